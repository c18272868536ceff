"""The HTTP protocol the service runs under uvicorn: its httptools protocol plus a bound on the
bytes and the time a client may spend sending a request's headers.

uvicorn bounds neither under httptools (``h11_max_incomplete_event_size`` applies to h11 alone,
and nothing limits the time to send headers), so one client could make the server buffer
hundreds of megabytes of header, or hold connections open forever by never finishing one.
Bodies are bounded per request by :class:`app.service.middleware.Admission`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from app.service.settings import Settings

__all__ = ["guarded_protocol", "server_options"]


class _GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Answers 431 once a request's headers exceed ``header_limit`` bytes, and 408 when they are
    not complete ``header_timeout`` seconds after the connection opened or the request began;
    either closes the connection."""

    header_limit = 64 * 1024
    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True  # the next bytes belong to a request's headers
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Still in the headers after feeding: everything counted so far was header bytes (the
        # parser resets the count when a request's headers complete within ``data``).
        if self._in_headers and self._header_bytes > self.header_limit:
            self._refuse(431, f"request headers over {self.header_limit} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        if self._header_timer is None:  # a keep-alive connection's next request
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._disarm_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_headers = True
        self._header_bytes = 0

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers and self._header_bytes:
            self._refuse(408, f"request headers not received within {self.header_timeout:g} s")
        elif not self.transport.is_closing():  # a connection that never sent anything
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and close, unless an earlier response on this connection is still
        being written (a pipelined request): then just close."""
        self._disarm_header_timer()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            body = message.encode("ascii")
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (status, _REASONS[status], len(body), body)
            )
        self.transport.close()


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def guarded_protocol(header_limit: int, header_timeout: float) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (``http=``), with these header bounds."""
    return type(
        "GuardedHttpToolsProtocol",
        (_GuardedHttpToolsProtocol,),
        {"header_limit": header_limit, "header_timeout": header_timeout},
    )


def server_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options every server process takes from the settings (``gsp serve``, each of
    ``--processes N``): the guarded protocol, and X-Forwarded-For / -Proto believed from the
    trusted proxies only (none by default)."""
    return {
        "http": guarded_protocol(settings.max_header_bytes, settings.header_timeout_s),
        "proxy_headers": True,
        "forwarded_allow_ips": [str(network) for network in settings.trusted_proxies],
    }
