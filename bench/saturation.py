"""How fast a saturated service says no: 503 latency beside served-search latency, one run.

Starts ``gsp serve`` with a small in-flight limit (``GSP_MAX_IN_FLIGHT``, default 4), opens twice
that many uploads that send a few bytes and stall (they must hold no slot), then drives
searches at a concurrency far above the limit (one request per connection, as clients that
are refused and retry do) while polling ``/readyz`` and ``/metrics``. Prints the count and
p50/p95/p99 latency of the 200s and of the 503s, and whether readiness stayed up.

Targets: the stalled uploads block no search (200s are served); 503s come without queueing,
p95 under 1 s (issue 20 measured 8.5 s), printed beside the served searches' p50; ``/readyz``
200 throughout. The throwaway checkpoint is a random-weight resnet18 at 64 px over a small
drawn gallery.

    .venv/bin/python bench/saturation.py [--limit 4] [--concurrency 64] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.service import build_assets, drawn, search_request, start_server, stop_server


def stalled_upload(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/search HTTP/1.1\r\nHost: bench\r\nContent-Length: 100000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
    )
    return sock


async def one_request(host: str, port: int, request: bytes) -> tuple[int, float]:
    """One request on its own connection: its status and milliseconds to the status line."""
    begin = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        elapsed = (time.perf_counter() - begin) * 1000.0
        await reader.read()  # to the end: the request asks the server to close
        return status, elapsed
    finally:
        writer.close()


async def drive(url: str, request: bytes, concurrency: int, seconds: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    latencies: dict[int, list[float]] = {}
    failures = 0
    deadline = time.perf_counter() + seconds
    probes = {"ready": 0, "not_ready": 0, "saturated_seen": False}

    async def worker() -> None:
        nonlocal failures
        while time.perf_counter() < deadline:
            try:
                status, ms = await one_request(host, int(port), request)
            except (OSError, ValueError, IndexError):
                failures += 1
                continue
            latencies.setdefault(status, []).append(ms)

    async def prober() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while time.perf_counter() < deadline:
                ready = await client.get("/readyz")
                probes["ready" if ready.status_code == 200 else "not_ready"] += 1
                if "gsp_http_saturated 1.0" in (await client.get("/metrics")).text:
                    probes["saturated_seen"] = True
                await asyncio.sleep(0.2)

    await asyncio.gather(prober(), *(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "failures": failures, **probes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=4, help="GSP_MAX_IN_FLIGHT")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; commit {commit}")  # fmt: skip
    os.environ.update(
        {"GSP_MAX_IN_FLIGHT": str(args.limit), "GSP_BODY_TIMEOUT_S": str(args.seconds + 30)}
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        checkpoint, gallery = build_assets(root, "resnet18", 64, 200)
        process, url, _ = start_server(checkpoint, gallery, "cpu", True, root)
        try:
            stalled = [stalled_upload(url) for _ in range(2 * args.limit)]
            buffer = io.BytesIO()
            drawn(7, 96).save(buffer, format="PNG")
            request = search_request(url, buffer.getvalue(), "saturation")
            request = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            result = asyncio.run(drive(url, request, args.concurrency, args.seconds))
            for sock in stalled:
                sock.close()
        finally:
            stop_server(process)
    print(f"limit {args.limit}, {2 * args.limit} stalled uploads, concurrency "
          f"{args.concurrency}, {args.seconds:g} s")  # fmt: skip
    print("| status | count | p50 ms | p95 ms | p99 ms |\n| --- | --- | --- | --- | --- |")
    for status, values in sorted(result["latencies"].items()):
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        print(f"| {status} | {len(values)} | {p50:.1f} | {p95:.1f} | {p99:.1f} |")
    print(f"connection failures {result['failures']}; /readyz 200 {result['ready']} times, "
          f"other {result['not_ready']}; saturation seen in /metrics: "
          f"{result['saturated_seen']}")  # fmt: skip
    served, refused = result["latencies"].get(200, []), result["latencies"].get(503, [])
    refused_p95 = float(np.percentile(refused, 95)) if refused else 0.0
    if served and refused:
        print(f"503 p95 / 200 p50: {refused_p95 / np.percentile(served, 50):.3f}")
    met = bool(served) and refused_p95 < 1000.0 and not result["not_ready"]
    print(f"searches served despite the stalls, 503 p95 < 1 s, readiness up: "
          f"{'met' if met else 'missed'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
