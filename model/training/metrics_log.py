"""A run's metrics: one JSON line per epoch in ``metrics.jsonl`` (validation metrics under
``val``), the ``metrics.png`` plot, and ``test_metrics.json``, the one test score of the run.

The log outlives crashes line by line; a resumed run first drops the lines of the epochs it
will redo, so every epoch appears once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_FILE",
    "PLOT_FILE",
    "TEST_FILE",
    "append_metrics",
    "plot_metrics",
    "truncate_metrics",
    "write_test_metrics",
]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
TEST_FILE = "test_metrics.json"


def truncate_metrics(output: Path, last_epoch: int) -> None:
    """Drop metrics.jsonl records after ``last_epoch`` (epochs a resumed run will redo)."""
    path = output / METRICS_FILE
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["epoch"] <= last_epoch]
        path.write_text("".join(line + "\n" for line in kept))


def append_metrics(output: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Append one epoch's record to metrics.jsonl; return all records (for the plot)."""
    path = output / METRICS_FILE
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_test_metrics(output: Path, record: dict[str, Any]) -> None:
    """Write the run's test score, kept apart from the validation metrics that selected it."""
    (output / TEST_FILE).write_text(json.dumps(record, indent=2) + "\n")


def plot_metrics(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and validation MAP@R per epoch, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [record["epoch"] for record in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [record["loss"] for record in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    scored = [record for record in history if "val" in record]
    right.plot([r["epoch"] for r in scored], [r["val"]["map_at_r"] for r in scored], marker="o")
    right.set(xlabel="epoch", ylabel="MAP@R", title="validation MAP@R")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
