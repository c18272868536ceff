"""The training job's configuration: a YAML file plus ``key.sub=value`` overrides, checked.

Sections: ``model`` (a :class:`~model.config.ModelConfig`), ``data`` (data set specs, batch
composition), ``loss``, ``optimizer``, ``schedule`` and the run-level keys below.  Unknown keys
are errors, so a typo in a config or an override never goes silently unused.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.config import ModelConfig

__all__ = [
    "DataConfig",
    "LossConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainingConfig",
    "apply_overrides",
    "load_training_config",
]


@dataclass(frozen=True)
class DataConfig:
    """What to train on, select on and report on.

    ``train`` and ``test`` are data specs (one key among folder/csv/cub/cars/sop/inshop/collage,
    see ``model.data``).  ``val`` is the validation split that picks ``best/`` and stops early:
    carved from the training split (``{holdout: classes|instances, fraction: 0.2, seed: 0}``,
    see ``model.data.holdout``) or a spec of its own (collages: ``split: val``); it must share
    no image with ``test``.  ``test`` is scored once, after training, on ``best/``.  Either may
    be omitted.  Batches hold ``batch_size`` images, ``m_per_class`` of each class, so a batch
    needs ``batch_size / m_per_class`` training classes.
    """

    train: dict[str, Any] = field(default_factory=dict)
    val: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    batch_size: int = 128
    m_per_class: int = 4
    num_workers: int = 4
    augment: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LossConfig:
    """Metric loss by name with its options; ZSR (GSP only) with its weight and options."""

    name: str = "proxy_anchor"
    options: dict[str, Any] = field(default_factory=dict)
    zsr: bool = True
    zsr_weight: float = 0.1
    zsr_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW or SGD with one learning rate per parameter group."""

    name: str = "adamw"
    lr_backbone: float = 1e-4
    lr_pooling: float = 1e-4
    lr_loss: float = 1e-2
    weight_decay: float = 1e-4
    momentum: float = 0.9
    grad_clip: float = 10.0


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warm-up over ``warmup_epochs`` then cosine decay to ``min_lr_ratio``.

    ``patience`` N > 0 stops training after N validations without a better validation MAP@R
    (0: train all ``epochs``).
    """

    epochs: int = 50
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    patience: int = 0


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run needs; ``to_dict`` is what lands in checkpoint metadata.

    ``prototype_init``: ``random`` or ``kcenter`` (GSP prototypes from a greedy k-center cover
    of ``kcenter_batches`` batches of projected features).  ``frozen_backbone`` trains the
    pooling on cached feature maps.  ``steps_per_epoch`` 0 means one pass over the training set.
    ``keep_checkpoints`` N > 0 keeps only the newest N epoch directories (and ``best``).
    ``checkpoint_every`` N validates and writes a checkpoint every N epochs and after the last
    (only checkpointed epochs can be resumed from).  ``projection_init`` (frozen-backbone runs)
    starts the head's projection from the principal components of the backbone's pooled
    features of ``data`` (a data spec), ``whiten``-ed or not, and with ``freeze`` keeps it there
    (model/projection_init.py).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    frozen_backbone: bool = False
    cache_dir: str = ".cache/features"
    prototype_init: str = "random"
    kcenter_batches: int = 8
    steps_per_epoch: int = 0
    amp: bool = True
    eval_batch_size: int = 256
    keep_checkpoints: int = 0
    checkpoint_every: int = 1
    projection_init: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prototype_init not in {"random", "kcenter"}:
            raise ValueError(
                f"prototype_init must be random or kcenter, not {self.prototype_init!r}"
            )
        if self.optimizer.name not in {"adamw", "sgd"}:
            raise ValueError(f"optimizer.name must be adamw or sgd, not {self.optimizer.name!r}")
        if self.schedule.epochs < 1:
            raise ValueError(f"schedule.epochs must be at least 1, got {self.schedule.epochs}")
        if self.data.batch_size % self.data.m_per_class:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be a multiple of "
                f"data.m_per_class ({self.data.m_per_class})"
            )
        if self.schedule.patience < 0:
            raise ValueError(f"schedule.patience must be >= 0, got {self.schedule.patience}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")
        if not self.data.train:
            raise ValueError("data.train must name a training data set")
        if self.projection_init:
            unknown = set(self.projection_init) - {"data", "whiten", "freeze"}
            if unknown or not isinstance(self.projection_init.get("data"), dict):
                raise ValueError(
                    "projection_init takes data (a data spec), whiten and freeze; "
                    f"got {sorted(self.projection_init)}"
                )
            if not self.frozen_backbone:
                raise ValueError("projection_init needs frozen_backbone: true")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        values = _checked(cls, data, "")
        if isinstance(values.get("data"), dict) and "eval" in values["data"]:
            raise ValueError(
                "data.eval is no longer read: name data.val (validation carved from training "
                "data, e.g. {holdout: classes, fraction: 0.2}; it picks best/) and data.test "
                "(scored once on best/ after training)"
            )
        sections = {
            "data": DataConfig,
            "loss": LossConfig,
            "optimizer": OptimizerConfig,
            "schedule": ScheduleConfig,
        }
        for name, section in sections.items():
            if name in values:
                values[name] = section(**_checked(section, values[name] or {}, f"{name}."))
        if "model" in values:
            values["model"] = ModelConfig.from_dict(values["model"] or {})
        return cls(**values)


def _checked(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or '<root>'} must be a mapping, got {data!r}")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(prefix + key for key in unknown)}")
    return dict(data)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries in a nested dict; values are parsed as YAML (typed).

    ``data.KIND=ROOT`` (KIND a data reader: ``cub``, ``folder``, ``collage``, ...) points every
    data spec of the config that reads KIND (``data.train``, ``data.val``, ``data.test``) at
    ROOT, keeping their other options: the one override a user needs to say where a data set
    lives.
    """
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override must look like key.sub=value, got {override!r}")
        if _is_data_root(key):
            _set_data_root(result, key.removeprefix("data."), _parse_value(raw))
            continue
        *parents, leaf = key.split(".")
        node = result
        for parent in parents:
            child = node.setdefault(parent, {})
            if not isinstance(child, dict):
                raise ValueError(f"cannot set {key!r}: {parent!r} is not a mapping")
            node = child
        node[leaf] = _parse_value(raw)
    return result


def _is_data_root(key: str) -> bool:
    section, _, name = key.partition(".")
    if section != "data" or not name or "." in name:
        return False
    if name in {f.name for f in dataclasses.fields(DataConfig)}:
        return False
    from model.data.registry import DATA_KINDS  # the readers: a heavy import, needed here only

    return name in DATA_KINDS


def _set_data_root(config: dict[str, Any], kind: str, root: Any) -> None:
    data = config.get("data") or {}
    specs = [data[name] for name in ("train", "val", "test") if isinstance(data.get(name), dict)]
    reading = [spec for spec in specs if kind in spec]
    if not reading:
        raise ValueError(
            f"data.{kind}=...: no data spec of this config reads {kind}; to change data sets, "
            f"set whole specs, e.g. 'data.train={{{kind}: ROOT}}' 'data.test={{{kind}: ROOT}}'"
        )
    for spec in reading:
        spec[kind] = root


def _parse_value(raw: str) -> Any:
    """YAML scalar, except that ``3e-3`` is a number (YAML 1.1 wants ``3.0e-3``)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_training_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainingConfig:
    """Read a YAML training config and apply dotted overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    merged = apply_overrides(data, overrides)
    _drop_other_pooling_options(data, merged, overrides)
    return TrainingConfig.from_dict(merged)


def _drop_other_pooling_options(
    original: dict[str, Any], merged: dict[str, Any], overrides: Sequence[str]
) -> None:
    """``model.pooling=gap`` on a GSP config: the file's ``pooling_options`` belong to the
    pooling it named, not to the one chosen now, so they are dropped (with a note) unless the
    overrides set options too."""
    before = (original.get("model") or {}).get("pooling")
    model = merged.get("model")
    if not isinstance(model, dict) or model.get("pooling") == before:
        return
    if any(item.startswith("model.pooling_options") for item in overrides):
        return
    dropped = model.pop("pooling_options", None)
    if dropped:
        print(
            f"note: model.pooling={model.get('pooling')} replaces the config's {before}; its "
            f"pooling_options {dropped} are dropped (set model.pooling_options to give new ones)",
            file=sys.stderr,
        )
