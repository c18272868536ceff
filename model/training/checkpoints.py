"""A run's directory: ``epoch-NNN`` checkpoints with their trainer state, and ``best``.

An epoch directory is a model checkpoint (``model.checkpoint``) plus the trainer state, written
last, so its presence marks the epoch complete and resumable.  ``best`` is a copy of the
checkpointed epoch with the highest MAP@R on the validation split (``data.val``, never the
test split), swapped in whole by a rename.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from model.checkpoint import load_checkpoint, save_checkpoint
from model.training.state import (
    TrainingParts,
    has_trainer_state,
    load_trainer_state,
    save_trainer_state,
)
from model.training_config import TrainingConfig

__all__ = ["BEST_DIR", "EPOCH_PREFIX", "RunDirectory"]

BEST_DIR = "best"
BEST_EPOCH_FILE = "best_epoch.json"
EPOCH_PREFIX = "epoch-"


class RunDirectory:
    """The checkpoints under a run's ``output_dir``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def epoch_dir(self, epoch: int) -> Path:
        return self.root / f"{EPOCH_PREFIX}{epoch:03d}"

    def last_epoch(self) -> int:
        """Highest epoch whose checkpoint and trainer state are complete; 0 when none."""
        epochs = [
            int(path.name[len(EPOCH_PREFIX) :])
            for path in self.root.glob(f"{EPOCH_PREFIX}*")
            if path.name[len(EPOCH_PREFIX) :].isdigit() and has_trainer_state(path)
        ]
        return max(epochs, default=0)

    def best_epoch(self) -> int | None:
        """The epoch ``best`` holds; None before any epoch was scored."""
        record = self.root / BEST_DIR / BEST_EPOCH_FILE
        return json.loads(record.read_text())["epoch"] if record.is_file() else None

    def save_epoch(
        self,
        config: TrainingConfig,
        epoch: int,
        parts: TrainingParts,
        record: dict[str, Any],
        best_map: float,
        description: dict[str, Any],
    ) -> float:
        """Write ``epoch-NNN`` (checkpoint + trainer state), refresh ``best`` and drop epochs
        beyond ``keep_checkpoints``; returns the best MAP@R so far."""
        metadata = {
            "training_data": description,
            "metrics": record,
            "epoch": epoch,
            "training_config": config.to_dict(),
        }
        directory = self.epoch_dir(epoch)
        if directory.exists():
            shutil.rmtree(directory)
        save_checkpoint(directory, parts.net, config.model, **metadata)
        map_at_r = record.get("val", {}).get("map_at_r")
        if map_at_r is not None and map_at_r > best_map:
            best_map = float(map_at_r)
            best = {"epoch": epoch, "map_at_r": best_map, "selected_on": "val"}
            self._replace_best(config, parts, metadata, best)
        save_trainer_state(directory, parts, epoch, best_map)  # last: marks the epoch complete
        if config.keep_checkpoints > 0:
            for old in range(1, epoch - config.keep_checkpoints + 1):
                shutil.rmtree(self.epoch_dir(old), ignore_errors=True)
        return best_map

    def _replace_best(
        self,
        config: TrainingConfig,
        parts: TrainingParts,
        metadata: dict[str, Any],
        best: dict[str, Any],
    ) -> None:
        staging = self.root / f".{BEST_DIR}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        save_checkpoint(staging, parts.net, config.model, **metadata)
        (staging / BEST_EPOCH_FILE).write_text(json.dumps(best))
        shutil.rmtree(self.root / BEST_DIR, ignore_errors=True)
        staging.rename(self.root / BEST_DIR)

    def restore(self, epoch: int, parts: TrainingParts, device: str) -> float:
        """Load epoch ``epoch``'s weights and trainer state into ``parts``; returns the best
        MAP@R so far."""
        directory = self.epoch_dir(epoch)
        loaded = load_checkpoint(directory, device=device)
        parts.net.load_state_dict(loaded.net.state_dict())
        return load_trainer_state(directory, parts)
