"""What one training step computes: the net (whole, or only its pooling on cached feature maps)
and the objective (metric loss, plus ZSR on GSP histograms), as one module."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from model.gsp import GeneralizedSumPooling
from model.losses import TrainingObjective, build_loss
from model.net import EmbeddingNet
from model.training_config import TrainingConfig
from model.zsr import ZeroShotRegularization

__all__ = ["TrainingStep", "build_objective", "gsp_pooling"]


class TrainingStep(nn.Module):
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


def gsp_pooling(net: EmbeddingNet) -> GeneralizedSumPooling | None:
    """The net's GSP layer, or None when it pools otherwise."""
    return net.pooling if isinstance(net.pooling, GeneralizedSumPooling) else None


def build_objective(
    config: TrainingConfig, net: EmbeddingNet, num_classes: int
) -> TrainingObjective:
    """The configured metric loss, plus ZSR when the pooling is GSP and ZSR is on."""
    loss = config.loss
    metric = build_loss(loss.name, num_classes, config.model.embedding_dim, **loss.options)
    gsp = gsp_pooling(net)
    zsr = None
    if gsp is not None and loss.zsr:
        zsr = ZeroShotRegularization(num_classes, gsp.num_prototypes, **loss.zsr_options)
    return TrainingObjective(metric, zsr, loss.zsr_weight)
