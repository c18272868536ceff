"""Checkpoints: exact round trip, content fingerprint, tamper detection, no unpickling."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from model.config import ModelConfig, Preprocessing
from model.net import EmbeddingNet, build_embedding_net

CONFIG = ModelConfig(
    backbone="resnet18",
    pretrained=False,
    pooling="gsp",
    embedding_dim=16,
    pooling_options={"num_prototypes": 4, "transport_ratio": 0.4},
    preprocessing=Preprocessing(image_size=64, resize_size=72),
)


@pytest.fixture(scope="module")
def trained_net() -> EmbeddingNet:
    """A random net whose batch-norm statistics moved, so buffers matter in the round trip."""
    torch.manual_seed(0)
    net = build_embedding_net(CONFIG).train()
    with torch.no_grad():
        net(torch.randn(4, 3, 64, 64))
    return net.eval()


@pytest.fixture
def net(trained_net: EmbeddingNet) -> EmbeddingNet:
    return copy.deepcopy(trained_net)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def test_round_trip_is_exact(tmp_path: Path, net: EmbeddingNet, images: torch.Tensor) -> None:
    digest = save_checkpoint(
        tmp_path / "ckpt", net, CONFIG, training_data="cifar10 train", metrics={"recall@1": 0.5}
    )
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.net.training
    assert loaded.config == CONFIG and loaded.fingerprint == digest and len(digest) == 16
    assert loaded.metadata["training_data"] == "cifar10 train"
    assert loaded.metadata["metrics"] == {"recall@1": 0.5}
    assert loaded.metadata["code_version"] == importlib.metadata.version("gsp-retrieval")
    assert datetime.fromisoformat(loaded.metadata["created"]).tzinfo is not None
    with torch.no_grad():
        before, after = net(images), loaded.net(images)
    assert torch.equal(before.embedding, after.embedding)
    assert torch.equal(before.weights, after.weights)
    assert torch.equal(before.histogram, after.histogram)


def test_fingerprint_tracks_content(tmp_path: Path, net: EmbeddingNet) -> None:
    first = save_checkpoint(tmp_path / "a", net, CONFIG)
    assert save_checkpoint(tmp_path / "b", net, CONFIG) == first  # deterministic
    other_config = replace(CONFIG, preprocessing=Preprocessing(image_size=64, resize_size=80))
    assert save_checkpoint(tmp_path / "c", net, other_config) != first
    with torch.no_grad():
        net.pooling.prototypes[0, 0] += 1e-6
    assert save_checkpoint(tmp_path / "d", net, CONFIG) != first


def test_replacing_a_checkpoint_is_clean(tmp_path: Path, net: EmbeddingNet) -> None:
    target = tmp_path / "ckpt"
    save_checkpoint(target, net, CONFIG)
    with torch.no_grad():
        net.pooling.prototypes.mul_(2)
    second = save_checkpoint(target, net, CONFIG, note="second")
    loaded = load_checkpoint(target)
    assert loaded.fingerprint == second and loaded.metadata["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_refuses_to_overwrite_other_directories_and_bad_metadata(
    tmp_path: Path, net: EmbeddingNet
) -> None:
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        save_checkpoint(precious, net, CONFIG)
    assert (precious / "cat.jpg").read_bytes() == b"jpeg"
    with pytest.raises(ValueError, match="plain JSON"):
        save_checkpoint(tmp_path / "x", net, CONFIG, metrics={"when": datetime.now()})
    with pytest.raises(ValueError, match="filled in automatically"):
        save_checkpoint(tmp_path / "x", net, CONFIG, code_version="1.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def safetensors_header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return size, json.loads(data[8 : 8 + size])


def test_weights_are_plain_safetensors_and_loading_never_unpickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, net: EmbeddingNet, images: torch.Tensor
) -> None:
    digest = save_checkpoint(tmp_path / "ckpt", net, CONFIG)
    _, header = safetensors_header(tmp_path / "ckpt" / WEIGHTS_FILE)
    assert header["__metadata__"] == {"fingerprint": digest}
    assert set(header) - {"__metadata__"} == set(net.state_dict())

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling attempted")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded.net(images).embedding, net(images).embedding)


def test_tampered_weights_are_detected(tmp_path: Path, net: EmbeddingNet) -> None:
    target = tmp_path / "ckpt"
    save_checkpoint(target, net, CONFIG)
    path = target / WEIGHTS_FILE
    size, header = safetensors_header(path)
    start, _ = header["pooling.prototypes"]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[8 + size + start] ^= 0x01  # one bit of one prototype
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"fingerprint .* differs"):
        load_checkpoint(target)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not readable"):
        load_checkpoint(target)


def rewrite_record(target: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    record = json.loads((target / CONFIG_FILE).read_text())
    edit(record)
    (target / CONFIG_FILE).write_text(json.dumps(record))


def test_tampered_config_is_detected(tmp_path: Path, net: EmbeddingNet) -> None:
    target = tmp_path / "ckpt"
    save_checkpoint(target, net, CONFIG)
    rewrite_record(target, lambda r: r["model"]["preprocessing"].update(image_size=96))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(target)


def test_unknown_keys_are_refused(tmp_path: Path, net: EmbeddingNet) -> None:
    target = tmp_path / "ckpt"
    save_checkpoint(target, net, CONFIG)
    rewrite_record(target, lambda r: r["model"].update(dropout=0.1))
    with pytest.raises(CheckpointError, match="unknown model config keys"):
        load_checkpoint(target)
    rewrite_record(target, lambda r: (r["model"].pop("dropout"), r.update(optimizer="sgd")))
    with pytest.raises(CheckpointError, match=r"unknown keys \['optimizer'\]"):
        load_checkpoint(target)


def test_shape_mismatch_is_reported(tmp_path: Path, net: EmbeddingNet) -> None:
    target = tmp_path / "ckpt"
    save_checkpoint(target, net, CONFIG)
    # a config claiming another embedding size, re-fingerprinted so only the shapes disagree
    wider = replace(CONFIG, embedding_dim=32)
    digest = fingerprint(net.state_dict(), wider)
    rewrite_record(target, lambda r: r.update(model=wider.to_dict(), fingerprint=digest))
    with pytest.raises(CheckpointError, match=r"do not fit .*pooling\.projection\.weight"):
        load_checkpoint(target)


def test_missing_parts_are_reported(tmp_path: Path, net: EmbeddingNet) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent")
    target = tmp_path / "ckpt"
    save_checkpoint(target, net, CONFIG)
    (target / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has no {WEIGHTS_FILE}"):
        load_checkpoint(target)
    (target / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has no {CONFIG_FILE}"):
        load_checkpoint(target)


def test_loading_never_fetches_pretrained_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, net: EmbeddingNet, images: torch.Tensor
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    config = replace(CONFIG, pretrained=True)  # resnet18 weights are absent from that cache
    save_checkpoint(tmp_path / "ckpt", net, config)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.pretrained
    with torch.no_grad():
        assert torch.equal(loaded.net(images).embedding, net(images).embedding)
