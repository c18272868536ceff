"""The real server: ``gsp serve`` under uvicorn on a loopback port, spoken to over HTTP.

Also checks that SIGHUP swaps in a rebuilt gallery while requests keep succeeding.
"""

from __future__ import annotations

import concurrent.futures
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.test_service_support import (
    API_KEY,
    ServiceAssets,
    drawn_image,
    png_bytes,
    point_gallery_link,
    running_server,
)


@pytest.fixture
def server(service_assets: ServiceAssets) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with running_server(service_assets) as started:
        yield started


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


# -- admission: slow and oversized requests ------------------------------------------------------

MAX_IN_FLIGHT = 4
ADMISSION_ENV = {
    "GSP_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
    "GSP_BODY_TIMEOUT_S": "4",
    "GSP_HEADER_TIMEOUT_S": "4",
    "GSP_MAX_HEADER_BYTES": "16384",
    "GSP_MAX_UPLOAD_BYTES": "200000",  # bodies of queries: at most 3 uploads + 1 MiB of form
}
SOCKET_PATIENCE_S = 30  # far beyond the server's deadlines: only a hung server reaches it


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=SOCKET_PATIENCE_S)
    return sock


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def send_until_answered(sock: socket.socket, parts: Iterator[bytes]) -> tuple[bytes, int]:
    """Send ``parts`` one by one, stopping as soon as the server answers; the answer and the
    bytes sent."""
    sent = 0
    for part in parts:
        if select.select([sock], [], [], 0.05)[0]:
            break
        try:
            sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(part)
    return answer(sock), sent


def stalled_upload(url: str) -> socket.socket:
    """A search upload that declares 150 kB, sends a few bytes of it and stops."""
    sock = connect(url)
    sock.sendall(
        b"POST /v1/search HTTP/1.1\r\nHost: test\r\nContent-Length: 150000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\nContent-Dispo"
    )
    return sock


def gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


@pytest.mark.slow
def test_stalled_clients_hold_no_slot_and_are_cut(service_assets: ServiceAssets) -> None:
    query = png_bytes(drawn_image("green", 1))
    with running_server(service_assets, **ADMISSION_ENV) as (url, _):
        uploads = [stalled_upload(url) for _ in range(2 * MAX_IN_FLIGHT)]
        headers = connect(url)
        headers.sendall(b"POST /v1/search HTTP/1.1\r\nHost: test\r\nContent-Le")
        idle = connect(url)
        deadline = time.monotonic() + SOCKET_PATIENCE_S
        while gauge(url, "gsp_http_requests_reading_body") < len(uploads):
            assert time.monotonic() < deadline, "the stalled uploads never reached the server"
            time.sleep(0.05)
        with httpx.Client(base_url=url, timeout=SOCKET_PATIENCE_S) as client:
            for _ in range(3):  # the stalled clients block nobody
                found = client.post("/v1/search", files={"image": ("q.png", query, "image/png")})
                assert found.status_code == 200
            assert client.get("/readyz").status_code == 200
        assert gauge(url, "gsp_http_requests_in_flight") == 0
        for sock in uploads:  # each cut with 408 once its body deadline passed
            assert answer(sock).startswith(b"HTTP/1.1 408 "), "a stalled upload was not cut"
            sock.close()
        assert answer(headers).startswith(b"HTTP/1.1 408 ")
        assert answer(idle) == b""  # a connection that never sent a byte is closed
        headers.close()
        idle.close()
        assert gauge(url, "gsp_http_requests_reading_body") == 0
        assert 'status="408"' in httpx.get(f"{url}/metrics").text


@pytest.mark.slow
def test_oversized_requests_and_the_per_client_limit_behind_a_proxy(
    service_assets: ServiceAssets,
) -> None:
    big = 16 * 1024 * 1024
    proxied = {"GSP_TRUSTED_PROXIES": "127.0.0.1", "GSP_MAX_IN_FLIGHT_PER_CLIENT": "1"}
    with running_server(service_assets, **ADMISSION_ENV, **proxied) as (url, _):
        chunk = b"x" * 65536
        chunked = connect(url)
        chunked.sendall(
            b"POST /v1/search HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        parts = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(big // len(chunk)))
        received, sent = send_until_answered(chunked, parts)
        assert received.startswith(b"HTTP/1.1 413 ")
        assert b"body_too_large" in received
        assert sent < big // 4  # refused at the limit, not after the whole body
        declared = connect(url)
        declared.sendall(
            b"POST /v1/search HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % big
        )
        assert answer(declared).startswith(b"HTTP/1.1 413 ")
        header = connect(url)
        header.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Padding: ")
        received, sent = send_until_answered(header, iter([b"a" * 4096] * 256))
        assert received.startswith(b"HTTP/1.1 431 ")
        assert sent < 64 * 1024
        for sock in (chunked, declared, header):
            sock.close()
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert gauge(url, "gsp_http_requests_reading_body") == 0
        # Behind a trusted proxy each X-Forwarded-For client has its own limit; a stalled
        # upload counts against its client's (and nobody else's) until it goes.
        stalled = connect(url)
        stalled.sendall(
            b"POST /v1/search HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 203.0.113.7\r\n"
            b"Content-Length: 1000\r\n\r\n--b"
        )

        def by_id(client: str, **headers: str) -> int:
            forwarded = {"X-Forwarded-For": client, **headers}
            return httpx.post(f"{url}/v1/search/by-id/0", headers=forwarded).status_code

        deadline = time.monotonic() + SOCKET_PATIENCE_S
        while by_id("203.0.113.7") != 429:
            assert time.monotonic() < deadline, "the stalled upload never counted"
            time.sleep(0.05)
        assert by_id("203.0.113.8") != 429
        assert by_id("203.0.113.7", **{"X-API-Key": API_KEY}) != 429  # a key is its own client
        stalled.close()
        while by_id("203.0.113.7") == 429:  # the client's slot is freed when it leaves
            assert time.monotonic() < deadline, "a closed upload kept its client's slot"
            time.sleep(0.05)
