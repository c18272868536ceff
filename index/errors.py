"""The gallery's error types, so callers can tell missing from corrupt or foreign."""

from __future__ import annotations

__all__ = [
    "GalleryCorruptError",
    "GalleryError",
    "GalleryFormatError",
    "GalleryLockedError",
    "GalleryMismatchError",
    "GalleryNotFoundError",
    "GalleryReadOnlyError",
    "InvalidItemError",
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


class GalleryFormatError(GalleryError):
    """The gallery's on-disk format is not one this code can open as asked.

    ``command`` is the exact command that makes it usable
    (``gsp index upgrade --gallery GALLERY``), or None when only a newer gsp-retrieval can read it.
    """

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command


class InvalidItemError(GalleryError, ValueError):
    """An item's label or metadata breaks the gallery's limits; nothing of the call was written.

    ``position`` is the item's place in the call and ``field`` is ``label`` or ``metadata``, so
    an API can answer 400 naming the offending input.
    """

    def __init__(self, position: int, field: str, reason: str) -> None:
        super().__init__(f"item {position}: {field} {reason}")
        self.position = position
        self.field = field
        self.reason = reason
