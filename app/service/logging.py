"""Structured JSON access logs: one line per request, with its id and per-stage timings.

Only what is listed in :func:`access_record` is logged: never headers, bodies, query strings,
image bytes or API keys.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import Any

__all__ = ["ACCESS_LOGGER", "access_record", "configure_logging", "request_id_from"]

ACCESS_LOGGER = "gsp.access"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class JsonFormatter(logging.Formatter):
    """Render a record's ``fields`` (or its message) as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        else:
            payload["message"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            payload["error"] = record.exc_info[0].__name__
        return json.dumps(payload, separators=(",", ":"), default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Send the ``gsp`` loggers to stderr as JSON lines (idempotent)."""
    logger = logging.getLogger("gsp")
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID when it is a sane token, otherwise a fresh one."""
    if header and _REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


def access_record(
    *,
    request_id: str,
    method: str,
    route: str,
    path: str,
    status: int,
    duration_ms: float,
    stages: dict[str, float],
    client: str | None,
) -> dict[str, Any]:
    """The fields of one access-log line."""
    return {
        "event": "request",
        "request_id": request_id,
        "method": method,
        "route": route,
        "path": path,
        "status": status,
        "duration_ms": round(duration_ms, 3),
        "stages_ms": {name: round(value, 3) for name, value in stages.items()},
        "client": client,
    }
