"""``gsp serve --processes 2`` for real: one leader that writes the gallery and one follower,
on one port, each also reachable on its own Unix socket.

Writes go through either process; every acknowledged write is searchable in every process
within a second, none is lost, reloads and re-opens under load fail no search, and a process
killed mid-request leaves the other answering while it is started again.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.service.processes import process_socket
from tests.conftest import free_port, image_bytes
from tests.test_service_support import API_KEY, ServiceAssets, drawn_image, png_bytes

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 120
VISIBLE_WITHIN_S = 1.0
_seeds = itertools.count(7000)  # every write in this module uploads a new noise image

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    url: str
    run_dir: Path
    gallery: Path
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def client(self, index: int) -> httpx.Client:
        """A client of process ``index`` alone (0: the leader)."""
        transport = httpx.HTTPTransport(uds=str(process_socket(self.run_dir, index)))
        return httpx.Client(transport=transport, base_url="http://process", timeout=30)

    def pid(self, index: int) -> int:
        """The pid of the latest process started as ``index``."""
        pattern = re.compile(rf"^process {index} \(.*\), pid (\d+)$")
        found = [int(m.group(1)) for line in self.lines if (m := pattern.match(line))]
        return found[-1]

    def wait_ready(self, index: int, seconds: float = STARTUP_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"gsp serve exited: {self.process.returncode}"
            try:
                with self.client(index) as client:
                    if client.get("/readyz").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        pytest.fail(f"process {index} was not ready within {seconds} s")

    def sizes(self) -> list[int]:
        sizes = []
        for index in (0, 1):
            with self.client(index) as client:
                sizes.append(client.get("/readyz").json()["gallery_size"])
        return sizes


@pytest.fixture(scope="module")
def cluster(
    service_assets: ServiceAssets, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    from index.backup import copy_gallery

    root = tmp_path_factory.mktemp("processes")
    gallery = root / "gallery"
    copy_gallery(service_assets.gallery_small, gallery)
    port = free_port()
    env = {
        **os.environ,
        "GSP_API_KEYS": API_KEY,
        "GSP_IMAGE_ROOTS": str(service_assets.images),
        "GSP_GALLERY_SAVE_EVERY": "1",  # a snapshot per write: followers re-open under load
    }
    command = [
        sys.executable, "-m", "app.cli", "serve", "--processes", "2",
        "--run-dir", str(root / "run"),
        "--checkpoint", str(service_assets.checkpoint), "--gallery", str(gallery),
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    running = Cluster(f"http://127.0.0.1:{port}", root / "run", gallery, process)

    def read_lines() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            running.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    try:
        running.wait_ready(0)
        running.wait_ready(1)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        reader.join(timeout=5)


def _new_image() -> bytes:
    return image_bytes(next(_seeds), "PNG", size=(72, 72))


def _add(client: httpx.Client, image: bytes) -> httpx.Response:
    return client.post(
        "/v1/gallery",
        files={"images": ("new.png", image, "image/png")},
        headers={"X-API-Key": API_KEY},
    )


def _top_match(client: httpx.Client, image: bytes) -> int | None:
    response = client.post("/v1/search", files={"image": ("q.png", image, "image/png")})
    assert response.status_code == 200, response.text
    matches = response.json()["matches"]
    return matches[0]["id"] if matches and matches[0]["score"] > 0.999 else None


def _search_status(client: httpx.Client, image: bytes) -> int:
    try:
        return client.post("/v1/search", files={"image": ("q.png", image, "image/png")}).status_code
    except httpx.TransportError:
        return -1


def test_a_write_through_either_process_is_searchable_in_both_within_a_second(
    cluster: Cluster,
) -> None:
    for writer in (0, 1, 1):
        image = _new_image()
        with cluster.client(writer) as client:
            response = _add(client, image)
        answered = time.monotonic()
        assert response.status_code == 200, response.text
        new_id = response.json()["items"][0]["id"]
        for reader in (writer, 1 - writer):  # the writing process reads its write at once
            with cluster.client(reader) as client:
                while _top_match(client, image) != new_id:
                    assert time.monotonic() - answered < VISIBLE_WITHIN_S, (
                        f"write {new_id} through process {writer} not searchable in {reader}"
                    )
                    time.sleep(0.02)
            if reader == writer:
                assert time.monotonic() - answered < VISIBLE_WITHIN_S


def test_concurrent_writes_and_searches_across_processes_lose_nothing(cluster: Cluster) -> None:
    before = cluster.sizes()
    assert before[0] == before[1]
    images = [_new_image() for _ in range(6)]
    query = png_bytes(drawn_image("red", 0))
    done = threading.Event()

    def write(image: bytes) -> int:
        with httpx.Client(base_url=cluster.url, timeout=60) as client:
            response = _add(client, image)
        assert response.status_code == 200, response.text
        return response.json()["items"][0]["id"]

    def search(index: int) -> list[int]:
        statuses = []
        with cluster.client(index) as client:
            while not done.is_set():
                statuses.append(_search_status(client, query))
        return statuses

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        searches = [pool.submit(search, index) for index in (0, 1)]
        ids = list(pool.map(write, images))
        acknowledged = time.monotonic()
        done.set()
        statuses = [status for future in searches for status in future.result()]
    assert len(set(ids)) == len(images)
    assert statuses and set(statuses) == {200}  # re-opened after every write, never failed
    while cluster.sizes() != [before[0] + len(images)] * 2:
        assert time.monotonic() - acknowledged < VISIBLE_WITHIN_S, cluster.sizes()
        time.sleep(0.02)
    for index in (0, 1):
        with cluster.client(index) as client:
            for image, new_id in zip(images, ids, strict=True):
                assert _top_match(client, image) == new_id


def test_metrics_of_either_process_cover_both(cluster: Cluster) -> None:
    query = png_bytes(drawn_image("blue", 0))
    sample = re.compile(
        r'^gsp_http_requests_total\{method="POST",route="/v1/search",status="200"\} (\S+)$', re.M
    )

    def searches_counted(index: int) -> float:
        with cluster.client(index) as client:
            return float(sample.search(client.get("/metrics").text).group(1))

    before = searches_counted(0)
    for index, times in ((0, 3), (1, 2)):
        with cluster.client(index) as client:
            for _ in range(times):
                assert _search_status(client, query) == 200
    assert searches_counted(1) == before + 5
    assert searches_counted(0) == before + 5


def test_reload_under_load_fails_no_search(cluster: Cluster) -> None:
    query = png_bytes(drawn_image("red", 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        pending = [
            pool.submit(lambda i: _search_status(cluster.client(i % 2), query), i)
            for i in range(16)
        ]
        cluster.process.send_signal(signal.SIGHUP)  # every process re-opens the gallery
        with cluster.client(1) as client:  # forwarded to the leader, followed by the follower
            reloaded = client.post("/v1/admin/reload-gallery", headers={"X-API-Key": API_KEY})
        statuses = [future.result() for future in pending]
    assert reloaded.status_code == 200, reloaded.text
    assert statuses == [200] * len(statuses)


def test_a_killed_follower_leaves_the_leader_answering_and_is_started_again(
    cluster: Cluster,
) -> None:
    query = png_bytes(drawn_image("blue", 1))
    follower = cluster.pid(1)
    size = cluster.sizes()[0]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        pending = [
            pool.submit(_search_status, httpx.Client(base_url=cluster.url), query)
            for _ in range(12)
        ]
        time.sleep(0.05)
        os.kill(follower, signal.SIGKILL)  # mid-request: some of those searches are its own
        [future.result() for future in pending]
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        assert [_search_status(client, query) for _ in range(8)] == [200] * 8
        response = _add(client, _new_image())  # the leader writes meanwhile
        assert response.status_code == 200, response.text
    deadline = time.monotonic() + 30
    while cluster.pid(1) == follower:
        assert time.monotonic() < deadline, "the killed follower was not started again"
        time.sleep(0.2)
    cluster.wait_ready(1)
    assert cluster.sizes() == [size + 1, size + 1]


def test_a_killed_leader_refuses_writes_until_restarted_and_loses_none(cluster: Cluster) -> None:
    from index.gallery import Gallery

    query = png_bytes(drawn_image("green", 0))
    leader = cluster.pid(0)
    size = cluster.sizes()[1]
    os.kill(leader, signal.SIGKILL)
    image = _new_image()
    with cluster.client(1) as client:
        assert _search_status(client, query) == 200  # the follower searches on
        deadline = time.monotonic() + STARTUP_SECONDS
        while (response := _add(client, image)).status_code != 200:
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "leader_unavailable"
            assert response.headers["retry-after"] == "1"
            assert time.monotonic() < deadline, "the killed leader was not started again"
            time.sleep(0.3)
        assert _top_match(client, image) == response.json()["items"][0]["id"]
    assert cluster.pid(0) != leader
    assert cluster.sizes() == [size + 1, size + 1]
    with Gallery.open(cluster.gallery, read_only=True) as on_disk:
        assert len(on_disk) == size + 1
