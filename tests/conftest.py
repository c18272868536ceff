"""Shared fixtures: the real data beside the checkout, and skipping of GPU-only tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
