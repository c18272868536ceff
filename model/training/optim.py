"""How parameters move: the optimiser with one learning rate per part, and its schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from model.net import EmbeddingNet
from model.training_config import TrainingConfig

__all__ = ["build_optimizer", "build_scheduler", "warmup_cosine"]


def build_optimizer(
    config: TrainingConfig, net: EmbeddingNet, objective: nn.Module
) -> torch.optim.Optimizer:
    """One parameter group each for backbone, pooling and loss (proxies), own learning rates."""
    opt = config.optimizer
    pooling = [p for p in net.pooling.parameters() if p.requires_grad]  # projection_init.freeze
    groups = [
        {"name": "pooling", "params": pooling, "lr": opt.lr_pooling},
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


def build_scheduler(
    config: TrainingConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured warm-up and cosine decay, stepped once per batch."""
    schedule = config.schedule
    total = steps_per_epoch * schedule.epochs
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, warmup, schedule.min_lr_ratio)
    )
