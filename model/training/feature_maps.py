"""Frozen-backbone runs train on the backbone's feature maps, computed once per split.

The maps go through the disk cache (``model.feature_cache``, keyed by backbone weights,
preprocessing and data content); rank 0 fills it while the other ranks wait, then read it.
The last few splits also stay in memory, so consecutive runs in one process (sweeps,
benchmarks) skip re-reading them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from model.data import LabeledImageDataset, dataset_identity, default_split, open_dataset
from model.feature_cache import (
    FeatureMapSet,
    cached_feature_maps,
    feature_cache_key,
    module_digest,
)
from model.net import EmbeddingNet, build_embedding_net
from model.training.distributed import DistributedContext
from model.training_config import TrainingConfig
from model.transforms import eval_transform

__all__ = ["cache_features", "split_feature_maps"]

# Keyed like the disk cache, so a stale entry cannot be hit.
_RECENT_MAPS: dict[str, FeatureMapSet] = {}
_RECENT_LIMIT = 2


def split_feature_maps(
    config: TrainingConfig,
    net: EmbeddingNet,
    spec: dict[str, Any],
    split: str,
    ctx: DistributedContext,
) -> tuple[FeatureMapSet, LabeledImageDataset]:
    """The frozen backbone's feature maps of one split (eval transform), via the disk cache,
    and the split opened as a data set (labels, classes, collage bookkeeping)."""
    net.backbone.eval()  # batch-norm statistics must neither change nor come from the batch
    dataset = open_dataset(spec, split, eval_transform(config.model.preprocessing))
    key = feature_cache_key(
        weights_digest=module_digest(net.backbone),
        preprocessing=config.model.preprocessing,
        dataset=dataset_identity(spec, split, dataset),
    )
    loader = DataLoader(
        dataset, batch_size=config.eval_batch_size, num_workers=config.data.num_workers
    )
    description = {"spec": spec, "split": split, "backbone": config.model.backbone}

    def backbone(images: Tensor) -> Tensor:
        # channels-last runs the depthwise and 1x1 convolutions about twice as fast on CPU
        return net.features(images.contiguous(memory_format=torch.channels_last))

    def load() -> FeatureMapSet:
        if key in _RECENT_MAPS:
            return _RECENT_MAPS[key]
        net.backbone.to(memory_format=torch.channels_last)
        cached = cached_feature_maps(
            backbone, loader, len(dataset), key, Path(config.cache_dir), ctx.device, description
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


def cache_features(config: TrainingConfig) -> None:
    """Fill the feature cache of the training and validation splits of a frozen-backbone run
    (the slow part, done once; later runs with the same backbone and data read it)."""
    if not config.frozen_backbone:
        raise ValueError("only a frozen_backbone run uses the feature cache")
    ctx = DistributedContext.single()
    net = build_embedding_net(config.model).to(ctx.device).requires_grad_(False)
    specs = [(config.data.train, default_split(config.data.train, training=True))]
    if config.data.eval:
        specs.append((config.data.eval, default_split(config.data.eval, training=False)))
    for spec, splits in specs:
        for split in splits:
            split_feature_maps(config, net, spec, split, ctx)
