"""The model side of the service: one network per device behind a micro-batcher.

Images are cropped to 8-bit tensors on the request's thread (``prepare``: Pillow and a copy,
no tensor arithmetic, so request threads never start CPU kernel thread pools); the batcher
stacks them and runs one forward pass on its single worker thread (``embed_tensors``) through
the bulk indexer's :class:`~model.inference.Embedder`: the uint8 batch goes to the device (a
quarter of float32's bytes), is normalised there, and runs at the same precision.

That thread is the network's only user in the service: explanations and region re-pooling
(``explain``, ``repool``) run there too, between batches, and hand back host-side results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.service.batching import MicroBatcher
from model.checkpoint import load_checkpoint
from model.explain import PairExplanation, PooledParts, explain_pair, repool_with_regions
from model.hardware import GraphMode
from model.inference import Embedder, stack_crops
from model.transforms import eval_crop, to_uint8_tensor

__all__ = ["Embedded", "InferenceEngine", "RegionMarks", "StartupError"]

# Given the feature map's (h, w): the (favour, ignore) coverages in [0, 1] of its locations.
RegionMarks = Callable[[tuple[int, int]], tuple[torch.Tensor, torch.Tensor]]


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
        precision: str = "auto",
        on_batch: Callable[[int, float], None] | None = None,
        graphs: GraphMode = "off",
    ) -> None:
        if not checkpoint.is_dir():
            raise StartupError(f"checkpoint directory not found: {checkpoint}")
        try:
            loaded = load_checkpoint(checkpoint, device=str(device))
        except Exception as error:  # any load failure must stop startup with its reason
            raise StartupError(f"cannot load checkpoint {checkpoint}: {error}") from error
        self.device = device
        self.config = loaded.config
        self.fingerprint: str = loaded.fingerprint
        self.preprocessing = loaded.config.preprocessing
        self.embedding_dim: int = loaded.config.embedding_dim
        self._crop = eval_crop(self.preprocessing)
        try:
            self._embedder = Embedder(loaded.net, self.preprocessing, device, precision, graphs)
        except ValueError as error:
            raise StartupError(str(error)) from error
        self.net = self._embedder.net
        # The network sees a centred square crop; heatmaps must be drawn over that square only.
        self.crop_fraction = self.preprocessing.crop_fraction
        self._max_batch_size = max_batch_size
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
        self._embedder.warm_up(self._max_batch_size)  # every bucket's graph before a request

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """The cropped image as an ``(S, S, 3)`` uint8 CPU tensor, ready for :meth:`inputs`."""
        return to_uint8_tensor(self._crop(image))

    def inputs(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The normalised ``(B, 3, S, S)`` network input on the device, from prepared tensors;
        equal to :func:`~model.transforms.eval_transform`'s, as the indexer computed it."""
        return self._embedder.inputs(stack_crops(tensors))

    @torch.inference_mode()
    def embed_tensors(self, tensors: Sequence[torch.Tensor]) -> list[Embedded]:
        """One forward pass over a batch; runs on the batcher's worker thread."""
        output = self._embedder.forward(self.inputs(tensors))
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

    def _feature_map(self, tensor: torch.Tensor) -> torch.Tensor:
        """The backbone's ``(1, C, h, w)`` map of one prepared image (model thread only)."""
        return self.net.features(self.inputs([tensor]))

    async def explain(self, query: torch.Tensor, match: torch.Tensor, top: int) -> PairExplanation:
        """:func:`~model.explain.explain_pair` of two prepared images, on the model thread;
        the result's tensors are on the host. Raises ``NotGSPError`` for a non-GSP network."""

        def work() -> PairExplanation:
            with torch.inference_mode():
                pair = explain_pair(
                    self.net, self._feature_map(query), self._feature_map(match), top=top
                )
                return _on_host(pair)

        return await self.batcher.run(work)

    async def repool(
        self,
        tensor: torch.Tensor,
        marks: RegionMarks,
        *,
        strength: float,
        transport_ratio: float | None,
    ) -> Embedded:
        """Embed one prepared image with marked regions favoured or ignored
        (:func:`~model.explain.repool_with_regions`), on the model thread.

        ``marks`` runs there too, once the feature map's size is known. Raises ``ExplainError``
        for bad marks and ``NotGSPError`` for a non-GSP network.
        """

        def work() -> Embedded:
            with torch.inference_mode():
                features = self._feature_map(tensor)
            favour, ignore = marks((int(features.shape[2]), int(features.shape[3])))
            with torch.inference_mode():
                output = repool_with_regions(
                    self.net,
                    features,
                    favour_mask=favour,
                    ignore_mask=ignore,
                    strength=strength,
                    transport_ratio=transport_ratio,
                )
                return Embedded(
                    output.embedding[0].float().cpu().numpy(),
                    output.weights[0].float().cpu().numpy(),
                )

        return await self.batcher.run(work)


def _on_host(pair: PairExplanation) -> PairExplanation:
    """``pair`` with its tensors copied off the device, for the threads that draw it."""

    def parts(side: PooledParts) -> PooledParts:
        return PooledParts(
            embedding=side.embedding.cpu(),
            weights=side.weights.cpu(),
            parts=side.parts.cpu(),
            maps=side.maps.cpu(),
        )

    return replace(
        pair,
        terms=pair.terms.cpu(),
        query=parts(pair.query),
        match=parts(pair.match),
        top=[
            replace(m, query_map=m.query_map.cpu(), match_map=m.match_map.cpu()) for m in pair.top
        ],
    )
