"""One meaning of a device name and of a worker count (model/hardware.py), for the command line,
the indexer and the service alike."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import model.hardware as hardware
from model.hardware import DeviceError, resolve_device, resolve_workers
from tests.test_service_support import ServiceAssets

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_auto_is_cuda_when_present_else_the_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_asking_for_cuda_without_it_is_an_error_not_a_fall_back(name: str) -> None:
    with pytest.raises(DeviceError, match=f"device '{name}' was requested but CUDA is not"):
        resolve_device(name)


def test_a_gpu_index_beyond_the_visible_ones_is_an_error() -> None:
    beyond = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError, match=f"device '{beyond}' was requested but"):
        resolve_device(beyond)


# ids quoted: a test whose id is the bare word "gpu" would be taken for a GPU-only test.
@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", "", "cpu:0"], ids=repr)
def test_misspelt_device_names_are_refused(name: str) -> None:
    with pytest.raises(DeviceError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device(name)


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (4, 3), (64, 8)])
def test_auto_workers_leave_a_cpu_to_the_network(monkeypatch, cpus: int, workers: int) -> None:
    monkeypatch.setattr(hardware, "usable_cpus", lambda: cpus)
    assert resolve_workers("auto") == workers


def test_worker_counts() -> None:
    assert resolve_workers(0) == 0
    assert resolve_workers("3") == 3
    with pytest.raises(ValueError, match="workers must be 0 or more, or 'auto', got -1"):
        resolve_workers(-1)
    with pytest.raises(ValueError, match="workers must be a count or 'auto', got 'many'"):
        resolve_workers("many")


def test_the_service_takes_the_same_device_names(service_assets: ServiceAssets) -> None:
    assert service_assets.settings(device="cuda:1").device == "cuda:1"
    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N"):
        service_assets.settings(device="gpu")


@no_cuda
def test_the_service_does_not_start_on_a_gpu_it_lacks(service_assets: ServiceAssets) -> None:
    from app.service.inference import StartupError
    from app.service.main import create_app

    with pytest.raises(StartupError, match="device 'cuda' was requested but CUDA is not"):
        create_app(service_assets.settings(device="cuda", gallery_read_only=True))
