"""The training loop: from a :class:`TrainingConfig` to a run directory of checkpoints.

Each epoch draws ``steps_per_epoch`` m-per-class batches; every ``checkpoint_every`` epochs
(and after the last) rank 0 validates on ``data.val``, writes ``epoch-NNN`` and refreshes
``best``; every epoch adds a line to ``metrics.jsonl``.  ``schedule.patience`` stops a run whose
validation MAP@R has stopped improving.  Then ``best`` (the last epoch without a val split) is
scored once on ``data.test``, into ``test_metrics.json``.  ``resume`` continues after the last
complete epoch with the optimiser, schedule and random streams as they were.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.data import MPerClassBatchSampler
from model.evaluate import score
from model.net import EmbeddingNet, build_embedding_net
from model.training.checkpoints import BEST_DIR, RunDirectory
from model.training.distributed import DistributedContext, init_distributed, seed_everything
from model.training.inputs import (
    MapBatches,
    TrainSource,
    build_eval_inputs,
    check_data,
    selection_specs,
    start_projection,
    train_loader,
    train_source,
)
from model.training.metrics_log import (
    PLOT_FILE,
    append_metrics,
    plot_metrics,
    truncate_metrics,
    write_test_metrics,
)
from model.training.optim import build_optimizer, build_scheduler
from model.training.state import TrainingParts
from model.training.step import TrainingStep, build_objective, gsp_pooling
from model.training_config import TrainingConfig

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """Where a run wrote, and what it measured per epoch."""

    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    test: dict[str, Any] | None = None


def train(config: TrainingConfig, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Run (or, with ``resume``, continue) the training job described by ``config``."""
    ctx = init_distributed()
    output = Path(config.output_dir)
    run = RunDirectory(output)
    start_epoch = run.last_epoch() if resume else 0
    if resume and start_epoch == 0:
        raise FileNotFoundError(f"--resume: no complete epoch checkpoint under {output}")
    if not resume and run.last_epoch() > 0:
        raise FileExistsError(
            f"{output} already holds epoch checkpoints; pass --resume or choose another output_dir"
        )
    check_data(config)  # before the feature cache and the first step, not after
    seed_everything(config.seed + ctx.rank)
    net = build_embedding_net(config.model).to(ctx.device)
    if config.frozen_backbone:
        net.backbone.requires_grad_(False)
    source = train_source(config, net, ctx, show_progress)
    if config.projection_init:
        start_projection(config, net, ctx, show_progress)
    _, val_spec = selection_specs(config)
    val_inputs = build_eval_inputs(config, net, val_spec, ctx, show_progress) if val_spec else None
    # filling the feature cache draws from the random streams (loader seeds), reading it does
    # not: reseed, so that a run is the same whether its cache was cold or warm
    seed_everything(config.seed + ctx.rank + 1)
    objective = build_objective(config, net, source.num_classes).to(ctx.device)
    optimizer = build_optimizer(config, net, objective)
    loader = train_loader(config, source, ctx)
    steps = config.steps_per_epoch or len(loader)
    parts = TrainingParts(net, objective, optimizer, build_scheduler(config, optimizer, steps))
    step = TrainingStep(net, objective, config.frozen_backbone, config.amp)
    best_map = -math.inf
    if start_epoch:
        best_map = run.restore(start_epoch, parts, str(ctx.device))
    elif config.prototype_init == "kcenter":
        _kcenter_init(config, step, loader, ctx)
    step_module: nn.Module = step
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        step_module = DistributedDataParallel(step, device_ids=device_ids)
    if ctx.main:
        output.mkdir(parents=True, exist_ok=True)
        truncate_metrics(output, start_epoch)
    result = TrainResult(output)
    description = _training_description(config, source)
    for epoch in range(start_epoch + 1, config.schedule.epochs + 1):
        record = _train_epoch(config, epoch, step_module, parts, loader, steps, ctx, show_progress)
        checkpoint = epoch % config.checkpoint_every == 0 or epoch == config.schedule.epochs
        if ctx.main and checkpoint:
            if val_inputs is not None:
                net.eval()
                with _autocast_eval(ctx, config.amp):
                    record["val"] = score(val_inputs, config.eval_batch_size, ctx.device)
            best_map = run.save_epoch(config, epoch, parts, record, best_map, description)
        if ctx.main:
            result.history = append_metrics(output, record)
            if checkpoint:
                plot_metrics(result.history, output / PLOT_FILE)
        ctx.barrier()
        if checkpoint and _out_of_patience(config, run, epoch):
            break
    if ctx.main:
        result.best_epoch = run.best_epoch()
        if config.data.test:
            result.test = _test_once(config, run, net, ctx, show_progress)
    return result


def _out_of_patience(config: TrainingConfig, run: RunDirectory, epoch: int) -> bool:
    """Whether ``schedule.patience`` validations have passed since the best one."""
    best = run.best_epoch()
    if not config.schedule.patience or best is None:
        return False
    return (epoch - best) // config.checkpoint_every >= config.schedule.patience


def _test_once(
    config: TrainingConfig,
    run: RunDirectory,
    net: EmbeddingNet,
    ctx: DistributedContext,
    show_progress: bool,
) -> dict[str, Any]:
    """Score the selected weights (``best``, or the last epoch when nothing was validated) on
    ``data.test``, once, and record it apart from the per-epoch validation metrics."""
    from model.checkpoint import load_checkpoint

    best = run.best_epoch()
    source = run.root / BEST_DIR if best is not None else run.epoch_dir(run.last_epoch())
    net.load_state_dict(load_checkpoint(source, device=str(ctx.device)).net.state_dict())
    net.eval()
    test_spec = config.data.test or {}
    inputs = build_eval_inputs(config, net, test_spec, ctx, show_progress)
    with _autocast_eval(ctx, config.amp):
        metrics = score(inputs, config.eval_batch_size, ctx.device)
    record = {
        "split": "test",
        "data": test_spec,
        "checkpoint": source.name,
        "epoch": best if best is not None else run.last_epoch(),
        "selected_on": "val MAP@R" if best is not None else "nothing: the last epoch",
        "metrics": metrics,
    }
    write_test_metrics(run.root, record)
    return record


def _train_epoch(
    config: TrainingConfig,
    epoch: int,
    step_module: nn.Module,
    parts: TrainingParts,
    loader: DataLoader | MapBatches,
    steps: int,
    ctx: DistributedContext,
    show_progress: bool,
) -> dict[str, Any]:
    """``steps`` optimiser steps; returns the epoch's metrics record (loss, speed, rates)."""
    optimizer = parts.optimizer
    _set_training(parts.net, config.frozen_backbone)
    if isinstance(loader.batch_sampler, MPerClassBatchSampler):
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
        parts.scheduler.step()
        losses.append(float(terms["total"].detach()))
        images += inputs.shape[0] * ctx.world_size
        rate = images / max(time.perf_counter() - began, 1e-9)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{rate:.1f}")
    return {
        "epoch": epoch,
        "loss": float(np.mean(losses)),
        "images_per_s": images / max(time.perf_counter() - began, 1e-9),
        "world_size": ctx.world_size,
        "lr": {group["name"]: group["lr"] for group in optimizer.param_groups},
    }


def _batches(loader: DataLoader | MapBatches, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` batches, restarting the loader when it runs out."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


@torch.no_grad()
def _kcenter_init(
    config: TrainingConfig,
    step: TrainingStep,
    loader: DataLoader | MapBatches,
    ctx: DistributedContext,
) -> None:
    """Initialise GSP prototypes by greedy k-center over features seen in a few batches."""
    gsp = gsp_pooling(step.net)
    if gsp is None:
        return
    gsp.start_warmup()
    _set_training(step.net, config.frozen_backbone)
    for inputs, _ in _batches(loader, config.kcenter_batches):
        step.embed(inputs.to(ctx.device, non_blocking=True).float())
    generator = torch.Generator().manual_seed(config.seed)
    gsp.finish_warmup(generator=generator)


def _autocast_eval(ctx: DistributedContext, amp: bool) -> torch.autocast:
    use = amp and ctx.device.type == "cuda"
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use)


def _set_training(net: EmbeddingNet, frozen_backbone: bool) -> None:
    net.train()
    if frozen_backbone:
        net.backbone.eval()


def _training_description(config: TrainingConfig, source: TrainSource) -> dict[str, Any]:
    return {
        **source.description,
        "num_images": len(source.labels),
        "num_classes": source.num_classes,
        "loss": config.loss.name,
        "zsr": config.loss.zsr,
        "frozen_backbone": config.frozen_backbone,
        "seed": config.seed,
    }
