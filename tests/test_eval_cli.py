"""``gsp train`` / ``gsp eval`` on a frozen-backbone run: eval reads the run's feature cache,
``--no-progress`` silences every bar, ``--cells`` measures the weight on marked objects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from app.cli import main
from model.checkpoint import load_checkpoint
from model.training import train
from model.training_config import TrainingConfig
from model.transforms import eval_transform
from tests.test_train import _raw_config

BARS = ("caching backbone features", "embedding", "epoch 1/", "it/s", "img/s")


def _frozen_config(root: Path) -> tuple[dict, Path]:
    raw = _raw_config(root)
    raw.update(frozen_backbone=True, prototype_init="random")
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump(raw))
    return raw, config


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    raw, config = _frozen_config(tmp_path_factory.mktemp("frozen"))
    train(TrainingConfig.from_dict(raw), show_progress=False)
    return {"raw": raw, "config": config}


def _cache_entries(raw: dict) -> set[str]:
    return {path.parent.name for path in Path(raw["cache_dir"]).glob("*/features.safetensors")}


def test_no_progress_silences_training_caching_and_embedding_bars(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    raw, config = _frozen_config(tmp_path)
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert not [bar for bar in BARS if bar in err], err[-500:]
    assert len(_cache_entries(raw)) == 3  # the bars were due: train part, val part, test cached


def test_eval_reads_the_runs_feature_cache_and_names_the_split(
    frozen_run: dict, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    raw = frozen_run["raw"]
    best = Path(raw["output_dir"]) / "best"
    before = _cache_entries(raw)
    out = tmp_path / "eval.json"
    data = f"folder={raw['data']['test']['folder']}"
    command = ["eval", "--checkpoint", str(best), "--data", data, "--out", str(out)]
    assert main([*command, "--no-progress"]) == 0
    captured = capfd.readouterr()
    assert "split: all" in captured.out and f"feature cache {raw['cache_dir']}" in captured.out
    assert not [bar for bar in BARS if bar in captured.err], captured.err[-500:]
    assert _cache_entries(raw) == before  # read, not computed again
    cached = json.loads(out.read_text())["metrics"]
    test_score = json.loads((Path(raw["output_dir"]) / "test_metrics.json").read_text())
    assert cached["map_at_r"] == pytest.approx(test_score["metrics"]["map_at_r"], abs=1e-6)

    assert main([*command, "--no-cache", "--no-progress"]) == 0
    assert "features: images (backbone run now)" in capfd.readouterr().out


def test_cells_measures_the_pooling_weight_on_marked_objects(
    frozen_run: dict, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Left halves of the test images marked (in pixels), one image left unmarked: the share
    matches the checkpoint's own weights on the left feature-map column, and uniform weights
    give one half."""
    raw = frozen_run["raw"]
    folder = Path(raw["data"]["test"]["folder"])
    images = sorted(folder.rglob("*.png"))
    rows = ["path,left,top,right,bottom"]
    rows += [f"{path.relative_to(folder)},0,0,12,24" for path in images[1:]]
    (folder / "objects.csv").write_text("\n".join(rows) + "\n")
    best = Path(raw["output_dir"]) / "best"
    out = tmp_path / "cells.json"
    command = ["eval", "--checkpoint", str(best), "--data", f"folder={folder}"]
    command += ["--cells", str(folder / "objects.csv"), "--out", str(out), "--no-progress"]
    assert main(command) == 0
    assert "object-weight share" in capfd.readouterr().out
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["uniform_mass_share"] == pytest.approx(0.5)

    loaded = load_checkpoint(best)
    transform = eval_transform(loaded.config.preprocessing)
    shares = []
    with torch.no_grad():
        for path in images[1:]:
            with Image.open(path) as image:
                weights = loaded.net.eval()(transform(image.convert("RGB"))[None]).weights[0]
            assert weights.shape == (2, 2)  # 64 px input, stride 32
            shares.append(float(weights[:, 0].sum() / weights.sum()))
    assert metrics["target_mass_share"] == pytest.approx(sum(shares) / len(shares), abs=5e-3)

    (folder / "bad.csv").write_text("path,x0,y0,x1,y1\nc4/0.png,0.5,0,0.2,1\n")
    bad = ["eval", "--checkpoint", str(best), "--data", f"folder={folder}", "--no-progress"]
    assert main([*bad, "--cells", str(folder / "bad.csv")]) == 1
    assert "bad.csv" in capfd.readouterr().err
