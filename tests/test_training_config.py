"""The training config loader's ``data.KIND=ROOT`` override (model/training_config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.training_config import load_training_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_a_data_root_override_points_train_and_eval_data_at_the_root() -> None:
    config = load_training_config(CONFIGS / "collage_gsp.yaml", ["data.collage=/x/c.tar.gz"])
    assert config.data.train["collage"] == config.data.eval["collage"] == "/x/c.tar.gz"
    assert (config.data.train["split"], config.data.eval["split"]) == ("train", "test")
    assert config.data.train["per_class"] != config.data.eval["per_class"]


def test_a_data_root_override_without_eval_data_sets_the_training_root(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("data: {train: {folder: a}}\n")
    config = load_training_config(path, ["data.folder=/photos"])
    assert (config.data.train, config.data.eval) == ({"folder": "/photos"}, None)


def test_a_data_root_override_for_data_the_config_does_not_read_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no data spec of this config reads cars"):
        load_training_config(CONFIGS / "cub_resnet50_gsp.yaml", ["data.cars=/x"])
    with pytest.raises(ValueError, match=r"unknown config keys: \['data.nope'\]"):
        load_training_config(CONFIGS / "cub_resnet50_gsp.yaml", ["data.nope=/x"])
    # Data-section fields are still plain keys.
    config = load_training_config(CONFIGS / "cub_resnet50_gsp.yaml", ["data.batch_size=8"])
    assert config.data.batch_size == 8
