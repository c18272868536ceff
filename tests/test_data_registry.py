"""Data specs (``folder: DIR``, ``csv: FILE``, ``cub: DIR``, ``collage: ...``): which reader, which
splits, which data set, and what identifies its content for the feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from model.config import Preprocessing
from model.data import (
    CsvListDataset,
    ImageFolderDataset,
    data_kind,
    dataset_identity,
    default_split,
    open_dataset,
)
from model.transforms import eval_transform


def _folder(root: Path, per_class: dict[str, int]) -> Path:
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(root / name / f"{index}.png")
    return root


def test_a_spec_names_exactly_one_reader() -> None:
    assert data_kind({"folder": "x"}) == "folder"
    assert data_kind({"cub": "x", "split": "test"}) == "cub"
    assert data_kind({"collage": None, "per_class": 3}) == "collage"
    with pytest.raises(ValueError, match="exactly one of"):
        data_kind({"split": "train"})
    with pytest.raises(ValueError, match="exactly one of"):
        data_kind({"folder": "x", "csv": "y"})


@pytest.mark.parametrize(
    ("spec", "training", "splits"),
    [
        ({"folder": "x"}, True, ["all"]),
        ({"csv": "x"}, False, ["all"]),
        ({"cub": "x"}, True, ["train"]),
        ({"cars": "x"}, False, ["test"]),
        ({"inshop": "x"}, True, ["train"]),
        ({"inshop": "x"}, False, ["query", "gallery"]),
        ({"collage": None, "split": "val"}, False, ["val"]),
    ],
)
def test_default_splits(spec: dict, training: bool, splits: list[str]) -> None:
    assert default_split(spec, training=training) == splits


def test_folder_and_csv_specs_open_their_readers_with_the_transform(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", {"a": 2, "b": 3})
    transform = eval_transform(Preprocessing(image_size=4, resize_size=4))
    folder = open_dataset({"folder": str(root)}, "all", transform)
    assert isinstance(folder, ImageFolderDataset)
    assert folder.classes == ["a", "b"] and folder.targets == [0, 0, 1, 1, 1]
    assert tuple(folder[0][0].shape) == (3, 4, 4)

    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nimages/b/0.png,b\nimages/a/1.png,a\n")
    csv = open_dataset({"csv": str(listing), "root": str(tmp_path)}, "all", None)
    assert isinstance(csv, CsvListDataset)
    assert [label for _, label in csv.samples] == [1, 0]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"collage": None, "per_class": 2, "gird": 3}, r"unknown collage options \['gird'\]"),
        ({"collage": None, "grid": 3}, "needs per_class"),
    ],
)
def test_collage_specs_are_checked_before_any_data_is_read(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        open_dataset(spec, "train", None)


def test_identity_follows_the_files_not_the_transform(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", {"a": 2, "b": 2})
    spec = {"folder": str(root)}
    plain = dataset_identity(spec, "all")
    transformed = open_dataset(spec, "all", eval_transform(Preprocessing(4, 4)))
    assert dataset_identity(spec, "all", transformed) == plain
    assert plain["size"] == 4 and plain["spec"] == spec

    _folder(root, {"b": 3})  # one more image of class b
    grown = dataset_identity(spec, "all")
    assert grown["size"] == 5
    assert grown["content"] != plain["content"]
