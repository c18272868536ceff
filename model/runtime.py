"""Process-wide switches for how the GSP layer runs on CUDA, read once rather than per call.

``GSP_KERNEL`` picks the layer's implementation there (its ``torch.compile``'d parts or the
hand-written Triton kernels) and ``GSP_COMPILE`` turns compiling those parts on or off.  The
layer asks :func:`runtime_options` on every call, which is a variable lookup; the switches are
set once at start: by the service from its settings (environment and ``.env``), by the ``gsp``
command line from the environment, and otherwise read from the environment on first use (a
script importing ``model``).  Tests and benchmarks change them for a block with
:func:`using_runtime_options`.  model/ never reads the service's settings itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, cast, get_args

__all__ = [
    "KERNELS",
    "Kernel",
    "RuntimeOptions",
    "runtime_options",
    "set_runtime_options",
    "using_runtime_options",
]

Kernel = Literal["compiled", "triton"]
KERNELS: tuple[str, ...] = get_args(Kernel)

# The spellings GSP_COMPILE accepts, as pydantic reads the service's boolean settings.
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class RuntimeOptions:
    """``kernel``: how the layer runs on CUDA, ``compiled`` (its parts under ``torch.compile``,
    model/compiling.py) or ``triton`` (model/gsp_triton.py; the default once measured faster).
    ``compile``: whether those parts are compiled on CUDA at all (off: eager, e.g. to debug)."""

    kernel: Kernel = "compiled"
    compile: bool = True

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be a bool, got {self.compile!r}")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> RuntimeOptions:
        """The options ``GSP_KERNEL`` and ``GSP_COMPILE`` ask for (defaults where unset); a
        value that is not understood is an error naming the variable, never ignored."""
        env = os.environ if environ is None else environ
        kernel = env.get("GSP_KERNEL", cls.kernel)
        if kernel not in KERNELS:
            raise ValueError(f"GSP_KERNEL must be one of {', '.join(KERNELS)}, got {kernel!r}")
        return cls(kernel=cast(Kernel, kernel), compile=_flag(env, "GSP_COMPILE", cls.compile))


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = env.get(name)
    if text is None:
        return default
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise ValueError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {text!r}")


_current: RuntimeOptions | None = None  # None until set, or read from the environment on use


def runtime_options() -> RuntimeOptions:
    """The options in force: the last ones set, else the environment's, read on first use."""
    global _current
    if _current is None:
        _current = RuntimeOptions.from_environment()
    return _current


def set_runtime_options(options: RuntimeOptions) -> None:
    """Make ``options`` the ones in force for the whole process (a program's start)."""
    global _current
    _current = options


@contextmanager
def using_runtime_options(
    *, kernel: Kernel | None = None, compile: bool | None = None
) -> Iterator[RuntimeOptions]:
    """The options in force with the given ones changed, inside the block only; whatever was in
    force before is restored after it, even when the block sets options itself."""
    global _current
    saved = _current
    current = runtime_options()
    _current = RuntimeOptions(
        kernel=current.kernel if kernel is None else kernel,
        compile=current.compile if compile is None else compile,
    )
    try:
        yield _current
    finally:
        _current = saved
