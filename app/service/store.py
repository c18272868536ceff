"""The served gallery: one dedicated thread owns it; reload swaps in a freshly opened copy.

Every gallery operation of a request runs as one function on the gallery thread, so searches,
additions and removals never interleave and the SQLite/faiss objects are only ever touched by
the thread that opened them. A reload opens the new gallery completely on that thread, then
swaps the reference and closes the old one: requests before the swap finished on the old
gallery, requests after it see the new one, and none fails.

Snapshots are coalesced. Every write is a committed SQLite transaction before the API answers,
and opening a gallery re-syncs its index from the database, so an acknowledged write survives a
crash without a snapshot. Rewriting the whole faiss index after each write would cost seconds on
a large gallery; instead a ``save()`` from request code only marks the gallery dirty, and the
store writes the snapshot after ``save_every`` such writes, ``save_interval`` seconds after the
first unsaved one, before a reload and on shutdown. An unsaved tail only lengthens the next
open's re-sync.

A read-only store may follow a writer in another process (``follow_interval``): a thread looks
that often at the gallery, has the gallery thread take in newly committed items
(:meth:`~index.gallery.Gallery.refresh`), and when the files were replaced (a new snapshot, a
rebuild, a new publication of :mod:`index.publish`) opens the gallery again off the gallery
thread and swaps it in there, as a reload does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from app.service.inference import StartupError

if TYPE_CHECKING:
    from index.gallery import Gallery

__all__ = ["SAVE_EVERY", "SAVE_INTERVAL_S", "UPLOADS_DIR", "GalleryStore", "ReloadResult"]

T = TypeVar("T")
UPLOADS_DIR = "uploads"
SAVE_EVERY = 100
SAVE_INTERVAL_S = 60.0
_log = logging.getLogger("gsp.service")


@dataclass(frozen=True)
class ReloadResult:
    previous_count: int
    count: int


class _CoalescedSaves:
    """The gallery as request functions see it: everything is the current gallery's, except
    that ``save()`` asks the store for a snapshot instead of writing one at once."""

    def __init__(self, store: GalleryStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store.gallery, name)

    def __len__(self) -> int:
        return len(self._store.gallery)

    def save(self) -> None:
        self._store._request_save()


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
        save_every: int = SAVE_EVERY,
        save_interval: float = SAVE_INTERVAL_S,
        follow_interval: float = 0.0,
    ) -> None:
        if save_every < 1 or save_interval <= 0:
            raise ValueError(
                f"save_every must be >= 1 and save_interval > 0, got {save_every}, {save_interval}"
            )
        self.directory = directory
        self.read_only = read_only
        self.save_every = save_every
        self.save_interval = save_interval
        self.unsaved_writes = 0
        self._timer: threading.Timer | None = None
        # The proxy forwards every attribute but ``save`` to the gallery: callers see a Gallery.
        self._view = cast("Gallery", _CoalescedSaves(self))
        self._fingerprint = model_fingerprint
        self._preprocessing = preprocessing
        self._image_roots = list(image_roots)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gsp-gallery")
        self._opened_state: object = None
        self._gallery: Gallery = self._executor.submit(self._open).result()
        self.on_change: Callable[[Gallery], None] | None = None
        self._stopped = threading.Event()
        self._follower: threading.Thread | None = None
        if read_only and follow_interval > 0:
            self._follower = threading.Thread(
                target=self._follow, args=(follow_interval,), name="gsp-follow", daemon=True
            )
            self._follower.start()

    def _open(self) -> Gallery:
        from index.errors import GalleryError

        try:
            gallery = self._open_raw()
        except GalleryError as error:
            raise StartupError(f"cannot open gallery {self.directory}: {error}") from error
        removed = self.remove_orphan_uploads(gallery)
        if removed:
            _log.info("removed %d upload files that no gallery item references", removed)
        return gallery

    def _open_raw(self) -> Gallery:
        from index.gallery import Gallery, disk_state
        from index.publish import published_gallery

        if not self.directory.is_dir():
            raise StartupError(f"gallery directory not found: {self.directory}")
        published = published_gallery(self.directory) if self.read_only else None
        directory = published or self.directory
        state = disk_state(directory)  # before opening: a change meanwhile is seen next time
        gallery = Gallery.open(
            directory,
            expected_fingerprint=self._fingerprint,
            expected_preprocessing=self._preprocessing,
            read_only=self.read_only,
            immutable=published is not None,
        )
        self._opened_state = state
        return gallery

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
        return self._executor.submit(lambda: function(self._view)).result()

    async def run(self, function: Callable[[Gallery], T]) -> T:
        """Run ``function(gallery)`` on the gallery thread and return its result.

        The gallery's ``save()`` there is coalesced (see the module docstring).
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(self._view))

    def _request_save(self) -> None:
        """On the gallery thread: count a write, snapshot when enough are pending."""
        self.unsaved_writes += 1
        if self.unsaved_writes >= self.save_every:
            self._flush()
        elif self._timer is None:
            self._timer = threading.Timer(self.save_interval, self._flush_from_timer)
            self._timer.daemon = True
            self._timer.start()

    def _flush_from_timer(self) -> None:
        with contextlib.suppress(RuntimeError):  # shut down meanwhile; close() has flushed
            self._executor.submit(self._flush)

    def _flush(self) -> None:
        """On the gallery thread: write a snapshot if writes are pending."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.unsaved_writes or self._gallery.read_only:
            return
        started = time.perf_counter()
        try:
            self._gallery.save()
        except OSError as error:  # the database still holds every write; retry next time
            _log.error("gallery snapshot failed (writes are safe in the database): %s", error)
            return
        _log.info(
            "gallery snapshot after %d writes in %.2f s",
            self.unsaved_writes,
            time.perf_counter() - started,
        )
        self.unsaved_writes = 0

    def _follow(self, interval: float) -> None:
        """The follower thread: :meth:`_follow_once` every ``interval`` seconds until closed."""
        last_error = ""
        while not self._stopped.wait(interval):
            try:
                self._follow_once()
            except Exception as error:  # keep serving what is open; say why once
                if str(error) != last_error:
                    _log.warning("following gallery %s: %s", self.directory, error)
                last_error = str(error)
            else:
                last_error = ""

    def _follow_once(self) -> None:
        from index.gallery import disk_state
        from index.publish import published_gallery

        directory = published_gallery(self.directory) or self.directory
        if disk_state(directory) == self._opened_state:
            self._executor.submit(self._refresh).result()
            return
        fresh = self._open()  # on this thread: searches go on meanwhile

        def swap() -> None:
            old, self._gallery = self._gallery, fresh
            old.close()
            if self.on_change is not None:
                self.on_change(fresh)

        self._executor.submit(swap).result()

    def _refresh(self) -> None:
        """On the gallery thread: take in other processes' committed writes."""
        if self._gallery.refresh() and self.on_change is not None:
            self.on_change(self._gallery)

    async def refresh(self) -> None:
        """Take in other processes' committed writes now (a follower's read-your-writes)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._refresh)

    def flush(self) -> None:
        """Write a snapshot now if any write is not in one yet."""
        self._executor.submit(self._flush).result()

    def _reload(self) -> ReloadResult:
        from index.errors import GalleryLockedError

        old = self._gallery
        previous = len(old)
        self._flush()
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
        """Snapshot pending writes, then release the gallery and its thread."""

        self._stopped.set()
        if self._follower is not None:
            self._follower.join(timeout=30)

        def finish() -> None:
            self._flush()
            self._gallery.close()

        self._executor.submit(finish).result()
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

    def public_source(self, source: str) -> str:
        """An item's source as the API shows it, never an absolute server path: relative to
        the gallery directory, ``<root name>/<relative path>`` under an ``image_roots``
        folder, else the file name alone. Purely textual: no file is touched."""
        path = Path(source)
        if not path.is_absolute():
            return source
        for root, prefix in ((self.directory, None), *((r, r.name) for r in self._image_roots)):
            try:
                relative = path.relative_to(root).as_posix()
            except ValueError:
                continue
            return f"{prefix}/{relative}" if prefix else relative
        return path.name

    def resolve_source(self, source: str) -> Path | None:
        """The real file behind an item's source, or None when it lies outside the allowed roots.

        Relative sources are relative to the gallery directory. Symlinks are followed before
        the check, so a link pointing out of the roots is refused.
        """
        served = self._gallery.directory  # a publication's current version, else directory
        path = Path(source)
        if not path.is_absolute():
            path = served / path
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not real.is_file():
            return None
        for root in (served, *self._image_roots):
            try:
                real.relative_to(root.resolve())
            except (OSError, ValueError):
                continue
            return real
        return None

    def discard_unreferenced(self, gallery: Gallery, sources: list[str]) -> None:
        """On the gallery thread: delete the upload files among ``sources`` that no item
        references (a failed add's files; another request may have added the same image)."""
        known = gallery.known_sha256()
        for source in sources:
            if Path(source).stem not in known:
                self.discard_upload(source)

    def remove_orphan_uploads(self, gallery: Gallery) -> int:
        """On the gallery thread, at open: delete partial writes and upload files no item
        references, left by a process killed between writing a file and committing its item.
        Returns how many were deleted."""
        uploads = self.uploads_directory()
        if self.read_only or not uploads.is_dir():
            return 0
        known = gallery.known_sha256()
        removed = 0
        for path in uploads.iterdir():
            partial = path.name.startswith(".") and path.name.endswith(".partial")
            if path.is_file() and (partial or path.stem not in known):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def discard_upload(self, source: str) -> None:
        """Delete a file under ``uploads/`` that no item references any more."""
        path = self.resolve_source(source)
        if path is not None and path.parent == self.uploads_directory().resolve():
            path.unlink(missing_ok=True)
