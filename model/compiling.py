"""``torch.compile`` for the GSP layer's small parts, on CUDA only.

At the sizes of a pooling layer a GPU finishes each eager operation in microseconds, so kernel
launches, not arithmetic, set the time; compiling fuses a part's operations into a few kernels.
On a CPU the arithmetic dominates and compiling (seconds, a C++ toolchain) would not pay.
``GSP_COMPILE=0`` keeps CUDA eager too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["compile_enabled", "fused"]

F = TypeVar("F", bound=Callable)

_compiled: dict[Callable, Callable] = {}


def compile_enabled(device: torch.device) -> bool:
    """Whether the layer's parts run compiled on ``device``."""
    return device.type == "cuda" and os.environ.get("GSP_COMPILE", "1") != "0"


def fused(part: F, device: torch.device) -> F:
    """``part`` compiled once (shapes symbolic) where :func:`compile_enabled`, else itself."""
    if not compile_enabled(device):
        return part
    if part not in _compiled:
        _compiled[part] = torch.compile(part, dynamic=True)
    return _compiled[part]
