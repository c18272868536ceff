"""A follower process's gallery writes, forwarded to the leader process that owns the gallery.

With ``gsp serve --processes N`` every process accepts connections on the one port, but only
the leader opens the gallery for writing. A follower relays each write request (adding or
removing items, reloading the gallery) unchanged over the leader's private Unix socket and
answers with the leader's response, so clients never need to know which process they reached.
After a successful write the follower takes the write in before it answers (``after_write``),
so a client that wrote through a process reads its write back from it at once.

The relay speaks HTTP/1.1 with ``h11`` (uvicorn's own parser), one connection per write.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import h11
from starlette.types import ASGIApp, Receive, Scope, Send

from app.service.middleware import _send_error

__all__ = ["FORWARDED", "ForwardWrites", "is_gallery_write"]

_WRITES = (
    ("POST", re.compile(r"^/v1/gallery/?$")),
    ("DELETE", re.compile(r"^/v1/gallery/[^/]+$")),
    ("POST", re.compile(r"^/v1/admin/reload-gallery$")),
)
# Hop-by-hop headers, which describe the client's connection and not the request.
_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"host"})
_READ = 65536
_log = logging.getLogger("gsp.service")


@dataclass(frozen=True)
class _Route:
    path: str


FORWARDED = _Route("forwarded to the leader")


def is_gallery_write(method: str, path: str) -> bool:
    return any(method == wanted and pattern.match(path) for wanted, pattern in _WRITES)


class ForwardWrites:
    """Relay gallery writes to the leader at ``leader`` (a Unix socket path); everything else
    goes to ``app``. When the leader cannot be reached (restarting), the answer is 503 with
    ``Retry-After``; nothing was written."""

    def __init__(
        self, app: ASGIApp, *, leader: Path, after_write: Callable[[], Awaitable[None]]
    ) -> None:
        self.app = app
        self.leader = leader
        self.after_write = after_write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_gallery_write(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        scope["route"] = FORWARDED  # what access logs and metrics name it by
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.leader))
        except OSError as error:
            _log.warning("gallery write refused: the leader process is unreachable: %s", error)
            await _send_error(
                send,
                503,
                "leader_unavailable",
                "the process that writes the gallery is restarting; retry shortly",
                headers=[(b"retry-after", b"1")],
            )
            return
        try:
            status, headers, body = await _relay(scope, receive, reader, writer)
        except (OSError, h11.ProtocolError) as error:
            _log.error("gallery write forwarded to the leader failed: %s", error)
            await _send_error(
                send,
                502,
                "leader_failed",
                "the process that writes the gallery failed during this write; it may or may "
                "not have been applied (a repeated add is recognised as a duplicate)",
            )
            return
        finally:
            writer.close()
        if status < 400:
            await self.after_write()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _relay(
    scope: Scope, receive: Receive, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Send the request to the leader, streaming its body; return the leader's whole answer
    (write answers are small JSON documents)."""
    connection = h11.Connection(h11.CLIENT)
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
    body_known = any(k.lower() == b"content-length" for k, _ in headers)
    if not body_known:
        headers.append((b"transfer-encoding", b"chunked"))
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    request = h11.Request(
        method=scope["method"], target=target, headers=[(b"host", b"leader"), *headers]
    )
    writer.write(connection.send(request) or b"")
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("the client went away")
        chunk, more = message.get("body", b""), message.get("more_body", False)
        if chunk:
            writer.write(connection.send(h11.Data(data=chunk)) or b"")
            await writer.drain()
    writer.write(connection.send(h11.EndOfMessage()) or b"")
    await writer.drain()
    status, response_headers, parts = 502, [], []
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(_READ))
        elif isinstance(event, h11.Response):
            status = event.status_code
            response_headers = [(k, v) for k, v in event.headers if k.lower() not in _HOP]
        elif isinstance(event, h11.Data):
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    body = b"".join(parts)
    response_headers = [(k, v) for k, v in response_headers if k.lower() != b"content-length"]
    response_headers.append((b"content-length", str(len(body)).encode()))
    return status, response_headers, body
