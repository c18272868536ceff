"""Retrieval evaluation: Precision@1, R-Precision, MAP@R and Recall@k of embeddings.

The ranking metrics come from pytorch-metric-learning's ``AccuracyCalculator`` (faiss k-NN);
Recall@k (a query counts as found when any of its ``k`` nearest references shares its label)
is added to it, and the neighbour count is raised so that every requested ``k`` is covered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator,
    try_getting_not_lone_labels,
)
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.data import CollageDataset, collage_masks, default_split, open_dataset
from model.feature_cache import FeatureMapSet

__all__ = [
    "RECALL_KS",
    "EvalInputs",
    "RetrievalCalculator",
    "embed",
    "format_table",
    "retrieval_metrics",
    "score",
    "target_mass_share",
]

RECALL_KS: tuple[int, ...] = (1, 2, 4, 8)
_RENAMED = {
    "precision_at_1": "precision_at_1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map_at_r",
}


class RetrievalCalculator(AccuracyCalculator):
    """``AccuracyCalculator`` with ``recall_at_k`` metrics and ``k`` large enough for them."""

    def __init__(self, recall_ks: Sequence[int] = RECALL_KS, **kwargs: object) -> None:
        if not recall_ks or any(int(k) < 1 for k in recall_ks):
            raise ValueError(f"recall_ks must be positive integers, got {list(recall_ks)}")
        self.recall_ks = tuple(sorted({int(k) for k in recall_ks}))
        super().__init__(k="max_bin_count", device=torch.device("cpu"), **kwargs)

    def __getattr__(self, name: str) -> Callable[..., float]:
        # ``calculate_recall_at_<k>`` for each requested k, found by AccuracyCalculator's dir().
        prefix = "calculate_recall_at_"
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            k = int(name[len(prefix) :])
            return lambda **kwargs: self._recall_at(k, **kwargs)
        raise AttributeError(name)

    def __dir__(self) -> list[str]:
        recall_names = [f"calculate_recall_at_{k}" for k in self.__dict__.get("recall_ks", ())]
        return [*super().__dir__(), *recall_names]

    def requires_knn(self) -> list[str]:
        return [*super().requires_knn(), *(f"recall_at_{k}" for k in self.recall_ks)]

    def determine_k(
        self, bin_counts: Tensor, num_reference_embeddings: int, ref_includes_query: bool
    ) -> int:
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        available = num_reference_embeddings - int(ref_includes_query)
        return max(1, min(max(k, self.recall_ks[-1]), available))

    def _recall_at(
        self, k: int, knn_labels: Tensor, query_labels: Tensor, not_lone_query_mask: Tensor, **_
    ) -> float:
        knn_labels, query_labels = try_getting_not_lone_labels(
            knn_labels, query_labels, not_lone_query_mask
        )
        if knn_labels is None:
            return float("nan")
        hits = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1)
        return float(hits.double().mean())


def retrieval_metrics(
    query: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray,
    reference: Tensor | np.ndarray | None = None,
    reference_labels: Tensor | np.ndarray | None = None,
    recall_ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Metrics of ``query`` embeddings against ``reference`` (or leave-one-out within query).

    Keys: ``precision_at_1``, ``r_precision``, ``map_at_r``, ``recall_at_<k>``.  Queries whose
    class has no other member among the references are left out, as in the library.
    """
    query_t = torch.as_tensor(np.asarray(query), dtype=torch.float32)
    query_labels_t = torch.as_tensor(np.asarray(query_labels)).reshape(-1)
    if query_t.dim() != 2 or query_t.shape[0] != query_labels_t.shape[0]:
        raise ValueError(
            f"query must be (N, d) with N labels, got {tuple(query_t.shape)} and "
            f"{tuple(query_labels_t.shape)}"
        )
    if (reference is None) != (reference_labels is None):
        raise ValueError("give both reference and reference_labels, or neither")
    if query_t.shape[0] < 2 and reference is None:
        raise ValueError("leave-one-out evaluation needs at least 2 queries")
    # Typed as the library's (untyped) class: its public methods, not the recall hook above.
    calculator: AccuracyCalculator = RetrievalCalculator(
        recall_ks,
        include=(*_RENAMED, *(f"recall_at_{k}" for k in sorted(set(recall_ks)))),
    )
    if reference is None:
        raw = calculator.get_accuracy(query_t, query_labels_t)
    else:
        reference_t = torch.as_tensor(np.asarray(reference), dtype=torch.float32)
        reference_labels_t = torch.as_tensor(np.asarray(reference_labels)).reshape(-1)
        raw = calculator.get_accuracy(query_t, query_labels_t, reference_t, reference_labels_t)
    return {_RENAMED.get(name, name): float(value) for name, value in raw.items()}


def target_mass_share(
    weights: Tensor, target_masks: Tensor, cell_masks: Tensor | None = None
) -> float:
    """Mean share of each image's pooling weight ``(N, h, w)`` lying on its target cell.

    The share is taken among the locations that belong to some cell (``cell_masks``; all by
    default), so uniform weights (GAP) give one over the number of cells: 0.25 on a 2x2 grid.
    """
    if cell_masks is None:
        cell_masks = torch.ones_like(target_masks)
    if not weights.shape == target_masks.shape == cell_masks.shape or weights.dim() != 3:
        raise ValueError(
            f"weights and masks must all be (N, h, w), got {tuple(weights.shape)}, "
            f"{tuple(target_masks.shape)} and {tuple(cell_masks.shape)}"
        )
    weights = weights.double()
    inside = (weights * target_masks.double()).sum(dim=(1, 2))
    on_cells = (weights * cell_masks.double()).sum(dim=(1, 2))
    return float((inside / on_cells.clamp_min(1e-12)).mean())


@dataclass
class EvalInputs:
    """What to embed and how: ``forward`` maps a batch of ``query``/``gallery`` inputs (images,
    or cached feature maps with ``net.pool``) to an ``EmbeddingOutput``.  Without ``gallery``
    the query set is searched leave-one-out.  ``collage``, the query split as a collage data set
    (its ``grid`` and ``target_cells``), adds the target-cell mass share; ``crop_fraction`` is
    the input's side as a fraction of the resized canvas (see ``target_cell_mask``)."""

    forward: Callable[[Tensor], Any]
    query: Dataset
    gallery: Dataset | None = None
    collage: CollageDataset | None = None
    crop_fraction: float = 1.0
    num_workers: int = 0


@torch.no_grad()
def embed(
    forward: Callable[[Tensor], Any],
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    desc: str = "embedding",
) -> tuple[Tensor, Tensor, Tensor]:
    """Embeddings ``(N, d)``, labels ``(N,)`` and pooling weights ``(N, h, w)`` of a data set."""
    if isinstance(dataset, FeatureMapSet):  # in-memory maps: slice batches, no loader
        starts = range(0, len(dataset), batch_size)
        batches: Any = (dataset.batch(range(i, min(i + batch_size, len(dataset)))) for i in starts)
        total = len(starts)
    else:
        batches = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        total = len(batches)
    embeddings, labels, weights = [], [], []
    for inputs, batch_labels in tqdm(batches, desc=desc, total=total, unit="batch", leave=False):
        out = forward(inputs.to(device).float())
        embeddings.append(out.embedding.float().cpu())
        weights.append(out.weights.float().cpu())
        labels.append(torch.as_tensor(batch_labels))
    if not embeddings:
        raise ValueError("cannot evaluate an empty data set")
    return torch.cat(embeddings), torch.cat(labels), torch.cat(weights)


def score(
    inputs: EvalInputs, batch_size: int = 256, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Retrieval metrics (and the target-cell mass share where masks are given)."""
    query, query_labels, weights = embed(
        inputs.forward, inputs.query, batch_size, device, inputs.num_workers, "embedding queries"
    )
    if inputs.gallery is None:
        metrics = retrieval_metrics(query, query_labels)
    else:
        gallery, gallery_labels, _ = embed(
            inputs.forward,
            inputs.gallery,
            batch_size,
            device,
            inputs.num_workers,
            "embedding gallery",
        )
        metrics = retrieval_metrics(query, query_labels, gallery, gallery_labels)
    if inputs.collage is not None:
        _, height, width = weights.shape
        masks = collage_masks(inputs.collage, (height, width), inputs.crop_fraction)
        metrics["target_mass_share"] = target_mass_share(weights, *masks)
    return metrics


_LABELS = {
    "precision_at_1": "P@1",
    "r_precision": "R-Precision",
    "map_at_r": "MAP@R",
    "target_mass_share": "target-cell mass share",
}


def format_table(metrics: dict[str, float]) -> str:
    """A two-column text table of metrics, in a stable order."""
    rows = [(_LABELS.get(k, k.replace("recall_at_", "Recall@")), v) for k, v in metrics.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in rows)


def evaluate_checkpoint(
    checkpoint: str | Path,
    spec: dict[str, Any],
    batch_size: int = 128,
    device: str = "cpu",
    num_workers: int = 0,
) -> dict[str, float]:
    """Load a checkpoint and score it on a data spec's test split (In-Shop: query vs gallery)."""
    from model.checkpoint import load_checkpoint
    from model.transforms import eval_transform

    loaded = load_checkpoint(checkpoint, device=device)
    net = loaded.net.eval()
    preprocessing = loaded.config.preprocessing
    splits = default_split(spec, training=False)
    sets = [open_dataset(spec, split, eval_transform(preprocessing)) for split in splits]
    inputs = EvalInputs(
        net,
        sets[0],
        gallery=sets[1] if len(sets) > 1 else None,
        collage=sets[0] if isinstance(sets[0], CollageDataset) else None,
        crop_fraction=preprocessing.crop_fraction,
        num_workers=num_workers,
    )
    return score(inputs, batch_size, device)
