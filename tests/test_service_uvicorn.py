"""The real server: ``gsp serve`` under uvicorn on a loopback port, spoken to over HTTP.

Also checks that SIGHUP swaps in a rebuilt gallery while requests keep succeeding.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.test_service_support import (
    API_KEY,
    ServiceAssets,
    drawn_image,
    png_bytes,
    point_gallery_link,
)

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 90


@pytest.fixture
def server(service_assets: ServiceAssets) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    env = {**os.environ, "GSP_API_KEYS": API_KEY, "GSP_IMAGE_ROOTS": str(service_assets.images)}
    command = [
        sys.executable, "-m", "app.cli", "serve",
        "--checkpoint", str(service_assets.checkpoint),
        "--gallery", str(service_assets.gallery_link),
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"gsp serve exited early with status {process.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail(f"gsp serve was not ready within {STARTUP_SECONDS} s")
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.slow
def test_real_server_search_and_sighup_reload(
    server: tuple[str, subprocess.Popen[str]], service_assets: ServiceAssets
) -> None:
    url, process = server
    assert process.stdout is not None
    assert process.stdout.readline().startswith(f"Serving on {url}/")
    query = png_bytes(drawn_image("green", 1))

    def one_search(_: int) -> int:
        response = httpx.post(
            f"{url}/v1/search", files={"image": ("q.png", query, "image/png")}, timeout=30
        )
        return response.status_code

    full = httpx.get(f"{url}/readyz").json()["gallery_size"]
    point_gallery_link(service_assets, service_assets.gallery_small)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            pending = [pool.submit(one_search, i) for i in range(24)]
            time.sleep(0.05)
            process.send_signal(signal.SIGHUP)
            statuses = [future.result() for future in pending]
        assert statuses == [200] * len(statuses)
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/readyz").json()["gallery_size"] != 3:
            assert time.monotonic() < deadline, "SIGHUP did not reload the gallery"
            time.sleep(0.1)
    finally:
        point_gallery_link(service_assets, service_assets.gallery_full)
    reloaded = httpx.post(f"{url}/v1/admin/reload-gallery", headers={"X-API-Key": API_KEY})
    assert reloaded.json()["gallery_size"] == full
    metrics = httpx.get(f"{url}/metrics").text
    assert 'route="/v1/search",status="200"' in metrics
