"""The exact partial-transport solver against the official fixed point, and its gradient."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import model.compiling as compiling
import model.solver as solver
import model.transport as transport
from model.checks import DeferredChecks
from model.reference_transport import converged_fixed_point, fixed_point_transport
from model.runtime import Kernel, using_runtime_options
from model.transport import partial_transport
from tests.conftest import RATIOS, adversarial_costs


@pytest.mark.parametrize("n", [1, 4, 49, 196])
@pytest.mark.parametrize("m", [1, 8, 64, 256])
@pytest.mark.parametrize("gamma", [0.1, 5.0, 100.0])
def test_plan_matches_converged_fixed_point(n: int, m: int, gamma: float) -> None:
    cost = adversarial_costs(m, n)
    ratios = torch.cat([RATIOS, RATIOS[[0, 2, 4, 3]]])
    plan, residual = partial_transport(cost, ratios, gamma)
    ref_plan, ref_residual = converged_fixed_point(cost, ratios, gamma)
    assert (plan - ref_plan).abs().max() < 1e-6
    assert (residual - ref_residual).abs().max() < 1e-6
    # Far tighter than the required 1e-6 in practice: the solve is exact to float64 precision.
    assert (plan - ref_plan).abs().max() < 1e-12


@pytest.mark.parametrize("gamma", [0.1, 1.0, 5.0, 20.0, 100.0])
def test_newton_converges_in_a_handful_of_steps(gamma: float) -> None:
    cost = torch.rand(len(RATIOS), 64, 196, generator=torch.Generator().manual_seed(3)) * 2
    steps = transport._solve(cost, RATIOS, gamma).steps
    assert steps <= 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_marginals_hold(dtype: torch.dtype) -> None:
    cost = torch.rand(6, 16, 49, dtype=dtype) * 2
    ratios = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.99, 1.0], dtype=dtype)
    plan, residual = partial_transport(cost, ratios, 10.0)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert torch.allclose(plan.sum(1) + residual, torch.full_like(residual, 1 / 49), atol=tol)
    assert torch.allclose(plan.sum((1, 2)), ratios, atol=tol)
    assert (plan >= 0).all() and (residual >= 0).all()


def test_full_ratio_transports_everything() -> None:
    cost = torch.rand(3, 8, 20, dtype=torch.float64) * 2
    plan, residual = partial_transport(cost, 1.0, 5.0)
    assert torch.equal(residual, torch.zeros_like(residual))
    assert torch.allclose(plan, torch.softmax(-5.0 * cost, dim=1) / 20, atol=1e-15)


def test_gradcheck_cost_and_ratio() -> None:
    cost = (torch.rand(3, 5, 7, dtype=torch.float64) * 2).requires_grad_()
    ratio = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, r: partial_transport(c, r, 3.0), (cost, ratio))


@pytest.mark.parametrize("gamma", [0.5, 5.0, 20.0])
def test_gradient_equals_autograd_through_unrolled_solver(gamma: float) -> None:
    cost = torch.rand(2, 6, 9, dtype=torch.float64) * 2
    ratio = torch.tensor([0.3, 0.8], dtype=torch.float64)
    probe_plan = torch.randn(2, 6, 9, dtype=torch.float64)
    probe_residual = torch.randn(2, 9, dtype=torch.float64)

    def gradients(solver):
        c = cost.clone().requires_grad_()
        r = ratio.clone().requires_grad_()
        plan, residual = solver(c, r)
        ((plan * probe_plan).sum() + (residual * probe_residual).sum()).backward()
        return c.grad, r.grad

    exact = gradients(lambda c, r: partial_transport(c, r, gamma))
    unrolled = gradients(lambda c, r: fixed_point_transport(c, r, gamma, iterations=3000))
    for ours, reference in zip(exact, unrolled, strict=True):
        assert (ours - reference).abs().max() < 1e-6


def test_gradient_is_finite_at_full_ratio() -> None:
    cost = (torch.rand(2, 4, 6, dtype=torch.float64) * 2).requires_grad_()
    ratio = torch.ones(2, dtype=torch.float64, requires_grad=True)
    plan, residual = partial_transport(cost, ratio, 5.0)
    (plan.square().sum() + residual.sum()).backward()
    assert torch.isfinite(cost.grad).all() and torch.isfinite(ratio.grad).all()


@pytest.mark.parametrize("gamma", [1.0, 50.0, 100.0])
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_costs_do_not_underflow(half: torch.dtype, gamma: float) -> None:
    cost = (torch.rand(4, 64, 49) * 2).to(half)
    plan, residual = partial_transport(cost, 0.3, gamma)
    assert plan.dtype == torch.float32
    assert torch.isfinite(plan).all() and torch.isfinite(residual).all()
    assert torch.allclose(plan.sum((1, 2)), torch.full((4,), 0.3), atol=1e-5)
    ref_plan, _ = converged_fixed_point(cost.double(), 0.3, gamma)
    assert (plan.double() - ref_plan).abs().max() < 1e-6


@pytest.mark.parametrize(
    ("cost", "ratio", "gamma", "message"),
    [
        (torch.rand(4, 5), 0.3, 5.0, "(B, m, n)"),
        (torch.rand(2, 4, 5), 0.0, 5.0, "transport_ratio"),
        (torch.rand(2, 4, 5), 1.5, 5.0, "transport_ratio"),
        (torch.rand(2, 4, 5), torch.tensor([0.3, 0.3, 0.3]), 5.0, "transport_ratio"),
        (torch.full((2, 4, 5), float("nan")), 0.3, 5.0, "NaN"),
        (torch.rand(2, 4, 5), 0.3, -1.0, "entropy_weight"),
        (torch.rand(2, 0, 5), 0.3, 5.0, "empty"),
    ],
)
def test_bad_input_is_rejected(cost, ratio, gamma, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        partial_transport(cost, ratio, gamma)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    cost = torch.rand(8, 64, 196) * 2
    plan_cpu, residual_cpu = partial_transport(cost, 0.3, 5.0)
    plan_gpu, residual_gpu = partial_transport(cost.cuda(), 0.3, 5.0)
    assert (plan_gpu.cpu() - plan_cpu).abs().max() < 1e-6
    assert (residual_gpu.cpu() - residual_cpu).abs().max() < 1e-6


def solve_with_gradients(cost: torch.Tensor, ratio: torch.Tensor, gamma: float):
    cost = cost.clone().requires_grad_()
    ratio = ratio.clone().requires_grad_()
    plan, residual = partial_transport(cost, ratio, gamma)
    (plan.square().sum() + (residual * torch.arange(cost.shape[2])).sum()).backward()
    return plan.detach(), residual.detach(), cost.grad, ratio.grad


def test_deferred_checks_raise_the_first_failure_and_return_the_values() -> None:
    checks = DeferredChecks().require(torch.tensor(True), "never")
    checks.require(torch.tensor(False), "first").require(torch.tensor(False), lambda: "second")
    with pytest.raises(ValueError, match="first"):
        checks.verify(torch.tensor(True))
    assert DeferredChecks().require(torch.tensor(1.0) > 0, "x").verify(
        torch.tensor(False), torch.tensor(True)
    ) == [False, True]
    assert DeferredChecks().verify() == []


def test_newton_in_blocks_between_checks_is_still_exact(monkeypatch) -> None:
    """The GPU schedule (8 steps per convergence check) on the CPU, where it can be tested."""
    cost = adversarial_costs(16, 49)
    ratios = torch.cat([RATIOS, RATIOS[[0, 2, 4, 3]]])
    stepwise = solve_with_gradients(cost, ratios, 5.0)
    monkeypatch.setattr(transport, "solver_for", lambda device: blocks)
    blocks = solver.EAGER._replace(steps_per_check=8)
    for ours, reference in zip(solve_with_gradients(cost, ratios, 5.0), stepwise, strict=True):
        assert (ours - reference).abs().max() < 1e-13
    for bad_cost, ratio, message in [
        (torch.full((2, 4, 5), float("inf")), 0.3, "NaN"),
        (torch.rand(2, 4, 5), torch.tensor([0.3, 1.5]), "transport_ratio"),
    ]:
        with pytest.raises(ValueError, match=message):
            partial_transport(bad_cost, ratio, 5.0)


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs g++")
def test_compiled_solver_equals_the_eager_one(monkeypatch) -> None:
    """The fused parts that CUDA runs, compiled here for the CPU: same plan and gradients."""
    cost = adversarial_costs(8, 9)
    ratios = torch.cat([RATIOS, RATIOS[[0, 2, 4, 3]]])
    eager = solve_with_gradients(cost, ratios, 3.0)
    monkeypatch.setattr(compiling, "compile_enabled", lambda device: True)
    for ours, reference in zip(solve_with_gradients(cost, ratios, 3.0), eager, strict=True):
        assert (ours - reference).abs().max() < 1e-12
    with pytest.raises(ValueError, match="NaN"):
        partial_transport(torch.full_like(cost, float("nan")), ratios, 3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["compiled", "triton"])
def test_a_gsp_forward_synchronises_with_the_host_once(kernel: Kernel) -> None:
    from model.gsp import GeneralizedSumPooling

    with using_runtime_options(kernel=kernel):
        layer = GeneralizedSumPooling(64, 32).cuda()
        features = torch.randn(8, 64, 7, 7, device="cuda")
        layer(features)  # compile and warm up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                layer(features)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]
