"""The model config: the preprocessing's crop share agrees with the transform, ``pretrained``
holds a flag or a weights path and nothing else, and the config round-trips through JSON,
including configs written before a field was derived."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model.backbones import build_backbone
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig, Preprocessing
from model.net import build_embedding_net
from model.training_config import load_training_config
from model.transforms import eval_crop


def _column_ramp(side: int) -> Image.Image:
    """A square image whose red channel is 1 + the column index (never 0, unlike padding)."""
    row = np.arange(1, side + 1, dtype=np.uint8)
    pixels = np.zeros((side, side, 3), dtype=np.uint8)
    pixels[..., 0] = row
    return Image.fromarray(pixels)


def test_crop_fraction_is_the_share_of_the_image_the_transform_keeps() -> None:
    preprocessing = Preprocessing(image_size=80, resize_size=100)
    assert preprocessing.crop_pct == pytest.approx(0.8)
    assert preprocessing.crop_fraction == pytest.approx(0.8)
    columns = np.asarray(eval_crop(preprocessing)(_column_ramp(100)))[50, :, 0]
    left = (1 - preprocessing.crop_fraction) / 2 * 100
    assert columns[0] == round(left) + 1
    assert len(columns) == round(preprocessing.crop_fraction * 100)


def test_a_crop_larger_than_the_image_pads_and_shows_all_of_it() -> None:
    preprocessing = Preprocessing(image_size=120, resize_size=100)
    assert preprocessing.crop_pct == pytest.approx(1.2)
    assert preprocessing.crop_fraction == 1.0
    columns = np.asarray(eval_crop(preprocessing)(_column_ramp(100)))[50, :, 0]
    shown = columns[columns > 0]
    assert len(columns) == 120
    assert list(shown) == list(range(1, 101))  # the whole image, padded around
    assert len(columns) / len(shown) == pytest.approx(preprocessing.crop_pct)


def test_preprocessing_json_keeps_only_the_sizes() -> None:
    # config.json files written before crop_pct existed hold exactly these keys, and still load.
    stored = {"image_size": 224, "resize_size": 256, "mean": [0.5] * 3, "std": [0.25] * 3}
    preprocessing = Preprocessing.from_dict(json.loads(json.dumps(stored)))
    assert preprocessing.to_dict() == stored
    assert preprocessing.crop_pct == pytest.approx(0.875)
    config = ModelConfig(preprocessing=preprocessing)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("field", ["mean", "std"])
@pytest.mark.parametrize("values", [[0.5], [0.5] * 4])
def test_stored_preprocessing_needs_one_mean_and_std_per_rgb_channel(
    field: str, values: list[float]
) -> None:
    # One value would broadcast over the channels silently, four would fail mid-request.
    stored = {"image_size": 224, "resize_size": 256, "mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(ValueError, match=f"{field} needs one value per RGB channel"):
        Preprocessing.from_dict({**stored, field: values})


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("false", False)])
def test_pretrained_flags_from_overrides_are_booleans(raw: str, value: bool) -> None:
    config = load_training_config("configs/collage_gsp.yaml", [f"model.pretrained={raw}"])
    assert config.model.pretrained is value
    stored = json.loads(json.dumps(config.model.to_dict()))
    assert ModelConfig.from_dict(stored).pretrained is value


def test_pretrained_path_builds_those_weights_and_survives_the_checkpoint(tmp_path: Path) -> None:
    reference = build_backbone("resnet18", pretrained=False)
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    config = load_training_config(
        "configs/collage_gsp.yaml",
        ["model.backbone=resnet18", f"model.pretrained={weights}", "model.embedding_dim=8"],
    ).model
    assert config.pretrained == str(weights)
    net = build_embedding_net(config)
    assert torch.equal(net.backbone.conv1.weight, reference.conv1.weight)

    save_checkpoint(tmp_path / "checkpoint", net, config)
    weights.unlink()  # loading a checkpoint never reads the starting weights again
    loaded = load_checkpoint(tmp_path / "checkpoint")
    assert loaded.config.pretrained == str(weights)
    assert torch.equal(loaded.net.backbone.conv1.weight, reference.conv1.weight)


@pytest.mark.parametrize("value", [1, 0.5, "", None, Path("weights.pth")])
def test_pretrained_rejects_values_that_are_neither_a_flag_nor_a_path(value: object) -> None:
    with pytest.raises(ValueError, match="true, false or the path of a weights file"):
        ModelConfig(pretrained=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="true, false or the path"):
        ModelConfig.from_dict({"pretrained": value})
