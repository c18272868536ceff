"""What a run feeds its network: m-per-class training batches (images, or cached feature maps
in frozen-backbone runs) and the validation inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from model.data import CollageDataset, MPerClassBatchSampler, default_split, open_dataset
from model.evaluate import EvalInputs
from model.feature_cache import FeatureMapSet
from model.net import EmbeddingNet
from model.training.distributed import DistributedContext
from model.training.feature_maps import split_feature_maps
from model.training_config import TrainingConfig
from model.transforms import eval_transform, train_transform

__all__ = ["MapBatches", "TrainSource", "build_eval_inputs", "train_loader", "train_source"]


@dataclass
class TrainSource:
    """Training items (images, or cached feature maps) with their labels."""

    items: Dataset
    labels: list[int]
    num_classes: int
    description: dict[str, Any]


def train_source(config: TrainingConfig, net: EmbeddingNet, ctx: DistributedContext) -> TrainSource:
    """The training split of ``data.train``: augmented images, or the frozen backbone's maps."""
    spec = config.data.train
    (split,) = default_split(spec, training=True)
    items: Dataset
    if config.frozen_backbone:
        items, images = split_feature_maps(config, net, spec, split, ctx)
    else:
        transform = train_transform(config.model.preprocessing, **config.data.augment)
        items = images = open_dataset(spec, split, transform)
    labels = [int(label) for label in images.targets]
    description = {"data": spec, "split": split}
    return TrainSource(items, labels, len(images.classes), description)


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
) -> EvalInputs:
    """What validation embeds: the eval split's images, or their cached feature maps."""
    ctx = ctx or DistributedContext.single(next(net.parameters()).device)
    splits = default_split(spec, training=False)
    preprocessing = config.model.preprocessing
    if config.frozen_backbone:
        pairs = [split_feature_maps(config, net, spec, split, ctx) for split in splits]
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
    )
