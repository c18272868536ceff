"""Where a job runs: the torch device a command or the service is asked for, and the CPUs it may
use for data-loading workers.  One meaning of ``--device`` and ``--workers`` everywhere.

torch is imported on use only: the command line checks device names while parsing, and
``gsp --help`` must not wait for torch.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICE_NAMES",
    "MAX_AUTO_WORKERS",
    "DeviceError",
    "check_device_name",
    "resolve_device",
    "resolve_workers",
    "usable_cpus",
]

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")
# Loader processes beyond this rarely pay: the network, not decoding, sets the pace by then.
MAX_AUTO_WORKERS = 8


class DeviceError(ValueError):
    """A device name that is misspelt, or that names a GPU this machine does not have."""


def check_device_name(name: str) -> str:
    """``name`` when it is one of :data:`DEVICE_NAMES` (spelling only: no hardware is asked)."""
    if not _DEVICE_NAME.fullmatch(name):
        raise DeviceError(f"device must be {DEVICE_NAMES}, got {name!r}")
    return name


def resolve_device(name: str) -> torch.device:
    """The device ``name`` asks for: ``auto`` is CUDA when present, else the CPU; ``cuda`` or
    ``cuda:N`` without that GPU is a :class:`DeviceError` now, not a failure at the first
    tensor (or, worse, a silent fall back to the CPU)."""
    import torch

    if check_device_name(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} was requested but CUDA is not available")
        visible = torch.cuda.device_count()
        if device.index is not None and device.index >= visible:
            raise DeviceError(
                f"device {name!r} was requested but only {visible} CUDA device(s) are visible"
            )
    return device


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | str) -> int:
    """Data-loading worker processes: a count as given (0 loads in the calling process), or for
    ``auto`` the usable CPUs but one (which runs the network), at least 1, at most
    :data:`MAX_AUTO_WORKERS`."""
    if workers == "auto":
        return min(MAX_AUTO_WORKERS, max(1, usable_cpus() - 1))
    try:
        count = int(workers)
    except ValueError:
        raise ValueError(f"workers must be a count or 'auto', got {workers!r}") from None
    if count < 0:
        raise ValueError(f"workers must be 0 or more, or 'auto', got {workers!r}")
    return count
