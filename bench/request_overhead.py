"""What a search request costs the service outside the model, stage by stage.

The c=1 latency target compares the service with the model + search in process, so everything
else a request does is overhead: HTTP framework, form parsing, decoding, thread hand-offs,
response building, access log. This drives the real application in process through ASGI (no
sockets, no client) with the forward pass replaced by an instant answer (the micro-batcher and
its thread stay, so the embed stage is its hand-off alone), and prints per-request medians: the
whole request, ``/healthz`` through the same middleware, the route's own stages beside the same
work timed alone, and what is left for the framework.

    .venv/bin/python bench/request_overhead.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.service.dependencies import decode_upload
from app.service.main import create_app
from app.service.searching import search_gallery
from app.service.settings import Settings
from bench.service import build_assets, drawn, search_form
from bench.upload_decode import median_ms

Message = dict[str, object]


class AsgiClient:
    """Calls an ASGI app directly, the way a server would, and keeps each request's scope."""

    def __init__(self, app, lifespan_state: dict) -> None:
        self.app = app
        self.lifespan_state = lifespan_state

    async def call(self, method: str, path: str, body: bytes = b"", headers=()) -> dict:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"bench"), *headers],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": dict(self.lifespan_state),
        }
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        status: list[int] = []

        async def receive() -> Message:
            if pending:
                return pending.pop()
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))

        await self.app(scope, receive, send)
        if status != [200]:
            raise RuntimeError(f"{method} {path} answered {status}")
        return scope


def alone_ms(work, repeats: int) -> float:
    """Median time of ``work()`` called back to back on this thread, caches warm."""
    median_ms(work, 50)
    return median_ms(work, repeats)


async def measure(requests: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="gsp-overhead-"))
    # A small random-weight model: the forward pass is replaced below, only its outputs' shapes
    # and the gallery's search count.
    checkpoint, gallery_dir = build_assets(root, "resnet18", 96, gallery_size=16)
    settings = Settings(
        _env_file=None,
        checkpoint=checkpoint,
        gallery=gallery_dir,
        device="cpu",
        gallery_read_only=True,
    )
    app = create_app(settings)
    # The JSON access log is still formatted and written, as in production, but not shown.
    for handler in logging.getLogger("gsp").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - open for the process
    query = drawn(0, 96)
    buffer = io.BytesIO()
    query.save(buffer, format="PNG")
    png = buffer.getvalue()
    content_type, body = search_form(png)
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    lifespan_state: dict = {}
    async with app.router.lifespan_context(app) as state:
        lifespan_state.update(state or {})
        service = app.state.service
        answer = await service.engine.embed(service.engine.prepare(query))

        # The batcher and its thread stay; only the forward pass they run becomes instant.
        service.engine.batcher._process = lambda tensors: [answer] * len(tensors)
        client = AsgiClient(app, lifespan_state)
        totals, stages, probes = [], [], []
        for index in range(requests + 100):
            started = time.perf_counter()
            scope = await client.call("POST", "/v1/search", body, headers)
            elapsed = time.perf_counter() - started
            started = time.perf_counter()
            await client.call("GET", "/healthz")
            probe = time.perf_counter() - started
            if index >= 100:  # warm-up
                totals.append(elapsed)
                probes.append(probe)
                stages.append(dict(scope["state"]["stages"]))

        def decode_and_prepare() -> None:
            decoded = decode_upload(png, "image/png", service)
            service.engine.prepare(decoded.image)

        embedding = np.asarray(answer.embedding, dtype=np.float32)
        search = search_gallery(embedding, 10, None, None)
        gallery = service.store.gallery
        alone = {
            "decode": alone_ms(decode_and_prepare, requests),
            "embed": alone_ms(lambda: [answer], requests),
            "search": alone_ms(lambda: search(gallery), requests),
        }
    total = statistics.median(totals) * 1000.0
    names = ("decode", "embed", "search")
    route = {name: statistics.median(s[name] for s in stages) for name in names}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
    print(f"POST /v1/search, {len(png)} B PNG (96 px), k=10, heatmaps off, instant model;")
    print(f"medians of {requests} requests through ASGI in process (no sockets, no client)")
    print(f"  whole request      {total:6.3f} ms")
    probe = statistics.median(probes) * 1000.0
    print(f"  GET /healthz       {probe:6.3f} ms  (middleware, routing, access log)")
    print("  stage              in the route   alone   hand-off and the rest")
    for name, route_ms in route.items():
        print(f"  {name:<18} {route_ms:12.3f} {alone[name]:7.3f} {route_ms - alone[name]:9.3f}")
    rest = total - sum(route.values())
    print(f"  outside the stages {rest:6.3f} ms  (form parsing, dependencies, response, log)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import uvloop
    except ImportError:  # the default event loop, as uvicorn would use
        asyncio.run(measure(args.requests))
    else:
        uvloop.run(measure(args.requests))


if __name__ == "__main__":
    main()
