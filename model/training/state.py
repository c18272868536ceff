"""The trainer state: what ``--resume`` needs beside an epoch's weights (the objective's proxies,
the optimiser's moments, the schedule's position, every random stream, the best score so far).

It is stored as safetensors + JSON, never pickle, so that opening a run directory cannot run
code: :func:`encode_state` moves tensors and arrays out of the nested state and leaves JSON.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.losses import TrainingObjective
from model.net import EmbeddingNet

__all__ = [
    "TrainingParts",
    "decode_state",
    "encode_state",
    "has_trainer_state",
    "load_trainer_state",
    "save_trainer_state",
]

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


@dataclass
class TrainingParts:
    """What a run optimises, and how: saved each checkpointed epoch, restored on resume."""

    net: EmbeddingNet
    objective: TrainingObjective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def encode_state(value: Any, tensors: dict[str, Tensor], path: str = "s") -> Any:
    """JSON-able form of nested state; tensors and arrays move to ``tensors`` by key."""
    if isinstance(value, Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": path}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {
                "__dict__": {k: encode_state(v, tensors, f"{path}.{k}") for k, v in value.items()}
            }
        return {
            "__items__": [
                [encode_state(k, tensors, f"{path}.k{i}"), encode_state(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in the trainer state")


def decode_state(value: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__tuple__" in value:
        return tuple(decode_state(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: decode_state(v, tensors) for k, v in value["__dict__"].items()}
    return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value["__items__"]}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def has_trainer_state(directory: Path) -> bool:
    """Whether ``directory`` holds a trainer state (written last: the epoch is complete)."""
    return (directory / STATE_JSON).is_file()


def save_trainer_state(directory: Path, parts: TrainingParts, epoch: int, best_map: float) -> None:
    """Write the state of ``parts`` and of the random streams after ``epoch`` into
    ``directory``; ``best_map`` is the best MAP@R so far (``-inf`` before any)."""
    state = {
        "epoch": epoch,
        "best_map_at_r": best_map if math.isfinite(best_map) else None,
        "objective": parts.objective.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "rng": _rng_state(),
    }
    tensors: dict[str, Tensor] = {}
    encoded = encode_state(state, tensors)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(encoded))


def load_trainer_state(directory: Path, parts: TrainingParts) -> float:
    """Restore ``parts`` (not the net's weights) and the random streams; returns the best MAP@R
    so far (``-inf`` before any)."""
    tensors = load_file(str(directory / STATE_TENSORS))
    state = decode_state(json.loads((directory / STATE_JSON).read_text()), tensors)
    parts.objective.load_state_dict(state["objective"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    best = state["best_map_at_r"]
    return -math.inf if best is None else float(best)
