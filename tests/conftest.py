"""What several test modules share: fixtures (the real data beside the checkout, a small
checkpoint for the indexing tests, the service tests' checkpoint, gallery and server), the
helpers more than one module needs (encoded and hostile images, error answers, free ports,
adversarial transport costs), and skipping of GPU-only tests."""

from __future__ import annotations

import io
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image

if TYPE_CHECKING:
    from tests.test_service_support import ServiceAssets

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"
# Transport ratios the solver tests cover, from nearly nothing kept to nearly everything.
RATIOS = torch.tensor([0.05, 0.3, 0.7, 0.9, 0.99], dtype=torch.float64)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    """Path of ../shared/data/cifar10-jpeg.tar.gz; skips the test when it is absent."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"real data not available: {CIFAR_ARCHIVE} is absent")
    return CIFAR_ARCHIVE


@pytest.fixture(scope="session")
def service_assets(tmp_path_factory: pytest.TempPathFactory) -> ServiceAssets:
    """A small checkpoint and galleries for the service tests, built once per session."""
    from tests.test_service_support import build_assets

    return build_assets(tmp_path_factory.mktemp("service"))


@pytest.fixture(scope="module")
def read_only_server(service_assets: ServiceAssets) -> Iterator[str]:
    """The service under real uvicorn on a loopback port, its URL; the gallery is read-only,
    so that nothing a test sends can change the shared gallery."""
    from app.service.main import create_app
    from tests.test_service_support import serve_in_thread

    with serve_in_thread(create_app(service_assets.settings(gallery_read_only=True))) as url:
        yield url


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained resnet18 GSP model on 64-pixel inputs, saved as a real checkpoint (the
    indexing tests' model; nothing writes to it)."""
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig, Preprocessing
    from model.net import build_embedding_net

    torch.manual_seed(0)
    config = ModelConfig(
        backbone="resnet18",
        pretrained=False,
        embedding_dim=32,
        preprocessing=Preprocessing(image_size=64, resize_size=72),
    )
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(directory, build_embedding_net(config).eval(), config)
    return directory


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (48, 40)) -> bytes:
    """A noise image of ``size`` encoded as ``fmt`` (GIF: two frames)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "GIF":
        second = Image.fromarray(255 - pixels)
        image.save(buffer, "GIF", save_all=True, append_images=[second])
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def write_images(folder: Path, seeds: range, ext: str = "jpg", fmt: str = "JPEG") -> list[Path]:
    """One noise image per seed, named ``{seed:04d}.{ext}``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"{seed:04d}.{ext}"
        path.write_bytes(image_bytes(seed, fmt))
        paths.append(path)
    return paths


def gallery_of_another_model(path: Path, fingerprint: str) -> None:
    """An empty gallery recorded as built by the model ``fingerprint``, not ``checkpoint``."""
    from index.gallery import Gallery

    Gallery.create(
        path, model_fingerprint=fingerprint, preprocessing={"image_size": 64}, embedding_dim=32
    ).close()


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (the data is never needed)."""
    data = encode(Image.new("L", (1, 1)), "PNG")
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    patched = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return data[:8] + patched + data[8 + len(patched) :]


def assert_error(response: Any, status: int, code: str | None = None) -> dict:
    """The service's error answer: ``status``, a non-empty ``detail``, and ``code`` if given."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["detail"], str | list) and body["detail"]
    if code is not None:
        assert body["code"] == code
    return body


def free_port() -> int:
    """A loopback port free at the time of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def adversarial_costs(m: int, n: int) -> torch.Tensor:
    """Random costs (one matrix per ratio of ``RATIOS``) plus the hard cases: all equal, one
    far location, all 0, all 2."""
    generator = torch.Generator().manual_seed(m * 1000 + n)
    random = torch.rand(len(RATIOS), m, n, generator=generator, dtype=torch.float64) * 2
    far = torch.zeros(m, n, dtype=torch.float64)
    far[:, 0] = 2.0
    cases = [
        torch.full((m, n), 0.7, dtype=torch.float64),
        far,
        torch.zeros(m, n),
        torch.full((m, n), 2.0),
    ]
    return torch.cat([random, torch.stack([c.double() for c in cases])])
