"""CIFAR-10 extraction (model/data/cifar.py) and the collage benchmark (model/data/collage.py).

Extraction logic is tested on tiny archives built in tmp_path; the collages use the real
CIFAR-10 archive (``cifar_archive`` fixture, skipped when absent), extracted once into the cache.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import Preprocessing
from model.data import (
    CIFAR10_CLASSES,
    DEFAULT_NUISANCE_CLASSES,
    DEFAULT_TARGET_CLASSES,
    CollageDataset,
    ensure_cifar10,
    load_image,
    target_cell_mask,
)
from model.data import cifar as cifar_module
from model.transforms import eval_transform

# --- extraction ---------------------------------------------------------------------------------


def _jpeg_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, value, value)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tiny_archive(path: Path, extra: list[tarfile.TarInfo] | None = None, skip: str = "") -> Path:
    """A CIFAR-shaped archive with one photo per class and split."""
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for value, name in enumerate(CIFAR10_CLASSES):
                if f"{split}/{name}" != skip:
                    _add_file(tar, f"cifar10/{split}/{name}/0000.jpg", _jpeg_bytes(value * 20))
        for info in extra or []:
            if info.isfile():
                tar.addfile(info, io.BytesIO(b"x" * info.size))
            else:
                tar.addfile(info)
    return path


def test_ensure_cifar10_extracts_once_and_trusts_its_marker(tmp_path, monkeypatch) -> None:
    archive = _tiny_archive(tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    root = ensure_cifar10(archive, cache)
    assert root == cache / "cifar10"
    assert (root / cifar_module.MARKER).is_file()
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(CIFAR10_CLASSES)
    assert np.asarray(load_image(root / "test" / "bird" / "0000.jpg")).mean() == pytest.approx(
        40, abs=3
    )

    def no_reopening(*args, **kwargs):
        raise AssertionError("the archive was opened again despite the marker")

    monkeypatch.setattr(tarfile, "open", no_reopening)
    assert ensure_cifar10(archive, cache) == root


def test_ensure_cifar10_redoes_a_partial_extraction(tmp_path) -> None:
    cache = tmp_path / "cache"
    (cache / "cifar10" / "train" / "cat").mkdir(parents=True)
    (cache / "cifar10" / "leftover.txt").write_text("from an interrupted run")
    root = ensure_cifar10(_tiny_archive(tmp_path / "tiny.tar.gz"), cache)
    assert not (root / "leftover.txt").exists()
    assert (root / "train" / "cat" / "0000.jpg").is_file()
    assert (root / cifar_module.MARKER).is_file()


def test_ensure_cifar10_without_archive_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar10-jpeg\.tar\.gz|absent"):
        ensure_cifar10(tmp_path / "absent.tar.gz", tmp_path / "cache")
    assert not (tmp_path / "cache" / "cifar10").exists()


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 1, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, link
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("cifar10/../../escaped.txt"),
        _member("/tmp/absolute-escape.txt"),
        _member("elsewhere/file.txt"),
        _member("cifar10/link", tarfile.SYMTYPE, link="/etc/passwd"),
        _member("cifar10/hard", tarfile.LNKTYPE, link="cifar10/train/cat/0000.jpg"),
    ],
    ids=["dotdot", "absolute", "outside-top", "symlink", "hardlink"],
)
def test_ensure_cifar10_refuses_unsafe_members(tmp_path, member) -> None:
    archive = _tiny_archive(tmp_path / "evil.tar.gz", extra=[member])
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(ValueError, match="unsafe"):
        ensure_cifar10(archive, cache)
    assert not (cache / "cifar10").exists()
    assert (
        not (tmp_path / "escaped.txt").exists() and not (tmp_path / "deep" / "escaped.txt").exists()
    )
    assert [p.name for p in cache.iterdir()] == [".cifar10.lock"]  # the scratch folder is gone


def test_ensure_cifar10_checks_the_layout(tmp_path) -> None:
    archive = _tiny_archive(tmp_path / "partial.tar.gz", skip="test/frog")
    with pytest.raises(ValueError, match="test/frog"):
        ensure_cifar10(archive, tmp_path / "cache")
    assert not (tmp_path / "cache" / "cifar10").exists()


# --- collages on real CIFAR-10 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_root(cifar_archive: Path) -> Path:
    return ensure_cifar10(cifar_archive)


def _cell(canvas: np.ndarray, cell: tuple[int, int], size: int) -> np.ndarray:
    row, col = cell
    return canvas[row * size : (row + 1) * size, col * size : (col + 1) * size]


def test_collage_items_labels_and_target_bookkeeping(cifar_root) -> None:
    per_class = 3
    dataset = CollageDataset(cifar_root, "train", per_class)
    assert len(dataset) == 7 * per_class == len(dataset.target_cells) == len(dataset.cell_sources)
    assert dataset.classes == list(DEFAULT_TARGET_CLASSES)
    assert dataset.targets == [label for label in range(7) for _ in range(per_class)]
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.size == (64, 64) and image.mode == "RGB"
        target_path = dataset.samples[index][0]
        assert target_path.parent.name == DEFAULT_TARGET_CLASSES[label]
        row, col = dataset.target_cells[index]
        sources = dataset.cell_sources[index]
        assert sources[row * 2 + col] == target_path
        canvas = np.asarray(image)
        for position, source in enumerate(sources):
            cell = divmod(position, 2)
            np.testing.assert_array_equal(_cell(canvas, cell, 32), np.asarray(load_image(source)))
            if cell != (row, col):
                assert source.parent.name in DEFAULT_NUISANCE_CLASSES
    assert len({cell for cell in dataset.target_cells}) > 1  # positions vary


def test_collages_are_deterministic_per_seed(cifar_root) -> None:
    first = CollageDataset(cifar_root, "test", 4, seed=11)
    again = CollageDataset(cifar_root, "test", 4, seed=11)
    other = CollageDataset(cifar_root, "test", 4, seed=12)
    assert first.target_cells == again.target_cells
    assert first.cell_sources == again.cell_sources
    for index in (0, 13, 27):
        assert np.array_equal(np.asarray(first[index][0]), np.asarray(again[index][0]))
    assert first.target_cells != other.target_cells
    assert first.cell_sources != other.cell_sources
    assert any(
        not np.array_equal(np.asarray(first[i][0]), np.asarray(other[i][0])) for i in range(3)
    )


def test_train_and_test_collages_use_disjoint_photos(cifar_root) -> None:
    # Test collages draw only from test/ (every cell), train collages only from train/. The large
    # test set also shows each of the 1,000 test photos of a class is used before any repeats.
    test = CollageDataset(cifar_root, "test", 1000)
    train = CollageDataset(cifar_root, "train", 50)
    test_sources = {path for sources in test.cell_sources for path in sources}
    train_sources = {path for sources in train.cell_sources for path in sources}
    assert all(path.is_relative_to(cifar_root / "test") for path in test_sources)
    assert all(path.is_relative_to(cifar_root / "train") for path in train_sources)
    targets_per_class = [
        {path for path, label in test.samples if label == c} for c in range(len(test.classes))
    ]
    assert all(len(paths) == 1000 for paths in targets_per_class)  # no repeats before exhaustion


def test_collage_grid_and_cell_size(cifar_root) -> None:
    dataset = CollageDataset(cifar_root, "test", 2, grid=3, cell_size=16, seed=5)
    assert dataset.image_size == 48
    for index in range(len(dataset)):
        canvas = np.asarray(dataset[index][0])
        assert canvas.shape == (48, 48, 3)
        row, col = dataset.target_cells[index]
        assert 0 <= row < 3 and 0 <= col < 3
        assert len(dataset.cell_sources[index]) == 9
        target = load_image(dataset.samples[index][0]).resize((16, 16), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(_cell(canvas, (row, col), 16), np.asarray(target))
    assert {cell for cell in dataset.target_cells} - {(1, 1)}  # not always the centre


def test_collage_transform_and_custom_classes(cifar_root) -> None:
    transform = eval_transform(Preprocessing(image_size=56, resize_size=64))
    dataset = CollageDataset(
        cifar_root,
        "test",
        2,
        target_classes=("cat", "dog"),
        nuisance_classes=("frog",),
        transform=transform,
    )
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 4
    tensor, label = dataset[3]
    assert tensor.shape == (3, 56, 56) and tensor.dtype == torch.float32 and label == 1
    for index, sources in enumerate(dataset.cell_sources):
        others = [s for s in sources if s != dataset.samples[index][0]]
        assert {s.parent.name for s in others} == {"frog"}


def test_val_collages_hold_out_the_train_collages_target_photos(cifar_root: Path) -> None:
    train = CollageDataset(cifar_root, "train", per_class=1500, seed=0)
    val = CollageDataset(cifar_root, "val", per_class=400, seed=0)
    val_targets = {path for path, _ in val.samples}
    assert len(val_targets) == len(val) == 7 * 400
    assert not val_targets & {path for path, _ in train.samples}
    assert all(path.parent.parent.name == "train" for path in val_targets)
    # Deterministic, and its own layout rather than a copy of the train plan's.
    again = CollageDataset(cifar_root, "val", per_class=400, seed=0)
    assert again.cell_sources == val.cell_sources
    assert val.target_cells != train.target_cells[: len(val)]
    with pytest.raises(ValueError, match="per_class"):
        CollageDataset(cifar_root, "val", per_class=5001, seed=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "validation"},
        {"per_class": 0},
        {"grid": 1},
        {"cell_size": 0},
        {"nuisance_classes": ()},
        {"target_classes": ("cat", "deer")},  # deer is a nuisance class
    ],
)
def test_collage_rejects_bad_arguments(tmp_path, kwargs) -> None:
    arguments = {"cifar_root": tmp_path, "split": "train", "per_class": 1, **kwargs}
    with pytest.raises(ValueError):
        CollageDataset(**arguments)


# --- target-cell masks --------------------------------------------------------------------------


def _all_cells(grid: int, map_size, crop_fraction: float = 1.0) -> list[torch.Tensor]:
    return [
        target_cell_mask(divmod(c, grid), grid, map_size, crop_fraction) for c in range(grid * grid)
    ]


def test_mask_on_an_odd_map_leaves_border_locations_out() -> None:
    masks = _all_cells(2, 7)
    assert all(mask.shape == (7, 7) and mask.dtype == torch.bool for mask in masks)
    assert [int(mask.sum()) for mask in masks] == [9, 9, 9, 9]
    assert not (torch.stack(masks).sum(0) > 1).any()  # disjoint
    covered = torch.stack(masks).any(0)
    assert not covered[3].any() and not covered[:, 3].any()  # centre row/column is a border
    assert masks[3][4:, 4:].all() and masks[0][:3, :3].all()  # cell (1, 1) is bottom-right


@pytest.mark.parametrize(("grid", "map_size"), [(2, 14), (2, 8), (3, 9), (2, (4, 6))])
def test_mask_partitions_maps_that_split_evenly(grid, map_size) -> None:
    masks = torch.stack(_all_cells(grid, map_size))
    assert torch.equal(masks.sum(0), torch.ones(masks.shape[1:], dtype=torch.long))
    assert len({int(mask.sum()) for mask in masks}) == 1


def test_mask_follows_a_centre_crop() -> None:
    # Visible: the middle half of the canvas, i.e. cell units 0.75..2.25 on a 3 x 3 grid; only the
    # first of 8 locations per axis has its centre in the first cell.
    corner = target_cell_mask((0, 0), 3, 8, crop_fraction=0.5)
    assert int(corner.sum()) == 1 and bool(corner[0, 0])
    # A centre crop is symmetric, so a 2 x 2 split is unchanged.
    assert torch.equal(target_cell_mask((1, 0), 2, 7, 224 / 256), target_cell_mask((1, 0), 2, 7))


@pytest.mark.parametrize(
    ("cell", "grid", "size", "crop"),
    [((2, 0), 2, 7, 1.0), ((0, -1), 2, 7, 1.0), ((0, 0), 2, 0, 1.0), ((0, 0), 2, 7, 1.5)],
)
def test_mask_rejects_bad_arguments(cell, grid, size, crop) -> None:
    with pytest.raises(ValueError):
        target_cell_mask(cell, grid, size, crop)
