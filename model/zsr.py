"""Zero-shot regularisation (ZSR) of GSP prototypes.

Each image's prototype histogram is a bag of parts.  The batch is split in two halves; a ridge
regression fitted on one half maps histograms to learnable class embeddings and must predict the
class embeddings of the other half.  Prototypes that make this work are parts shared across
classes, which is what transfers to classes never seen in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ZeroShotRegularization"]


class ZeroShotRegularization(nn.Module):
    """Cross-entropy of ridge-regressed class embeddings, fitted and scored across batch halves.

    Args:
        num_classes: number of training classes (labels must lie in ``[0, num_classes)``).
        num_prototypes: length of the histograms (GSP's ``m``).
        class_embedding_dim: size of the learnable class embeddings.
        ridge: weight of the ridge penalty of the regression.
        scale: inverse temperature of the softmax over class-embedding dot products.
    """

    def __init__(
        self,
        num_classes: int,
        num_prototypes: int,
        class_embedding_dim: int = 128,
        ridge: float = 0.05,
        scale: float = 9.5,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if ridge <= 0:
            raise ValueError(f"ridge must be positive, got {ridge}")
        self.num_prototypes = num_prototypes
        self.ridge = float(ridge)
        self.scale = float(scale)
        self.class_embeddings = nn.Parameter(torch.randn(num_classes, class_embedding_dim) * 0.1)

    def _regress(self, source: Tensor, targets: Tensor) -> Tensor:
        """Ridge weights ``W`` minimising ``|source W - targets|^2 + ridge |W|^2``."""
        gram = source.T @ source
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + self.ridge * eye, source.T @ targets)

    def _score(self, fit: Tensor, fit_labels: Tensor, held: Tensor, held_labels: Tensor) -> Tensor:
        weights = self._regress(fit, self.class_embeddings[fit_labels])
        logits = self.scale * (held @ weights) @ self.class_embeddings.T
        return F.cross_entropy(logits, held_labels)

    def forward(self, histograms: Tensor, labels: Tensor) -> Tensor:
        """Loss for a batch of ``(B, m)`` histograms with integer ``labels`` ``(B,)``."""
        if histograms.dim() != 2 or histograms.shape[1] != self.num_prototypes:
            raise ValueError(
                f"histograms must be (B, {self.num_prototypes}), got {tuple(histograms.shape)}"
            )
        if labels.shape != histograms.shape[:1]:
            raise ValueError(f"labels must be ({histograms.shape[0]},), got {tuple(labels.shape)}")
        if histograms.shape[0] < 4:
            raise ValueError("ZSR needs at least 4 samples: two halves of two")
        num_classes = self.class_embeddings.shape[0]
        if bool(((labels < 0) | (labels >= num_classes)).any()):
            raise ValueError(f"labels must lie in [0, {num_classes})")
        with torch.autocast(device_type=histograms.device.type, enabled=False):
            hist = histograms.float()
            half = hist.shape[0] // 2
            first, second = hist[:half], hist[half:]
            first_labels, second_labels = labels[:half], labels[half:]
            return 0.5 * (
                self._score(first, first_labels, second, second_labels)
                + self._score(second, second_labels, first, first_labels)
            )
