"""Item limits: labels and metadata are bounded where they are written, and stored data that
breaks the bounds (hostile, or from before them) cannot break reads, searches or the service."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from index.errors import GalleryError, InvalidItemError
from index.gallery import Gallery, ItemInput
from index.limits import (
    MAX_LABEL_BYTES,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    UNREADABLE_METADATA,
)
from tests.test_gallery import create, grids, items, unit_vectors
from tests.test_service_support import ServiceAssets, drawn_image, png_bytes


def nested(depth: int) -> dict[str, Any]:
    """A dict nested ``depth`` levels deep, built without recursion."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def nested_list(depth: int) -> list[Any]:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def alternating(depth: int) -> dict[str, Any]:
    """Objects and arrays in turn, ``depth`` levels in all."""
    value: Any = "leaf"
    for level in range(depth - 1):
        value = [value] if level % 2 == 0 else {"a": value}
    return {"top": value}


def nested_text(depth: int) -> str:
    return '{"a": ' * (depth - 1) + '{"leaf": 1}' + "}" * (depth - 1)


def metadata_of_size(size: int) -> dict[str, str]:
    """An object whose JSON text is exactly ``size`` bytes."""
    empty = len(json.dumps({"pad": ""}))
    return {"pad": "x" * (size - empty)}


def with_item(position: int, label: Any = None, extra: Any = None) -> list[ItemInput]:
    """Three new items, the one at ``position`` carrying ``label`` and ``extra``."""
    batch = items(100, 103)
    batch[position] = ItemInput(batch[position].source, batch[position].sha256, label, extra)
    return batch


def test_labels_and_metadata_at_the_limits_are_stored_whole(tmp_path: Path) -> None:
    label = "é" * (MAX_LABEL_BYTES // 2)  # two bytes each: exactly the limit
    deep = nested(MAX_METADATA_DEPTH)
    mixed = alternating(MAX_METADATA_DEPTH)
    large = metadata_of_size(MAX_METADATA_BYTES)
    brackets = {"list": [[[1]]], "s": '{[{["\\' + "[" * 40}  # brackets in strings do not count
    with create(tmp_path / "g") as gallery:
        ids = gallery.add(
            unit_vectors(4),
            grids(4),
            [
                ItemInput("a", items(0, 1)[0].sha256, label, deep),
                ItemInput("b", items(1, 2)[0].sha256, None, large),
                ItemInput("c", items(2, 3)[0].sha256, "plain", brackets),
                ItemInput("d", items(3, 4)[0].sha256, None, mixed),
            ],
        ).ids
        gallery.save()
    with Gallery.open(tmp_path / "g", read_only=True) as gallery:
        first, second, third, fourth = gallery.get_many(ids)
        assert first.label == label and first.extra == deep
        assert second.extra == large
        assert third.extra == brackets
        assert fourth.extra == mixed


@pytest.mark.parametrize(
    ("label", "extra", "field", "reason"),
    [
        ("x" * (MAX_LABEL_BYTES + 1), None, "label", f"limit is {MAX_LABEL_BYTES} bytes"),
        ("é" * (MAX_LABEL_BYTES // 2) + "x", None, "label", "limit is"),
        (7, None, "label", "must be text"),
        ("\ud800", None, "label", "not valid Unicode"),
        (None, nested(MAX_METADATA_DEPTH + 1), "metadata", "deeper than 32"),
        (None, nested(100_000), "metadata", "deeper than 32"),
        (None, {"a": nested_list(MAX_METADATA_DEPTH)}, "metadata", "deeper than 32"),
        (None, alternating(MAX_METADATA_DEPTH + 1), "metadata", "deeper than 32"),
        (None, metadata_of_size(MAX_METADATA_BYTES + 1), "metadata", "limit is 65536 bytes"),
        (None, {"x": float("nan")}, "metadata", "not plain JSON"),
        (None, {"x": float("inf")}, "metadata", "not plain JSON"),
        (None, {"x": {1, 2}}, "metadata", "not plain JSON"),
        (None, [1, 2], "metadata", "must be a JSON object"),
    ],
)
def test_over_the_limits_is_refused_and_nothing_of_the_call_is_written(
    tmp_path: Path, label: Any, extra: Any, field: str, reason: str
) -> None:
    with create(tmp_path / "g") as gallery:
        gallery.add(unit_vectors(1), grids(1), items(0, 1))
        with pytest.raises(InvalidItemError, match=reason) as caught:
            gallery.add(unit_vectors(3, seed=1), grids(3), with_item(1, label, extra))
        assert (caught.value.position, caught.value.field) == (1, field)
        assert str(caught.value).startswith(f"item 1: {field} ")
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, GalleryError)
        assert len(gallery) == 1 and gallery.find_sha256(with_item(1)[0].sha256) is None


def test_a_cycle_in_metadata_is_refused_not_recursed(tmp_path: Path) -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with create(tmp_path / "g") as gallery, pytest.raises(InvalidItemError, match="Circular"):
        gallery.add(unit_vectors(3), grids(3), with_item(2, "x", loop))


def test_an_upsert_over_the_limits_leaves_the_stored_item_alone(tmp_path: Path) -> None:
    with create(tmp_path / "g") as gallery:
        item_id = gallery.add(
            unit_vectors(1), grids(1), [ItemInput("a", items(0, 1)[0].sha256, "l", {"k": 1})]
        ).ids[0]
        hostile = ItemInput("moved", items(0, 1)[0].sha256, "l2", nested(40))
        with pytest.raises(InvalidItemError):
            gallery.add(unit_vectors(1), grids(1), [hostile], on_duplicate="update")
        record = gallery.get(item_id)
        assert (record.source, record.label, record.extra) == ("a", "l", {"k": 1})


# Stored values a gallery written before the limits, or edited by hand, may hold.
HOSTILE_STORED = {
    "500 deep": (nested_text(500), "nested deeper than 32"),
    "9,000 deep (past the recursion limit)": (nested_text(9_000), "nested deeper than 32"),
    "200 KB": (json.dumps({"pad": "x" * 200_000}), "over the 65536-byte limit"),
    "NaN": ('{"x": NaN}', "not valid JSON"),
    "not JSON": ("{'x': 1", "not valid JSON"),
    "a list": ("[1, 2]", "not an object"),
}


def poison(database: Path, values: list[tuple[int, str]], label: tuple[int, str]) -> None:
    with sqlite3.connect(database) as db:
        db.executemany("UPDATE items SET extra = ? WHERE id = ?", [(v, i) for i, v in values])
        db.execute("UPDATE items SET label = ? WHERE id = ?", (label[1], label[0]))
    db.close()


def test_stored_hostile_metadata_cannot_break_reads_or_searches(tmp_path: Path) -> None:
    vectors = unit_vectors(10)
    with create(tmp_path / "g") as gallery:
        ids = gallery.add(vectors, grids(10), items(0, 10, lambda i: "ok")).ids
        gallery.save()
    hostile = dict(zip(ids, HOSTILE_STORED.values(), strict=False))
    huge_label_id = ids[7]
    poison(
        tmp_path / "g" / "items.sqlite",
        [(item_id, text) for item_id, (text, _) in hostile.items()],
        (huge_label_id, "Ω" * 3_000_000),
    )
    for read_only in (True, False):
        with Gallery.open(tmp_path / "g", read_only=read_only) as gallery:
            hits = gallery.search(vectors, k=10)
            assert [row[0].id for row in hits] == ids
            records = {r.id: r for r in gallery.get_many([m.id for m in hits[0]])}
            assert set(records) == set(ids)
            for item_id, (_, reason) in hostile.items():
                extra = gallery.get(item_id).extra
                assert list(extra) == [UNREADABLE_METADATA] and reason in extra[UNREADABLE_METADATA]
            for record in records.values():  # every record serialises, as a response would
                json.dumps(record.extra, allow_nan=False)
            assert records[ids[8]].extra == {}
            label = records[huge_label_id].label
            assert label.endswith("…") and len(label.encode()) <= MAX_LABEL_BYTES
            assert label.startswith("Ω" * 100)


def test_the_service_answers_for_items_stored_with_hostile_metadata(
    service_assets: ServiceAssets, tmp_path: Path
) -> None:
    from app.service.main import create_app

    own = tmp_path / "gallery"
    shutil.copytree(service_assets.gallery_full, own, symlinks=True)
    with Gallery.open(own, read_only=True) as gallery:
        count = len(gallery)
        every = gallery.get_many(range(1, count + 3))
    poison(
        own / "items.sqlite",
        [(r.id, nested_text(500)) for r in every],
        (every[0].id, "L" * 6_000_000),
    )
    with TestClient(create_app(service_assets.settings(gallery=own))) as client:
        for record in every[:3]:
            response = client.get(f"/v1/gallery/{record.id}")
            assert response.status_code == 200, response.text
            assert UNREADABLE_METADATA in response.json()["metadata"]
        query = png_bytes(drawn_image("red", 0))
        found = client.post(
            "/v1/search", files={"image": ("q", query, "image/png")}, data={"k": "20"}
        )
        assert found.status_code == 200, found.text
        matches = found.json()["matches"]
        assert len(matches) == min(count, 20)
        assert all(UNREADABLE_METADATA in m["metadata"] for m in matches)
        assert len(found.content) < 20 * (MAX_LABEL_BYTES + 4096)
