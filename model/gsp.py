"""Pooling layers behind one interface: Generalized Sum Pooling and the GAP, GMP, GeM baselines.

Every pooling maps a ``(B, C, H, W)`` feature map to a :class:`PoolingResult` whose
``embedding`` is the pooled ``(B, d)`` vector (not normalised) and whose ``weights`` are the
per-location pooling weights ``(B, H, W)`` with mean 1: the attention heatmaps of the service.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.checks import all_finite
from model.compiling import fused
from model.gsp_function import cosine_costs, gsp_pool
from model.transport import ratio_tensor

__all__ = [
    "POOLINGS",
    "GeneralizedMeanPooling",
    "GeneralizedSumPooling",
    "GlobalAveragePooling",
    "GlobalMaxPooling",
    "PoolingResult",
    "build_pooling",
    "greedy_k_center",
]


@dataclass
class PoolingResult:
    """Output of every pooling layer.

    ``plan`` ``(B, m, H, W)`` and ``histogram`` ``(B, m)`` exist for GSP only.
    """

    embedding: Tensor
    weights: Tensor
    plan: Tensor | None = None
    histogram: Tensor | None = None


def _check_feature_map(features: Tensor, in_channels: int, *, finite: bool = True) -> None:
    """Shape checks, and unless ``finite`` is False (GSP checks inside its fused pooling,
    read in its one sync) that no value is NaN or infinite."""
    if features.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(features.shape)}")
    if features.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} channels, got {features.shape[1]}")
    if finite and not bool(all_finite(features)):
        raise ValueError("feature map contains NaN or infinite values")


def greedy_k_center(points: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Pick ``k`` rows of ``points`` that cover them: each next pick is the farthest from the set.

    Starts from a random row.  With fewer than ``k`` distinct rows, picks repeat the farthest.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (N, d) matrix, got {tuple(points.shape)}")
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    chosen = [first]
    nearest = torch.cdist(points, points[first : first + 1]).squeeze(1)
    for _ in range(k - 1):
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, torch.cdist(points, points[pick : pick + 1]).squeeze(1))
    return points[chosen]


class GeneralizedSumPooling(nn.Module):
    """Generalized Sum Pooling (Gürbüz et al., ICCV 2023) with an exact transport solve.

    A 1x1 projection maps features to ``embedding_dim``; locations are matched to ``m``
    trainable prototypes by entropy-smoothed partial transport that moves a fraction
    ``transport_ratio`` of the mass; the pooled vector is the transported-mass-weighted mean
    of the projected features.  ``transport_ratio = 1`` is global average pooling.
    """

    def __init__(
        self,
        in_channels: int,
        embedding_dim: int,
        num_prototypes: int = 64,
        transport_ratio: float = 0.3,
        entropy_weight: float = 5.0,
    ) -> None:
        super().__init__()
        if not 0 < transport_ratio <= 1:
            raise ValueError(f"transport_ratio must lie in (0, 1], got {transport_ratio}")
        if entropy_weight <= 0:
            raise ValueError(f"entropy_weight must be positive, got {entropy_weight}")
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be at least 1, got {num_prototypes}")
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.transport_ratio = float(transport_ratio)
        self.entropy_weight = float(entropy_weight)
        self.projection = nn.Conv2d(in_channels, embedding_dim, kernel_size=1)
        self.prototypes = nn.Parameter(
            F.normalize(torch.randn(num_prototypes, embedding_dim), dim=1)
        )
        self._warmup_memory: list[Tensor] | None = None
        self._warmup_size = 0

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def costs(self, projected: Tensor) -> Tensor:
        """``(B, m, n)`` distances between L2-normalised locations and prototypes, in [0, 2]."""
        return fused(cosine_costs, projected.device)(projected, self.prototypes)

    def forward(
        self,
        features: Tensor,
        transport_ratio: float | Tensor | None = None,
        unary_cost: Tensor | None = None,
    ) -> PoolingResult:
        """Pool a ``(B, C, H, W)`` feature map.

        ``transport_ratio`` overrides the trained ratio (query-time selectivity);
        ``unary_cost`` ``(B, H, W)`` is added to every location's transport cost (positive
        discourages pooling a location, negative favours it).
        """
        _check_feature_map(features, self.in_channels, finite=False)
        batch, _, height, width = features.shape
        projected = self.projection(features)
        self._remember(projected)
        ratio = self.transport_ratio if transport_ratio is None else transport_ratio
        if unary_cost is not None:
            unary_cost = unary_cost.reshape(batch, height, width)
        weights, plan, embedding, histogram = gsp_pool(
            projected,
            self.prototypes,
            unary_cost,
            ratio_tensor(ratio, batch, features.device),
            self.entropy_weight,
        )
        return PoolingResult(
            embedding=embedding,
            weights=weights.reshape(batch, height, width),
            plan=plan.reshape(batch, -1, height, width),
            histogram=histogram,
        )

    # -- prototype initialisation -------------------------------------------------------------

    def start_warmup(self, memory_size: int = 1024) -> None:
        """Collect projected location features from the next training forwards."""
        self._warmup_memory = []
        self._warmup_size = memory_size

    def _remember(self, projected: Tensor) -> None:
        if self._warmup_memory is None or not self.training:
            return
        collected = sum(chunk.shape[0] for chunk in self._warmup_memory)
        if collected >= self._warmup_size:
            return
        rows = projected.detach().flatten(2).transpose(1, 2).reshape(-1, projected.shape[1])
        take = torch.randperm(rows.shape[0], device=rows.device)[: self._warmup_size - collected]
        self._warmup_memory.append(rows[take].float().cpu())

    def finish_warmup(self, generator: torch.Generator | None = None) -> None:
        """Initialise the prototypes by greedy k-center over the collected features."""
        if not self._warmup_memory:
            raise RuntimeError("no features were collected: call start_warmup() and run forwards")
        memory = torch.cat(self._warmup_memory)
        self._warmup_memory = None
        self.init_prototypes(memory, generator=generator)

    @torch.no_grad()
    def init_prototypes(self, features: Tensor, generator: torch.Generator | None = None) -> None:
        """Set the prototypes to a greedy k-center cover of projected features ``(N, d)``."""
        if features.dim() != 2 or features.shape[1] != self.embedding_dim:
            raise ValueError(
                f"features must be (N, {self.embedding_dim}), got {tuple(features.shape)}"
            )
        centers = greedy_k_center(
            F.normalize(features.float(), dim=1), self.num_prototypes, generator
        )
        self.prototypes.copy_(centers.to(self.prototypes))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, embedding_dim={self.embedding_dim}, "
            f"num_prototypes={self.num_prototypes}, transport_ratio={self.transport_ratio}, "
            f"entropy_weight={self.entropy_weight}"
        )


class GlobalAveragePooling(nn.Module):
    """1x1 projection, then the mean over locations; every location weighs 1."""

    def __init__(self, in_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.projection = nn.Conv2d(in_channels, embedding_dim, kernel_size=1)

    def forward(self, features: Tensor) -> PoolingResult:
        _check_feature_map(features, self.in_channels)
        batch, _, height, width = features.shape
        embedding = self.projection(features).mean(dim=(2, 3))
        weights = features.new_ones(batch, height, width, dtype=torch.float32)
        return PoolingResult(
            embedding=embedding.to(torch.promote_types(embedding.dtype, torch.float32)),
            weights=weights,
        )


class _ChannelwisePooling(nn.Module):
    """Pools each channel over locations, then projects; weights are each location's share."""

    def __init__(self, in_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.projection = nn.Linear(in_channels, embedding_dim)

    def _pool(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, n)`` to the pooled ``(B, C)`` and each location's contribution ``(B, n)``."""
        raise NotImplementedError

    def forward(self, features: Tensor) -> PoolingResult:
        _check_feature_map(features, self.in_channels)
        batch, _, height, width = features.shape
        flat = features.flatten(2)
        pooled, contribution = self._pool(flat.to(torch.promote_types(flat.dtype, torch.float32)))
        share = contribution / contribution.sum(dim=1, keepdim=True).clamp_min(1e-12)
        weights = (share * height * width).reshape(batch, height, width)
        return PoolingResult(embedding=self.projection(pooled), weights=weights)


class GlobalMaxPooling(_ChannelwisePooling):
    """Channel-wise max; a location's weight counts the channels whose maximum it holds."""

    def _pool(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        pooled, where = flat.max(dim=2)
        counts = torch.zeros(flat.shape[0], flat.shape[2], device=flat.device)
        counts.scatter_add_(1, where, torch.ones_like(where, dtype=counts.dtype))
        return pooled, counts


class GeneralizedMeanPooling(_ChannelwisePooling):
    """GeM: ``(mean x^p)^(1/p)`` per channel with a learnable power ``p`` (Radenović et al.)."""

    def __init__(self, in_channels: int, embedding_dim: int, power: float = 3.0) -> None:
        super().__init__(in_channels, embedding_dim)
        self.power = nn.Parameter(torch.tensor(float(power)))

    def _pool(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        raised = flat.clamp_min(1e-6).pow(self.power)
        pooled = raised.mean(dim=2).pow(1.0 / self.power)
        return pooled, raised.detach().sum(dim=1)


POOLINGS: dict[str, type[nn.Module]] = {
    "gsp": GeneralizedSumPooling,
    "gap": GlobalAveragePooling,
    "gmp": GlobalMaxPooling,
    "gem": GeneralizedMeanPooling,
}


def build_pooling(name: str, in_channels: int, embedding_dim: int, **options: float) -> nn.Module:
    """Build a pooling by name (``gsp``, ``gap``, ``gmp``, ``gem``); options go to GSP/GeM."""
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose one of {sorted(POOLINGS)}")
    return POOLINGS[name](in_channels, embedding_dim, **options)
