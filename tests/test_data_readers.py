"""Readers (image folder, CSV list, CUB, Cars196, SOP, In-Shop) and m-per-class batch sampling.

Fixtures are written into tmp_path in each benchmark's published layout. Every image is a solid
colour that encodes its class id, so a test can check from the pixels alone that the label a
reader gives an image is the class it was filed under.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

from model.config import Preprocessing
from model.data import (
    BenchmarkDataset,
    CsvListDataset,
    ImageFolderDataset,
    LabeledImageDataset,
    MPerClassBatchSampler,
    list_images,
    load_benchmark,
    load_image,
)
from model.transforms import eval_transform


def _colour(class_key: int | str) -> tuple[int, int, int]:
    """A distinct, exactly recoverable (PNG is lossless) colour per class."""
    number = class_key if isinstance(class_key, int) else sum(map(ord, class_key)) * 7
    return (number % 256, (number // 256) % 256, 77)


def _write_image(path, class_key, size=(6, 5), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, _colour(class_key))
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def _assert_labels_match_pixels(dataset: LabeledImageDataset, key_of_label) -> None:
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.getpixel((0, 0)) == _colour(key_of_label(label))


# --- image folder -------------------------------------------------------------------------------


def test_image_folder_reads_nested_files_with_any_image_extension(tmp_path) -> None:
    _write_image(tmp_path / "cat" / "a.png", "cat")
    _write_image(tmp_path / "cat" / "deep" / "deeper" / "b.PNG", "cat")
    _write_image(tmp_path / "cat" / "c.jpg", "cat")
    _write_image(tmp_path / "dog" / "d.bmp", "dog")
    _write_image(tmp_path / "dog" / "e.gif", "dog", mode="P")
    _write_image(tmp_path / "dog" / "f.tiff", "dog")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    _write_image(tmp_path / ".ipynb_checkpoints" / "x.png", "hidden")  # not a class
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["cat", "dog"]
    assert len(dataset) == 6
    assert sorted(p.name for p, _ in dataset.samples) == [
        "a.png",
        "b.PNG",
        "c.jpg",
        "d.bmp",
        "e.gif",
        "f.tiff",
    ]
    assert dataset.targets == [0, 0, 0, 1, 1, 1]
    # JPEG and GIF (a 256-colour palette) change colours; the other formats keep them exactly.
    exact = [i for i, (p, _) in enumerate(dataset.samples) if p.suffix not in {".jpg", ".gif"}]
    for index in exact:
        image, label = dataset[index]
        assert image.mode == "RGB"
        assert image.getpixel((0, 0)) == _colour(dataset.classes[label])


def test_image_folder_class_selection_order_and_transform(tmp_path) -> None:
    for name in ("a", "b", "c"):
        _write_image(tmp_path / name / "1.png", name, size=(50, 60))
    transform = eval_transform(Preprocessing(image_size=16, resize_size=20))
    dataset = ImageFolderDataset(tmp_path, transform=transform, classes=["c", "a"])
    assert dataset.classes == ["c", "a"]
    assert [p.parent.name for p, _ in dataset.samples] == ["c", "a"]
    tensor, label = dataset[0]
    assert tensor.shape == (3, 16, 16) and label == 0


def test_image_folder_errors_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "absent")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty_class").mkdir()
    _write_image(tmp_path / "full" / "x.png", "full")
    with pytest.raises(ValueError, match="empty_class"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path, classes=["full", "missing"])


def test_load_image_names_the_broken_file(tmp_path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    with pytest.raises(OSError, match=r"broken\.jpg"):
        load_image(broken)


# --- CSV list -----------------------------------------------------------------------------------


def test_csv_list_with_header_string_labels_and_relative_paths(tmp_path) -> None:
    for name, label in [("x/1.png", "zebra"), ("x/2.png", "apple"), ("y/3.png", "zebra")]:
        _write_image(tmp_path / name, label)
    absolute = _write_image(tmp_path / "elsewhere" / "4.png", "apple")
    (tmp_path / "list.csv").write_text(
        f"path,label\nx/1.png,zebra\n\nx/2.png , apple\ny/3.png,zebra\n{absolute},apple\n"
    )
    dataset = CsvListDataset(tmp_path / "list.csv")
    assert dataset.classes == ["apple", "zebra"]
    assert [label for _, label in dataset.samples] == [1, 0, 1, 0]
    assert dataset.samples[0][0] == tmp_path / "x" / "1.png"
    _assert_labels_match_pixels(dataset, lambda label: dataset.classes[label])


def test_csv_list_without_header_numeric_labels_and_root(tmp_path) -> None:
    images = tmp_path / "images"
    for i, label in enumerate(["10", "2", "2", "1"]):
        _write_image(images / f"{i}.png", int(label))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "l.csv").write_text("0.png,10\n1.png,2\n2.png,2\n3.png,1\n")
    with pytest.raises(FileNotFoundError, match="line 1"):  # relative to the CSV's folder
        CsvListDataset(lists / "l.csv")
    dataset = CsvListDataset(lists / "l.csv", root=images)
    assert dataset.classes == ["1", "2", "10"]  # integer labels in numeric order
    assert dataset.targets == [2, 1, 1, 0]
    _assert_labels_match_pixels(dataset, lambda label: int(dataset.classes[label]))


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        ("a.png,cat\nb.png\n", ValueError, "line 2"),
        ("a.png,cat,extra\n", ValueError, "line 1"),
        ("a.png,\n", ValueError, "line 1"),
        ("path,label\na.png,cat\nmissing.png,cat\n", FileNotFoundError, "line 3"),
        ("path,label\n", ValueError, "no rows"),
    ],
)
def test_csv_list_errors_name_the_line(tmp_path, content, error, match) -> None:
    _write_image(tmp_path / "a.png", "cat")
    (tmp_path / "l.csv").write_text(content)
    with pytest.raises(error, match=match):
        CsvListDataset(tmp_path / "l.csv")


def test_csv_list_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CsvListDataset(tmp_path / "nope.csv")


# --- benchmarks: published layouts --------------------------------------------------------------


def _check_split_pair(train: BenchmarkDataset, test: BenchmarkDataset) -> None:
    assert not set(train.class_ids) & set(test.class_ids)
    for dataset in (train, test):
        assert sorted(set(dataset.targets)) == list(range(len(dataset.classes)))
        assert len(dataset.class_ids) == len(dataset.classes)
        _assert_labels_match_pixels(dataset, lambda label, d=dataset: d.class_ids[label])


def _write_png_named(path, class_key):
    """Lossless pixels under the benchmark's own (.jpg) file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), _colour(class_key)).save(path, format="PNG")


def test_cub_split_follows_the_literature(tmp_path) -> None:
    base = tmp_path / "CUB_200_2011"
    class_ids = (1, 7, 100, 101, 150, 200)
    rows_images, rows_labels = [], []
    for n, class_id in enumerate(c for c in class_ids for _ in range(2)):
        relative = f"{class_id:03d}.Bird/{n}.jpg"
        _write_png_named(base / "images" / relative, class_id)
        rows_images.append(f"{n + 1} {relative}")
        rows_labels.append(f"{n + 1} {class_id}")
    (base / "images.txt").write_text("\n".join(rows_images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(rows_labels) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{c} {c:03d}.Bird" for c in class_ids) + "\n")

    train = load_benchmark("cub200", tmp_path, "train")
    test = load_benchmark("CUB", base, "test")  # root may be CUB_200_2011 itself; alias accepted
    assert train.class_ids == [1, 7, 100] and test.class_ids == [101, 150, 200]
    assert len(train) == 6 and len(test) == 6
    assert train.classes[2] == "100.Bird"
    _check_split_pair(train, test)


def test_cub_reports_images_without_class_and_missing_files(tmp_path) -> None:
    base = tmp_path / "CUB_200_2011"
    _write_png_named(base / "images" / "a.jpg", 1)
    (base / "images.txt").write_text("1 a.jpg\n2 b.jpg\n")
    (base / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(ValueError, match="image id 2"):
        load_benchmark("cub200", tmp_path, "train")
    (base / "image_class_labels.txt").write_text("1 1\n2 1\n")
    with pytest.raises(FileNotFoundError, match="1 image file"):
        load_benchmark("cub200", tmp_path, "train")
    (base / "image_class_labels.txt").write_text("1 1\n2\n")
    with pytest.raises(ValueError, match="line 2"):
        load_benchmark("cub200", tmp_path, "train")


def _struct_array(rows: list[dict]) -> np.ndarray:
    """A 1 x N MATLAB struct array as scipy.io.savemat writes it."""
    fields = list(rows[0])
    array = np.empty((1, len(rows)), dtype=[(field, object) for field in fields])
    for i, row in enumerate(rows):
        for field in fields:
            array[0, i][field] = row[field]
    return array


def _class_names() -> np.ndarray:
    names = np.empty((1, 196), dtype=object)
    for i in range(196):
        names[0, i] = f"Make Model {i + 1}"
    return names


CARS_CLASSES = (1, 50, 98, 99, 150, 196)


def test_cars196_annos_mat_split_follows_the_literature(tmp_path) -> None:
    rows = []
    for n, class_id in enumerate(c for c in CARS_CLASSES for _ in range(2)):
        relative = f"car_ims/{n + 1:06d}.jpg"
        _write_png_named(tmp_path / relative, class_id)
        box = {f"bbox_{k}": np.array([[5]], dtype=np.uint8) for k in ("x1", "y1", "x2", "y2")}
        rows.append(
            {
                "relative_im_path": relative,
                **box,
                "class": np.array([[class_id]], dtype=np.uint8),
                "test": np.array([[n % 2]], dtype=np.uint8),
            }
        )
    scipy.io.savemat(
        tmp_path / "cars_annos.mat",
        {"annotations": _struct_array(rows), "class_names": _class_names()},
    )
    train = load_benchmark("cars196", tmp_path, "train")
    test = load_benchmark("cars", tmp_path, "test")
    assert train.class_ids == [1, 50, 98] and test.class_ids == [99, 150, 196]
    assert len(train) == 6 and len(test) == 6
    assert train.classes == ["Make Model 1", "Make Model 50", "Make Model 98"]
    # The official train/test flag is ignored: the split is by class, as in the literature.
    _check_split_pair(train, test)


def test_cars196_devkit_layout(tmp_path) -> None:
    train_rows, test_rows = [], []
    for n, class_id in enumerate(CARS_CLASSES):
        folder, rows = ("cars_train", train_rows) if n % 2 else ("cars_test", test_rows)
        for k in range(2):
            fname = f"{n:05d}_{k}.jpg"
            _write_png_named(tmp_path / folder / fname, class_id)
            rows.append(
                {
                    "bbox_x1": 1,
                    "bbox_y1": 1,
                    "bbox_x2": 4,
                    "bbox_y2": 4,
                    "class": class_id,
                    "fname": fname,
                }
            )
    (tmp_path / "devkit").mkdir()
    scipy.io.savemat(tmp_path / "devkit" / "cars_meta.mat", {"class_names": _class_names()})
    scipy.io.savemat(
        tmp_path / "devkit" / "cars_train_annos.mat", {"annotations": _struct_array(train_rows)}
    )
    scipy.io.savemat(
        tmp_path / "cars_test_annos_withlabels.mat", {"annotations": _struct_array(test_rows)}
    )
    train = load_benchmark("cars196", tmp_path, "train")
    test = load_benchmark("cars196", tmp_path, "test")
    assert train.class_ids == [1, 50, 98] and test.class_ids == [99, 150, 196]
    assert len(train) == 6 and len(test) == 6
    _check_split_pair(train, test)


def test_cars196_without_annotations_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cars_annos\.mat"):
        load_benchmark("cars196", tmp_path, "train")


def _make_sop(root, train_classes=(1, 2, 3), test_classes=(11319, 11320)):
    for listing, classes in (("Ebay_train.txt", train_classes), ("Ebay_test.txt", test_classes)):
        lines = ["image_id class_id super_class_id path"]
        for n, class_id in enumerate(c for c in classes for _ in range(3)):
            relative = f"bicycle_final/{class_id}_{n}.JPG"
            _write_png_named(root / relative, class_id)
            lines.append(f"{n + 1} {class_id} {1 + class_id % 2} {relative}")
        (root / listing).write_text("\n".join(lines) + "\n")


def test_sop_split_uses_the_published_lists(tmp_path) -> None:
    _make_sop(tmp_path)
    train = load_benchmark("sop", tmp_path, "train")
    test = load_benchmark("Stanford_Online_Products", tmp_path, "test")
    assert train.class_ids == [1, 2, 3] and test.class_ids == [11319, 11320]
    assert len(train) == 9 and len(test) == 6
    _check_split_pair(train, test)


def _make_inshop(root, declared_count=None):
    rows = [("train", "id_00000001"), ("train", "id_00000002")] * 2
    rows += [("query", "id_00000003"), ("gallery", "id_00000003"), ("gallery", "id_00000003")]
    rows += [("query", "id_00000004"), ("gallery", "id_00000004"), ("gallery", "id_00000005")]
    lines = []
    for n, (status, item) in enumerate(rows):
        relative = f"img/WOMEN/Dresses/{item}/{n:02d}_1_front.jpg"
        _write_png_named(root / "Img" / relative, int(item[3:]))
        lines.append(f"{relative} {item} {status}")
    count = len(lines) if declared_count is None else declared_count
    (root / "Eval").mkdir()
    text = f"{count}\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n"
    (root / "Eval" / "list_eval_partition.txt").write_text(text)


def test_inshop_train_query_gallery(tmp_path) -> None:
    _make_inshop(tmp_path)
    train = load_benchmark("In-Shop", tmp_path, "train")
    query = load_benchmark("inshop", tmp_path, "query")
    gallery = load_benchmark("inshop", tmp_path, "gallery")
    assert (len(train), len(query), len(gallery)) == (4, 2, 4)
    assert train.class_ids == ["id_00000001", "id_00000002"]
    # Query and gallery share one label space, so one item has one label in both.
    assert query.classes == gallery.classes == ["id_00000003", "id_00000004", "id_00000005"]
    assert query.targets == [0, 1] and gallery.targets == [0, 0, 1, 2]
    assert not set(train.class_ids) & set(query.class_ids)
    for dataset in (train, query, gallery):
        _assert_labels_match_pixels(dataset, lambda label, d=dataset: int(d.class_ids[label][3:]))


def test_inshop_truncated_list_is_detected(tmp_path) -> None:
    _make_inshop(tmp_path, declared_count=99)
    with pytest.raises(ValueError, match="declares 99 rows"):
        load_benchmark("inshop", tmp_path, "train")


def test_load_benchmark_rejects_unknown_names_splits_and_roots(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("imagenet", tmp_path, "train")
    with pytest.raises(ValueError, match="query"):
        load_benchmark("inshop", tmp_path, "test")
    with pytest.raises(ValueError, match="splits"):
        load_benchmark("sop", tmp_path, "query")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark("sop", tmp_path / "absent", "train")
    with pytest.raises(FileNotFoundError, match=r"Ebay_train\.txt"):
        load_benchmark("sop", tmp_path, "train")


# --- m-per-class batches ------------------------------------------------------------------------


LABELS = [c for c in range(8) for _ in range(5)] + [8, 8]  # class 8 has fewer than m images


def test_batches_hold_m_images_of_each_class() -> None:
    sampler = MPerClassBatchSampler(LABELS, m=3, batch_size=12, batches_per_epoch=25, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 25
    for batch in batches:
        assert len(batch) == 12
        classes, counts = np.unique([LABELS[i] for i in batch], return_counts=True)
        assert len(classes) == 4 and set(counts) == {3}
    assert any(LABELS[i] == 8 for batch in batches for i in batch)  # drawn with replacement


def test_batches_are_reproducible_per_seed_and_epoch() -> None:
    first = MPerClassBatchSampler(LABELS, m=2, batch_size=8, seed=3)
    second = MPerClassBatchSampler(LABELS, m=2, batch_size=8, seed=3)
    epoch0, epoch1 = list(first), list(first)
    assert epoch0 == list(second) and epoch1 == list(second)
    assert epoch0 != epoch1  # epochs differ
    first.set_epoch(0)
    assert list(first) == epoch0
    assert list(MPerClassBatchSampler(LABELS, m=2, batch_size=8, seed=4)) != epoch0
    assert len(epoch0) == len(LABELS) // 8  # default: about one pass over the data


def test_sampler_feeds_a_dataloader(tmp_path) -> None:
    for name in ("a", "b", "c"):
        for k in range(2):
            _write_image(tmp_path / name / f"{k}.png", name, size=(8, 8))
    transform = eval_transform(Preprocessing(image_size=8, resize_size=8))
    dataset = ImageFolderDataset(tmp_path, transform=transform)
    sampler = MPerClassBatchSampler(dataset.targets, m=2, batch_size=4, batches_per_epoch=3)
    batches = list(DataLoader(dataset, batch_sampler=sampler))
    assert len(batches) == 3
    for images, labels in batches:
        assert images.shape == (4, 3, 8, 8)
        assert sorted(torch.bincount(labels).tolist()) in ([0, 2, 2], [2, 2])


@pytest.mark.parametrize(
    ("m", "batch_size", "match"),
    [(3, 10, "multiple"), (2, 40, "classes"), (0, 4, "multiple")],
)
def test_sampler_rejects_impossible_batches(m, batch_size, match) -> None:
    with pytest.raises(ValueError, match=match):
        MPerClassBatchSampler(LABELS, m=m, batch_size=batch_size)


def test_training_readers_and_the_indexer_take_the_same_files_for_images(tmp_path) -> None:
    from index.images import find_images

    images = ["a.JPG", "b.jpeg", "c.Png", "d.webp", "e.tif", "deep/f.TIFF", "deep/g.bmp", "h.gif"]
    others = ["notes.txt", "raw.cr2", "jpg", "x.jpg.part", "deep/.DS_Store"]
    for name in images + others:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    expected = {tmp_path / name for name in images}
    assert set(list_images(tmp_path)) == expected
    assert set(find_images(tmp_path)) == expected
