"""Pure ASGI middleware: request ids, access logs and request metrics; admission (bodies read
in full under a size limit and a deadline, then a bound on the requests in progress); a bound
on each client's requests.

Pure ASGI (not Starlette's ``BaseHTTPMiddleware``) so that responses are not re-streamed
through an extra task on every request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.service.bodies import BodyTimeout, BodyTooLarge, ClientGone, read_body
from app.service.logging import ACCESS_LOGGER, access_record, request_id_from
from app.service.metrics import ServiceMetrics

__all__ = ["OPERATIONAL_PATHS", "AccessMiddleware", "Admission", "ClientLimit"]

# Probes and metrics: answered whatever the load, so that a busy server is not taken for a dead one.
OPERATIONAL_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_access_log = logging.getLogger(ACCESS_LOGGER)
_error_log = logging.getLogger("gsp.error")


class AccessMiddleware:
    """One JSON access-log line and one metrics observation per HTTP request.

    The request id (the client's ``X-Request-ID`` when sane, else a fresh one) is echoed in
    the response. Routes add per-stage timings to ``request.state.stages``.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = request_id_from(headers.get(b"x-request-id", b"").decode("latin-1"))
        stages: dict[str, float] = {}
        scope.setdefault("state", {})
        scope["state"]["stages"] = stages
        scope["state"]["request_id"] = request_id
        status = 499  # logged when no response starts: the client left before its body was in
        sent_start = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent_start
            if message["type"] == "http.response.start":
                status = message["status"]
                sent_start = True
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            _error_log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if not sent_start:
                await _send_error(
                    send_with_id, 500, "internal_error", f"internal error (request {request_id})"
                )
        finally:
            self._record(scope, request_id, status, time.perf_counter() - started, stages)

    def _record(
        self, scope: Scope, request_id: str, status: int, seconds: float, stages: dict[str, float]
    ) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        method = scope.get("method", "")
        self.metrics.observe_request(method, route, status, seconds)
        for stage, ms in stages.items():
            self.metrics.stage.labels(stage).observe(ms / 1000.0)
        client = scope.get("client")
        fields = access_record(
            request_id=request_id,
            method=method,
            route=route,
            path=scope.get("path", ""),
            status=status,
            duration_ms=seconds * 1000.0,
            stages=stages,
            client=client[0] if client else None,
        )
        _access_log.info("request", extra={"fields": fields})


class Admission:
    """Admits a request to the application only once its whole body is in, and then only while
    fewer than ``limit`` requests are in progress.

    The body is read first (:func:`app.service.bodies.read_body`): at most ``body_limit(scope)``
    bytes (413, also at once for a larger declared length) within ``body_timeout`` seconds (408).
    A slow or stalled upload therefore holds no in-flight slot, and its refusal closes the
    connection. Beyond the limit requests get 503 with ``Retry-After``: at once, before their
    bodies are read, when the service is already full on arrival. ``OPERATIONAL_PATHS`` pass
    untouched. One event loop runs every request, so plain counters are exact.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int,
        metrics: ServiceMetrics,
        body_limit: Callable[[Scope], int],
        body_timeout: float,
    ) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, got {limit}")
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.body_limit = body_limit
        self.body_timeout = body_timeout
        self.in_flight = 0
        metrics.in_flight_limit.set(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _app_path(scope) in OPERATIONAL_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await self._overloaded(send, close=True)
            return
        limit = self.body_limit(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _body_too_large(send, limit)
            return
        self.metrics.reading_bodies.inc()
        try:
            body = await read_body(receive, limit=limit, timeout=self.body_timeout)
        except BodyTooLarge:
            await _body_too_large(send, limit)
            return
        except BodyTimeout:
            await _send_error(
                send,
                408,
                "body_timeout",
                f"the request body did not arrive within {self.body_timeout:g} s "
                "(GSP_BODY_TIMEOUT_S)",
                headers=[_CLOSE],
            )
            return
        except ClientGone:
            return
        finally:
            self.metrics.reading_bodies.dec()
        try:
            if self.in_flight >= self.limit:
                await self._overloaded(send, close=False)
                return
            self._count(+1)
            try:
                await self.app(scope, body.replay(receive), send)
            finally:
                self._count(-1)
        finally:
            body.close()

    def _count(self, change: int) -> None:
        self.in_flight += change
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.saturated.set(self.in_flight >= self.limit)

    async def _overloaded(self, send: Send, *, close: bool) -> None:
        """503; ``close`` when the request's body was left unread, so the connection goes."""
        await _send_error(
            send,
            503,
            "overloaded",
            f"the service is busy with {self.limit} requests (GSP_MAX_IN_FLIGHT); retry shortly",
            headers=[(b"retry-after", b"1"), *([_CLOSE] if close else [])],
        )


class ClientLimit:
    """At most ``limit`` requests of one client in progress, bodies still arriving included;
    the next ones get 429 with ``Retry-After``.

    ``identify`` names the client (its key, else its address), so that one client, stalled or
    busy, cannot take every in-flight slot from the others. ``OPERATIONAL_PATHS`` pass.
    """

    def __init__(self, app: ASGIApp, *, limit: int, identify: Callable[[Scope], str]) -> None:
        if limit < 1:
            raise ValueError(f"the per-client limit must be at least 1, got {limit}")
        self.app = app
        self.limit = limit
        self.identify = identify
        self.open: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _app_path(scope) in OPERATIONAL_PATHS:
            await self.app(scope, receive, send)
            return
        client = self.identify(scope)
        count = self.open.get(client, 0)
        if count >= self.limit:
            await _send_error(
                send,
                429,
                "too_many_requests",
                f"this client already has {self.limit} requests in progress "
                "(GSP_MAX_IN_FLIGHT_PER_CLIENT); retry when one is answered",
                headers=[(b"retry-after", b"1"), _CLOSE],
            )
            return
        self.open[client] = count + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self.open[client] - 1
            if left:
                self.open[client] = left
            else:
                del self.open[client]


def _app_path(scope: Scope) -> str:
    """The request path inside the application: behind a proxy's prefix (``--root-path``)
    servers put the prefix in front of ``path`` too."""
    path, prefix = scope.get("path", ""), scope.get("root_path", "")
    return path[len(prefix) :] if prefix and path.startswith(prefix) else path


_CLOSE = (b"connection", b"close")


async def _body_too_large(send: Send, limit: int) -> None:
    await _send_error(
        send, 413, "body_too_large", f"request body over {limit} bytes", headers=[_CLOSE]
    )


async def _send_error(
    send: Send,
    status: int,
    code: str,
    detail: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"detail": detail, "code": code}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
