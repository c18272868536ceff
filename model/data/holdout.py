"""Validation splits carved from training data, so settings and checkpoints are never chosen on
the split that is reported.

A training config says ``data.val: {holdout: classes, fraction: 0.2, seed: 0}``: a seeded fifth
of the training split's classes is set aside for validation (class-disjoint protocols: the model
is judged on classes it never saw, so it is chosen that way too) and training uses the rest.
``holdout: instances`` sets aside a fraction of each class's images instead (protocols whose test
classes are the training classes). :func:`carve_specs` turns that into two ordinary data specs,
each with a ``holdout`` entry that :func:`held_out_part` applies to the opened split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.data.base import LabeledImageDataset

__all__ = ["HOLDOUT_KINDS", "HeldOutPart", "carve_specs", "check_disjoint", "held_out_part"]

HOLDOUT_KINDS = ("classes", "instances")
_HOLDOUT_KEYS = {"holdout", "fraction", "seed"}


def carve_specs(
    train: dict[str, Any], val: dict[str, Any] | None, train_split: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The training and validation specs a config's ``data.train`` and ``data.val`` stand for.

    A ``val`` naming a reader (``collage: ..., split: val``, ``folder: DIR``) is used as it is;
    a ``holdout`` val becomes ``train`` restricted to the held-out part, and ``train`` to the
    rest, both pinned to ``train_split``.
    """
    if val is None or "holdout" not in val:
        return train, val
    unknown = set(val) - _HOLDOUT_KEYS
    if unknown:
        raise ValueError(
            f"data.val: a holdout spec takes {sorted(_HOLDOUT_KEYS)}, not {sorted(unknown)} "
            "(to validate on another data set, name its reader instead of holdout)"
        )
    if "collage" in train:
        raise ValueError(
            "data.val: collage specs carve their own validation collages from training photos; "
            "use {collage: ..., split: val, per_class: N} with the training spec's seed"
        )
    rule = {
        "by": val["holdout"],
        "fraction": float(val.get("fraction", 0.2)),
        "seed": int(val.get("seed", 0)),
    }
    _check_rule(rule)
    base = {key: value for key, value in train.items() if key != "holdout"}
    return (
        {**base, "split": train_split, "holdout": {**rule, "part": "train"}},
        {**base, "split": train_split, "holdout": {**rule, "part": "val"}},
    )


def _check_rule(rule: dict[str, Any]) -> None:
    if rule["by"] not in HOLDOUT_KINDS:
        raise ValueError(f"holdout must be one of {list(HOLDOUT_KINDS)}, got {rule['by']!r}")
    if not 0.0 < rule["fraction"] < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {rule['fraction']}")
    if rule.get("part", "val") not in {"train", "val"}:
        raise ValueError(f"holdout part must be train or val, got {rule['part']!r}")


class HeldOutPart(LabeledImageDataset):
    """The items ``indices`` of ``base`` (read through it), with labels renumbered to
    ``classes``; ``source_labels[i]`` is the label the class had in ``base``."""

    def __init__(
        self, base: LabeledImageDataset, indices: Sequence[int], source_labels: Sequence[int]
    ) -> None:
        relabel = {int(old): new for new, old in enumerate(source_labels)}
        samples = [(base.samples[i][0], relabel[base.samples[i][1]]) for i in indices]
        super().__init__(samples, [base.classes[i] for i in source_labels], base.transform)
        self.base = base
        self.indices = [int(i) for i in indices]
        self.source_labels = [int(label) for label in source_labels]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.base[self.indices[index]]
        return image, self.samples[index][1]


def held_out_part(base: LabeledImageDataset, rule: dict[str, Any]) -> HeldOutPart:
    """The ``rule["part"]`` (``train`` or ``val``) of ``base`` under a holdout rule.

    ``classes``: ``round(fraction * classes)`` classes (at least 2, so validation can retrieve
    across classes, and leaving at least one) drawn with ``seed`` go to val.  ``instances``:
    ``floor(fraction * n)`` images of each class go to val; classes keep their labels.
    """
    _check_rule(rule)
    rng = np.random.default_rng(rule["seed"])
    labels = np.asarray(base.targets)
    num_classes = len(base.classes)
    want_val = rule["part"] == "val"
    if rule["by"] == "classes":
        held = max(2, round(rule["fraction"] * num_classes))
        if held >= num_classes:
            raise ValueError(
                f"holdout classes: {num_classes} training classes cannot spare {held} for "
                "validation and keep some for training"
            )
        chosen = set(rng.permutation(num_classes)[:held].tolist())
        keep = sorted(c for c in range(num_classes) if (c in chosen) == want_val)
        kept = set(keep)
        indices = [i for i, label in enumerate(labels) if label in kept]
        return HeldOutPart(base, indices, keep)
    indices = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        order = members[rng.permutation(len(members))]
        held = int(rule["fraction"] * len(members))
        indices.extend((order[:held] if want_val else order[held:]).tolist())
    return HeldOutPart(base, sorted(indices), list(range(num_classes)))


def check_disjoint(parts: Mapping[str, Sequence[LabeledImageDataset]]) -> None:
    """Fail when two named parts (``train``, ``val``, ``test``) share an image file.

    Collages are compared by their class-bearing photos (``samples``), so recurring clutter
    photos do not count as overlap.
    """
    files = {name: _paths(sets) for name, sets in parts.items()}
    names = list(files)
    for first, name in enumerate(names):
        for other in names[first + 1 :]:
            shared = files[name] & files[other]
            if shared:
                example = sorted(shared)[0]
                raise ValueError(
                    f"data.{name} and data.{other} share {len(shared)} image(s), e.g. {example}: "
                    "the test split must be unseen by training and selection, and data.val "
                    "is carved from training data (e.g. {holdout: classes, fraction: 0.2})"
                )


def _paths(sets: Sequence[LabeledImageDataset]) -> set[Path]:
    return {Path(path).resolve() for dataset in sets for path, _ in dataset.samples}
