"""The gallery's error types, so callers can tell missing from corrupt or foreign."""

from __future__ import annotations

__all__ = [
    "GalleryCorruptError",
    "GalleryError",
    "GalleryLockedError",
    "GalleryMismatchError",
    "GalleryNotFoundError",
    "GalleryReadOnlyError",
]


class GalleryError(Exception):
    """Base class of every gallery failure."""


class GalleryNotFoundError(GalleryError):
    """The directory holds no gallery (no ``current`` snapshot pointer)."""


class GalleryCorruptError(GalleryError):
    """The gallery's files exist but cannot be read or disagree with each other."""


class GalleryMismatchError(GalleryError):
    """The gallery was built by a different model or preprocessing than the caller's."""


class GalleryLockedError(GalleryError):
    """Another process holds the gallery open for writing."""


class GalleryReadOnlyError(GalleryError):
    """A write was attempted on a gallery opened with ``read_only=True``."""
