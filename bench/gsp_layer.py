"""Benchmark of the GSP layer: cost, solver speed and exactness, training step, memory.

Everything is measured side by side in one run and printed as ratios, because the machines are
shared and noisy.  Run ``python bench/gsp_layer.py --device cpu`` (or ``cuda``).  On CUDA the
layer is timed both ways it can run there (model/gsp_function.py): its compiled parts (the
default) and the hand-written Triton kernels (``GSP_KERNEL=triton``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.gsp import GeneralizedSumPooling
from model.reference_transport import fixed_point_transport
from model.runtime import Kernel, using_runtime_options
from model.transport import partial_transport


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds after two warm-up calls."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def interleaved(fns: dict[str, Callable[[], object]], device, repeats: int) -> dict[str, float]:
    """Time several functions in alternation, so that machine noise hits all of them alike."""
    results: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(3):
        for name, fn in fns.items():
            results[name].append(timed(fn, device, repeats))
    return {name: min(values) for name, values in results.items()}


def on_kernels(kernel: Kernel, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run with the runtime option ``kernel`` (``GSP_KERNEL``): how the layer runs on
    CUDA."""

    def run() -> None:
        with using_runtime_options(kernel=kernel):
            fn()

    return run


def both_kernels(name: str, fn: Callable[[], None], device: torch.device) -> dict[str, Callable]:
    """``{name: fn}`` on a CPU; on CUDA ``fn`` on the compiled parts and, as ``name +
    " triton"``, on the Triton kernels (left out, with the error printed, if they fail)."""
    if device.type != "cuda":
        return {name: fn}
    runs = {name: on_kernels("compiled", fn)}
    try:
        on_kernels("triton", fn)()
    except Exception as error:  # report and measure the rest
        print(f"   the Triton kernels failed: {error!r}")
        return runs
    return {**runs, f"{name} triton": on_kernels("triton", fn)}


def fresh_compiles() -> None:
    """Forget every compiled graph, so that the next configuration compiles for its own sizes
    as a training job of that shape would (on CUDA the layer's parts are compiled for the first
    sizes they see; a later change of sizes recompiles them with those sizes symbolic)."""
    torch.compiler.reset()


def layer_against_cost_matrix(device: torch.device, repeats: int) -> None:
    print("\n1. Layer forward+backward against projection + cost matrix forward+backward")
    print("   (B=64, C=1280, d=512, m=64)")
    for side in (7, 14):
        fresh_compiles()
        layer = GeneralizedSumPooling(1280, 512, num_prototypes=64).to(device)
        features = torch.randn(64, 1280, side, side, device=device, requires_grad=True)

        def whole_layer(layer=layer, features=features) -> None:
            result = layer(features)
            (result.embedding.sum() + result.histogram.sum()).backward()

        def cost_only(layer=layer, features=features) -> None:
            layer.costs(layer.projection(features)).sum().backward()

        runs = {**both_kernels("layer", whole_layer, device), "cost": cost_only}
        t = interleaved(runs, device, repeats)
        print(
            f"   n={side * side:4d}: layer {t['layer']:8.2f} ms, projection+cost "
            f"{t['cost']:8.2f} ms, ratio {t['layer'] / t['cost']:.2f}x (target <= 1.5x)"
        )
        if "layer triton" in t:
            print(
                f"   n={side * side:4d}: layer on the Triton kernels {t['layer triton']:8.2f} ms, "
                f"ratio {t['layer triton'] / t['cost']:.2f}x (target <= 1.5x)"
            )
        solve_share(layer, features, device, repeats)


def solve_share(layer: GeneralizedSumPooling, features, device, repeats: int) -> None:
    """Where the rest goes: the transport solve alone, forward and backward."""
    with torch.no_grad():
        cost = layer.costs(layer.projection(features))
    cost.requires_grad_()

    def solve() -> None:
        plan, residual = partial_transport(cost, layer.transport_ratio, layer.entropy_weight)
        (plan.sum() + residual.sum()).backward()

    solve_ms = timed(solve, device, repeats)
    print(f"          of which the transport solve forward+backward: {solve_ms:.2f} ms")


def profiled(fn: Callable[[], object], device: torch.device, calls: int):
    """Operator statistics of ``calls`` calls of ``fn``: the host's, and the GPU's on one."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return profile.key_averages()


def profile_layer(device: torch.device) -> None:
    """Where a layer forward+backward spends its time, by operation (``--profile``)."""
    print("\nProfile: layer forward+backward, B=64 C=1280 d=512 m=64 n=49, 10 calls")
    layer = GeneralizedSumPooling(1280, 512, num_prototypes=64).to(device)
    features = torch.randn(64, 1280, 7, 7, device=device, requires_grad=True)

    def whole_layer() -> None:
        result = layer(features)
        (result.embedding.sum() + result.histogram.sum()).backward()

    for name, run in both_kernels("layer", whole_layer, device).items():
        timed(run, device, 3)
        print(f"   {name}: operators by host time")
        print(profiled(run, device, 10).table(sort_by="self_cpu_time_total", row_limit=25))


def solver_against_fixed_point(device: torch.device, repeats: int) -> None:
    print("\n2. Exact solve against the reference 100-iteration fixed point (float32 inputs)")
    fresh_compiles()
    torch.manual_seed(0)
    cost = torch.rand(64, 64, 196, device=device) * 2
    gamma = 5.0
    t = interleaved(
        {
            "exact": lambda: partial_transport(cost, 0.3, gamma),
            "fixed": lambda: fixed_point_transport(cost, 0.3, gamma, iterations=100),
        },
        device,
        repeats,
    )
    print(
        f"   B=64 m=64 n=196: exact {t['exact']:.2f} ms, fixed point {t['fixed']:.2f} ms, "
        f"speed-up {t['fixed'] / t['exact']:.2f}x"
    )
    print("   max |plan - float64 exact| (and residual), by transport ratio:")
    cost64 = cost.double()
    for ratio in (0.3, 0.9, 0.99, 1.0):
        truth_plan, truth_residual = partial_transport(cost64, ratio, gamma)
        ours = partial_transport(cost, ratio, gamma)
        ref = fixed_point_transport(cost, ratio, gamma, iterations=100)
        err_ours = max(
            (ours[0].double() - truth_plan).abs().max().item(),
            (ours[1].double() - truth_residual).abs().max().item(),
        )
        err_ref = max(
            (ref[0].double() - truth_plan).abs().max().item(),
            (ref[1].double() - truth_residual).abs().max().item(),
        )
        print(f"   mu={ratio:<5}: exact {err_ours:.2e}   fixed point {err_ref:.2e}")


def resnet_steps(device: torch.device) -> dict[str, Callable[[], None]]:
    """One training step (forward, backward, AdamW) of a ResNet-50 at 224 px, batch 8, with a
    GSP head and with a GAP head."""

    def make(pooling: str):
        backbone = torch.nn.Sequential(*list(torchvision.models.resnet50().children())[:-2])
        if pooling == "gsp":
            head = GeneralizedSumPooling(2048, 512, num_prototypes=64)
        else:
            from model.gsp import GlobalAveragePooling

            head = GlobalAveragePooling(2048, 512)
        model = torch.nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, optimizer

    images = torch.randn(8, 3, 224, 224, device=device)
    steps = {}
    for pooling in ("gsp", "gap"):
        model, optimizer = make(pooling)

        def step(model=model, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            embedding = model["head"](model["backbone"](images)).embedding
            torch.nn.functional.normalize(embedding, dim=1).sum().backward()
            optimizer.step()

        steps.update(both_kernels(pooling, step, device) if pooling == "gsp" else {"gap": step})
    return steps


def training_step(device: torch.device, repeats: int) -> None:
    print("\n3. ResNet-50 training step at 224 px, batch 8: GSP against GAP")
    fresh_compiles()
    t = interleaved(resnet_steps(device), device, max(2, repeats // 4))
    print(
        f"   GSP {t['gsp']:.1f} ms, GAP {t['gap']:.1f} ms, ratio {t['gsp'] / t['gap']:.3f}x "
        "(target <= 1.05x)"
    )
    if "gsp triton" in t:
        print(
            f"   GSP on the Triton kernels {t['gsp triton']:.1f} ms, "
            f"ratio {t['gsp triton'] / t['gap']:.3f}x (target <= 1.05x)"
        )


def profile_training_step(device: torch.device, steps: int = 5) -> None:
    """Where the GSP head's extra time in a training step goes (``--profile-step``): per head,
    the step's wall time, the device's kernel time and the host's time blocked in
    synchronisations (both heads' figures include the one wait that ends each profile), then
    GSP's operators by host time."""
    print(f"\nProfile: ResNet-50 training step, 224 px, batch 8, {steps} steps per head")
    for name, step in resnet_steps(device).items():
        wall = timed(step, device, 3)
        events = profiled(step, device, steps)
        kernels_us = sum(event.self_device_time_total for event in events)
        blocked_us = sum(
            event.self_cpu_time_total for event in events if "Synchronize" in event.key
        )
        print(
            f"   {name}: {wall:.1f} ms per step; device kernels {kernels_us / steps / 1e3:.1f} "
            f"ms; host blocked in synchronisations {blocked_us / steps / 1e3:.1f} ms"
        )
        if name.startswith("gsp"):
            print(f"   {name}: operators by host time")
            print(events.table(sort_by="self_cpu_time_total", row_limit=25))


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn``."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn().backward()
    return sum(storages.values())


def peak_memory(device: torch.device) -> None:
    print("\n4. Memory of forward+backward: analytic gradient against 100 unrolled iterations")
    torch.manual_seed(0)
    base_cost = torch.rand(64, 64, 196, device=device) * 2

    def analytic() -> torch.Tensor:
        cost = base_cost.clone().requires_grad_()
        plan, residual = partial_transport(cost, 0.3, 5.0)
        return plan.sum() + residual.sum()

    def unrolled() -> torch.Tensor:
        cost = base_cost.clone().requires_grad_()
        plan, residual = fixed_point_transport(cost, 0.3, 5.0, iterations=100)
        return plan.sum() + residual.sum()

    ours, ref = saved_bytes(analytic), saved_bytes(unrolled)
    print(
        f"   saved for backward: analytic {ours / 2**20:.2f} MiB, unrolled {ref / 2**20:.2f} MiB, "
        f"ratio {ours / ref:.3f} (target <= 0.333)"
    )
    if device.type == "cuda":
        peaks = {}
        for name, fn in (("analytic", analytic), ("unrolled", unrolled)):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            fn().backward()
            torch.cuda.synchronize(device)
            peaks[name] = torch.cuda.max_memory_allocated(device) - start
        print(
            f"   CUDA peak above baseline: analytic {peaks['analytic'] / 2**20:.2f} MiB, "
            f"unrolled {peaks['unrolled'] / 2**20:.2f} MiB, "
            f"ratio {peaks['analytic'] / peaks['unrolled']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-resnet", action="store_true", help="skip the training step")
    parser.add_argument(
        "--profile", action="store_true", help="only print an operator profile of the layer"
    )
    parser.add_argument(
        "--profile-step",
        action="store_true",
        help="only profile the ResNet-50 training step with each head",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"machine: {machine(device)}")
    if args.profile:
        profile_layer(device)
        return
    if args.profile_step:
        profile_training_step(device)
        return
    layer_against_cost_matrix(device, args.repeats)
    solver_against_fixed_point(device, args.repeats)
    peak_memory(device)
    if not args.skip_resnet:
        training_step(device, args.repeats)


if __name__ == "__main__":
    main()
