"""The embedding network: a backbone feature map pooled into one L2-normalised vector.

``features`` and ``pool`` are separate steps so that a frozen-backbone feature cache and
query-time re-pooling (another transport ratio, a unary cost) can skip the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from model.backbones import build_backbone
from model.config import ModelConfig
from model.gsp import GeneralizedSumPooling, build_pooling

__all__ = ["EmbeddingNet", "EmbeddingOutput", "build_embedding_net"]


@dataclass
class EmbeddingOutput:
    """``embedding`` (B, d) float32 with unit L2 norm; ``weights`` (B, h, w) pooling weights
    (mean 1, the attention heatmap); ``histogram`` (B, m) prototype masses, GSP only."""

    embedding: Tensor
    weights: Tensor
    histogram: Tensor | None = None


class EmbeddingNet(nn.Module):
    """Backbone, then pooling, then L2 normalisation."""

    def __init__(self, backbone: nn.Module, pooling: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling

    @property
    def embedding_dim(self) -> int:
        dim = self.pooling.embedding_dim  # set by every pooling layer; torch types it loosely
        if not isinstance(dim, int):
            raise TypeError(f"{type(self.pooling).__name__} has no integer embedding_dim")
        return dim

    def features(self, images: Tensor) -> Tensor:
        """The backbone's ``(B, C, h, w)`` feature map of ``(B, 3, H, W)`` images."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        return self.backbone(images)

    def pool(self, features: Tensor, **pooling_kwargs: Any) -> EmbeddingOutput:
        """Pool a feature map; ``transport_ratio`` / ``unary_cost`` go to GSP (None = default)."""
        options = {key: value for key, value in pooling_kwargs.items() if value is not None}
        if options and not isinstance(self.pooling, GeneralizedSumPooling):
            raise ValueError(
                f"pooling options {sorted(options)} need GSP pooling; this network uses "
                f"{type(self.pooling).__name__}"
            )
        result = self.pooling(features, **options)
        return EmbeddingOutput(
            embedding=F.normalize(result.embedding.float(), dim=1),
            weights=result.weights.float(),
            histogram=None if result.histogram is None else result.histogram.float(),
        )

    def forward(self, images: Tensor, **pooling_kwargs: Any) -> EmbeddingOutput:
        return self.pool(self.features(images), **pooling_kwargs)


def build_embedding_net(config: ModelConfig) -> EmbeddingNet:
    """Build the network a :class:`ModelConfig` describes (weights per ``config.pretrained``)."""
    backbone = build_backbone(config.backbone, config.pretrained, config.output_stride)
    pooling = build_pooling(
        config.pooling, backbone.out_channels, config.embedding_dim, **config.pooling_options
    )
    return EmbeddingNet(backbone, pooling)
