"""Pure ASGI middleware: request ids, a body-size guard, access logs and request metrics, and
a bound on the requests in progress.

Pure ASGI (not Starlette's ``BaseHTTPMiddleware``) so that responses are not re-streamed
through an extra task on every request.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.service.logging import ACCESS_LOGGER, access_record, request_id_from
from app.service.metrics import ServiceMetrics

__all__ = ["OPERATIONAL_PATHS", "AccessMiddleware", "InFlightLimit"]

# Probes and metrics: answered whatever the load, so that a busy server is not taken for a dead one.
OPERATIONAL_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_access_log = logging.getLogger(ACCESS_LOGGER)
_error_log = logging.getLogger("gsp.error")


class AccessMiddleware:
    """One JSON access-log line and one metrics observation per HTTP request.

    The request id (the client's ``X-Request-ID`` when sane, else a fresh one) is echoed in
    the response. Routes add per-stage timings to ``request.state.stages``. Bodies declared
    larger than ``body_limit`` are refused with 413 before anything is read.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics, body_limit: int) -> None:
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit

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
        status = 500
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

        length = headers.get(b"content-length", b"")
        try:
            if length.isdigit() and int(length) > self.body_limit:
                await _send_error(
                    send_with_id,
                    413,
                    "body_too_large",
                    f"request body over {self.body_limit} bytes",
                )
            else:
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


class InFlightLimit:
    """At most ``limit`` requests in progress; the next ones get 503 with ``Retry-After`` before
    their bodies are read.

    Under a flood the excess is then answered at once, instead of queueing until memory (each
    waiting request holds its upload) or the clients' patience runs out. ``OPERATIONAL_PATHS``
    are never refused. One event loop runs every request, so a plain counter is exact.
    """

    def __init__(self, app: ASGIApp, *, limit: int, metrics: ServiceMetrics) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, got {limit}")
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _app_path(scope) in OPERATIONAL_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await _send_error(
                send,
                503,
                "overloaded",
                f"the service is busy with {self.limit} requests (GSP_MAX_IN_FLIGHT); "
                "retry shortly",
                headers=[(b"retry-after", b"1")],
            )
            return
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()


def _app_path(scope: Scope) -> str:
    """The request path inside the application: behind a proxy's prefix (``--root-path``)
    servers put the prefix in front of ``path`` too."""
    path, prefix = scope.get("path", ""), scope.get("root_path", "")
    return path[len(prefix) :] if prefix and path.startswith(prefix) else path


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
