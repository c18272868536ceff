"""Shared fixtures: the real data beside the checkout, the service tests' checkpoint and gallery,
and skipping of GPU-only tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from tests.test_service_support import ServiceAssets

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"


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
