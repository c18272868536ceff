"""``torch.compile`` for the GSP layer's small parts, on CUDA only.

At the sizes of a pooling layer a GPU finishes each eager operation in microseconds, so kernel
launches, not arithmetic, set the time; compiling fuses a part's operations into a few kernels.
On a CPU the arithmetic dominates and compiling (seconds, a C++ toolchain) would not pay.
The runtime option ``compile=False`` (``GSP_COMPILE=0``, model/runtime.py) keeps CUDA eager too.

Shapes follow torch's default (``dynamic=None``): the first call compiles for its exact sizes;
a call with other sizes recompiles once with the sizes that changed left symbolic. A training
job of one batch shape thus runs kernels specialised to it, whose guards and launch code cost
the host less than fully symbolic ones (``bench/compile_modes.py``), and a service that has
run batches of 1 and 2 has compiled every batch size (tests/test_gsp.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

from model.runtime import runtime_options

__all__ = ["compile_enabled", "fused"]

P = ParamSpec("P")
R = TypeVar("R")

_compiled: dict[Callable, Callable] = {}


def compile_enabled(device: torch.device) -> bool:
    """Whether the layer's parts run compiled on ``device``."""
    return device.type == "cuda" and runtime_options().compile


def fused(part: Callable[P, R], device: torch.device) -> Callable[P, R]:
    """``part`` compiled (see the module doc for shapes) where :func:`compile_enabled`, else
    itself."""
    if not compile_enabled(device):
        return part
    if part not in _compiled:
        _compiled[part] = torch.compile(part)
    return _compiled[part]
