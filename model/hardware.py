"""Where a job runs: the torch device a command or the service is asked for, the CPUs it may
use for data-loading workers, and the names of the precisions and JPEG decoders it may use
(:mod:`model.inference` carries them out).  One meaning of ``--device``, ``--workers``,
``--precision`` and ``--decode`` everywhere.

torch is imported on use only: the command line checks device names while parsing, and
``gsp --help`` must not wait for torch.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

__all__ = [
    "DECODERS",
    "DEVICE_NAMES",
    "GRAPH_MODES",
    "MAX_AUTO_WORKERS",
    "PRECISIONS",
    "Decoder",
    "DeviceError",
    "GraphMode",
    "Precision",
    "check_device_name",
    "resolve_device",
    "resolve_workers",
    "usable_cpus",
]

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")
# Loader processes beyond this rarely pay when the network runs on the CPU: it, not decoding,
# sets the pace by then. An accelerator embeds faster than any count of cores decodes.
MAX_AUTO_WORKERS = 8
# ``auto``: fp16 autocast on CUDA, fp32 elsewhere (see model/inference.py for why not bf16).
Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# Where JPEGs decode: CPU workers (Pillow) or the GPU (nvJPEG, batched).
Decoder = Literal["cpu", "gpu"]
DECODERS: tuple[str, ...] = get_args(Decoder)
# How the embedding forward runs on CUDA (model/graphs.py): as it is, as captured CUDA graphs per
# bucketed batch size, or through torch.compile's reduce-overhead mode.
GraphMode = Literal["off", "graphs", "reduce-overhead"]
GRAPH_MODES: tuple[str, ...] = get_args(GraphMode)


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


def resolve_workers(workers: int | str, *, accelerator: bool = False) -> int:
    """Data-loading worker processes: a count as given (0 loads in the calling process), or for
    ``auto`` the usable CPUs but one (which feeds the network), at least 1, and at most
    :data:`MAX_AUTO_WORKERS` unless the network runs on an ``accelerator``."""
    if workers == "auto":
        count = max(1, usable_cpus() - 1)
        return count if accelerator else min(MAX_AUTO_WORKERS, count)
    try:
        count = int(workers)
    except ValueError:
        raise ValueError(f"workers must be a count or 'auto', got {workers!r}") from None
    if count < 0:
        raise ValueError(f"workers must be 0 or more, or 'auto', got {workers!r}")
    return count
