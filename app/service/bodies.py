"""Reading a request body in full before the application sees the request: counted as it
streams (chunked or with a declared length), under a deadline, and held in memory only up to
:data:`MEMORY_BYTES` (the rest on an unnamed temporary file, which vanishes with the process
even after ``kill -9``).

The application then gets the body replayed, so that no request takes an in-flight slot while
a slow or stalled client is still sending it.
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import IO

from starlette.types import Message, Receive

__all__ = ["MEMORY_BYTES", "BodyTimeout", "BodyTooLarge", "ClientGone", "ReadBody", "read_body"]

MEMORY_BYTES = 1024 * 1024  # per request; beyond, the body goes to a temporary file
_REPLAY_PART = 256 * 1024


class BodyTooLarge(Exception):
    """The body passed the limit (the bytes past it were not kept)."""


class BodyTimeout(Exception):
    """The body was not complete by the deadline."""


class ClientGone(Exception):
    """The client disconnected before its body was complete."""


class ReadBody:
    """A complete request body, replayable once as ASGI ``http.request`` messages."""

    def __init__(self) -> None:
        self.size = 0
        self._tail: list[bytes] = []  # in memory, after what the file holds
        self._tail_size = 0
        self._file: IO[bytes] | None = None

    async def add(self, data: bytes) -> None:
        self.size += len(data)
        self._tail.append(data)
        self._tail_size += len(data)
        if self._tail_size >= MEMORY_BYTES:
            await asyncio.to_thread(self._spill)

    def _spill(self) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self._file.write(b"".join(self._tail))
        self._tail, self._tail_size = [], 0

    def replay(self, receive: Receive) -> Receive:
        """A ``receive`` giving this body, then what ``receive`` gives (the disconnect)."""
        done = False
        if self._file is not None:
            self._file.seek(0)

        async def replayed() -> Message:
            nonlocal done
            if done:
                return await receive()
            if self._file is not None:
                part = await asyncio.to_thread(self._file.read, _REPLAY_PART)
                if part:
                    return {"type": "http.request", "body": part, "more_body": True}
            done = True
            return {"type": "http.request", "body": b"".join(self._tail), "more_body": False}

        return replayed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tail = []


async def read_body(receive: Receive, *, limit: int, timeout: float) -> ReadBody:
    """The whole body from ``receive``; :class:`BodyTooLarge` once it passes ``limit`` bytes,
    :class:`BodyTimeout` when it is not complete ``timeout`` seconds from now,
    :class:`ClientGone` when the client leaves first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body = ReadBody()
    try:
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise BodyTimeout from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            data = message.get("body", b"")
            if body.size + len(data) > limit:
                raise BodyTooLarge
            if data:
                await body.add(data)
            if not message.get("more_body", False):
                return body
    except BaseException:
        body.close()
        raise
