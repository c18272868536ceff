"""What a run feeds its network: m-per-class training batches (images, or cached feature maps
in frozen-backbone runs) and the validation and test inputs, checked before any slow work."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from model.data import (
    CollageDataset,
    MPerClassBatchSampler,
    carve_specs,
    check_disjoint,
    default_split,
    open_dataset,
)
from model.data.sampling import check_batch_composition
from model.evaluate import EvalInputs
from model.feature_cache import FeatureMapSet
from model.net import EmbeddingNet, build_embedding_net
from model.projection_init import principal_projection, set_projection
from model.training.distributed import DistributedContext
from model.training.feature_maps import split_feature_maps
from model.training_config import TrainingConfig
from model.transforms import eval_transform, train_transform

__all__ = [
    "MapBatches",
    "TrainSource",
    "build_eval_inputs",
    "cache_features",
    "check_data",
    "selection_specs",
    "start_projection",
    "train_loader",
    "train_source",
]


def selection_specs(config: TrainingConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The specs training and validation read: ``data.train`` and ``data.val``, with a holdout
    val carved out of the training split (``model.data.holdout``)."""
    (split,) = default_split(config.data.train, training=True)
    return carve_specs(config.data.train, config.data.val, split)


def check_data(config: TrainingConfig) -> None:
    """Open every split without decoding an image and fail early, before features are cached or
    a step is taken: batches the training classes cannot fill, a val or test split that shares
    images with training or with each other."""
    train_spec, val_spec = selection_specs(config)
    (split,) = default_split(train_spec, training=True)
    training = open_dataset(train_spec, split, None)
    check_batch_composition(training.targets, config.data.m_per_class, config.data.batch_size)
    parts = {"train": [training]}
    for name, spec in (("val", val_spec), ("test", config.data.test)):
        if spec:
            parts[name] = [open_dataset(spec, s, None) for s in default_split(spec, False)]
    check_disjoint(parts)


@dataclass
class TrainSource:
    """Training items (images, or cached feature maps) with their labels."""

    items: Dataset
    labels: list[int]
    num_classes: int
    description: dict[str, Any]


def train_source(
    config: TrainingConfig, net: EmbeddingNet, ctx: DistributedContext, progress: bool = True
) -> TrainSource:
    """The training split of ``data.train`` (less a carved-out val): augmented images, or the
    frozen backbone's maps."""
    spec, _ = selection_specs(config)
    (split,) = default_split(spec, training=True)
    items: Dataset
    if config.frozen_backbone:
        items, images = split_feature_maps(config, net, spec, split, ctx, progress)
    else:
        transform = train_transform(config.model.preprocessing, **config.data.augment)
        items = images = open_dataset(spec, split, transform)
    labels = [int(label) for label in images.targets]
    description = {"data": spec, "split": split}
    return TrainSource(items, labels, len(images.classes), description)


def start_projection(
    config: TrainingConfig, net: EmbeddingNet, ctx: DistributedContext, progress: bool = True
) -> None:
    """``projection_init``: the head's projection from the principal components of the frozen
    backbone's average-pooled features of ``projection_init.data`` (through the feature cache)."""
    spec = config.projection_init["data"]
    (split,) = default_split(spec, training=True)
    maps, _ = split_feature_maps(config, net, spec, split, ctx, progress)
    pooled = maps.maps.float().mean(dim=(1, 2))
    projection = getattr(net.pooling, "projection", None)
    if not isinstance(projection, nn.Conv2d):
        pooling = config.model.pooling
        raise ValueError(f"projection_init needs a pooling with a projection, not {pooling}")
    weight, bias = principal_projection(
        pooled, projection.out_channels, bool(config.projection_init.get("whiten", False))
    )
    set_projection(
        projection,
        weight.to(ctx.device),
        bias.to(ctx.device),
        bool(config.projection_init.get("freeze", False)),
    )


class MapBatches:
    """Training batches gathered straight from in-memory cached maps: no loader, no collation."""

    def __init__(self, maps: FeatureMapSet, batch_sampler: MPerClassBatchSampler) -> None:
        self.maps = maps
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return (self.maps.batch(indices) for indices in self.batch_sampler)


def train_loader(
    config: TrainingConfig, source: TrainSource, ctx: DistributedContext
) -> DataLoader | MapBatches:
    """m-per-class batches; every rank draws its own (seeded by rank) share of the epoch."""
    per_epoch = config.steps_per_epoch or max(
        1, len(source.labels) // (config.data.batch_size * ctx.world_size)
    )
    sampler = MPerClassBatchSampler(
        source.labels,
        config.data.m_per_class,
        config.data.batch_size,
        per_epoch,
        seed=config.seed + 1_000_003 * ctx.rank,
    )
    if isinstance(source.items, FeatureMapSet):
        return MapBatches(source.items, sampler)
    workers = config.data.num_workers
    return DataLoader(
        source.items,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=workers > 0,
    )


def build_eval_inputs(
    config: TrainingConfig,
    net: EmbeddingNet,
    spec: dict[str, Any],
    ctx: DistributedContext | None = None,
    progress: bool = True,
) -> EvalInputs:
    """What validation (or the test) embeds: the spec's evaluation splits' images, or their
    cached feature maps."""
    ctx = ctx or DistributedContext.single(next(net.parameters()).device)
    splits = default_split(spec, training=False)
    preprocessing = config.model.preprocessing
    if config.frozen_backbone:
        pairs = [split_feature_maps(config, net, spec, split, ctx, progress) for split in splits]
        sets: list[Dataset] = [maps for maps, _ in pairs]
        query: Dataset = pairs[0][1]
        forward: Callable[[Tensor], Any] = net.pool
    else:
        sets = [open_dataset(spec, split, eval_transform(preprocessing)) for split in splits]
        query = sets[0]
        forward = net
    return EvalInputs(
        forward,
        sets[0],
        gallery=sets[1] if len(sets) > 1 else None,
        collage=query if isinstance(query, CollageDataset) else None,
        crop_fraction=preprocessing.crop_fraction,
        num_workers=0 if config.frozen_backbone else config.data.num_workers,
        progress=progress and ctx.main,
    )


def cache_features(config: TrainingConfig, progress: bool = True) -> None:
    """Fill the feature cache of the training, validation and test splits of a frozen-backbone
    run (the slow part, done once; later runs with the same backbone and data read it)."""
    if not config.frozen_backbone:
        raise ValueError("only a frozen_backbone run uses the feature cache")
    check_data(config)
    ctx = DistributedContext.single()
    net = build_embedding_net(config.model).to(ctx.device).requires_grad_(False)
    train_spec, val_spec = selection_specs(config)
    specs = [(train_spec, default_split(train_spec, training=True))]
    for spec in (val_spec, config.data.test):
        if spec:
            specs.append((spec, default_split(spec, training=False)))
    if config.projection_init:
        spec = config.projection_init["data"]
        specs.append((spec, default_split(spec, training=True)))
    for spec, splits in specs:
        for split in splits:
            split_feature_maps(config, net, spec, split, ctx, progress)
