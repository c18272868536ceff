"""The GSP layer's Triton kernels (model/gsp_triton.py) against the float64 fixed point and the
compiled path's eager form, and built by Triton's compiler for real GPUs (no GPU needed).

The kernels run on CUDA where there is a GPU. Elsewhere this module runs in a child process
under Triton's interpreter (``TRITON_INTERPRET=1`` must be set before Triton is imported),
started by the first test below; in the parent process the kernel tests then skip, since the
child has run them (and that test checks that none skipped there).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model.compiling as compiling
import model.gsp_function as gsp_function
from model.gsp import GeneralizedSumPooling
from model.runtime import RuntimeOptions, using_runtime_options

# Triton comes with torch's Linux wheels only; elsewhere the layer has its compiled path alone.
pytest.importorskip("triton", reason="Triton is not installed (torch ships it on Linux)")
from model.gsp_triton import MAX_LOCATIONS
from model.reference_transport import converged_fixed_point
from model.transport import partial_transport
from tests.conftest import RATIOS, adversarial_costs

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
kernels = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED,
    reason="no GPU: test_kernels_under_the_interpreter runs these under Triton's interpreter",
)


# What the child process runs: the tests of the kernels themselves.
_KERNEL_TESTS = "not under_the_interpreter and not compile_for_a_gpu"


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="this is the child process that test starts")
@pytest.mark.skipif(DEVICE == "cuda", reason="the kernel tests below run natively on this GPU")
def test_kernels_under_the_interpreter() -> None:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            _KERNEL_TESTS,
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    # Every kernel test ran there: none skipped.
    assert re.search(r"\b\d+ passed, \d+ deselected in\b", child.stdout), child.stdout[-2000:]


def test_asking_for_the_kernels_without_triton_says_what_is_missing(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "model.gsp_triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now fails
    with (
        using_runtime_options(kernel="triton"),
        pytest.raises(RuntimeError, match="GSP_KERNEL=triton needs the triton package"),
    ):
        gsp_function.triton_selected(torch.device("cuda"), 49)


def test_the_kernels_run_on_cuda_when_the_runtime_options_choose_them() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert RuntimeOptions().kernel == "compiled"  # the compiled parts by default
    with using_runtime_options(kernel="compiled"):
        assert not gsp_function.triton_selected(cuda, 49)
    with using_runtime_options(kernel="triton"):
        assert gsp_function.triton_selected(cuda, 49)
        assert gsp_function.triton_selected(cuda, MAX_LOCATIONS)
        assert not gsp_function.triton_selected(cuda, MAX_LOCATIONS + 1)
        assert not gsp_function.triton_selected(cpu, 49)


# Pointer arguments that are float64 whatever the input precision (model/gsp_triton.py).
_FLOAT64_POINTERS = {"ratio_ptr", "gamma_ptr", "log_mass_ptr", "offset_ptr", "grad_ratio_ptr"}


def cubin_for(kernel, arch: int, dtype: str, constants: dict[str, object], warps: int) -> bytes:
    """``kernel`` compiled for ``sm_<arch>`` as the launch wrappers would launch it, for
    ``dtype`` cosines and features (Triton's own compiler and ptxas: no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    work = "fp64" if dtype == "fp64" else "fp32"
    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in ("m", "n", "d"):
            signature[param.name] = "i32"
        elif param.name == "flags_ptr":
            signature[param.name] = "*i32"
        elif param.name in _FLOAT64_POINTERS:
            signature[param.name] = "*fp64"
        elif param.name in ("cosine_ptr", "unary_ptr", "projected_ptr", "grad_projected_ptr"):
            signature[param.name] = f"*{dtype}"
        else:
            signature[param.name] = f"*{work}"
    compiled = triton.compile(
        ASTSource(kernel, signature, constants),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps},
    )
    return compiled.asm["cubin"]


def resource_usage(cubin: bytes, tmp_path: Path) -> dict[str, int]:
    """Registers and stack bytes (where spills go) per thread, as ``cuobjdump`` reports them."""
    import triton

    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    report = subprocess.run(
        [str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK):(\d+)", report)}


@pytest.mark.skipif(INTERPRETED, reason="the interpreter replaces the kernels")
@pytest.mark.skipif(DEVICE == "cuda", reason="the kernel tests below compile them for this GPU")
@pytest.mark.parametrize("arch", [80, 90])  # A100, H100
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
@pytest.mark.parametrize(("m", "n"), [(64, 49), (64, 196), (256, MAX_LOCATIONS)])
def test_the_kernels_compile_for_a_gpu_without_spilling(
    arch: int, dtype: str, m: int, n: int, tmp_path: Path
) -> None:
    from model import gsp_triton

    chosen = gsp_triton._blocks(m, n, 512)
    blocks = {"BLOCK_M": chosen.m, "BLOCK_N": chosen.n, "BLOCK_D": chosen.d}
    forward = {"HAS_UNARY": True, **gsp_triton._SOLVER_CONSTANTS, **blocks}
    every_gradient = ("WEIGHTS", "PLAN", "HISTOGRAM", "EMBEDDING")
    backward = {
        "HAS_UNARY": True,
        **{f"HAS_GRAD_{output}": True for output in every_gradient},
        **blocks,
    }
    for kernel, constants in (
        (gsp_triton._forward_kernel, forward),
        (gsp_triton._backward_kernel, backward),
    ):
        usage = resource_usage(cubin_for(kernel, arch, dtype, constants, chosen.warps), tmp_path)
        # A few spilled values at most (ptxas's choice); a tile too large for the registers
        # spills hundreds of bytes per thread.
        assert usage["STACK"] <= 64, usage
        assert 0 < usage["REG"] <= 255, usage


def cosines_for(cost: torch.Tensor) -> torch.Tensor:
    """Cosines whose costs ``sqrt(2 - 2 cos)`` are ``cost``."""
    return 1 - cost.double() ** 2 / 2


def kernel_costs(cosine: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * cosine).clamp_min(1e-12).sqrt()


@kernels
@pytest.mark.parametrize("n", [1, 4, 49, 196])
@pytest.mark.parametrize("m", [1, 8, 64, 256])
@pytest.mark.parametrize("gamma", [0.1, 5.0, 100.0])
def test_forward_matches_converged_fixed_point(n: int, m: int, gamma: float) -> None:
    from model.gsp_triton import transport_forward

    cosine = cosines_for(adversarial_costs(m, n))
    cost = kernel_costs(cosine)
    ratios = torch.cat([RATIOS, RATIOS[[0, 2, 4, 3]]])
    features = torch.randn(len(ratios), 3, n, dtype=torch.float64)
    solved = transport_forward(
        cosine.to(DEVICE), None, ratios.to(DEVICE), features.to(DEVICE), gamma
    )
    plan, weights = solved.plan.cpu(), solved.weights.cpu()
    residual = (1 - weights * ratios[:, None]) / n
    ref_plan, ref_residual = converged_fixed_point(cost, ratios, gamma)
    assert (plan - ref_plan).abs().max() < 1e-6
    assert (residual - ref_residual).abs().max() < 1e-6
    # The same Newton iterates as the solver: equal to float64 precision.
    exact_plan, exact_residual = partial_transport(cost, ratios, gamma)
    assert (plan - exact_plan).abs().max() < 1e-12
    assert (residual - exact_residual).abs().max() < 1e-12
    assert torch.allclose(solved.histogram.cpu(), plan.sum(2) / ratios[:, None], atol=1e-14)
    pooled = (features * weights[:, None, :]).mean(dim=2)
    assert torch.allclose(solved.embedding.cpu(), pooled, atol=1e-14)
    assert bool(solved.finite_cosines) and bool(solved.finite_unary) and bool(solved.in_range)


def layer_inputs(batch: int = 3, d: int = 5, m: int = 4, side: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE)

    projected = draw(batch, d, side, side)
    prototypes = draw(m, d)
    unary = draw(batch, side, side) * 0.3
    ratio = torch.tensor([0.2, 0.6, 1.0][:batch], dtype=torch.float64, device=DEVICE)
    return projected, prototypes, unary, ratio


def upstream_gradients(seed: int) -> list[torch.Tensor]:
    """Random gradients w.r.t. weights, plan, embedding and histogram of :func:`layer_inputs`'
    default sizes, on the device the kernels run on."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 9), (3, 4, 9), (3, 5), (3, 4)]
    return [
        torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE) for shape in shapes
    ]


def pooled_with_gradients(pool, inputs, upstream, gamma: float):
    leaves = [tensor.clone().requires_grad_() for tensor in inputs]
    outputs = pool.apply(*leaves, gamma)
    pairs = zip(outputs, upstream, strict=True)
    loss = sum((output * grad).sum() for output, grad in pairs if grad is not None)
    torch.autograd.backward(loss)
    return [output.detach() for output in outputs], [leaf.grad for leaf in leaves]


@kernels
@pytest.mark.parametrize("used", ["all", "embedding", "weights and plan"])
@pytest.mark.parametrize("gamma", [0.5, 5.0, 50.0])
def test_outputs_and_gradients_equal_the_compiled_paths(used: str, gamma: float) -> None:
    inputs = layer_inputs()
    keep = {"all": (0, 1, 2, 3), "embedding": (2,), "weights and plan": (0, 1)}[used]
    upstream = [grad if i in keep else None for i, grad in enumerate(upstream_gradients(1))]
    ours, our_grads = pooled_with_gradients(gsp_function._TritonGSPPool, inputs, upstream, gamma)
    cpu_inputs = [tensor.cpu() for tensor in inputs]
    cpu_upstream = [None if grad is None else grad.cpu() for grad in upstream]
    theirs, their_grads = pooled_with_gradients(
        gsp_function._GSPPool, cpu_inputs, cpu_upstream, gamma
    )
    for mine, reference in zip(ours + our_grads, theirs + their_grads, strict=True):
        assert torch.allclose(mine.cpu(), reference, atol=1e-11, rtol=1e-9)


@kernels
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs g++")
def test_the_compiled_cosine_gradients_equal_the_eager_ones(monkeypatch) -> None:
    """On CUDA the backward's cosine gradients run compiled; here on the CPU, the same."""
    inputs = layer_inputs()
    upstream = upstream_gradients(2)
    pool = gsp_function._TritonGSPPool
    eager = pooled_with_gradients(pool, inputs, upstream, 5.0)
    monkeypatch.setattr(compiling, "compile_enabled", lambda device: True)
    compiled = pooled_with_gradients(pool, inputs, upstream, 5.0)
    for ours, reference in zip(compiled[0] + compiled[1], eager[0] + eager[1], strict=True):
        assert (ours - reference).abs().max() < 1e-12


@kernels
def test_gradcheck() -> None:
    projected, prototypes, unary, ratio = layer_inputs(batch=2, d=3, m=3, side=2)
    ratio = ratio[:2].clone().requires_grad_()
    leaves = [tensor.requires_grad_() for tensor in (projected, prototypes, unary)]

    def pooled(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return gsp_function._TritonGSPPool.apply(*tensors, 4.0)

    assert torch.autograd.gradcheck(pooled, (*leaves, ratio), atol=1e-7)


@kernels
def test_the_layer_runs_on_the_kernels_when_selected(monkeypatch) -> None:
    torch.manual_seed(0)
    layer = GeneralizedSumPooling(6, 5, num_prototypes=4).double().to(DEVICE)
    features = torch.randn(2, 6, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    applied = []
    original = gsp_function._TritonGSPPool.forward

    def counted(*args):
        applied.append(True)
        return original(*args)

    monkeypatch.setattr(gsp_function._TritonGSPPool, "forward", staticmethod(counted))
    monkeypatch.setattr(gsp_function, "triton_selected", lambda device, locations: True)
    ours = layer(features, transport_ratio=0.4)
    (ours.embedding.sum() + ours.histogram[:, 0].sum()).backward()
    our_grad = features.grad.clone()
    assert applied
    monkeypatch.setattr(gsp_function, "triton_selected", lambda device, locations: False)
    features.grad = None
    theirs = layer(features, transport_ratio=0.4)
    (theirs.embedding.sum() + theirs.histogram[:, 0].sum()).backward()
    assert len(applied) == 1
    assert torch.allclose(ours.embedding, theirs.embedding, atol=1e-12)
    assert torch.allclose(ours.weights, theirs.weights, atol=1e-12)
    assert torch.allclose(ours.plan, theirs.plan, atol=1e-12)
    assert torch.allclose(our_grad, features.grad, atol=1e-11)


@kernels
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("nan features", "feature map .* NaN or infinite"),
        ("inf features", "feature map .* NaN or infinite"),
        ("nan prototypes", "cost contains NaN or infinite"),
        ("inf unary", "cost contains NaN or infinite"),
        ("ratio 0", r"transport_ratio must lie in \(0, 1\]"),
        ("ratio 1.5", r"transport_ratio must lie in \(0, 1\]"),
    ],
)
def test_bad_input_gets_the_compiled_paths_errors(change: str, message: str) -> None:
    projected, prototypes, unary, ratio = layer_inputs()
    if change == "nan features":
        projected[1, 2, 0, 0] = float("nan")
    elif change == "inf features":
        projected[2, 0, 1, 2] = -float("inf")
    elif change == "nan prototypes":
        prototypes[3, 1] = float("nan")
    elif change == "inf unary":
        unary[0, 1, 1] = float("inf")
    else:
        ratio[1] = float(change.split()[1])
    with pytest.raises(ValueError, match=message):
        gsp_function._TritonGSPPool.apply(projected, prototypes, unary, ratio, 5.0)


@kernels
def test_float32_inputs_give_float32_outputs_close_to_float64() -> None:
    inputs = layer_inputs(batch=2, d=8, m=6, side=5)
    exact = gsp_function._TritonGSPPool.apply(*inputs, 5.0)
    single = gsp_function._TritonGSPPool.apply(*(tensor.float() for tensor in inputs), 5.0)
    for low, high in zip(single, exact, strict=True):
        assert low.dtype == torch.float32
        assert torch.allclose(low.double(), high, atol=1e-5, rtol=1e-5)
