"""Model configuration: everything needed to rebuild a network and feed it images, as JSON."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeAlias

__all__ = ["ModelConfig", "Preprocessing", "PretrainedWeights", "per_channel"]

PretrainedWeights: TypeAlias = bool | str
"""A backbone's starting weights: ``True`` its ImageNet weights from the local cache or package,
``False`` random initialisation, or the path of a local state_dict file (a string, so the config
stays JSON)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def per_channel(values: Iterable[float], name: str) -> tuple[float, float, float]:
    """``values`` as one float per RGB channel (a normalisation's mean or std); any other count
    is refused, since normalising with it would broadcast silently."""
    floats = [float(value) for value in values]
    if len(floats) != 3:
        raise ValueError(f"{name} needs one value per RGB channel, got {floats}")
    return floats[0], floats[1], floats[2]


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input: resize the short side, centre-crop, normalise.

    The crop's share of the image is derived from the two sizes (``crop_pct``,
    ``crop_fraction``), never stored, so every user of it agrees with the transform.
    """

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def crop_pct(self) -> float:
        """The centre crop's side over the resized short side (timm's ``crop_pct``); above 1 the
        crop is larger than the resized image and pads around it."""
        return self.image_size / self.resize_size

    @property
    def crop_fraction(self) -> float:
        """The share of the resized short side that reaches the network: ``crop_pct``, at most 1
        (padding shows nothing more of the image)."""
        return min(1.0, self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(data["image_size"]),
            resize_size=int(data["resize_size"]),
            mean=per_channel(data["mean"], "mean"),
            std=per_channel(data["std"], "std"),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an :class:`~model.net.EmbeddingNet` plus its preprocessing.

    ``pretrained`` is a :data:`PretrainedWeights` (a path as a string, e.g. ``str(path)``).
    Whether the file exists is checked when the backbone is built, not here, so a config naming
    weights on another machine still loads.
    """

    backbone: str = "resnet50"
    pretrained: PretrainedWeights = True
    output_stride: int = 32
    pooling: str = "gsp"
    embedding_dim: int = 512
    pooling_options: dict[str, float] = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __post_init__(self) -> None:
        if not isinstance(self.pretrained, bool | str) or self.pretrained == "":
            raise ValueError(
                "model.pretrained must be true, false or the path of a weights file, "
                f"got {self.pretrained!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        data["pooling_options"] = dict(self.pooling_options)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        values = dict(data)
        if "preprocessing" in values:
            values["preprocessing"] = Preprocessing.from_dict(values["preprocessing"])
        if "pooling_options" in values:
            values["pooling_options"] = dict(values["pooling_options"])
        return cls(**values)
