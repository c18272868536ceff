"""Metric-learning losses by name (pytorch-metric-learning), plus the GSP zero-shot term.

``build_loss(name, ...)`` gives a :class:`MetricLoss`: the library loss with the miner it is
usually paired with.  Proxy-based losses own parameters (the proxies, or margin's learnable
beta); they are the module's ``parameters()`` so the trainer can give them their own learning
rate.  :class:`TrainingObjective` adds the zero-shot regulariser on GSP histograms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pytorch_metric_learning import losses, miners
from torch import Tensor, nn

from model.zsr import ZeroShotRegularization

__all__ = ["LOSSES", "MetricLoss", "TrainingObjective", "build_loss"]


def _contrastive(num_classes: int, dim: int, **options: Any) -> tuple[nn.Module, nn.Module | None]:
    options = {"pos_margin": 0.0, "neg_margin": 0.5, **options}
    return losses.ContrastiveLoss(**options), None


def _triplet(num_classes: int, dim: int, **options: Any) -> tuple[nn.Module, nn.Module | None]:
    margin = options.pop("margin", 0.1)
    mining = options.pop("type_of_triplets", "semihard")
    miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=mining)
    return losses.TripletMarginLoss(margin=margin, **options), miner


def _multi_similarity(
    num_classes: int, dim: int, **options: Any
) -> tuple[nn.Module, nn.Module | None]:
    epsilon = options.pop("epsilon", 0.1)
    options = {"alpha": 2.0, "beta": 50.0, "base": 0.5, **options}
    return losses.MultiSimilarityLoss(**options), miners.MultiSimilarityMiner(epsilon=epsilon)


def _margin(num_classes: int, dim: int, **options: Any) -> tuple[nn.Module, nn.Module | None]:
    options = {"margin": 0.2, "beta": 1.2, "learn_beta": True, **options}
    if options["learn_beta"]:
        options["num_classes"] = num_classes
    return losses.MarginLoss(**options), miners.DistanceWeightedMiner(cutoff=0.5)


def _proxy_nca(num_classes: int, dim: int, **options: Any) -> tuple[nn.Module, nn.Module | None]:
    options = {"softmax_scale": 32.0, **options}
    return losses.ProxyNCALoss(num_classes, dim, **options), None


def _proxy_anchor(num_classes: int, dim: int, **options: Any) -> tuple[nn.Module, nn.Module | None]:
    options = {"margin": 0.1, "alpha": 32.0, **options}
    return losses.ProxyAnchorLoss(num_classes, dim, **options), None


def _normalized_softmax(
    num_classes: int, dim: int, **options: Any
) -> tuple[nn.Module, nn.Module | None]:
    options = {"temperature": 0.05, **options}
    return losses.NormalizedSoftmaxLoss(num_classes, dim, **options), None


_BUILDERS: dict[str, Callable[..., tuple[nn.Module, nn.Module | None]]] = {
    "contrastive": _contrastive,
    "triplet": _triplet,
    "multi_similarity": _multi_similarity,
    "margin": _margin,
    "proxy_nca": _proxy_nca,
    "proxy_anchor": _proxy_anchor,
    "normalized_softmax": _normalized_softmax,
}
LOSSES: tuple[str, ...] = tuple(_BUILDERS)


class MetricLoss(nn.Module):
    """A pytorch-metric-learning loss and its (optional) miner behind ``forward(emb, labels)``."""

    def __init__(self, name: str, loss: nn.Module, miner: nn.Module | None) -> None:
        super().__init__()
        self.name = name
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        embeddings = embeddings.float()
        if self.miner is None:
            return self.loss(embeddings, labels)
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


def build_loss(name: str, num_classes: int, embedding_dim: int, **options: Any) -> MetricLoss:
    """Build a loss by name; ``options`` override its constructor defaults.

    Names: contrastive, triplet, multi_similarity, margin, proxy_nca, proxy_anchor,
    normalized_softmax.  ``num_classes`` is the number of training classes (labels must lie
    in ``[0, num_classes)`` for the proxy losses).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    if num_classes < 2:
        raise ValueError(f"metric learning needs at least 2 classes, got {num_classes}")
    try:
        loss, miner = _BUILDERS[name](num_classes, embedding_dim, **options)
    except TypeError as error:
        raise ValueError(f"bad options for loss {name!r}: {error}") from error
    return MetricLoss(name, loss, miner)


class TrainingObjective(nn.Module):
    """The metric loss on embeddings plus ``zsr_weight`` times ZSR on GSP histograms.

    ZSR is active only when a histogram is passed (GSP pooling) and ``zsr`` was given.
    """

    def __init__(
        self,
        metric: MetricLoss,
        zsr: ZeroShotRegularization | None = None,
        zsr_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if zsr_weight < 0:
            raise ValueError(f"zsr_weight must be non-negative, got {zsr_weight}")
        self.metric = metric
        self.zsr = zsr
        self.zsr_weight = float(zsr_weight)

    def forward(
        self, embeddings: Tensor, labels: Tensor, histograms: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Loss terms: ``metric``, ``zsr`` (when active) and their weighted ``total``."""
        terms = {"metric": self.metric(embeddings, labels)}
        total = terms["metric"]
        if self.zsr is not None and histograms is not None:
            terms["zsr"] = self.zsr(histograms, labels)
            total = total + self.zsr_weight * terms["zsr"]
        terms["total"] = total
        return terms
