"""The served gallery: one dedicated thread owns it; reload swaps in a freshly opened copy.

Every gallery operation of a request runs as one function on the gallery thread, so searches,
additions and removals never interleave and the SQLite/faiss objects are only ever touched by
the thread that opened them. A reload opens the new gallery completely on that thread, then
swaps the reference and closes the old one: requests before the swap finished on the old
gallery, requests after it see the new one, and none fails.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from app.service.inference import StartupError

if TYPE_CHECKING:
    from index.gallery import Gallery

__all__ = ["UPLOADS_DIR", "GalleryStore", "ReloadResult"]

T = TypeVar("T")
UPLOADS_DIR = "uploads"


@dataclass(frozen=True)
class ReloadResult:
    previous_count: int
    count: int


class GalleryStore:
    """Owns the current :class:`~index.gallery.Gallery` and the thread that uses it."""

    def __init__(
        self,
        directory: Path,
        *,
        model_fingerprint: str,
        preprocessing: dict[str, Any],
        image_roots: list[Path],
        read_only: bool = False,
    ) -> None:
        self.directory = directory
        self.read_only = read_only
        self._fingerprint = model_fingerprint
        self._preprocessing = preprocessing
        self._image_roots = list(image_roots)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gsp-gallery")
        self._gallery: Gallery = self._executor.submit(self._open).result()
        self.on_change: Callable[[Gallery], None] | None = None

    def _open(self) -> Gallery:
        from index.errors import GalleryError

        try:
            return self._open_raw()
        except GalleryError as error:
            raise StartupError(f"cannot open gallery {self.directory}: {error}") from error

    def _open_raw(self) -> Gallery:
        from index.gallery import Gallery

        if not self.directory.is_dir():
            raise StartupError(f"gallery directory not found: {self.directory}")
        return Gallery.open(
            self.directory,
            expected_fingerprint=self._fingerprint,
            expected_preprocessing=self._preprocessing,
            read_only=self.read_only,
        )

    def _probe_read_only(self) -> None:
        from index.errors import GalleryError
        from index.gallery import Gallery

        try:
            Gallery.open(
                self.directory,
                expected_fingerprint=self._fingerprint,
                expected_preprocessing=self._preprocessing,
                read_only=True,
            ).close()
        except GalleryError as error:
            raise StartupError(f"cannot open gallery {self.directory}: {error}") from error

    @property
    def gallery(self) -> Gallery:
        """The current gallery; use it only inside :meth:`run` functions."""
        return self._gallery

    def call(self, function: Callable[[Gallery], T]) -> T:
        """Like :meth:`run`, for code outside the event loop (startup)."""
        return self._executor.submit(lambda: function(self._gallery)).result()

    async def run(self, function: Callable[[Gallery], T]) -> T:
        """Run ``function(gallery)`` on the gallery thread and return its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(self._gallery))

    def _reload(self) -> ReloadResult:
        from index.errors import GalleryLockedError

        old = self._gallery
        previous = len(old)
        try:
            fresh = self._open()
        except StartupError as error:
            if not isinstance(error.__cause__, GalleryLockedError):
                raise
            # The served path still resolves to the directory whose writer lock we hold (it
            # was rebuilt in place). Validate it completely through a read-only open first;
            # only then release the old gallery and re-open for writing. Requests wait behind
            # this call on the gallery thread, so the swap is still atomic for them.
            self._probe_read_only()
            old.close()
            fresh = self._open()
        else:
            old.close()
        self._gallery = fresh
        if self.on_change is not None:
            self.on_change(fresh)
        return ReloadResult(previous_count=previous, count=len(fresh))

    async def reload(self) -> ReloadResult:
        """Open the gallery directory again (rebuilt offline) and swap it in atomically."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._reload)

    def close(self) -> None:
        self._executor.submit(self._gallery.close).result()
        self._executor.shutdown(wait=True)

    # -- files -------------------------------------------------------------------------------

    def uploads_directory(self) -> Path:
        return self.directory / UPLOADS_DIR

    def store_upload(self, data: bytes, sha256: str, extension: str) -> str:
        """Write an uploaded image as ``uploads/<sha256>.<ext>``; returns the source to record."""
        uploads = self.uploads_directory()
        uploads.mkdir(exist_ok=True)
        name = f"{sha256}.{extension}"
        target = uploads / name
        if not target.exists():
            partial = uploads / f".{name}.{os.getpid()}.partial"
            partial.write_bytes(data)
            os.replace(partial, target)
        return f"{UPLOADS_DIR}/{name}"

    def resolve_source(self, source: str) -> Path | None:
        """The real file behind an item's source, or None when it lies outside the allowed roots.

        Relative sources are relative to the gallery directory. Symlinks are followed before
        the check, so a link pointing out of the roots is refused.
        """
        path = Path(source)
        if not path.is_absolute():
            path = self.directory / path
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not real.is_file():
            return None
        for root in (self.directory, *self._image_roots):
            try:
                real.relative_to(root.resolve())
            except (OSError, ValueError):
                continue
            return real
        return None

    def discard_upload(self, source: str) -> None:
        """Delete a file under ``uploads/`` that no item references any more."""
        path = self.resolve_source(source)
        if path is not None and path.parent == self.uploads_directory().resolve():
            path.unlink(missing_ok=True)
