"""The sha256 dedupe lookup kept as sorted runs (index/sha_runs.py): every stored hash is found
with its id whatever the batch sizes, runs stay logarithmic in number, removed items are not
found, and another connection sees each new run."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np

from index.metadata import ItemRow, MetadataStore

DIM = 4


def sha(number: int) -> str:
    return hashlib.sha256(b"%d" % number).hexdigest()


def rows(hashes: list[str]) -> list[ItemRow]:
    vector, grid = np.ones(DIM, np.float32), np.zeros((2, 2), np.float32)
    return [ItemRow(f"{h[:8]}.jpg", h, None, "", {}, vector, grid) for h in hashes]


def run_sizes(path: Path) -> list[int]:
    """Each run's length, checking that its keys are sorted."""
    with sqlite3.connect(path) as db:
        runs = [np.frombuffer(k, "<u8") for (k,) in db.execute("SELECT keys FROM sha_runs")]
    assert all((keys[1:] >= keys[:-1]).all() for keys in runs)
    return [len(keys) for keys in runs]


def test_every_hash_is_found_with_its_id_and_runs_stay_few(tmp_path: Path) -> None:
    path = tmp_path / "items.sqlite"
    store = MetadataStore(path, create=True)
    ids: dict[str, int] = {}
    rng = np.random.default_rng(0)
    number = 0
    for _ in range(60):
        batch = [sha(number + i) for i in range(int(rng.integers(1, 40)))]
        number += len(batch)
        ids.update(zip(batch, store.insert(rows(batch)), strict=True))
    assert store.find_sha256(list(ids)) == ids
    assert store.find_sha256([sha(-1), sha(number)]) == {}
    sizes = run_sizes(path)
    assert sum(sizes) == len(ids)
    assert len(sizes) <= int(np.log2(len(ids))) + 1
    store.close()


def test_removed_items_are_not_found_and_their_hash_can_return(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "items.sqlite", create=True)
    first = store.insert(rows([sha(0), sha(1)]))
    store.delete([first[0]])
    assert store.find_sha256([sha(0), sha(1)]) == {sha(1): first[1]}
    again = store.insert(rows([sha(0)]))
    assert again[0] > first[1]
    assert store.find_sha256([sha(0)]) == {sha(0): again[0]}
    store.close()


def test_hashes_sharing_their_first_64_bits_stay_apart(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "items.sqlite", create=True)
    twins = ["ab" * 8 + "0" * 48, "ab" * 8 + "f" * 48]
    first = store.insert(rows(twins[:1]))[0]
    assert store.find_sha256(twins) == {twins[0]: first}
    second = store.insert(rows(twins[1:]))[0]
    assert store.find_sha256(twins) == {twins[0]: first, twins[1]: second}
    store.close()


def test_a_reader_sees_the_writers_new_and_merged_runs(tmp_path: Path) -> None:
    path = tmp_path / "items.sqlite"
    writer = MetadataStore(path, create=True)
    reader = MetadataStore(path, read_only=True)
    stored: dict[str, int] = {}
    for number in range(0, 64, 8):
        batch = [sha(number + i) for i in range(8)]
        stored.update(zip(batch, writer.insert(rows(batch)), strict=True))
        assert reader.find_sha256(list(stored)) == stored
    assert run_sizes(path) == [64]  # eight runs of 8 merged into one
    reader.close()
    writer.close()
