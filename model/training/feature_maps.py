"""Frozen-backbone runs train on the backbone's feature maps, computed once per split.

The maps go through the disk cache (``model.feature_cache``, keyed by backbone weights,
preprocessing and data content); rank 0 fills it while the other ranks wait, then read it.
The last few splits also stay in memory, so consecutive runs in one process (sweeps,
benchmarks) skip re-reading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from model.config import Preprocessing
from model.data import LabeledImageDataset, dataset_identity, open_dataset
from model.feature_cache import (
    FeatureMapSet,
    cached_feature_maps,
    feature_cache_key,
    module_digest,
)
from model.net import EmbeddingNet
from model.training.distributed import DistributedContext
from model.training_config import TrainingConfig
from model.transforms import eval_transform

__all__ = ["MapCache", "frozen_feature_maps", "split_feature_maps"]

# Keyed like the disk cache, so a stale entry cannot be hit.
_RECENT_MAPS: dict[str, FeatureMapSet] = {}
_RECENT_LIMIT = 2


@dataclass(frozen=True)
class MapCache:
    """Where a frozen backbone's maps are cached, and how a miss computes them."""

    directory: Path
    batch_size: int = 256
    num_workers: int = 0
    progress: bool = True


def split_feature_maps(
    config: TrainingConfig,
    net: EmbeddingNet,
    spec: dict[str, Any],
    split: str,
    ctx: DistributedContext,
    progress: bool = True,
) -> tuple[FeatureMapSet, LabeledImageDataset]:
    """The frozen backbone's feature maps of one split of a training run's data (see
    :func:`frozen_feature_maps`); ``progress`` shows a bar while the cache is filled."""
    cache = MapCache(
        Path(config.cache_dir), config.eval_batch_size, config.data.num_workers, progress
    )
    return frozen_feature_maps(net, config.model.preprocessing, spec, split, cache, ctx)


def frozen_feature_maps(
    net: EmbeddingNet,
    preprocessing: Preprocessing,
    spec: dict[str, Any],
    split: str,
    cache: MapCache,
    ctx: DistributedContext,
) -> tuple[FeatureMapSet, LabeledImageDataset]:
    """The frozen backbone's feature maps of one split (eval transform), via the disk cache,
    and the split opened as a data set (labels, classes, collage bookkeeping)."""
    net.backbone.eval()  # batch-norm statistics must neither change nor come from the batch
    dataset = open_dataset(spec, split, eval_transform(preprocessing))
    key = feature_cache_key(
        weights_digest=module_digest(net.backbone),
        preprocessing=preprocessing,
        dataset=dataset_identity(spec, split, dataset),
    )
    loader = DataLoader(dataset, batch_size=cache.batch_size, num_workers=cache.num_workers)
    description = {"spec": spec, "split": split, "backbone": type(net.backbone).__name__}

    def backbone(images: Tensor) -> Tensor:
        # channels-last runs the depthwise and 1x1 convolutions about twice as fast on CPU
        return net.features(images.contiguous(memory_format=torch.channels_last))

    def load() -> FeatureMapSet:
        if key in _RECENT_MAPS:
            return _RECENT_MAPS[key]
        net.backbone.to(memory_format=torch.channels_last)
        cached = cached_feature_maps(
            backbone,
            loader,
            len(dataset),
            key,
            cache.directory,
            ctx.device,
            description,
            progress=cache.progress and ctx.main,
        )
        maps = FeatureMapSet(cached.features, cached.labels)
        _RECENT_MAPS[key] = maps
        while len(_RECENT_MAPS) > _RECENT_LIMIT:
            _RECENT_MAPS.pop(next(iter(_RECENT_MAPS)))
        return maps

    if ctx.main:  # rank 0 fills the cache, the others then read it
        maps = load()
        ctx.barrier()
    else:
        ctx.barrier()
        maps = load()
    return maps, dataset
