"""The training config loader's ``data.KIND=ROOT`` override (model/training_config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.training_config import load_training_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_a_data_root_override_points_train_val_and_test_data_at_the_root() -> None:
    config = load_training_config(CONFIGS / "collage_gsp.yaml", ["data.collage=/x/c.tar.gz"])
    assert config.data.val is not None and config.data.test is not None
    specs = (config.data.train, config.data.val, config.data.test)
    assert [spec["collage"] for spec in specs] == ["/x/c.tar.gz"] * 3
    assert [spec["split"] for spec in specs] == ["train", "val", "test"]
    assert config.data.train["per_class"] != config.data.test["per_class"]


def test_a_data_root_override_without_val_or_test_sets_the_training_root(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("data: {train: {folder: a}}\n")
    config = load_training_config(path, ["data.folder=/photos"])
    assert (config.data.train, config.data.val, config.data.test) == (
        {"folder": "/photos"},
        None,
        None,
    )


def test_the_former_eval_key_is_refused_with_what_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("data: {train: {folder: a}, eval: {folder: b}}\n")
    with pytest.raises(ValueError, match=r"data.eval is no longer read: name data.val"):
        load_training_config(path)


def test_a_data_root_override_for_data_the_config_does_not_read_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no data spec of this config reads cars"):
        load_training_config(CONFIGS / "cub_resnet50_gsp.yaml", ["data.cars=/x"])
    with pytest.raises(ValueError, match=r"unknown config keys: \['data.nope'\]"):
        load_training_config(CONFIGS / "cub_resnet50_gsp.yaml", ["data.nope=/x"])
    # Data-section fields are still plain keys.
    config = load_training_config(CONFIGS / "cub_resnet50_gsp.yaml", ["data.batch_size=8"])
    assert config.data.batch_size == 8


def test_switching_pooling_drops_the_other_poolings_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from model.net import build_embedding_net

    config = load_training_config(
        CONFIGS / "collage_gsp.yaml", ["model.pooling=gap", "model.pretrained=false"]
    )
    assert (config.model.pooling, config.model.pooling_options) == ("gap", {})
    note = capsys.readouterr().err
    assert "model.pooling=gap replaces the config's gsp" in note and "entropy_weight" in note
    build_embedding_net(config.model)  # no "unexpected keyword 'entropy_weight'"
    given = load_training_config(
        CONFIGS / "collage_gap.yaml",
        ["model.pooling=gem", "model.pooling_options={power: 4.0}"],
    )
    assert given.model.pooling_options == {"power": 4.0}
    kept = load_training_config(CONFIGS / "collage_gsp.yaml", ["model.embedding_dim=64"])
    assert kept.model.pooling_options["entropy_weight"] == 30.0
