"""The model side of the service: one network per device behind a micro-batcher.

Images are cropped to 8-bit tensors on the request's thread (``prepare``: Pillow and a copy,
no tensor arithmetic, so request threads never start CPU kernel thread pools); the batcher
stacks them, moves the uint8 batch to the device (a quarter of float32's bytes), normalises it
there and runs one forward pass on its single worker thread (``embed_tensors``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.service.batching import MicroBatcher
from model.checkpoint import load_checkpoint
from model.transforms import Normalise, eval_crop, to_uint8_tensor

__all__ = ["Embedded", "InferenceEngine", "StartupError"]


class StartupError(RuntimeError):
    """The service cannot start: the message says what is missing or mismatched."""


@dataclass(frozen=True)
class Embedded:
    embedding: np.ndarray  # (d,) float32, L2-normalised
    weights: np.ndarray  # (h, w) float32 pooling weights: the heatmap


class InferenceEngine:
    """A loaded checkpoint, its eval transform, and the batcher that feeds it."""

    def __init__(
        self,
        checkpoint: Path,
        device: torch.device,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if not checkpoint.is_dir():
            raise StartupError(f"checkpoint directory not found: {checkpoint}")
        try:
            loaded = load_checkpoint(checkpoint, device=str(device))
        except Exception as error:  # any load failure must stop startup with its reason
            raise StartupError(f"cannot load checkpoint {checkpoint}: {error}") from error
        self.device = device
        self.net = loaded.net.eval()
        self.config = loaded.config
        self.fingerprint: str = loaded.fingerprint
        self.preprocessing = loaded.config.preprocessing
        self.embedding_dim: int = loaded.config.embedding_dim
        self._crop = eval_crop(self.preprocessing)
        self._normalise = Normalise(self.preprocessing, device)
        # The network sees a centred square crop; heatmaps must be drawn over that square only.
        self.crop_fraction = min(
            1.0, self.preprocessing.image_size / self.preprocessing.resize_size
        )
        self.batcher: MicroBatcher[torch.Tensor, Embedded] = MicroBatcher(
            self.embed_tensors,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            name=f"model-{device.type}",
            on_batch=on_batch,
        )
        if device.type == "cuda":
            self.warm_up()

    @property
    def min_side(self) -> int:
        """Decoders may reduce large JPEGs down to this side, no further (the indexer's rule)."""
        return self.preprocessing.resize_size

    def warm_up(self) -> None:
        """Run the first forwards (layer compilation, cuDNN plans) before the service is ready.

        Batches of 1 and 2 cover both compiled shapes: a single image and any larger batch.
        """
        size = self.preprocessing.image_size
        for batch in (1, 2):
            self.embed_tensors([torch.zeros(size, size, 3, dtype=torch.uint8)] * batch)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """The cropped image as an ``(S, S, 3)`` uint8 CPU tensor, ready for :meth:`inputs`."""
        return to_uint8_tensor(self._crop(image))

    def inputs(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The normalised ``(B, 3, S, S)`` network input on the device, from prepared tensors;
        equal to :func:`~model.transforms.eval_transform`'s, as the indexer computed it."""
        # A lone image needs no stacking copy: its pixels go to the device as they are.
        batch = tensors[0][None] if len(tensors) == 1 else torch.stack(list(tensors))
        return self._normalise(batch.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def embed_tensors(self, tensors: Sequence[torch.Tensor]) -> list[Embedded]:
        """One forward pass over a batch; runs on the batcher's worker thread."""
        output = self.net(self.inputs(tensors))
        dim = output.embedding.shape[1]
        # One device-to-host copy (and wait) for both results instead of two.
        both = torch.cat([output.embedding.float(), output.weights.float().flatten(1)], dim=1)
        host = both.cpu().numpy()
        weights = host[:, dim:].reshape(output.weights.shape)
        return [Embedded(host[i, :dim], weights[i]) for i in range(len(tensors))]

    def embed_images(self, images: Sequence[Image.Image]) -> list[Embedded]:
        """Synchronous embedding without the batcher (benchmarks, offline use)."""
        return self.embed_tensors([self.prepare(image) for image in images])

    async def embed(self, tensor: torch.Tensor) -> Embedded:
        """Embed one prepared tensor through the micro-batcher."""
        return await self.batcher.submit(tensor)
