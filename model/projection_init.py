"""A head's projection started from the principal components of pooled backbone features.

A head that only learns *where* to pool (its prototypes) keeps what its projection keeps; starting
the projection from the principal components of the backbone's average-pooled features of chosen
photos (``projection_init.data`` of a training config) keeps the directions those photos vary
in, and ``projection_init.freeze`` keeps it there while the prototypes train.  ``whiten`` gives
every component unit variance; otherwise one overall scale gives them unit mean variance, so
the transport's cosine costs see the features' own spectrum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["principal_projection", "set_projection"]


def principal_projection(pooled: Tensor, dim: int, whiten: bool) -> tuple[Tensor, Tensor]:
    """``(W, b)`` with ``W x + b`` the top-``dim`` principal components of the rows of
    ``pooled`` ``(N, C)``, centred, whitened or scaled by one number (float64 eigensolve)."""
    if pooled.dim() != 2 or not 0 < dim <= pooled.shape[1]:
        raise ValueError(f"need (N, C) features and 0 < dim <= C, got {tuple(pooled.shape)}, {dim}")
    mean = pooled.double().mean(dim=0)
    centred = pooled.double() - mean
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / centred.shape[0])
    top = eigenvalues.argsort(descending=True)[:dim]
    if whiten:
        weight = (vectors[:, top] / eigenvalues[top].clamp_min(1e-8).sqrt()).T
    else:
        weight = vectors[:, top].T / eigenvalues[top].clamp_min(1e-8).mean().sqrt()
    return weight.float(), (-weight @ mean).float()


def set_projection(projection: nn.Conv2d, weight: Tensor, bias: Tensor, freeze: bool) -> None:
    """Copy ``(W, b)`` into a 1x1 ``projection``; ``freeze`` stops it from training."""
    if (
        projection.kernel_size != (1, 1)
        or projection.bias is None
        or projection.weight.shape[:2] != weight.shape
    ):
        raise ValueError(
            f"a ({weight.shape[0]}, {weight.shape[1]}) projection does not fit "
            f"{tuple(projection.weight.shape)}"
        )
    with torch.no_grad():
        projection.weight.copy_(weight[:, :, None, None])
        projection.bias.copy_(bias)
    projection.requires_grad_(not freeze)
