"""The embedding forward (or the GSP layer alone) replayed as CUDA graphs at a few batch sizes.

On a GPU a batch-1 ResNet-50 + GSP forward is bound by kernel launches and host work, not
arithmetic (issue 21: about 7 ms for about 1 ms of work); a captured CUDA graph launches the
whole forward at once. Graphs have static shapes, so a batch is padded up to the next
*bucket* size (:data:`BUCKETS`) by repeating its first image, and the outputs are cut back:
in inference rows never interact (batch norm uses running statistics, pooling is per image),
so a padded batch's real rows equal the unpadded batch's. Batches larger than the largest
bucket run as they are.

Modes (``GSP_CUDA_GRAPHS``; ``bench/graphs.py`` measures them side by side):

- ``graphs``: one ``torch.cuda.CUDAGraph`` per bucket around the whole forward. GSP reads its
  input checks and its solver's first convergence flag on the host once per forward; during
  capture that read is deferred (:func:`model.checks.deferred_verification`) into one flag the
  graph recomputes on every replay. A replay whose flag fails (non-finite input, or a solve
  that needed more than the first Newton block, which is rare) is run again eagerly, which
  raises or iterates exactly as without graphs.
- ``reduce-overhead``: ``torch.compile(mode="reduce-overhead")``; torch splits the forward
  at the host read and captures the pieces between.
- ``off``: the forward as it is. Always so on a CPU, where arithmetic, not launches, sets
  the time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from model.checks import deferred_verification
from model.hardware import GRAPH_MODES, GraphMode

__all__ = ["BUCKETS", "GRAPH_MODES", "BucketedForward", "GraphMode", "bucket_for", "cut", "padded"]

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Eager runs before a capture: cuDNN picks its algorithms and lazy initialisation happens
# outside the graph.
_WARM_UP_RUNS = 2

Output = TypeVar("Output")


def bucket_for(size: int, buckets: Sequence[int] = BUCKETS) -> int | None:
    """The smallest bucket holding ``size`` rows; None past the largest."""
    if size < 1:
        raise ValueError(f"a batch needs at least one row, got {size}")
    return next((bucket for bucket in sorted(buckets) if bucket >= size), None)


def padded(batch: Tensor, size: int) -> Tensor:
    """``batch`` with its first row repeated up to ``size`` rows (a real input, so every
    check the forward makes on it holds)."""
    missing = size - batch.shape[0]
    if missing < 0:
        raise ValueError(f"cannot pad {batch.shape[0]} rows to {size}")
    if missing == 0:
        return batch
    return torch.cat([batch, batch[:1].expand(missing, *batch.shape[1:])])


def cut(output: Output, rows: int) -> Output:
    """The first ``rows`` rows of every tensor in ``output`` (a tensor, a tuple or list of
    them, or a dataclass such as ``EmbeddingOutput``), cloned: a graph's outputs are
    overwritten by its next replay."""
    return _map(lambda tensor: tensor[:rows].clone(), output)


def _map(function: Callable[[Tensor], Tensor], value: Any) -> Any:
    if isinstance(value, Tensor):
        return function(value)
    if isinstance(value, tuple | list):
        return type(value)(_map(function, item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            field.name: _map(function, getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
        return dataclasses.replace(value, **changes)
    return value


@dataclasses.dataclass
class _Captured(Generic[Output]):
    graph: torch.cuda.CUDAGraph
    inputs: Tensor
    output: Output
    holds: Tensor  # every deferred check held in the last replay


class BucketedForward(Generic[Output]):
    """``forward`` (inference only: call it under ``torch.inference_mode``) run through CUDA
    graphs per bucket, or as it is (see the module doc for ``mode``)."""

    def __init__(
        self,
        forward: Callable[[Tensor], Output],
        device: torch.device,
        mode: GraphMode = "off",
        buckets: Sequence[int] = BUCKETS,
    ) -> None:
        if mode not in GRAPH_MODES:
            raise ValueError(f"unknown CUDA graph mode {mode!r}; choose one of {GRAPH_MODES}")
        self.forward = forward
        self.mode: GraphMode = mode if device.type == "cuda" else "off"
        self.buckets = tuple(sorted(buckets))
        self._captured: dict[tuple[int, tuple[int, ...], torch.dtype], _Captured[Output]] = {}
        self._compiled: Callable[[Tensor], Output] | None = None
        if self.mode == "reduce-overhead":
            self._compiled = torch.compile(forward, mode="reduce-overhead", dynamic=False)

    def __call__(self, batch: Tensor) -> Output:
        bucket = bucket_for(batch.shape[0], self.buckets)
        if self.mode == "off" or bucket is None:
            return self.forward(batch)
        if self._compiled is not None:
            torch.compiler.cudagraph_mark_step_begin()
            return cut(self._compiled(padded(batch, bucket)), batch.shape[0])
        captured = self._capture(bucket, batch)
        captured.inputs.copy_(padded(batch, bucket))
        captured.graph.replay()
        if not bool(captured.holds):  # one host read, as the eager forward makes
            return self.forward(batch)
        return cut(captured.output, batch.shape[0])

    def warm_up(self, sample: Tensor, largest: int) -> None:
        """Capture (or compile) every bucket up to ``largest`` rows from one sample input row,
        so that no request waits for it."""
        if self.mode == "off":
            return
        for bucket in self.buckets:
            if bucket > largest:
                break
            self(sample[:1].expand(bucket, *sample.shape[1:]).contiguous())

    def _capture(self, bucket: int, batch: Tensor) -> _Captured[Output]:
        key = (bucket, tuple(batch.shape[1:]), batch.dtype)
        if key in self._captured:
            return self._captured[key]
        inputs = padded(batch, bucket).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARM_UP_RUNS):
                self.forward(inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with deferred_verification() as flags, torch.cuda.graph(graph):
            output = self.forward(inputs)
            holds = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)
        self._captured[key] = _Captured(graph, inputs, output, holds)
        return self._captured[key]
