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

# A map size (h, w) to per-image object masks and the masks of the area a share is taken over,
# both (N, h, w) with values in [0, 1].
MaskSource = Callable[[tuple[int, int]], tuple[Tensor, Tensor]]

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
    default).  Masks may be fractional (a location's coverage).  Images whose ``cell_masks`` is
    empty (no marked region) are left out.  Uniform weights give each image the share of its
    target's locations among its cells' (``torch.ones_like(weights)``: the baseline).
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
    marked = cell_masks.flatten(1).double().sum(dim=1) > 0
    if not bool(marked.any()):
        raise ValueError("no image has a marked region to measure a weight share on")
    return float((inside / on_cells.clamp_min(1e-12))[marked].mean())


@dataclass
class EvalInputs:
    """What to embed and how: ``forward`` maps a batch of ``query``/``gallery`` inputs (images,
    or cached feature maps with ``net.pool``) to an ``EmbeddingOutput``.  Without ``gallery``
    the query set is searched leave-one-out.  ``collage``, the query split as a collage data set
    (its ``grid`` and ``target_cells``), adds the target-cell mass share; ``object_masks``
    (e.g. :func:`model.object_regions.region_mask_source`) does the same for other data sets;
    both add the share uniform weights give (the baseline); ``crop_fraction`` is
    the input's side as a fraction of the resized canvas (see ``target_cell_mask``);
    ``progress`` shows the embedding bars."""

    forward: Callable[[Tensor], Any]
    query: Dataset
    gallery: Dataset | None = None
    collage: CollageDataset | None = None
    object_masks: MaskSource | None = None
    crop_fraction: float = 1.0
    num_workers: int = 0
    progress: bool = True


@torch.no_grad()
def embed(
    forward: Callable[[Tensor], Any],
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    desc: str = "embedding",
    progress: bool = True,
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
    bar = tqdm(batches, desc=desc, total=total, unit="batch", leave=False, disable=not progress)
    for inputs, batch_labels in bar:
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
        inputs.forward,
        inputs.query,
        batch_size,
        device,
        inputs.num_workers,
        "embedding queries",
        inputs.progress,
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
            inputs.progress,
        )
        metrics = retrieval_metrics(query, query_labels, gallery, gallery_labels)
    _, height, width = weights.shape
    masks = None
    if inputs.collage is not None:
        masks = collage_masks(inputs.collage, (height, width), inputs.crop_fraction)
    elif inputs.object_masks is not None:
        masks = inputs.object_masks((height, width))
    if masks is not None:
        metrics["target_mass_share"] = target_mass_share(weights, *masks)
        metrics["uniform_mass_share"] = target_mass_share(torch.ones_like(weights), *masks)
    return metrics


_LABELS = {
    "precision_at_1": "P@1",
    "r_precision": "R-Precision",
    "map_at_r": "MAP@R",
    "target_mass_share": "object-weight share",
    "uniform_mass_share": "same cells, uniform weights",
}


def format_table(metrics: dict[str, float]) -> str:
    """A two-column text table of metrics, in a stable order."""
    rows = [(_LABELS.get(k, k.replace("recall_at_", "Recall@")), v) for k, v in metrics.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in rows)


@dataclass
class CheckpointEvaluation:
    """What ``gsp eval`` reports: the metrics, the splits scored, where features came from."""

    metrics: dict[str, float]
    splits: list[str]
    features: str


def evaluate_checkpoint(
    checkpoint: str | Path,
    spec: dict[str, Any],
    batch_size: int = 128,
    device: str = "cpu",
    num_workers: int = 0,
    *,
    cache: bool | Path = True,
    regions: Path | None = None,
    progress: bool = True,
) -> CheckpointEvaluation:
    """Load a checkpoint and score it on a data spec's evaluation splits (``split``, else test;
    In-Shop: query vs gallery).

    ``cache``: True reads the backbone's feature maps from the run's feature cache when the
    run froze its backbone (the maps are the same, so they are not computed again), a folder
    uses that cache, False always runs the backbone.  ``regions``, an object-region CSV
    (:mod:`model.object_regions`), adds the object-weight share.
    """
    from model.checkpoint import load_checkpoint
    from model.training.distributed import DistributedContext
    from model.training.feature_maps import MapCache, frozen_feature_maps
    from model.transforms import eval_transform

    loaded = load_checkpoint(checkpoint, device=device)
    net = loaded.net.eval()
    preprocessing = loaded.config.preprocessing
    splits = default_split(spec, training=False)
    cache_dir = _feature_cache_dir(loaded.metadata, cache)
    forward: Callable[[Tensor], Any] = net
    sets: list[Dataset]
    if cache_dir is None:
        sets = [open_dataset(spec, split, eval_transform(preprocessing)) for split in splits]
        datasets: list[Any] = sets
        features = "images (backbone run now)"
    else:
        ctx = DistributedContext.single(torch.device(device))
        maps_cache = MapCache(cache_dir, batch_size, num_workers, progress)
        pairs = [
            frozen_feature_maps(net, preprocessing, spec, split, maps_cache, ctx)
            for split in splits
        ]
        sets, datasets = [maps for maps, _ in pairs], [opened for _, opened in pairs]
        forward = net.pool
        features = f"feature cache {cache_dir}"
    object_masks = None
    if regions is not None:
        from model.object_regions import read_object_regions, region_mask_source

        paths = [path for path, _ in datasets[0].samples]
        object_masks = region_mask_source(paths, read_object_regions(regions), preprocessing)
    inputs = EvalInputs(
        forward,
        sets[0],
        gallery=sets[1] if len(sets) > 1 else None,
        collage=datasets[0] if isinstance(datasets[0], CollageDataset) else None,
        object_masks=object_masks,
        crop_fraction=preprocessing.crop_fraction,
        num_workers=0 if cache_dir is not None else num_workers,
        progress=progress,
    )
    return CheckpointEvaluation(score(inputs, batch_size, device), splits, features)


def _feature_cache_dir(metadata: dict[str, Any], cache: bool | Path) -> Path | None:
    """The feature cache to read: the given folder, or the training run's when it froze the
    backbone (its weights, hence its maps, are the cached ones); None to run the backbone."""
    if cache is False:
        return None
    if cache is not True:
        return Path(cache)
    run = metadata.get("training_config") or {}
    return Path(run.get("cache_dir") or ".cache/features") if run.get("frozen_backbone") else None
