"""docs/config.md documents every training config key with its real default: checked against
the config dataclasses, so adding, renaming or re-defaulting a key without the docs fails."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from model.config import ModelConfig, Preprocessing
from model.training_config import (
    DataConfig,
    LossConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainingConfig,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
SECTIONS: dict[str, type] = {
    "top level": TrainingConfig,
    "model": ModelConfig,
    "model.preprocessing": Preprocessing,
    "data": DataConfig,
    "loss": LossConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
}


def _render(value: Any) -> str:
    """A default as the docs spell it (YAML flow style)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_render(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_render(item)}" for key, item in value.items()) + "}"
    return str(value)


def _documented() -> dict[str, dict[str, str]]:
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in DOC.read_text().splitlines():
        heading = re.fullmatch(r"## `([^`]+)`", line)
        if heading:
            section = heading.group(1)
            tables[section] = {}
        row = re.match(r"\| `([a-z_]+)` \| `([^`]*)` \| (.+) \|$", line)
        if row and section is not None:
            assert row.group(1) not in tables[section], f"{section}.{row.group(1)} twice"
            assert row.group(3).strip(), f"{section}.{row.group(1)} has no description"
            tables[section][row.group(1)] = row.group(2)
    return tables


def _defaults(cls: type) -> dict[str, str]:
    defaults = {}
    for item in dataclasses.fields(cls):
        if item.name in SECTIONS or item.name == "preprocessing":
            continue  # a section of its own
        value = item.default
        if value is dataclasses.MISSING:
            value = item.default_factory()  # type: ignore[misc]
        defaults[item.name] = _render(value)
    return defaults


def test_every_config_key_is_documented_with_its_default() -> None:
    documented = _documented()
    assert set(documented) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        assert documented[section] == _defaults(cls), f"docs/config.md section {section}"
