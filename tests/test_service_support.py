"""Shared assets of the service tests: a tiny checkpoint and galleries built from drawn images.

Imported by the ``test_service_*`` modules; the assets are built once per test session (the
module-level cache) however many modules ask for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image, ImageDraw

from app.service.settings import Settings
from bench.service import stop_server
from tests.conftest import free_port

API_KEY = "test-key-5f1c"
REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 90
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
PER_LABEL = 4


@dataclass(frozen=True)
class Entry:
    source: str  # what the gallery records
    file: Path  # where the test reads the bytes from
    label: str | None


@dataclass(frozen=True)
class ServiceAssets:
    root: Path
    checkpoint: Path
    images: Path
    gallery_link: Path  # the served path: a symlink, re-pointed to swap galleries
    gallery_full: Path
    gallery_small: Path  # a second build with fewer items, for reload tests
    outside_file: Path  # a real image that must never be served
    escape_ids: tuple[int, ...]  # items whose sources point outside the allowed roots

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "checkpoint": self.checkpoint,
            "gallery": self.gallery_link,
            "device": "cpu",
            "api_keys": [API_KEY],
            "image_roots": [self.images],
            "max_k": 20,
            "max_upload_bytes": 1_000_000,
            "max_pixels": 4_000_000,
            "batch_max_wait_ms": 2.0,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)


def drawn_image(label: str, variant: int, size: int = 80) -> Image.Image:
    """A coloured disc on a grey background, placed by ``variant``: classes differ by colour."""
    image = Image.new("RGB", (size + 16 * (variant % 2), size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    offset = 8 + 6 * variant
    draw.ellipse((offset, offset, offset + size // 2, offset + size // 2), fill=COLOURS[label])
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _build_checkpoint(directory: Path) -> None:
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig, Preprocessing
    from model.net import build_embedding_net

    config = ModelConfig(
        backbone="resnet18",
        pretrained=False,
        pooling="gsp",
        embedding_dim=32,
        preprocessing=Preprocessing(image_size=96, resize_size=108),
    )
    torch.manual_seed(0)
    save_checkpoint(directory, build_embedding_net(config).eval(), config)


def _build_gallery(directory: Path, checkpoint: Path, entries: list[Entry]) -> list[int]:
    """Embed the entries' files into a new gallery that records their ``source`` strings."""
    from index.gallery import Gallery, ItemInput
    from model.checkpoint import load_checkpoint
    from model.transforms import eval_transform

    loaded = load_checkpoint(checkpoint, device="cpu")
    transform = eval_transform(loaded.config.preprocessing)
    items, tensors = [], []
    for entry in entries:
        data = entry.file.read_bytes()
        items.append(
            ItemInput(
                source=entry.source,
                sha256=hashlib.sha256(data).hexdigest(),
                label=entry.label,
                extra={"name": entry.file.name},
            )
        )
        with Image.open(io.BytesIO(data)) as image:
            tensors.append(transform(image))
    with torch.inference_mode():
        output = loaded.net.eval()(torch.stack(tensors))
    gallery = Gallery.create(
        directory,
        model_fingerprint=loaded.fingerprint,
        preprocessing=loaded.config.preprocessing.to_dict(),
        embedding_dim=loaded.config.embedding_dim,
    )
    result = gallery.add(
        output.embedding.numpy().astype(np.float32), list(output.weights.numpy()), items
    )
    gallery.save()
    gallery.close()
    return [int(i) for i in result.ids]


def point_gallery_link(assets: ServiceAssets, target: Path) -> None:
    """Atomically re-point the served gallery path (what an offline rebuild would do)."""
    temporary = assets.root / "gallery.next"
    if temporary.is_symlink():
        temporary.unlink()
    temporary.symlink_to(target, target_is_directory=True)
    os.replace(temporary, assets.gallery_link)


def build_assets(root: Path) -> ServiceAssets:
    checkpoint = root / "checkpoint"
    _build_checkpoint(checkpoint)
    images = root / "images"
    images.mkdir()
    entries = []
    for label in COLOURS:
        for variant in range(PER_LABEL):
            path = images / f"{label}-{variant}.png"
            drawn_image(label, variant).save(path)
            entries.append(Entry(str(path), path, label))
    outside = root / "secret.png"
    drawn_image("red", 1).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(outside)
    # Two items whose sources escape the allowed roots: a relative path and a symlink.
    escapes = [Entry("../secret.png", outside, "escape"), Entry("link-out.png", outside, "escape")]
    full = root / "gallery-full"
    ids = _build_gallery(full, checkpoint, entries + escapes)
    (full / "link-out.png").symlink_to(outside)
    small = root / "gallery-small"
    _build_gallery(small, checkpoint, entries[::PER_LABEL])
    assets = ServiceAssets(
        root=root,
        checkpoint=checkpoint,
        images=images,
        gallery_link=root / "gallery",
        gallery_full=full,
        gallery_small=small,
        outside_file=outside,
        escape_ids=tuple(ids[-2:]),
    )
    point_gallery_link(assets, full)
    return assets


@contextlib.contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def running_server(
    service_assets: ServiceAssets, gallery: Path | None = None, **env: str
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``gsp serve`` on a free loopback port, with these ``GSP_*`` settings beside the keys,
    serving ``gallery`` (default: the shared test gallery)."""
    port = free_port()
    env = {
        **os.environ,
        "GSP_API_KEYS": API_KEY,
        "GSP_IMAGE_ROOTS": str(service_assets.images),
        **env,
    }
    command = [
        sys.executable, "-m", "app.cli", "serve",
        "--checkpoint", str(service_assets.checkpoint),
        "--gallery", str(gallery or service_assets.gallery_link),
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
        stop_server(process)
        if process.stdout is not None:
            process.stdout.close()


def wait_until_ready(url: str, process: subprocess.Popen, seconds: float, what: str) -> None:
    """Poll ``url``/readyz until it answers 200; fail when ``process`` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, f"{what} exited with status {process.returncode}"
        assert time.monotonic() < deadline, f"{what} was not ready within {seconds} s"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
