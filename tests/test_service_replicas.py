"""Two api replicas over one published gallery, as real ``gsp serve --read-only`` processes:
they answer the same search identically, refuse writes, and both move to a new publication."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from index.backup import copy_gallery
from index.gallery import Gallery
from index.publish import publish_gallery
from tests.conftest import free_port
from tests.test_service_support import (
    API_KEY,
    ServiceAssets,
    drawn_image,
    png_bytes,
    wait_until_ready,
)

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 120

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _replica(assets: ServiceAssets, published: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "GSP_IMAGE_ROOTS": str(assets.images), "GSP_API_KEYS": API_KEY}
    command = [
        sys.executable, "-m", "app.cli", "serve", "--read-only",
        "--checkpoint", str(assets.checkpoint), "--gallery", str(published),
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, STARTUP_SECONDS, "replica")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def _load_balancer(nginx: str, root: Path, replicas: list[str]) -> Iterator[str]:
    """The compose file's nginx configuration, pointed at ``replicas`` on loopback, run with the
    host's nginx."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = (REPO / "docker" / "loadbalancer" / "nginx.conf").read_text()
    for index, url in enumerate(replicas, 1):
        text = text.replace(f"replica-{index}:8000", url.removeprefix("http://"))
    text = text.replace("listen 8080", f"listen 127.0.0.1:{port}")
    text = text.replace("/tmp/nginx", str(root))
    if os.geteuid() == 0:  # the image runs it unprivileged; as root, keep workers as root here
        text = "user root;\n" + text
    config = root / "nginx.conf"
    config.write_text(text)
    process = subprocess.Popen(
        [nginx, "-c", str(config), "-e", "stderr", "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, 20, "nginx")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _answer(url: str, query: bytes) -> dict:
    response = httpx.post(
        f"{url}/v1/search",
        files={"image": ("q.png", query, "image/png")},
        data={"k": "5"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    del body["timings"]
    return body


@dataclass(frozen=True)
class Replicas:
    urls: list[str]
    writer_gallery: Path
    published: Path


@pytest.fixture(scope="module")
def replicas(
    service_assets: ServiceAssets, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    """Two replicas over a publication of a copy of the full gallery (the writer's)."""
    root = tmp_path_factory.mktemp("replicas")
    writer_gallery = root / "gallery"
    copy_gallery(service_assets.gallery_full, writer_gallery)
    published = root / "published"
    publish_gallery(writer_gallery, published)
    with _replica(service_assets, published) as one, _replica(service_assets, published) as two:
        yield Replicas([one, two], writer_gallery, published)


def test_the_load_balancer_configuration_spreads_searches_over_the_replicas(
    replicas: Replicas, tmp_path: Path
) -> None:
    nginx = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed on this machine (apt-get install nginx-light)")
    query = png_bytes(drawn_image("red", 2))
    alone = _answer(replicas.urls[0], query)
    with _load_balancer(nginx, tmp_path, replicas.urls) as balanced:
        assert [_answer(balanced, query) for _ in range(4)] == [alone] * 4


def test_two_replicas_over_a_publication_answer_alike_and_follow_it(replicas: Replicas) -> None:
    one, two = replicas.urls
    query = png_bytes(drawn_image("blue", 2))
    first = _answer(one, query)
    assert first == _answer(two, query) and len(first["matches"]) == 5
    top = first["matches"][0]["id"]
    image = httpx.get(f"{one}/v1/gallery/{top}/image")
    assert image.status_code == 200
    assert image.content == httpx.get(f"{two}/v1/gallery/{top}/image").content
    refused = httpx.delete(f"{one}/v1/gallery/{top}", headers={"X-API-Key": API_KEY})
    assert refused.status_code == 409 and refused.json()["code"] == "read_only"
    with Gallery.open(replicas.writer_gallery) as writer:  # the single writer changes it
        writer.remove([top])
        size = len(writer)
    publish_gallery(replicas.writer_gallery, replicas.published)
    published_at = time.monotonic()
    for url in (one, two):
        while httpx.get(f"{url}/readyz").json()["gallery_size"] != size:
            assert time.monotonic() - published_at < 5, "a replica kept the old publication"
            time.sleep(0.05)
    after = _answer(one, query)
    assert after == _answer(two, query)
    assert top not in [match["id"] for match in after["matches"]]
