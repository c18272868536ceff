"""Admission and the per-client limit at the ASGI level: bodies read in full (size limit,
deadline) before a request takes an in-flight slot, refusals, and the paths never refused."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from app.service.bodies import MEMORY_BYTES
from app.service.dependencies import client_identity
from app.service.metrics import ServiceMetrics
from app.service.middleware import Admission, ClientLimit
from app.service.settings import Settings


class HeldApp:
    """An ASGI app that reads its body, then stays in progress until ``release`` is set and
    answers with the body's size and SHA-256."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope, receive, send) -> None:
        digest, size, more = hashlib.sha256(), 0, True
        while more:
            message = await receive()
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        self.entered += 1
        await self.release.wait()
        body = json.dumps({"size": size, "sha256": digest.hexdigest()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def receiver(chunks: list[bytes], stall: bool = False):
    """A ``receive`` giving ``chunks`` (the last one ends the body unless ``stall``), then
    waiting forever: a client that stopped sending, or one waiting for its answer."""
    pending = list(chunks)

    async def receive() -> dict:
        if pending:
            data = pending.pop(0)
            return {"type": "http.request", "body": data, "more_body": bool(pending) or stall}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


async def call(
    app, path: str, root_path: str = "", chunks: list[bytes] | None = None, **options
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through ``app``: status, headers and body of the answer."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    headers = options.pop("headers", [])
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": root_path,
        "headers": headers,
        "client": options.pop("client", ("127.0.0.1", 5000)),
    }
    await app(scope, receiver(chunks or [b""], **options), send)
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


def gauge(metrics: ServiceMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def admission(inner, metrics: ServiceMetrics, limit: int = 2, **options) -> Admission:
    options = {"body_limit": lambda scope: 10 * MEMORY_BYTES, "body_timeout": 5.0, **options}
    return Admission(inner, limit=limit, metrics=metrics, **options)


async def settle(condition) -> None:
    while not condition():
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("root_path", ["", "/gsp"])
def test_requests_over_the_limit_are_refused_and_probes_never(root_path: str) -> None:
    async def scenario() -> None:
        inner, metrics = HeldApp(), ServiceMetrics()
        limited = admission(inner, metrics)
        held = [
            asyncio.create_task(call(limited, f"{root_path}{path}", root_path))
            for path in ("/v1/search", "/")
        ]
        await settle(lambda: inner.entered == 2)
        assert gauge(metrics, "gsp_http_saturated") == 1
        status, headers, body = await call(limited, f"{root_path}/v1/search", root_path)
        assert (status, headers[b"retry-after"]) == (503, b"1")
        assert json.loads(body)["code"] == "overloaded"
        assert gauge(metrics, "gsp_http_requests_in_flight") == 2
        probes = [
            asyncio.create_task(call(limited, f"{root_path}{path}", root_path))
            for path in ("/healthz", "/readyz", "/metrics")
        ]
        await settle(lambda: inner.entered == 5)  # the probes went through, past the full limit
        inner.release.set()
        assert [(await task)[0] for task in held + probes] == [200] * 5
        assert limited.in_flight == 0 and gauge(metrics, "gsp_http_requests_in_flight") == 0
        assert gauge(metrics, "gsp_http_saturated") == 0
        assert (await call(limited, f"{root_path}/v1/search", root_path))[0] == 200

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_stalled_bodies_hold_no_slot_and_are_cut_with_408() -> None:
    async def scenario() -> None:
        inner, metrics = HeldApp(), ServiceMetrics()
        inner.release.set()
        limited = admission(inner, metrics, limit=1, body_timeout=0.2)
        stalled = [
            asyncio.create_task(call(limited, "/v1/search", chunks=[b"--boundary"], stall=True))
            for _ in range(4)
        ]
        await settle(lambda: gauge(metrics, "gsp_http_requests_reading_body") == 4)
        assert limited.in_flight == 0
        status, _, body = await call(limited, "/v1/search", chunks=[b"a" * 100])
        assert (status, json.loads(body)["size"]) == (200, 100)
        for task in stalled:
            status, headers, body = await task
            assert (status, headers[b"connection"]) == (408, b"close")
            assert json.loads(body)["code"] == "body_timeout"
        assert inner.entered == 1 and limited.in_flight == 0
        assert gauge(metrics, "gsp_http_requests_reading_body") == 0

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_bodies_are_counted_as_they_stream() -> None:
    async def scenario() -> None:
        inner, metrics = HeldApp(), ServiceMetrics()
        inner.release.set()
        limited = admission(inner, metrics, body_limit=lambda scope: 1000)
        # chunked: no declared length; refused at the chunk that passes the limit
        status, headers, body = await call(limited, "/v1/search", chunks=[b"a" * 600] * 2)
        assert (status, headers[b"connection"]) == (413, b"close")
        assert json.loads(body)["code"] == "body_too_large"
        # a declared length over the limit: refused before anything is read
        declared = [(b"content-length", b"1001")]
        status, _, _ = await call(limited, "/v1/search", headers=declared, chunks=[], stall=True)
        assert status == 413
        assert inner.entered == 0
        assert (await call(limited, "/v1/search", chunks=[b"a" * 500] * 2))[0] == 200

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_body_beyond_memory_reaches_the_app_intact() -> None:
    async def scenario() -> None:
        inner, metrics = HeldApp(), ServiceMetrics()
        inner.release.set()
        chunks = [bytes([n]) * (MEMORY_BYTES // 3 + n) for n in range(10)]  # spills to a file
        status, _, body = await call(admission(inner, metrics), "/v1/search", chunks=chunks)
        whole = b"".join(chunks)
        assert status == 200
        assert json.loads(body) == {"size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_the_per_client_limit_counts_each_client_apart() -> None:
    async def scenario() -> None:
        inner = HeldApp()
        limited = ClientLimit(
            admission(inner, ServiceMetrics(), limit=10),
            limit=2,
            identify=lambda scope: scope["client"][0],
        )
        held = [
            asyncio.create_task(call(limited, "/v1/search", chunks=[b"x"], stall=stall))
            for stall in (True, False)  # one still sending its body, one in progress
        ]
        await settle(lambda: inner.entered == 1)
        status, headers, body = await call(limited, "/v1/search")
        assert (status, headers[b"retry-after"]) == (429, b"1")
        assert json.loads(body)["code"] == "too_many_requests"
        other = asyncio.create_task(call(limited, "/v1/search", client=("10.0.0.2", 1)))
        probe = asyncio.create_task(call(limited, "/healthz"))
        await settle(lambda: inner.entered == 3)
        inner.release.set()
        assert [(await task)[0] for task in (held[1], other, probe)] == [200] * 3
        held[0].cancel()
        await asyncio.gather(held[0], return_exceptions=True)
        assert limited.open == {}

    asyncio.run(asyncio.wait_for(scenario(), 10))


@pytest.mark.parametrize("middleware", [Admission, ClientLimit])
def test_the_limits_must_admit_a_request(middleware) -> None:
    options = (
        {"metrics": ServiceMetrics(), "body_limit": lambda scope: 1, "body_timeout": 1.0}
        if middleware is Admission
        else {"identify": lambda scope: ""}
    )
    with pytest.raises(ValueError, match="at least 1"):
        middleware(HeldApp(), limit=0, **options)


def test_clients_are_named_by_a_valid_key_else_by_address(tmp_path) -> None:
    settings = Settings(
        _env_file=None,
        checkpoint=tmp_path,
        gallery=tmp_path,
        api_keys=["write-1"],
        read_keys=["read-1", "read-2"],
    )
    identify = client_identity(settings)

    def named(headers: list[tuple[bytes, bytes]], address: str = "10.0.0.1") -> str:
        return identify({"type": "http", "headers": headers, "client": (address, 1)})

    by_key = {named([(b"x-api-key", key)]) for key in (b"write-1", b"read-1", b"read-2")} | {
        named([(b"cookie", b"gsp_key=read-1")], "10.0.0.2")
    }
    assert len(by_key) == 3  # one name per key, the cookie's the same as the header's
    assert named([(b"x-api-key", b"read-1")]) == named([(b"x-api-key", b"read-1")], "10.0.0.9")
    # an invalid key is no identity: clients cannot dodge their limit by inventing keys
    assert named([(b"x-api-key", b"made-up")]) == named([]) != named([], "10.0.0.2")
