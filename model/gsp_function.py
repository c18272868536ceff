"""The GSP layer after its projection as one autograd function: costs, transport, pooling.

At the sizes of a pooling layer a GPU spends its time on kernel launches and on the Python
around them, not on arithmetic.  So the costs to the prototypes, the transport solve and the
pooled outputs run as one forward and one backward call (each compiled on CUDA, see
model/compiling.py) with one host synchronisation, instead of a dozen separate calls.  The
backward recomputes the cheap cost and pooling steps (``torch.func.vjp``) around the solver's
implicit gradient, so nothing beyond the inputs, the assignment and ``u + l`` is stored.

The runtime option ``kernel="triton"`` (``GSP_KERNEL=triton``, model/runtime.py) swaps that
function on CUDA for one whose transport and pooling are two hand-written Triton kernels
(model/gsp_triton.py): same outputs, gradients and errors, fewer launches; it becomes the
default once measured faster on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.checks import DeferredChecks, all_finite
from model.compiling import fused
from model.runtime import runtime_options
from model.solver import (
    NON_FINITE_COST,
    Begun,
    begin,
    finish,
    implicit_backward,
    require_valid_transport,
    settle,
    solver_for,
)

__all__ = [
    "cosine_costs",
    "cosines",
    "gsp_pool",
    "pooled_outputs",
    "pooled_vector",
    "triton_selected",
]

_NOT_FINITE = "feature map (or its projection) contains NaN or infinite values"


def cosines(projected: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarities ``(B, m, n)`` of every location to every prototype."""
    dtype = torch.promote_types(projected.dtype, torch.float32)
    locations = F.normalize(projected.flatten(2).to(dtype), dim=1)
    prototypes = F.normalize(prototypes.to(dtype), dim=1)
    # (m, d) @ (B, d, n) broadcasts to one batched product whose (B, m, n) result is already
    # contiguous (an einsum here permutes its operands and its result into copies).
    return torch.matmul(prototypes, locations)


def cosine_costs(projected: Tensor, prototypes: Tensor) -> Tensor:
    """Distances ``sqrt(2 - 2 cos)`` in [0, 2] between every location and every prototype."""
    return (2 - 2 * cosines(projected, prototypes)).clamp_min(1e-12).sqrt()


def pooled_vector(weights: Tensor, projected: Tensor) -> Tensor:
    """``mean_i w_i z_i`` over the locations, in at least float32."""
    flat = projected.flatten(2)
    embedding = torch.einsum("bn,bdn->bd", weights.to(flat.dtype), flat) / flat.shape[2]
    return embedding.to(torch.promote_types(embedding.dtype, torch.float32))


def pooled_outputs(
    assignment: Tensor, taken: Tensor, projected: Tensor, ratio: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weights ``g / mu``, plan, pooled vector ``mean_i w_i z_i``, histogram; ratio ``(B, 1)``."""
    n = taken.shape[1]
    weights = taken / ratio
    plan = assignment * (taken / n)[:, None, :]
    histogram = plan.sum(dim=2) / ratio
    return weights, plan, pooled_vector(weights, projected), histogram


def _costs(projected: Tensor, prototypes: Tensor, *unary: Tensor) -> Tensor:
    """Cosine costs plus the optional per-location unary cost ``(B, H, W)``."""
    cost = cosine_costs(projected, prototypes)
    if unary:
        cost = cost + unary[0].reshape(cost.shape[0], 1, cost.shape[2]).to(cost.dtype)
    return cost


def _pool_at(
    u: Tensor, log_mass: Tensor, saturated: Tensor, assignment: Tensor, projected: Tensor,
    ratio: Tensor,
) -> tuple[Tensor, ...]:  # fmt: skip
    """``z = u + l`` and the pooled outputs for a solved offset ``u``."""
    z, taken, _ = finish(u, log_mass, saturated, assignment.dtype)
    return (z, *pooled_outputs(assignment, taken, projected, ratio.to(taken.dtype)[:, None]))


def _forward_block(
    projected: Tensor, prototypes: Tensor, unary: tuple[Tensor, ...], ratio: Tensor,
    entropy_weight: float, steps: int,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:  # fmt: skip
    """Whether the projected features are finite, the solver's first block of Newton steps on
    their costs, and the outputs at its last iterate."""
    cost = _costs(projected, prototypes, *unary)
    # The solve runs in at least float32, whatever autocast made of the costs.
    work_dtype = torch.promote_types(cost.dtype, torch.float32)
    with torch.autocast(device_type=projected.device.type, enabled=False):
        begun = begin(cost.to(work_dtype), ratio, entropy_weight, steps)
    assignment, log_mass, u, *_, saturated = begun[:8]
    pooled = _pool_at(u, log_mass, saturated, assignment, projected, ratio)
    return all_finite(projected), begun, pooled


def _backward_block(
    projected: Tensor, prototypes: Tensor, unary: tuple[Tensor, ...], ratio: Tensor,
    assignment: Tensor, z: Tensor, grads: tuple[Tensor, ...], entropy_weight: float,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Gradients w.r.t. projected features, prototypes, unary cost and ratio.

    Pooling and costs are differentiated by recomputing them (cheap); the transport in between
    by the implicit function theorem (:func:`model.solver.implicit_backward`).
    """
    taken = torch.sigmoid(z).to(assignment.dtype)
    ratio_column = ratio.to(taken.dtype)[:, None]
    # torch types vjp's result as a union of both arities (no overload on has_aux).
    _, pull = torch.func.vjp(pooled_outputs, assignment, taken, projected, ratio_column)  # type: ignore[misc]
    grad_assignment, grad_taken, grad_projected, grad_ratio = pull(grads)
    with torch.autocast(device_type=projected.device.type, enabled=False):
        grad_cost, grad_mu = implicit_backward(
            assignment, z, grad_assignment, grad_taken, None, entropy_weight
        )
    # torch types vjp's result as a union of both arities (no overload on has_aux).
    cost, pull = torch.func.vjp(_costs, projected, prototypes, *unary)  # type: ignore[misc]
    grad_projected_cost, grad_prototypes, *grad_unary = pull(grad_cost.to(cost.dtype))
    grad_ratio = grad_mu + grad_ratio[:, 0].to(grad_mu.dtype)
    return grad_projected + grad_projected_cost, grad_prototypes, *grad_unary, grad_ratio


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """Whether autocast is on for ``device_type``, and its dtype, for :func:`_as_in_forward`."""
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _as_in_forward(ctx, device_type: str) -> torch.autocast:
    """The forward's autocast state (``ctx.autocast``), so that recomputed steps match it."""
    enabled, dtype = ctx.autocast
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)


class _GSPPool(torch.autograd.Function):
    """Projected features to GSP weights, plan, embedding and histogram (see module doc)."""

    @staticmethod
    def forward(ctx, projected, prototypes, unary, ratio, entropy_weight):  # see gsp_pool
        device = projected.device
        solver = solver_for(device)
        extra = () if unary is None else (unary,)
        finite, begun, outputs = fused(_forward_block, device)(
            projected, prototypes, extra, ratio, entropy_weight, solver.steps_per_check
        )
        begun = Begun(*begun)
        # All input checks are read with the solver's first convergence flag: one host sync.
        checks = DeferredChecks().require(finite, _NOT_FINITE)
        u, steps = settle(solver, begun, ratio, checks)
        if steps > solver.steps_per_check:  # the first block had not converged everywhere
            outputs = fused(_pool_at, device)(
                u, begun.log_mass, begun.saturated, begun.assignment, projected, ratio
            )
        z, *pooled = outputs
        ctx.save_for_backward(projected, prototypes, unary, ratio, begun.assignment, z)
        ctx.entropy_weight = entropy_weight
        ctx.autocast = _autocast_state(device.type)
        return tuple(pooled)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        projected, prototypes, unary, ratio, assignment, z = ctx.saved_tensors
        extra = () if unary is None else (unary,)
        with _as_in_forward(ctx, projected.device.type):
            grad_projected, grad_prototypes, *grad_unary, grad_ratio = fused(
                _backward_block, projected.device
            )(projected, prototypes, extra, ratio, assignment, z, grads, ctx.entropy_weight)
        grad_unary_input = grad_unary[0] if grad_unary else None
        return grad_projected, grad_prototypes, grad_unary_input, grad_ratio.to(ratio.dtype), None


def _cosine_pullback(
    projected: Tensor, prototypes: Tensor, grad_cosine: Tensor, through_pooling: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. features and prototypes from the cosines' gradient, plus the pooled
    vector's share of the features' gradient: one compiled call on CUDA (the normalisations'
    gradients are a dozen small operations eagerly)."""
    # torch types vjp's result as a union of both arities (no overload on has_aux).
    _, pull = torch.func.vjp(cosines, projected, prototypes)  # type: ignore[misc]
    grad_projected, grad_prototypes = pull(grad_cosine)
    if through_pooling is not None:
        grad_projected = grad_projected + through_pooling.view_as(grad_projected)
    return grad_projected, grad_prototypes


class _TritonGSPPool(torch.autograd.Function):
    """:class:`_GSPPool` with the transport and pooling in two Triton kernels
    (model/gsp_triton.py); the cosines stay a matrix product."""

    @staticmethod
    def forward(ctx, projected, prototypes, unary, ratio, entropy_weight):  # see gsp_pool
        from model.gsp_triton import transport_forward

        flat_unary = None if unary is None else unary.flatten(1)
        flat = projected.flatten(2)
        cosine = cosines(projected, prototypes)
        solved = transport_forward(cosine, flat_unary, ratio, flat, entropy_weight)
        # Cosines are NaN exactly where the features or the prototypes are not finite; which
        # one is looked up only then, and reported as the compiled path reports it.
        checks = DeferredChecks().require(
            solved.finite_cosines,
            lambda: _NOT_FINITE if not all_finite(projected) else NON_FINITE_COST,
        )
        require_valid_transport(checks, solved.finite_unary, solved.in_range, ratio)
        checks.verify()
        # The cosines are kept (as large as the compiled path's saved assignment) rather than
        # recomputed: seven launches fewer in the backward.
        ctx.save_for_backward(
            projected, prototypes, flat_unary, ratio, cosine, solved.log_mass, solved.offset
        )
        ctx.entropy_weight = entropy_weight
        ctx.unary_shape = None if unary is None else unary.shape
        ctx.autocast = _autocast_state(projected.device.type)
        # Gradients of unused outputs arrive as None, so the backward skips their passes.
        ctx.set_materialize_grads(False)
        return solved.weights, solved.plan, solved.embedding, solved.histogram

    @staticmethod
    def backward(ctx, grad_weights, grad_plan, grad_embedding, grad_histogram):
        from model.gsp_triton import Upstream, transport_backward

        projected, prototypes, unary, ratio, cosine, log_mass, offset = ctx.saved_tensors
        upstream = Upstream(grad_weights, grad_plan, grad_embedding, grad_histogram)
        grad_cosine, through_pooling, grad_unary, grad_ratio = transport_backward(
            cosine, unary, ratio, projected.flatten(2), log_mass, offset, upstream,
            ctx.entropy_weight,
        )  # fmt: skip
        with _as_in_forward(ctx, projected.device.type):
            grad_projected, grad_prototypes = fused(_cosine_pullback, projected.device)(
                projected, prototypes, grad_cosine.to(cosine.dtype), through_pooling
            )
        if grad_unary is not None:
            grad_unary = grad_unary.reshape(ctx.unary_shape)
        return grad_projected, grad_prototypes, grad_unary, grad_ratio.to(ratio.dtype), None


def triton_selected(device: torch.device, locations: int) -> bool:
    """Whether :func:`gsp_pool` runs the Triton kernels: on CUDA when the runtime options say
    ``kernel="triton"`` (the compiled parts by default, until a GPU measurement says otherwise),
    for feature maps of at most ``model.gsp_triton.MAX_LOCATIONS`` locations."""
    if runtime_options().kernel != "triton" or device.type != "cuda":
        return False
    try:
        from model.gsp_triton import MAX_LOCATIONS
    except ImportError as error:
        raise RuntimeError(
            "GSP_KERNEL=triton needs the triton package (torch installs it on Linux)"
        ) from error
    return locations <= MAX_LOCATIONS


def gsp_pool(
    projected: Tensor,
    prototypes: Tensor,
    unary: Tensor | None,
    ratio: Tensor,
    entropy_weight: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GSP's weights ``(B, n)``, plan ``(B, m, n)``, embedding ``(B, d)`` and histogram ``(B, m)``.

    ``projected`` ``(B, d, H, W)``; ``ratio`` ``(B,)`` (differentiable); ``unary`` ``(B, H, W)``
    or None.  Raises ``ValueError`` for non-finite features or costs and ratios outside (0, 1].
    """
    locations = projected.shape[2] * projected.shape[3]
    pool = _TritonGSPPool if triton_selected(projected.device, locations) else _GSPPool
    return pool.apply(projected, prototypes, unary, ratio, float(entropy_weight))
