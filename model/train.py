"""The training job: a metric-learning run from a :class:`TrainingConfig` to checkpoints.

One code path serves a laptop, one GPU and ``torchrun`` (DistributedDataParallel when
``WORLD_SIZE`` > 1; only rank 0 writes).  With ``frozen_backbone`` the backbone's feature maps
are cached once and only the pooling (and loss) train, on the cache.  A run writes a
checkpoint directory (``epoch-NNN``, every ``checkpoint_every`` epochs and after the last) with
the trainer state beside the weights (safetensors + JSON, never pickle) for ``resume``, the
validation metrics and the ``metrics.png`` plot; every epoch adds a line to ``metrics.jsonl``.
The best checkpointed epoch by MAP@R is copied to ``best``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import MPerClassBatchSampler, dataset_identity, default_split, open_dataset
from model.evaluate import EvalInputs, score
from model.feature_cache import (
    FeatureMapSet,
    cached_feature_maps,
    feature_cache_key,
    module_digest,
)
from model.gsp import GeneralizedSumPooling
from model.losses import TrainingObjective, build_loss
from model.net import EmbeddingNet, build_embedding_net
from model.training_config import TrainingConfig
from model.transforms import eval_transform, train_transform
from model.zsr import ZeroShotRegularization

__all__ = ["TrainResult", "cache_features", "decode_state", "encode_state", "train"]

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
BEST_DIR = "best"
EPOCH_PREFIX = "epoch-"


@dataclass
class TrainResult:
    """Where a run wrote, and what it measured per epoch."""

    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None


# -- trainer state without pickle ------------------------------------------------------------


def encode_state(value: Any, tensors: dict[str, Tensor], path: str = "s") -> Any:
    """JSON-able form of nested state; tensors and arrays move to ``tensors`` by key."""
    if isinstance(value, Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": path}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {
                "__dict__": {k: encode_state(v, tensors, f"{path}.{k}") for k, v in value.items()}
            }
        return {
            "__items__": [
                [encode_state(k, tensors, f"{path}.k{i}"), encode_state(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in the trainer state")


def decode_state(value: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__tuple__" in value:
        return tuple(decode_state(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: decode_state(v, tensors) for k, v in value["__dict__"].items()}
    return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value["__items__"]}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_state(directory: Path, state: dict[str, Any]) -> None:
    tensors: dict[str, Tensor] = {}
    encoded = encode_state(state, tensors)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(encoded))


def _load_state(directory: Path) -> dict[str, Any]:
    tensors = load_file(str(directory / STATE_TENSORS))
    return decode_state(json.loads((directory / STATE_JSON).read_text()), tensors)


# -- distributed set-up ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return _Dist(0, 1, device)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return _Dist(dist.get_rank(), dist.get_world_size(), device)


def _barrier(ctx: _Dist) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- model, objective, optimiser, schedule ---------------------------------------------------


class _Step(nn.Module):
    """One training step's forward: the net (whole, or its pooling on cached features) and the
    objective, in one module so that DistributedDataParallel synchronises the proxies too."""

    def __init__(
        self, net: EmbeddingNet, objective: TrainingObjective, on_features: bool, amp: bool
    ) -> None:
        super().__init__()
        self.net = net
        self.objective = objective
        self.on_features = on_features
        self.amp = amp

    def embed(self, inputs: Tensor) -> Any:
        use_amp = self.amp and inputs.device.type == "cuda"
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=use_amp):
            return self.net.pool(inputs) if self.on_features else self.net(inputs)

    def forward(self, inputs: Tensor, labels: Tensor) -> dict[str, Tensor]:
        out = self.embed(inputs)
        histogram = None if out.histogram is None else out.histogram.float()
        return self.objective(out.embedding.float(), labels, histogram)


def _gsp(net: EmbeddingNet) -> GeneralizedSumPooling | None:
    return net.pooling if isinstance(net.pooling, GeneralizedSumPooling) else None


def build_objective(
    config: TrainingConfig, net: EmbeddingNet, num_classes: int
) -> TrainingObjective:
    """The configured metric loss, plus ZSR when the pooling is GSP and ZSR is on."""
    loss = config.loss
    metric = build_loss(loss.name, num_classes, config.model.embedding_dim, **loss.options)
    gsp = _gsp(net)
    zsr = None
    if gsp is not None and loss.zsr:
        zsr = ZeroShotRegularization(num_classes, gsp.num_prototypes, **loss.zsr_options)
    return TrainingObjective(metric, zsr, loss.zsr_weight)


def build_optimizer(
    config: TrainingConfig, net: EmbeddingNet, objective: nn.Module
) -> torch.optim.Optimizer:
    """One parameter group each for backbone, pooling and loss (proxies), own learning rates."""
    opt = config.optimizer
    groups = [
        {"name": "pooling", "params": list(net.pooling.parameters()), "lr": opt.lr_pooling},
        {"name": "loss", "params": list(objective.parameters()), "lr": opt.lr_loss},
    ]
    if not config.frozen_backbone:
        groups.insert(
            0,
            {"name": "backbone", "params": list(net.backbone.parameters()), "lr": opt.lr_backbone},
        )
    groups = [group for group in groups if group["params"]]
    if opt.name == "sgd":
        return torch.optim.SGD(
            groups, lr=opt.lr_pooling, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
    return torch.optim.AdamW(groups, lr=opt.lr_pooling, weight_decay=opt.weight_decay)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate factor: linear up to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# -- data ------------------------------------------------------------------------------------


@dataclass
class _TrainSource:
    """Training items (images, or cached feature maps) with their labels."""

    items: Dataset
    labels: list[int]
    num_classes: int
    description: dict[str, Any]


# The last few cached splits stay in memory, so consecutive runs in one process (sweeps,
# benchmarks) skip re-reading them; keyed like the disk cache, so a stale entry cannot be hit.
_RECENT_MAPS: dict[str, FeatureMapSet] = {}
_RECENT_LIMIT = 2


def _cached(
    config: TrainingConfig, net: EmbeddingNet, spec: dict[str, Any], split: str, ctx: _Dist
) -> tuple[FeatureMapSet, Dataset]:
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
        _barrier(ctx)
    else:
        _barrier(ctx)
        maps = load()
    return maps, dataset


def cache_features(config: TrainingConfig) -> None:
    """Fill the feature cache of the training and validation splits of a frozen-backbone run
    (the slow part, done once; later runs with the same backbone and data read it)."""
    if not config.frozen_backbone:
        raise ValueError("only a frozen_backbone run uses the feature cache")
    ctx = _Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    net = build_embedding_net(config.model).to(ctx.device).requires_grad_(False)
    specs = [(config.data.train, default_split(config.data.train, training=True))]
    if config.data.eval:
        specs.append((config.data.eval, default_split(config.data.eval, training=False)))
    for spec, splits in specs:
        for split in splits:
            _cached(config, net, spec, split, ctx)


def _train_source(config: TrainingConfig, net: EmbeddingNet, ctx: _Dist) -> _TrainSource:
    spec = config.data.train
    (split,) = default_split(spec, training=True)
    if config.frozen_backbone:
        items, images = _cached(config, net, spec, split, ctx)
    else:
        transform = train_transform(config.model.preprocessing, **config.data.augment)
        items = images = open_dataset(spec, split, transform)
    labels = [int(label) for label in images.targets]
    description = {"data": spec, "split": split}
    return _TrainSource(items, labels, len(images.classes), description)


class _MapBatches:
    """Training batches gathered straight from in-memory cached maps: no loader, no collation."""

    def __init__(self, maps: FeatureMapSet, batch_sampler: MPerClassBatchSampler) -> None:
        self.maps = maps
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return (self.maps.batch(indices) for indices in self.batch_sampler)


def _train_loader(
    config: TrainingConfig, source: _TrainSource, ctx: _Dist
) -> DataLoader | _MapBatches:
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
        return _MapBatches(source.items, sampler)
    workers = config.data.num_workers
    return DataLoader(
        source.items,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=workers > 0,
    )


def build_eval_inputs(
    config: TrainingConfig, net: EmbeddingNet, spec: dict[str, Any], ctx: _Dist | None = None
) -> EvalInputs:
    """What validation embeds: the eval split's images, or their cached feature maps."""
    ctx = ctx or _Dist(0, 1, next(net.parameters()).device)
    splits = default_split(spec, training=False)
    preprocessing = config.model.preprocessing
    if config.frozen_backbone:
        pairs = [_cached(config, net, spec, split, ctx) for split in splits]
        sets: list[Dataset] = [maps for maps, _ in pairs]
        query = pairs[0][1]
        forward: Callable[[Tensor], Any] = net.pool
    else:
        sets = [open_dataset(spec, split, eval_transform(preprocessing)) for split in splits]
        query = sets[0]
        forward = net
    return EvalInputs(
        forward,
        sets[0],
        gallery=sets[1] if len(sets) > 1 else None,
        collage=query if hasattr(query, "target_cells") else None,
        crop_fraction=preprocessing.crop_fraction,
        num_workers=0 if config.frozen_backbone else config.data.num_workers,
    )


def _batches(loader: DataLoader, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` batches, restarting the loader when it runs out."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


@torch.no_grad()
def _kcenter_init(config: TrainingConfig, step: _Step, loader: DataLoader, ctx: _Dist) -> None:
    """Initialise GSP prototypes by greedy k-center over features seen in a few batches."""
    gsp = _gsp(step.net)
    if gsp is None:
        return
    gsp.start_warmup()
    _set_training(step.net, config.frozen_backbone)
    for inputs, _ in _batches(loader, config.kcenter_batches):
        step.embed(inputs.to(ctx.device, non_blocking=True).float())
    generator = torch.Generator().manual_seed(config.seed)
    gsp.finish_warmup(generator=generator)


def _autocast_eval(ctx: _Dist, amp: bool) -> torch.autocast:
    use = amp and ctx.device.type == "cuda"
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use)


def _set_training(net: EmbeddingNet, frozen_backbone: bool) -> None:
    net.train()
    if frozen_backbone:
        net.backbone.eval()


def _epoch_dir(output: Path, epoch: int) -> Path:
    return output / f"{EPOCH_PREFIX}{epoch:03d}"


def _last_epoch(output: Path) -> int:
    """Highest epoch whose checkpoint and trainer state are complete; 0 when none."""
    epochs = [
        int(path.name[len(EPOCH_PREFIX) :])
        for path in output.glob(f"{EPOCH_PREFIX}*")
        if path.name[len(EPOCH_PREFIX) :].isdigit() and (path / STATE_JSON).is_file()
    ]
    return max(epochs, default=0)


def _truncate_metrics(output: Path, last_epoch: int) -> None:
    """Drop metrics.jsonl records after ``last_epoch`` (epochs a resumed run will redo)."""
    path = output / METRICS_FILE
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["epoch"] <= last_epoch]
        path.write_text("".join(line + "\n" for line in kept))


def _write_metrics(output: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Append one epoch's record to metrics.jsonl; return all records (for the plot)."""
    path = output / METRICS_FILE
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and MAP@R per epoch, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [record["epoch"] for record in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [record["loss"] for record in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    scored = [record for record in history if record.get("map_at_r") is not None]
    right.plot([r["epoch"] for r in scored], [r["map_at_r"] for r in scored], marker="o")
    right.set(xlabel="epoch", ylabel="MAP@R", title="validation MAP@R")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _training_description(config: TrainingConfig, source: _TrainSource) -> dict[str, Any]:
    return {
        **source.description,
        "num_images": len(source.labels),
        "num_classes": source.num_classes,
        "loss": config.loss.name,
        "zsr": config.loss.zsr,
        "frozen_backbone": config.frozen_backbone,
        "seed": config.seed,
    }


def train(config: TrainingConfig, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Run (or, with ``resume``, continue) the training job described by ``config``."""
    ctx = _init_distributed()
    output = Path(config.output_dir)
    start_epoch = _last_epoch(output) if resume else 0
    if resume and start_epoch == 0:
        raise FileNotFoundError(f"--resume: no complete epoch checkpoint under {output}")
    if not resume and _last_epoch(output) > 0:
        raise FileExistsError(
            f"{output} already holds epoch checkpoints; pass --resume or choose another output_dir"
        )
    seed_everything(config.seed + ctx.rank)
    net = build_embedding_net(config.model).to(ctx.device)
    if config.frozen_backbone:
        net.backbone.requires_grad_(False)
    source = _train_source(config, net, ctx)
    eval_inputs = (
        build_eval_inputs(config, net, config.data.eval, ctx) if config.data.eval else None
    )
    objective = build_objective(config, net, source.num_classes).to(ctx.device)
    optimizer = build_optimizer(config, net, objective)
    loader = _train_loader(config, source, ctx)
    steps = config.steps_per_epoch or len(loader)
    total = steps * config.schedule.epochs
    warmup = round(config.schedule.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, warmup, config.schedule.min_lr_ratio)
    )
    step = _Step(net, objective, config.frozen_backbone, config.amp)
    best_map = -math.inf
    if start_epoch:
        best_map = _restore(output, start_epoch, net, objective, optimizer, scheduler, ctx)
    elif config.prototype_init == "kcenter":
        _kcenter_init(config, step, loader, ctx)
    step_module: nn.Module = step
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        step_module = DistributedDataParallel(step, device_ids=device_ids)
    if ctx.main:
        output.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(output, start_epoch)
    result = TrainResult(output)
    description = _training_description(config, source)
    for epoch in range(start_epoch + 1, config.schedule.epochs + 1):
        _set_training(net, config.frozen_backbone)
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        losses, images, began = [], 0, time.perf_counter()
        bar = tqdm(
            _batches(loader, steps),
            total=steps,
            desc=f"epoch {epoch}/{config.schedule.epochs}",
            disable=not (show_progress and ctx.main),
            unit="batch",
        )
        for inputs, labels in bar:
            inputs = inputs.to(ctx.device, non_blocking=True).float()
            labels = labels.to(ctx.device, non_blocking=True)
            terms = step_module(inputs, labels)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, config.optimizer.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(terms["total"].detach()))
            images += inputs.shape[0] * ctx.world_size
            rate = images / max(time.perf_counter() - began, 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{rate:.1f}")
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "images_per_s": images / max(time.perf_counter() - began, 1e-9),
            "world_size": ctx.world_size,
            "lr": {group["name"]: group["lr"] for group in optimizer.param_groups},
        }
        checkpoint = epoch % config.checkpoint_every == 0 or epoch == config.schedule.epochs
        if ctx.main and checkpoint:
            if eval_inputs is not None:
                net.eval()
                with _autocast_eval(ctx, config.amp):
                    record.update(score(eval_inputs, config.eval_batch_size, ctx.device))
            best_map = _save_epoch(
                config,
                output,
                epoch,
                net,
                objective,
                optimizer,
                scheduler,
                record,
                best_map,
                description,
            )
        if ctx.main:
            result.history = _write_metrics(output, record)
            if checkpoint:
                plot_metrics(result.history, output / PLOT_FILE)
        _barrier(ctx)
    if ctx.main and (output / BEST_DIR).is_dir():
        result.best_epoch = json.loads((output / BEST_DIR / "best_epoch.json").read_text())["epoch"]
    return result


def _save_epoch(
    config: TrainingConfig,
    output: Path,
    epoch: int,
    net: EmbeddingNet,
    objective: TrainingObjective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    record: dict[str, Any],
    best_map: float,
    description: dict[str, Any],
) -> float:
    """Write ``epoch-NNN`` (checkpoint + trainer state) and refresh ``best``; returns best MAP@R."""
    metadata = {
        "training_data": description,
        "metrics": record,
        "epoch": epoch,
        "training_config": config.to_dict(),
    }
    directory = _epoch_dir(output, epoch)
    if directory.exists():
        shutil.rmtree(directory)
    save_checkpoint(directory, net, config.model, **metadata)
    map_at_r = record.get("map_at_r")
    improved = map_at_r is not None and map_at_r > best_map
    if improved:
        best_map = float(map_at_r)
        best = output / BEST_DIR
        staging = output / f".{BEST_DIR}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        save_checkpoint(staging, net, config.model, **metadata)
        (staging / "best_epoch.json").write_text(json.dumps({"epoch": epoch, "map_at_r": best_map}))
        shutil.rmtree(best, ignore_errors=True)
        staging.rename(best)
    state = {
        "epoch": epoch,
        "best_map_at_r": best_map if math.isfinite(best_map) else None,
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
    }
    _save_state(directory, state)  # written last: its presence marks the epoch complete
    if config.keep_checkpoints > 0:
        for old in range(1, epoch - config.keep_checkpoints + 1):
            shutil.rmtree(_epoch_dir(output, old), ignore_errors=True)
    return best_map


def _restore(
    output: Path,
    epoch: int,
    net: EmbeddingNet,
    objective: TrainingObjective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: _Dist,
) -> float:
    """Load epoch ``epoch``'s weights and trainer state; returns the best MAP@R so far."""
    directory = _epoch_dir(output, epoch)
    loaded = load_checkpoint(directory, device=str(ctx.device))
    net.load_state_dict(loaded.net.state_dict())
    state = _load_state(directory)
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    best = state["best_map_at_r"]
    return -math.inf if best is None else float(best)
