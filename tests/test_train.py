"""End-to-end training on a tiny image folder: checkpoints, metrics, plot, resume, frozen cache."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from model.net import build_embedding_net
from model.training import train
from model.training.checkpoints import RunDirectory
from model.training.distributed import seed_everything
from model.training.metrics_log import append_metrics, truncate_metrics
from model.training.optim import warmup_cosine
from model.training.state import TrainingParts, decode_state, encode_state, save_trainer_state
from model.training_config import TrainingConfig, apply_overrides, load_training_config
from tests.conftest import free_port


def _folder(root: Path, classes: int = 4, per_class: int = 6, first: int = 0) -> Path:
    rng = np.random.default_rng(first)
    for label in range(first, first + classes):
        (root / f"c{label}").mkdir(parents=True)
        for index in range(per_class):
            base = np.full((24, 24, 3), 20 * label, dtype=np.uint8)
            noise = rng.integers(0, 40, size=base.shape, dtype=np.uint8)
            Image.fromarray(base + noise).save(root / f"c{label}" / f"{index}.png")
    return root


def _raw_config(tmp_path: Path) -> dict:
    data = _folder(tmp_path / "images")
    test = _folder(tmp_path / "test-images", classes=3, per_class=4, first=4)
    return {
        "model": {
            "backbone": "efficientnet_lite0",
            "pretrained": False,
            "pooling": "gsp",
            "embedding_dim": 16,
            "pooling_options": {"num_prototypes": 4, "transport_ratio": 0.5},
            "preprocessing": {
                "image_size": 64,
                "resize_size": 64,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25],
            },
        },
        "data": {
            "train": {"folder": str(data)},
            "val": {"holdout": "instances", "fraction": 0.34, "seed": 0},
            "test": {"folder": str(test)},
            "batch_size": 8,
            "m_per_class": 2,
            "num_workers": 0,
        },
        "loss": {"name": "proxy_anchor", "zsr": True},
        "schedule": {"epochs": 2, "warmup_epochs": 0.5},
        "steps_per_epoch": 1,
        "prototype_init": "kcenter",
        "kcenter_batches": 1,
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "eval_batch_size": 16,
    }


def _config(tmp_path: Path, **extra: object) -> TrainingConfig:
    raw = _raw_config(tmp_path)
    return TrainingConfig.from_dict(apply_overrides(raw, [f"{k}={v}" for k, v in extra.items()]))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_trains_writes_checkpoints_metrics_plot_resumes_and_evaluates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main
    from model.checkpoint import load_checkpoint

    raw = _raw_config(tmp_path)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config_file), "--no-progress"]) == 0
    run = Path(raw["output_dir"])
    for name in ("epoch-001", "epoch-002", "best"):
        assert (run / name / "model.safetensors").is_file(), name
    assert (run / "metrics.png").stat().st_size > 0
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 <= r["val"]["map_at_r"] <= 1 for r in records)
    best_epoch = json.loads((run / "best" / "best_epoch.json").read_text())["epoch"]
    printed = capsys.readouterr().out
    assert f"best epoch {best_epoch} (chosen on val MAP@R)" in printed
    assert "test (scored once, on best/)" in printed
    tested = json.loads((run / "test_metrics.json").read_text())
    assert (tested["split"], tested["checkpoint"], tested["epoch"]) == ("test", "best", best_epoch)
    loaded = load_checkpoint(run / "epoch-002")  # trainer state beside it: still verifies
    assert loaded.metadata["training_data"]["data"]["folder"] == raw["data"]["train"]["folder"]
    assert loaded.metadata["metrics"]["epoch"] == 2
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))

    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainingConfig.from_dict(raw), show_progress=False)
    resume = ["train", "--config", str(config_file), "schedule.epochs=3", "--resume"]
    assert main([*resume, "--no-progress"]) == 0
    assert [r["epoch"] for r in _metrics(run)] == [1, 2, 3]
    resumed = load_checkpoint(run / "epoch-003").net
    before = load_checkpoint(run / "epoch-002").net
    pairs = zip(resumed.pooling.parameters(), before.pooling.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)

    out = tmp_path / "eval.json"
    data = f"folder={raw['data']['test']['folder']}"
    evaluate = ["eval", "--checkpoint", str(run / "best"), "--data", data, "--out", str(out)]
    assert main([*evaluate, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "MAP@R" in printed and "split: all" in printed
    # the evaluation command scores the same network and data as the run's one test score
    evaluated = json.loads(out.read_text())
    assert evaluated["splits"] == ["all"]
    best_test = json.loads((run / "test_metrics.json").read_text())["metrics"]["map_at_r"]
    assert evaluated["metrics"]["map_at_r"] == pytest.approx(best_test, abs=1e-6)


def test_frozen_backbone_trains_pooling_on_cached_features(tmp_path: Path) -> None:
    from model.checkpoint import load_checkpoint

    config = _config(
        tmp_path,
        frozen_backbone=True,
        prototype_init="random",
        checkpoint_every=2,
        **{"schedule.epochs": 3},
    )
    train(config, show_progress=False)
    run = Path(config.output_dir)
    caches = list((tmp_path / "cache").glob("*/features.safetensors"))
    assert len(caches) == 3  # the train and val parts of one folder, and the test folder
    assert sorted(p.name for p in run.glob("epoch-*")) == ["epoch-002", "epoch-003"]
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert ["val" in r for r in records] == [False, True, True]
    seed_everything(config.seed)  # the run's initial network, built the same way
    initial = build_embedding_net(config.model)
    middle = load_checkpoint(run / "epoch-002").net
    final = load_checkpoint(run / "epoch-003").net
    for name, value in initial.backbone.state_dict().items():
        # weights and batch-norm statistics untouched by caching and training
        assert torch.equal(final.backbone.state_dict()[name], value), name
    assert any(
        not torch.equal(a, b)
        for a, b in zip(middle.pooling.parameters(), final.pooling.parameters(), strict=True)
    )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(initial.pooling.parameters(), final.pooling.parameters(), strict=True)
    )


def test_trainer_state_round_trips_without_pickle() -> None:
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": (1, (2, 3), None), "n": np.arange(3)}
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.loads(json.dumps(encode_state(state, tensors)))
    decoded = decode_state(encoded, tensors)
    assert decoded["rng"] == (1, (2, 3), None)
    assert np.array_equal(decoded["n"], np.arange(3))
    restored = torch.optim.AdamW([torch.nn.Parameter(param.detach().clone())], lr=0.5)
    restored.load_state_dict(decoded["optimizer"])
    assert restored.param_groups[0]["lr"] == 0.1
    assert torch.equal(
        restored.state_dict()["state"][0]["exp_avg"], optimizer.state[param]["exp_avg"]
    )


def test_resume_starts_after_the_last_complete_epoch_and_forgets_later_metrics(
    tmp_path: Path,
) -> None:
    """An epoch directory without its trainer state (a crash while writing it) is not resumable,
    and the metrics lines of epochs a resumed run redoes are dropped."""
    run = RunDirectory(tmp_path)
    assert run.last_epoch() == 0 and run.best_epoch() is None
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    parts = TrainingParts(None, torch.nn.Linear(1, 1), optimizer, scheduler)  # type: ignore[arg-type]
    for epoch in (1, 2):
        run.epoch_dir(epoch).mkdir()
    save_trainer_state(run.epoch_dir(1), parts, epoch=1, best_map=0.5)
    (tmp_path / "epoch-x").mkdir()  # not an epoch
    assert run.last_epoch() == 1
    for epoch in (1, 2, 3):
        append_metrics(tmp_path, {"epoch": epoch, "loss": 1.0})
    truncate_metrics(tmp_path, run.last_epoch())
    assert [r["epoch"] for r in _metrics(tmp_path)] == [1]


def test_schedule_warms_up_then_decays() -> None:
    factor = warmup_cosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
    values = [factor(step) for step in range(11)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[1:]))
    assert values[10] == pytest.approx(0.1)


def test_config_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    path = Path("configs/collage_gsp.yaml")
    config = load_training_config(
        path,
        [
            "schedule.epochs=3",
            "model.pooling_options.transport_ratio=0.15",
            "optimizer.lr_pooling=3e-3",  # YAML 1.1 reads this as a string; it must be a number
        ],
    )
    assert config.schedule.epochs == 3
    assert config.optimizer.lr_pooling == pytest.approx(0.003)
    assert config.model.pooling_options["transport_ratio"] == 0.15
    with pytest.raises(ValueError, match="unknown config keys"):
        load_training_config(path, ["optimizer.lr_typo=1"])
    with pytest.raises(ValueError, match=r"key\.sub=value"):
        load_training_config(path, ["epochs"])


@pytest.mark.slow
def test_torchrun_trains_with_two_processes_on_cpu(tmp_path: Path) -> None:
    """The same command under torchrun: two CPU processes (gloo), DistributedDataParallel,
    one writer."""
    import os
    import subprocess
    import sys

    from model.checkpoint import load_checkpoint

    raw = _raw_config(tmp_path)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "app.cli", "train", "--config", str(config_file), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = Path(raw["output_dir"])
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]  # rank 0 alone writes
    assert all(r["world_size"] == 2 and np.isfinite(r["loss"]) for r in records)
    final = load_checkpoint(run / "epoch-002").net
    assert final.pooling.prototypes.isfinite().all()


def test_projection_init_starts_and_freezes_the_projection(tmp_path: Path) -> None:
    """The head's projection is the plain PCA of the pooled backbone features of the named
    photos, computed independently here, and stays there while the prototypes train."""
    from model.checkpoint import load_checkpoint
    from model.transforms import eval_transform

    photos = _folder(tmp_path / "clean", classes=5, per_class=8, first=5)
    config = _config(tmp_path, frozen_backbone=True, **{"schedule.epochs": 2})
    raw = {**config.to_dict(), "projection_init": {"data": {"folder": str(photos)}, "freeze": True}}
    config = TrainingConfig.from_dict(raw)
    train(config, show_progress=False)
    first = load_checkpoint(Path(config.output_dir) / "epoch-001").net
    net = load_checkpoint(Path(config.output_dir) / "epoch-002").net

    seed_everything(config.seed)  # the run's untrained backbone, built the same way
    backbone = build_embedding_net(config.model).backbone.eval()
    transform = eval_transform(config.model.preprocessing)
    images = sorted(photos.rglob("*.png"))
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
        pooled = backbone(pixels).double().mean(dim=(2, 3))
    centred = pooled - pooled.mean(dim=0)
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / len(images))
    top = eigenvalues.argsort(descending=True)[:16]
    expected = vectors[:, top].T / eigenvalues[top].mean().sqrt()
    projection = net.pooling.projection.weight.flatten(1).double()
    # eigenvectors are defined up to sign: compare each row with its best-signed reference
    signs = torch.sign((projection * expected).sum(dim=1, keepdim=True))
    # the run's features pass through a float16 cache: within 1 % of the largest weight
    assert torch.allclose(projection, signs * expected, atol=1e-2 * float(expected.abs().max()))
    assert torch.equal(first.pooling.projection.weight, net.pooling.projection.weight)
    assert not torch.equal(first.pooling.prototypes, net.pooling.prototypes)  # these train


def test_projection_init_is_checked() -> None:
    base = {"data": {"train": {"folder": "x"}, "batch_size": 8, "m_per_class": 2}}
    with pytest.raises(ValueError, match="needs frozen_backbone"):
        TrainingConfig.from_dict({**base, "projection_init": {"data": {"folder": "y"}}})
    with pytest.raises(ValueError, match="projection_init takes"):
        TrainingConfig.from_dict(
            {**base, "frozen_backbone": True, "projection_init": {"data": {"folder": "y"}, "x": 1}}
        )


def test_a_run_does_not_depend_on_a_warm_feature_cache(tmp_path: Path) -> None:
    """The same frozen-backbone config gives the same weights whether its run fills the feature
    cache (cold) or reads it (warm): filling it must not move the random streams."""
    from model.checkpoint import load_checkpoint
    from model.training import feature_maps

    raw = _raw_config(tmp_path)
    weights = []
    for name in ("cold", "warm"):
        feature_maps._RECENT_MAPS.clear()  # a new process: the warm run reads the disk cache
        overrides = ["frozen_backbone=true", f"output_dir={tmp_path / name}", "schedule.epochs=2"]
        config = TrainingConfig.from_dict(apply_overrides(raw, overrides))
        train(config, show_progress=False)
        weights.append(load_checkpoint(tmp_path / name / "epoch-002").net.pooling.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
