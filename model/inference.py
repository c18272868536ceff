"""The inference path the bulk job and the service share: 8-bit crops in, float32 embeddings out.

Images travel as ``(S, S, 3)`` uint8 crops (a quarter of float32's bytes) and become one batch
with one copy (:func:`stack_crops`; the bulk job's loader pins that batch once, never each
sample). :class:`Embedder` moves the batch to the device, normalises it there, and runs the
network in the precision asked for: on CUDA, fp16 autocast and channels_last by default (bf16
cost cosine 0.985 against fp32 on EfficientNet-Lite0, fp16 keeps 0.999), fp32 on the CPU.

JPEGs may also decode on the GPU in batches (nvJPEG, :func:`decode_jpegs`), resized there with
the antialiased bilinear filter Pillow's resize uses; the result agrees with the CPU path
(reduced-scale Pillow decode) to cosine 0.999, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from model.config import Preprocessing
from model.graphs import BucketedForward
from model.hardware import PRECISIONS, GraphMode
from model.net import EmbeddingNet, EmbeddingOutput
from model.transforms import Normalise

__all__ = [
    "Embedder",
    "decode_jpegs",
    "is_jpeg",
    "resolve_precision",
    "stack_crops",
]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The JPEG start-of-image marker followed by any marker segment.
_JPEG_MAGIC = b"\xff\xd8\xff"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype ``precision`` asks for on ``device``: ``auto`` is fp16 on CUDA and
    fp32 elsewhere; fp16 on the CPU is refused (slow there, and not what anyone measured)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return _DTYPES[precision]


def stack_crops(crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """One ``(B, S, S, 3)`` uint8 batch from ``(S, S, 3)`` crops, in one copy (a lone crop is
    viewed, not copied)."""
    if not crops:
        raise ValueError("no crops to stack")
    return crops[0][None] if len(crops) == 1 else torch.stack(list(crops))


class Embedder:
    """A network on its device at its precision: uint8 batches in, :class:`EmbeddingOutput` with
    float32 tensors on the device out. One per process and device; not thread-safe.

    ``graphs``: on CUDA, the forward after the host-to-device copy replayed as CUDA graphs per
    bucketed batch size (:mod:`model.graphs`); ``off`` and every CPU run it as it is."""

    def __init__(
        self,
        net: EmbeddingNet,
        preprocessing: Preprocessing,
        device: torch.device,
        precision: str = "auto",
        graphs: GraphMode = "off",
    ) -> None:
        self.device = device
        self.dtype = resolve_precision(precision, device)
        self.channels_last = device.type == "cuda"
        self.net = net.to(device).eval()
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.preprocessing = preprocessing
        self._normalise = Normalise(preprocessing, device)
        self._forward = BucketedForward(self._network, device, graphs)

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """The normalised ``(B, 3, S, S)`` float32 input on the device from a ``(B, S, S, 3)``
        uint8 batch anywhere (a pinned host batch copies asynchronously); equal to
        :func:`~model.transforms.eval_transform`'s values."""
        inputs = self._normalise(batch.to(self.device, non_blocking=True))
        if self.channels_last:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def autocast(self) -> AbstractContextManager[object]:
        """The autocast region of this precision (a no-op at fp32)."""
        return torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> EmbeddingOutput:
        """Embed a uint8 batch; embedding and weights come back float32, on the device."""
        return self._forward(self.inputs(batch))

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor) -> EmbeddingOutput:
        """Embed a batch already normalised on the device (:meth:`inputs`)."""
        return self._forward(inputs)

    @torch.inference_mode()
    def warm_up(self, largest: int) -> None:
        """Capture (or compile) the graphs of every bucket up to ``largest`` rows now, so that no
        batch waits for it; nothing without graphs."""
        size = self.preprocessing.image_size
        sample = self.inputs(torch.zeros(1, size, size, 3, dtype=torch.uint8))
        self._forward.warm_up(sample, largest)

    def _network(self, inputs: torch.Tensor) -> EmbeddingOutput:
        """The network at this precision on a normalised device batch: what the graphs capture."""
        with self.autocast():
            output = self.net(inputs)
        return EmbeddingOutput(embedding=output.embedding.float(), weights=output.weights.float())


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts like a JPEG (what the GPU decoder takes; others decode on CPU)."""
    return data[:3] == _JPEG_MAGIC


def decode_jpegs(
    files: Sequence[bytes], preprocessing: Preprocessing, device: torch.device
) -> list[torch.Tensor | None]:
    """Decode JPEGs on ``device`` in one batch (nvJPEG on CUDA) and crop each as
    :func:`~model.transforms.eval_crop` does: upright RGB, short side to ``resize_size``
    (antialiased bilinear), centre square of ``image_size``. Each result is an ``(S, S, 3)``
    uint8 tensor on ``device``, or None where that file did not decode (the caller decodes it
    on the CPU for the reason)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    decoded: list[torch.Tensor | None]
    try:
        decoded = list(
            decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        )
    except RuntimeError:  # one bad file fails the batch: decode one by one to find it
        decoded = []
        for one in encoded:
            try:
                decoded.append(
                    decode_jpeg(
                        one, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
                    )
                )
            except RuntimeError:
                decoded.append(None)
    return [None if image is None else _crop(image, preprocessing) for image in decoded]


def _crop(image: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """A ``(3, H, W)`` uint8 image resized (short side) and centre-cropped, as ``(S, S, 3)``."""
    from torchvision.transforms.v2 import functional as F

    resized = F.resize(
        image[None].float(),
        [preprocessing.resize_size],
        interpolation=F.InterpolationMode.BILINEAR,
        antialias=True,
    )
    square = F.center_crop(resized, [preprocessing.image_size])
    return square[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
