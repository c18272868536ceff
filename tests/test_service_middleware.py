"""The in-flight limit at the ASGI level: counting, refusals, and the paths it never refuses."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.service.metrics import ServiceMetrics
from app.service.middleware import InFlightLimit


class HeldApp:
    """An ASGI app whose requests stay in progress until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope, receive, send) -> None:
        self.entered += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app, path: str, root_path: str = "") -> tuple[int, dict[bytes, bytes], bytes]:
    """One GET through ``app``: status, headers and body."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path}
    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


def in_flight(metrics: ServiceMetrics) -> float | None:
    return metrics.registry.get_sample_value("gsp_http_requests_in_flight")


@pytest.mark.parametrize("root_path", ["", "/gsp"])
def test_requests_over_the_limit_are_refused_and_probes_never(root_path: str) -> None:
    async def scenario() -> None:
        inner, metrics = HeldApp(), ServiceMetrics()
        limited = InFlightLimit(inner, limit=2, metrics=metrics)
        held = [
            asyncio.create_task(call(limited, f"{root_path}{path}", root_path))
            for path in ("/v1/search", "/")
        ]
        while inner.entered < 2:
            await asyncio.sleep(0)
        status, headers, body = await call(limited, f"{root_path}/v1/search", root_path)
        assert (status, headers[b"retry-after"]) == (503, b"1")
        assert json.loads(body)["code"] == "overloaded"
        assert in_flight(metrics) == 2
        probes = [
            asyncio.create_task(call(limited, f"{root_path}{path}", root_path))
            for path in ("/healthz", "/readyz", "/metrics")
        ]
        while inner.entered < 5:  # the probes went through, past the full limit
            await asyncio.sleep(0)
        inner.release.set()
        assert [(await task)[0] for task in held + probes] == [200] * 5
        assert limited.in_flight == 0 and in_flight(metrics) == 0
        assert (await call(limited, f"{root_path}/v1/search", root_path))[0] == 200

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_the_limit_must_admit_a_request() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        InFlightLimit(HeldApp(), limit=0, metrics=ServiceMetrics())
