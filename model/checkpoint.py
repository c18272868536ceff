"""Checkpoints: a directory anyone can inspect and nobody has to unpickle.

Layout: ``model.safetensors`` (the network's tensors) and ``config.json`` holding the model
config (architecture and preprocessing), free-form metadata (training data, metrics, ...), the
installed code version, the creation time and a content ``fingerprint``: sha256 over the tensors
in name order plus the canonical JSON of the model config.  Loading recomputes the fingerprint,
so edited or corrupted weights or configs are refused, and galleries can name the exact model
that embedded them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.backbones import state_dict_mismatch
from model.config import ModelConfig
from model.net import EmbeddingNet, build_embedding_net
from model.version import package_version

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "LoadedModel",
    "fingerprint",
    "load_checkpoint",
    "save_checkpoint",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
FINGERPRINT_CHARS = 16
_RECORD_KEYS = {"format_version", "model", "fingerprint", "metadata"}
_AUTOMATIC_METADATA = ("code_version", "created")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, modified or does not fit its config."""


@dataclass
class LoadedModel:
    """A network restored from a checkpoint, in eval mode, with what was saved beside it."""

    net: EmbeddingNet
    config: ModelConfig
    fingerprint: str
    metadata: dict[str, Any]


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(tensors: Mapping[str, Tensor], config: ModelConfig) -> str:
    """Short sha256 of the tensors (name, dtype, shape, bytes; in name order) and the config."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        header = _canonical_json([name, str(tensor.dtype), list(tensor.shape)])
        digest.update(header.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(_canonical_json(config.to_dict()).encode())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    directory: str | os.PathLike[str], net: EmbeddingNet, config: ModelConfig, **metadata: Any
) -> str:
    """Write ``net`` and ``config`` as a checkpoint directory and return its fingerprint.

    ``metadata`` (e.g. ``training_data=...``, ``metrics={...}``) must be JSON-serialisable;
    ``code_version`` and ``created`` are added.  The directory is written beside the target and
    renamed into place, so readers never see half a checkpoint; an existing checkpoint there is
    replaced, any other existing directory is refused.
    """
    target = Path(directory)
    reserved = sorted(set(metadata) & set(_AUTOMATIC_METADATA))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are filled in automatically")
    is_checkpoint = (target / CONFIG_FILE).is_file()
    if target.exists() and not is_checkpoint and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(f"{target} exists and is not a checkpoint; refusing to replace it")
    tensors = {name: value.detach().cpu().contiguous() for name, value in net.state_dict().items()}
    digest = fingerprint(tensors, config)
    record = {
        "format_version": FORMAT_VERSION,
        "fingerprint": digest,
        "model": config.to_dict(),
        "metadata": {
            **metadata,
            "code_version": package_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }
    try:
        config_text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint metadata must be plain JSON: {error}") from error

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"fingerprint": digest})
        with open(staging / WEIGHTS_FILE, "rb+") as handle:
            os.fsync(handle.fileno())
        _write_synced(staging / CONFIG_FILE, config_text.encode())
        if target.exists():
            retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return digest


def _read_record(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}")
    try:
        record = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not valid JSON: {error}") from error
    if not isinstance(record, dict):
        raise CheckpointError(f"{directory / CONFIG_FILE} must hold a JSON object")
    unknown = sorted(set(record) - _RECORD_KEYS)
    missing = sorted(_RECORD_KEYS - set(record))
    if unknown or missing:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: unknown keys {unknown}, missing keys {missing}"
        )
    if record["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format {record['format_version']!r} is not supported "
            f"(this code reads format {FORMAT_VERSION})"
        )
    return record


def load_checkpoint(directory: str | os.PathLike[str], device: str = "cpu") -> LoadedModel:
    """Rebuild the network of a checkpoint (no pretrained download, no unpickling), verified."""
    directory = Path(directory)
    record = _read_record(directory)
    try:
        config = ModelConfig.from_dict(record["model"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad model config: {error}") from error
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is not readable: {error}") from error
    actual = fingerprint(tensors, config)
    if actual != record["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {directory} fails verification: fingerprint {actual} differs from the "
            f"recorded {record['fingerprint']!r}; its weights or config were modified or corrupted"
        )
    net = build_embedding_net(replace(config, pretrained=False))
    mismatch = state_dict_mismatch(net.state_dict(), tensors)
    if mismatch:
        raise CheckpointError(
            f"weights of {directory} do not fit the network its config describes: {mismatch}"
        )
    net.load_state_dict(tensors)
    net.to(device).eval()
    return LoadedModel(
        net=net, config=config, fingerprint=actual, metadata=dict(record["metadata"])
    )
