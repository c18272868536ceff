"""docker/nginx/gsp.conf for real: nginx (TLS with a throwaway certificate) in front of
``gsp serve``. Skips with the reason when nginx or openssl is not installed (CI installs both).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
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
    running_server,
)

CONF = Path(__file__).resolve().parents[1] / "docker" / "nginx" / "gsp.conf"
PATIENCE_S = 30

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists())
        or not shutil.which("openssl"),
        reason="needs nginx and openssl (apt-get install nginx-light openssl)",
    ),
]


def shipped_conf(service_port: int, http_port: int, https_port: int, tls: Path) -> str:
    """The shipped file with its marked lines edited as the docs say, on loopback ports."""
    text = CONF.read_text()
    text = text.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{service_port};")
    text = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", text)  # no IPv6 needed here
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = text.replace("listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl")
    text = text.replace("https://$host$request_uri", f"https://$host:{https_port}$request_uri")
    return text.replace("/etc/nginx/tls/", f"{tls}/")


@contextlib.contextmanager
def nginx(conf: str, root: Path) -> Iterator[None]:
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    (root / "gsp.conf").write_text(conf)
    main = root / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers write the temp folders below
    temp = " ".join(
        f"{kind}_temp_path {root / kind};" for kind in ("client_body", "proxy", "fastcgi")
    )
    main.write_text(
        f"{user}pid {root / 'nginx.pid'};\nerror_log {root / 'error.log'};\nevents {{}}\n"
        f"http {{ access_log off; {temp} uwsgi_temp_path {root / 'uwsgi'}; "
        f"scgi_temp_path {root / 'scgi'}; include {root / 'gsp.conf'}; }}\n"
    )
    checked = subprocess.run(
        [nginx_bin, "-t", "-c", str(main), "-p", str(root)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen(
        [nginx_bin, "-c", str(main), "-p", str(root), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=15)


@pytest.fixture
def proxied(service_assets: ServiceAssets, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(https URL through nginx, its http URL, the service's own URL)."""
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(tls / "gsp.key"), "-out", str(tls / "gsp.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    env = {"GSP_TRUSTED_PROXIES": "127.0.0.1", "GSP_MAX_UPLOAD_BYTES": "200000"}
    with running_server(service_assets, **env) as (service, _):
        http_port, https_port = free_port(), free_port()
        conf = shipped_conf(int(service.rsplit(":", 1)[1]), http_port, https_port, tls)
        with nginx(conf, tmp_path):
            url = f"https://localhost:{https_port}"
            deadline = time.monotonic() + PATIENCE_S
            while True:
                try:
                    httpx.get(f"{url}/healthz", verify=False)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "nginx did not start"
                    time.sleep(0.1)
            yield url, f"http://localhost:{http_port}", service


def upload_start(port: int, length: int) -> ssl.SSLSocket:
    """An upload through TLS declaring ``length`` bytes, of which it sends only a few."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    sock = context.wrap_socket(socket.create_connection(("localhost", port), timeout=PATIENCE_S))
    sock.sendall(
        b"POST /v1/search HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n" % length
    )
    return sock


def test_nginx_terminates_tls_and_the_service_believes_only_it(
    proxied: tuple[str, str, str],
) -> None:
    url, plain, service = proxied
    assert httpx.get(f"{plain}/readyz").status_code == 301  # plain HTTP goes to HTTPS
    query = png_bytes(drawn_image("red", 0))
    with httpx.Client(base_url=url, verify=False, timeout=PATIENCE_S) as client:
        port = int(url.rsplit(":", 1)[1])
        uploads = [upload_start(port, 5000) for _ in range(4)]
        found = client.post("/v1/search", files={"image": ("q.png", query, "image/png")})
        assert found.status_code == 200
        # nginx holds the stalled bodies: the service never sees them
        assert "gsp_http_requests_reading_body 0.0" in httpx.get(f"{service}/metrics").text
        for sock in uploads:
            sock.close()
        # nginx refuses what the service would: a query body over 3 uploads + 1 MiB of form
        with upload_start(port, 32 * 1024 * 1024) as declared:
            assert declared.recv(100).startswith(b"HTTP/1.1 413 ")
        # X-Forwarded-Proto from the trusted proxy: the key cookie is Secure behind TLS ...
        entered = client.post("/key", data={"key": API_KEY}, follow_redirects=False)
        assert entered.status_code == 303
        assert "secure" in entered.headers["set-cookie"].lower()
    # ... while the same header from any other peer (127.0.0.2: not the proxy) is not believed
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
        direct = other.post(
            f"{service}/key", data={"key": API_KEY}, headers={"X-Forwarded-Proto": "https"}
        )
    assert "secure" not in direct.headers["set-cookie"].lower()
