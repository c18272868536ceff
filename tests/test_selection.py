"""Honest selection: validation splits carved from training data (model/data/holdout.py), checked
against the test split before training, and ``best/`` chosen on them, never on test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from app.cli import main
from model.data import carve_specs, check_disjoint, default_split, open_dataset
from model.training import train
from model.training.inputs import check_data, selection_specs
from model.training_config import TrainingConfig, apply_overrides, load_training_config
from tests.test_train import _folder, _raw_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _paths(dataset) -> set[Path]:
    return {path for path, _ in dataset.samples}


def _parts(train_spec: dict, val_spec: dict) -> tuple:
    carved_train, carved_val = carve_specs(train_spec, val_spec, "all")
    assert carved_val is not None
    return open_dataset(carved_train, "all", None), open_dataset(carved_val, "all", None)


def test_class_holdout_validates_on_training_classes_the_model_does_not_train_on(
    tmp_path: Path,
) -> None:
    whole = open_dataset({"folder": str(_folder(tmp_path / "f", classes=10))}, "all", None)
    spec = {"folder": str(tmp_path / "f")}
    fit, val = _parts(spec, {"holdout": "classes", "fraction": 0.3, "seed": 1})
    assert len(val.classes) == 3 and len(fit.classes) == 7
    assert set(val.classes) <= set(whole.classes)  # held-out *training* classes only
    assert not set(val.classes) & set(fit.classes)
    assert _paths(fit) | _paths(val) == _paths(whole) and not _paths(fit) & _paths(val)
    # labels renumbered within each part, pixels still those of the class (see _folder)
    for part in (fit, val):
        assert sorted(set(part.targets)) == list(range(len(part.classes)))
        image, label = part[len(part) - 1]
        assert int(part.classes[label][1:]) * 20 <= np.asarray(image).min()
    again, other_seed = (
        _parts(spec, {"holdout": "classes", "fraction": 0.3, "seed": seed})[1] for seed in (1, 2)
    )
    assert again.classes == val.classes and other_seed.classes != val.classes


def test_instance_holdout_keeps_the_classes_and_splits_each_ones_images(tmp_path: Path) -> None:
    spec = {"folder": str(_folder(tmp_path / "f", classes=3, per_class=10))}
    fit, val = _parts(spec, {"holdout": "instances", "fraction": 0.25, "seed": 0})
    assert fit.classes == val.classes
    assert np.bincount(val.targets).tolist() == [2, 2, 2]
    assert np.bincount(fit.targets).tolist() == [8, 8, 8]
    assert not _paths(fit) & _paths(val)


@pytest.mark.parametrize(
    ("val", "match"),
    [
        ({"holdout": "images"}, "holdout must be one of"),
        ({"holdout": "classes", "fraction": 1.5}, "fraction must be in"),
        ({"holdout": "classes", "folder": "x"}, "holdout spec takes"),
        ({"holdout": "classes", "fraction": 0.9}, "cannot spare"),
    ],
)
def test_bad_holdouts_are_refused(tmp_path: Path, val: dict, match: str) -> None:
    spec = {"folder": str(_folder(tmp_path / "f", classes=3))}
    with pytest.raises(ValueError, match=match):
        _parts(spec, val)


def test_a_val_or_test_split_sharing_images_is_refused_before_training(tmp_path: Path) -> None:
    raw = _raw_config(tmp_path)
    raw["data"]["test"] = dict(raw["data"]["train"])  # the old habit: test on what you train on
    with pytest.raises(ValueError, match=r"data.train and data.test share 16 image"):
        check_data(TrainingConfig.from_dict(raw))
    raw = _raw_config(tmp_path / "again")
    raw["data"]["val"] = raw["data"]["test"]  # selecting on the reported split
    with pytest.raises(ValueError, match=r"data.val and data.test share 12 image"):
        check_data(TrainingConfig.from_dict(raw))


def test_every_shipped_config_selects_on_a_val_split_carved_from_training_data() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_training_config(path)
        val, test = config.data.val, config.data.test
        assert val is not None and test is not None, path.name
        if "collage" in config.data.train:
            # collage val: training photos the train collages leave out, same plan seed
            assert (val["split"], val["seed"]) == ("val", config.data.train["seed"]), path.name
            assert test["split"] == "test", path.name
        elif "csv" in config.data.train:
            # lists of bench/unseen_data.py --export: the protocol's validation classes, carved
            # from the training photos (bench/unseen_protocols.py), each split a list of its own
            lists = {config.data.train["csv"], val["csv"], test["csv"]}
            assert len(lists) == 3, path.name
        else:
            assert val["holdout"] == "classes", path.name  # class-disjoint benchmarks
            assert "split" not in test, path.name  # the benchmark's own test classes


def _write_cub(root: Path, train_ids: range, test_ids: range, per_class: int = 3) -> None:
    base = root / "CUB_200_2011"
    images, labels = [], []
    for number, class_id in enumerate(c for c in [*train_ids, *test_ids] for _ in range(per_class)):
        relative = f"{class_id:03d}.Bird/{number}.jpg"
        (base / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (class_id, 0, 0)).save(base / "images" / relative, format="PNG")
        images.append(f"{number + 1} {relative}")
        labels.append(f"{number + 1} {class_id}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    classes = [*train_ids, *test_ids]
    (base / "classes.txt").write_text("\n".join(f"{c} {c:03d}.Bird" for c in classes) + "\n")


def test_the_cub_config_validates_on_held_out_training_classes_disjoint_from_test(
    tmp_path: Path,
) -> None:
    _write_cub(tmp_path, range(1, 21), range(101, 106))
    overrides = [f"data.cub={tmp_path}", "data.batch_size=8", "data.m_per_class=2"]
    config = load_training_config(CONFIGS / "cub_resnet50_gsp.yaml", overrides)
    check_data(config)
    train_spec, val_spec = selection_specs(config)
    assert val_spec is not None and config.data.test is not None
    fit = open_dataset(train_spec, "train", None)
    val = open_dataset(val_spec, *default_split(val_spec, training=False), None)
    test = open_dataset(config.data.test, *default_split(config.data.test, training=False), None)
    training_classes = {f"{c:03d}.Bird" for c in range(1, 21)}
    assert set(val.classes) <= training_classes and len(val.classes) == 4
    assert not set(val.classes) & set(fit.classes) and not set(val.classes) & set(test.classes)
    check_disjoint({"train": [fit], "val": [val], "test": [test]})


def test_the_collage_configs_val_shares_no_target_photo_with_train_or_test(
    cifar_archive: Path,
) -> None:
    sizes = ["data.train.per_class=300", "data.val.per_class=100", "data.test.per_class=100"]
    config = load_training_config(
        CONFIGS / "collage_gsp.yaml", [f"data.collage={cifar_archive}", *sizes]
    )
    check_data(config)  # raises on any shared class-bearing photo


def test_batches_the_training_classes_cannot_fill_fail_before_any_feature_is_cached(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    raw = _raw_config(tmp_path)
    raw["frozen_backbone"] = True
    raw["data"]["batch_size"] = 10  # 5 classes of 2; the folder has 4
    with pytest.raises(ValueError, match=r"needs 5 classes per batch, but the training split"):
        train(TrainingConfig.from_dict(raw), show_progress=False)
    assert not (tmp_path / "cache").exists()
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    err = capfd.readouterr().err
    assert "gsp train: data.batch_size 10 with data.m_per_class 2 needs 5 classes" in err
    assert "Traceback" not in err and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_best_is_the_epoch_with_the_best_validation_score_and_test_is_scored_once_on_it(
    tmp_path: Path,
) -> None:
    from model.evaluate import evaluate_checkpoint

    raw = _raw_config(tmp_path)
    overrides = ["schedule.epochs=4", "frozen_backbone=true", "prototype_init=random"]
    overrides += ["optimizer.lr_pooling=0.01", "keep_checkpoints=0"]
    config = TrainingConfig.from_dict(apply_overrides(raw, overrides))
    result = train(config, show_progress=False)
    run = Path(config.output_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [record["val"]["map_at_r"] for record in records]
    assert result.best_epoch == 1 + int(np.argmax(val))
    assert all("test" not in record and "map_at_r" not in record for record in records)
    tested = json.loads((run / "test_metrics.json").read_text())
    assert tested["epoch"] == result.best_epoch and tested["selected_on"] == "val MAP@R"
    assert config.data.test is not None
    test = [
        evaluate_checkpoint(run / f"epoch-{epoch:03d}", config.data.test, progress=False)
        for epoch in range(1, 5)
    ]
    test_maps = [evaluation.metrics["map_at_r"] for evaluation in test]
    # a run where the splits disagree (seeded, so it stays one): test would pick another epoch
    assert 1 + int(np.argmax(test_maps)) != result.best_epoch
    # the recorded test score is the chosen epoch's, not the best test score
    assert tested["metrics"]["map_at_r"] == pytest.approx(test_maps[result.best_epoch - 1])
    assert tested["metrics"]["map_at_r"] < max(test_maps)


def test_patience_stops_after_validations_without_a_better_score(tmp_path: Path) -> None:
    raw = _raw_config(tmp_path)
    overrides = ["schedule.epochs=6", "schedule.patience=1", "frozen_backbone=true"]
    overrides += ["prototype_init=random", "optimizer.lr_pooling=0.01"]
    config = TrainingConfig.from_dict(apply_overrides(raw, overrides))
    result = train(config, show_progress=False)
    epochs = [record["epoch"] for record in result.history]
    val = [record["val"]["map_at_r"] for record in result.history]
    best = result.best_epoch
    assert best is not None and val[best - 1] == max(val)
    assert epochs == list(range(1, best + 2))  # one validation without progress, then stop
    assert epochs[-1] < 6
    assert json.loads((Path(config.output_dir) / "test_metrics.json").read_text())["epoch"] == best
