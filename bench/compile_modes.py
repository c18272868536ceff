"""Host cost of the GSP layer's compiled parts: torch's default shapes against fully symbolic ones.

On a GPU the layer is bound by the host that launches its kernels (docs/benchmarks.md), and that
host work is the same Python, guards and launch code wherever the kernels run. So this stand-in
compiles the layer's parts on the CPU, at sizes so small that arithmetic is negligible, with the
GPU's schedule (8 Newton steps per convergence check), and times a forward + backward with the
parts compiled two ways, alternately in one process:

- ``default``: what ``model.compiling.fused`` does (``torch.compile(part)``: exact sizes first,
  sizes that later change become symbolic);
- ``dynamic=True``: every size symbolic from the start (the layer's setting before 2026-11-27).

Each is timed at a fixed batch, as a training job runs it, and after a batch of another size has
made the batch dimension symbolic, as a service runs it after its warm-up.

    .venv/bin/python bench/compile_modes.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.compiling as compiling
import model.gsp_function as gsp_function
from model.gsp import GeneralizedSumPooling
from model.solver import EAGER, Solver

GPU_STEPS_PER_CHECK = 8  # model.solver's schedule on CUDA


def on_cpu_as_on_gpu() -> None:
    """Compile on the CPU too, and solve in the GPU's blocks of Newton steps."""
    compiling.compile_enabled = lambda device: True

    def solver_for(device: torch.device) -> Solver:
        parts = (compiling.fused(part, device) for part in EAGER[:4])
        return Solver(*parts, steps_per_check=GPU_STEPS_PER_CHECK)

    gsp_function.solver_for = solver_for


def fully_symbolic(compiled: dict[Callable, Callable]) -> dict[Callable, Callable]:
    """The same parts compiled with ``dynamic=True``, from copies of their code (Dynamo keeps
    its graphs on the code object, so the two modes must not share one)."""

    def copy(part: Callable) -> Callable:
        code = part.__code__.replace()
        return types.FunctionType(
            code, part.__globals__, part.__name__, part.__defaults__, part.__closure__
        )

    return {part: torch.compile(copy(part), dynamic=True) for part in compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100, help="forward + backward per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    on_cpu_as_on_gpu()
    torch.manual_seed(0)
    layer = GeneralizedSumPooling(8, 8, num_prototypes=4)
    inputs = {batch: torch.randn(batch, 8, 2, 2, requires_grad=True) for batch in (2, 3)}

    def step(batch: int = 2) -> None:
        result = layer(inputs[batch])
        (result.embedding.sum() + result.weights.sum()).backward()

    modes = {"default": compiling._compiled}
    step()  # fills the default cache with every part the layer compiles
    modes["dynamic=True"] = fully_symbolic(compiling._compiled)
    results: dict[tuple[str, str], list[float]] = {}
    for schedule, other_batch in (("one batch size", None), ("after a batch of 3", 3)):
        for cache in modes.values():  # warm up; the batch of 3 recompiles where it must
            compiling._compiled = cache
            if other_batch is not None:
                step(other_batch)
            for _ in range(20):
                step()
        for _ in range(args.rounds):
            for mode, cache in modes.items():
                compiling._compiled = cache
                started = time.perf_counter()
                for _ in range(args.calls):
                    step()
                elapsed = (time.perf_counter() - started) / args.calls * 1000.0
                results.setdefault((schedule, mode), []).append(elapsed)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        "1 thread; layer GeneralizedSumPooling(8, 8, num_prototypes=4), batch 2, 2x2 map"
    )
    print(f"{'schedule':>20} {'default ms':>11} {'dynamic=True ms':>16} {'ratio':>6}")
    for schedule in ("one batch size", "after a batch of 3"):
        ours = statistics.median(results[(schedule, "default")])
        symbolic = statistics.median(results[(schedule, "dynamic=True")])
        print(f"{schedule:>20} {ours:>11.3f} {symbolic:>16.3f} {ours / symbolic:>5.2f}x")


if __name__ == "__main__":
    main()
