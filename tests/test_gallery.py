"""The gallery store: round trip, upsert, id stability, crash safety, refusal, filtering, types."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from index.errors import (
    GalleryCorruptError,
    GalleryLockedError,
    GalleryMismatchError,
    GalleryNotFoundError,
    GalleryReadOnlyError,
)
from index.gallery import Gallery, ItemInput
from index.vectors import VectorIndex, faiss_gpu_available, ivf_params, resolve_index_type

DIM = 16
PREPROCESSING = {"image_size": 64, "resize_size": 72, "mean": [0.5] * 3, "std": [0.25] * 3}
REPO_ROOT = Path(__file__).resolve().parents[1]
# What ``auto`` picks for a large gallery on this machine (faiss has no GPU fast-scan).
LARGE_DEFAULT = "ivf_sq8" if faiss_gpu_available() else "ivf_fastscan"


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(start: int, stop: int, label_of=lambda i: None) -> list[ItemInput]:
    return [
        ItemInput(f"img/{i}.jpg", hashlib.sha256(f"{i}".encode()).hexdigest(), label_of(i))
        for i in range(start, stop)
    ]


def grids(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.random((7, 7)).astype(np.float32) for _ in range(n)]


def create(path: Path, **kwargs) -> Gallery:
    return Gallery.create(
        path, model_fingerprint="fp-a", preprocessing=PREPROCESSING, embedding_dim=DIM, **kwargs
    )


def test_round_trip_through_save_and_reopen(tmp_path: Path) -> None:
    vectors, weights = unit_vectors(50), grids(50)
    with create(tmp_path / "g") as gallery:
        result = gallery.add(vectors, weights, items(0, 50, lambda i: "even" if i % 2 else "odd"))
        gallery.save()
    assert result.added == 50 and result.duplicates == []
    with Gallery.open(tmp_path / "g", expected_fingerprint="fp-a") as gallery:
        assert len(gallery) == 50
        hits = gallery.search(vectors[:5], k=3)
        assert [row[0].id for row in hits] == result.ids[:5]
        assert all(row[0].rank == 1 for row in hits)
        assert all(row[0].score == pytest.approx(1.0, abs=1e-5) for row in hits)
        record = gallery.get(result.ids[7])
        assert record.source == "img/7.jpg" and record.label == "even"
        np.testing.assert_allclose(record.weights, weights[7], atol=1e-3)  # float16 storage
        np.testing.assert_array_equal(gallery.embedding(result.ids[7]), vectors[7])
        assert gallery.find_sha256(items(7, 8)[0].sha256) == result.ids[7]
        assert [r.id for r in gallery.get_many([result.ids[3], 10**9, result.ids[1]])] == [
            result.ids[3],
            result.ids[1],
        ]
        assert gallery.manifest.model_fingerprint == "fp-a"
        assert gallery.manifest.count == 50


def test_duplicates_are_skipped_or_updated_never_indexed_twice(tmp_path: Path) -> None:
    with create(tmp_path / "g") as gallery:
        first = gallery.add(unit_vectors(3), grids(3), items(0, 3))
        batch = [*items(2, 4), items(3, 4)[0]]  # 2 is known, 3 repeats within the call
        second = gallery.add(unit_vectors(3, seed=2), grids(3), batch)
        assert second.duplicates == [0, 2]
        assert second.ids[0] == first.ids[2] and second.ids[1] == second.ids[2]
        assert len(gallery) == 4
        renamed = ItemInput("moved/2.jpg", batch[0].sha256, "cat", {"note": 1})
        gallery.add(unit_vectors(1, seed=3), grids(1), [renamed])
        assert gallery.get(first.ids[2]).source == "img/2.jpg"  # skip leaves it alone
        gallery.add(unit_vectors(1, seed=3), grids(1), [renamed], on_duplicate="update")
        record = gallery.get(first.ids[2])
        assert (record.source, record.label, record.extra) == ("moved/2.jpg", "cat", {"note": 1})
        np.testing.assert_array_equal(gallery.embedding(first.ids[2]), unit_vectors(3)[2])
        assert len(gallery) == 4


def test_ids_beyond_64_bits_name_no_item(tmp_path: Path) -> None:
    with create(tmp_path / "g") as gallery:
        gallery.add(unit_vectors(2), grids(2), items(0, 2))
        huge = 2**70
        assert gallery.get(huge) is None and gallery.embedding(huge) is None
        assert [record.id for record in gallery.get_many([1, huge, -huge])] == [1]
        assert gallery.remove([huge]) == 0 and len(gallery) == 2


def test_ids_are_stable_and_never_reused_across_removes_and_saves(tmp_path: Path) -> None:
    vectors = unit_vectors(10)
    with create(tmp_path / "g") as gallery:
        ids = gallery.add(vectors, grids(10), items(0, 10)).ids
        assert gallery.remove([ids[-1], ids[2], 10**9]) == 2
        gallery.save()
    with Gallery.open(tmp_path / "g") as gallery:
        assert gallery.get(ids[2]) is None and gallery.embedding(ids[2]) is None
        assert gallery.search(vectors[4:5], k=1)[0][0].id == ids[4]
        new_id = gallery.add(unit_vectors(1, seed=9), grids(1), items(20, 21)).ids[0]
        assert new_id > max(ids)
        # Unsaved changes are in the database; reopening reconciles the index with them.
    with Gallery.open(tmp_path / "g") as gallery:
        assert len(gallery) == 9
        assert gallery.search(unit_vectors(1, seed=9), k=1)[0][0].id == new_id
        assert all(m.id != ids[2] for m in gallery.search(vectors[2:3], k=9)[0])


def test_refuses_a_gallery_from_another_model_or_preprocessing(tmp_path: Path) -> None:
    create(tmp_path / "g").close()
    with pytest.raises(GalleryMismatchError) as error:
        Gallery.open(tmp_path / "g", expected_fingerprint="fp-b")
    assert "fp-a" in str(error.value) and "fp-b" in str(error.value)
    other = {**PREPROCESSING, "image_size": 224}
    with pytest.raises(GalleryMismatchError, match="preprocessing"):
        Gallery.open(tmp_path / "g", expected_fingerprint="fp-a", expected_preprocessing=other)
    with pytest.raises(GalleryNotFoundError):
        Gallery.open(tmp_path / "missing")


def test_one_writer_many_readers(tmp_path: Path) -> None:
    with create(tmp_path / "g") as writer:
        writer.add(unit_vectors(4), grids(4), items(0, 4))
        with pytest.raises(GalleryLockedError):
            Gallery.open(tmp_path / "g")
        with Gallery.open(tmp_path / "g", read_only=True) as reader:
            assert len(reader) == 4
            with pytest.raises(GalleryReadOnlyError):
                reader.remove([1])


def test_bad_input_is_rejected_with_a_clear_error(tmp_path: Path) -> None:
    with create(tmp_path / "g") as gallery:
        with pytest.raises(ValueError, match="shape"):
            gallery.add(unit_vectors(2)[:, :8], grids(2), items(0, 2))
        with pytest.raises(ValueError, match="L2-normalised"):
            gallery.add(unit_vectors(2) * 2, grids(2), items(0, 2))
        with pytest.raises(ValueError, match="sha256"):
            gallery.add(unit_vectors(1), grids(1), [ItemInput("x", "not-a-hash")])
        with pytest.raises(ValueError, match="k must be positive"):
            gallery.search(unit_vectors(1), k=0)
        assert len(gallery) == 0


@pytest.mark.parametrize("index_type", ["flat", "ivf_fastscan", "ivf_sq8", "ivf", "ivf_flat"])
def test_label_filter_returns_k_results_of_a_rare_label(tmp_path: Path, index_type: str) -> None:
    vectors = unit_vectors(3000)
    with create(tmp_path / "g", index_type=index_type) as gallery:
        gallery.add(vectors, grids(3000), items(0, 3000, lambda i: "rare" if i % 250 == 0 else "x"))
        assert gallery.manifest.index_type == index_type
        rare = {r.id for r in gallery.get_many(range(1, 3001)) if r.label == "rare"}
        hits = gallery.search(vectors[:20], k=10, label="rare")
        assert all(len(row) == 10 and {m.id for m in row} <= rare for row in hits)
        scores = [m.score for m in hits[0]]
        assert scores == sorted(scores, reverse=True)
        assert gallery.search(vectors[:1], k=20, label="rare")[0].__len__() == len(rare)
        assert gallery.search(vectors[:1], k=3, label="absent") == [[]]


def test_auto_index_switches_to_ivf_past_the_threshold(tmp_path: Path) -> None:
    vectors = unit_vectors(2500)
    with create(tmp_path / "g", large_threshold=2000) as gallery:
        gallery.add(vectors[:1500], grids(1500), items(0, 1500))
        assert gallery.manifest.index_type == "flat"
        gallery.add(vectors[1500:], grids(1000), items(1500, 2500))
        assert gallery.manifest.index_type == LARGE_DEFAULT
        params = gallery.manifest.index_params
        # 8-bit codes + id, and for fast-scan its 4-bit codes of d/2 sub-quantisers + row number
        fastscan_bytes = DIM // 4 + 8 if LARGE_DEFAULT == "ivf_fastscan" else 0
        assert params["nlist"] > 1 and params["bytes_per_item"] == DIM + 8 + fastscan_bytes
        hits = gallery.search(vectors[::50], k=1)
        assert [row[0].id for row in hits] == list(range(1, 2501, 50))
        assert all(abs(row[0].score - 1) < 1e-2 for row in hits)  # scores from 8-bit codes
        gallery.remove(list(range(1, 1001)))  # shrinking does not flap back to flat
        gallery.save()
    with Gallery.open(tmp_path / "g") as gallery:
        assert gallery.manifest.index_type == LARGE_DEFAULT and len(gallery) == 1500


def test_auto_index_trades_speed_for_memory_past_the_compact_threshold(tmp_path: Path) -> None:
    vectors = unit_vectors(6000)
    with create(tmp_path / "g", large_threshold=1000, compact_threshold=5000) as gallery:
        gallery.add(vectors[:1200], grids(1200), items(0, 1200))
        assert gallery.manifest.index_type == LARGE_DEFAULT
        assert gallery.manifest.index_params["trained_on"] == 1200
        gallery.add(vectors[1200:4000], grids(2800), items(1200, 4000))
        assert gallery.manifest.index_type == LARGE_DEFAULT  # grown, not 4x its training size
        gallery.add(vectors[4000:], grids(2000), items(4000, 6000))
        assert gallery.manifest.index_type == "ivf"  # retrained as what 6,000 items call for
        assert gallery.manifest.index_params["compact_threshold"] == 5000
        gallery.configure_search(nprobe=gallery.manifest.index_params["nlist"])
        hits = gallery.search(vectors[::500], k=1)
        assert [row[0].id for row in hits] == list(range(1, 6001, 500))
    with pytest.raises(ValueError, match="compact_threshold"):
        create(tmp_path / "bad", large_threshold=10, compact_threshold=5)


_SAVER = """
import hashlib, sys, numpy as np
from index.gallery import Gallery, ItemInput
gallery = Gallery.open(sys.argv[1])
rng = np.random.default_rng(5)
for step in range(10**6):
    x = rng.standard_normal((1, {dim})).astype(np.float32)
    x /= np.linalg.norm(x)
    sha = hashlib.sha256(f"loop-{{step}}".encode()).hexdigest()
    gallery.add(x, [np.zeros((7, 7))], [ItemInput("loop", sha)])
    print("saving", flush=True)
    gallery.save()
"""


def test_a_kill_during_save_leaves_a_loadable_consistent_gallery(tmp_path: Path) -> None:
    n = 60_000  # big enough that writing the index dominates the loop
    with create(tmp_path / "g") as gallery:
        gallery.add(unit_vectors(n), [np.zeros((2, 2))] * n, items(0, n))
        gallery.save()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for delay in (0.0, 0.05, 0.13):
        process = subprocess.Popen(
            [sys.executable, "-c", _SAVER.format(dim=DIM), str(tmp_path / "g")],
            stdout=subprocess.PIPE,
            env=env,
        )
        for _ in range(2):
            assert process.stdout.readline() == b"saving\n"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        with Gallery.open(tmp_path / "g") as gallery:
            assert len(gallery) >= n + 1
            assert gallery.search(unit_vectors(3), k=1)[0][0].id == 1
            probe = gallery.embedding(len(gallery))
            assert gallery.search(probe[None], k=1)[0][0].id == len(gallery)
        leftovers = [p.name for p in (tmp_path / "g" / "snapshots").iterdir()]
        assert not [name for name in leftovers if name.startswith(".tmp-")]
        assert len(leftovers) <= 3


def test_searches_from_threads_while_one_thread_writes(tmp_path: Path) -> None:
    import threading

    vectors = unit_vectors(400)
    with create(tmp_path / "g") as gallery:
        gallery.add(vectors[:200], grids(200), items(0, 200))
        errors: list[BaseException] = []

        def read() -> None:
            try:
                for row in range(50):
                    hits = gallery.search(vectors[row : row + 1], k=1)[0]
                    assert hits[0].id == row + 1
            except BaseException as error:
                errors.append(error)

        readers = [threading.Thread(target=read) for _ in range(3)]
        for thread in readers:
            thread.start()
        for start in range(200, 400, 20):
            gallery.add(vectors[start : start + 20], grids(20), items(start, start + 20))
        for thread in readers:
            thread.join()
        assert errors == [] and len(gallery) == 400


@pytest.mark.gpu
def test_gpu_search_matches_exact_search(tmp_path: Path) -> None:
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss is the CPU build; install faiss-gpu to search on the GPU")
    vectors = unit_vectors(5000)
    with create(tmp_path / "g") as gallery:
        gallery.add(vectors, grids(5000), items(0, 5000))
        hits = gallery.search(vectors[:50], k=10)
        assert gallery.search_device == "gpu"
    exact = np.argsort(-(vectors[:50] @ vectors.T), axis=1)[:, :10] + 1
    assert [[m.id for m in row] for row in hits] == exact.tolist()


@pytest.mark.gpu
def test_gpu_copy_of_a_wide_product_code_index_searches() -> None:
    # 64 sub-quantisers need float16 lookup tables on the GPU; an option the cloner does not
    # know would be dropped silently and the copy refused.
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss is the CPU build; install faiss-gpu to search on the GPU")
    dim = 256
    x = np.random.default_rng(0).standard_normal((4000, dim)).astype(np.float32)
    vectors = x / np.linalg.norm(x, axis=1, keepdims=True)
    index = VectorIndex.trained_ivf(dim, len(vectors), vectors, index_type="ivf")
    assert index.params["m"] == 64
    index.add(np.arange(len(vectors)), vectors)
    index.set_nprobe(int(index.params["nlist"]))
    _, ids = index.search(vectors[:50], 10)
    assert index.on_gpu
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9


def _exact_top(queries: np.ndarray, vectors: np.ndarray, k: int) -> list[list[int]]:
    return (np.argsort(-(queries @ vectors.T), axis=1)[:, :k] + 1).tolist()


def test_ivf_pq_reranks_candidates_to_exact_scores_in_little_memory(tmp_path: Path) -> None:
    vectors, queries = unit_vectors(4000), unit_vectors(40, seed=7)
    with create(tmp_path / "g", index_type="ivf", rerank=30) as gallery:
        gallery.add(vectors, grids(4000), items(0, 4000))
        params = gallery.manifest.index_params
        assert gallery.manifest.index_type == "ivf" and params["m"] == DIM // 4
        assert params["bytes_per_item"] == params["m"] + 8  # PQ codes + id, not 4·d + 8
        gallery.configure_search(nprobe=params["nlist"])  # isolate the PQ + re-rank stage
        hits = gallery.search(queries, k=10)
        for query, row in zip(queries, hits, strict=True):
            exact = vectors[[m.id - 1 for m in row]] @ query
            np.testing.assert_allclose([m.score for m in row], exact, rtol=0, atol=1e-6)
            assert [m.rank for m in row] == list(range(1, 11))
            assert [m.score for m in row] == sorted((m.score for m in row), reverse=True)
        truth = _exact_top(queries, vectors, 10)
        found = [[m.id for m in row] for row in hits]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
        assert recall >= 0.95
        gallery.configure_search(rerank=1)  # k candidates only: the PQ order alone is worse
        coarse = [[m.id for m in row] for row in gallery.search(queries, k=10)]
        worse = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(coarse, truth, strict=True)])
        assert worse < recall
        removed = found[0][0]
        assert gallery.remove([removed]) == 1
        assert all(m.id != removed for m in gallery.search(queries[:1], k=10)[0])
        gallery.save()
    with Gallery.open(tmp_path / "g") as gallery:
        assert gallery.manifest.index_params["rerank"] == 1 and len(gallery) == 3999
        assert gallery.search(vectors[5:6], k=1)[0][0].id == 6


def test_index_types_report_their_memory_per_item(tmp_path: Path) -> None:
    with create(tmp_path / "flat") as gallery:
        assert gallery.manifest.index_params["bytes_per_item"] == 4 * DIM + 8
        with pytest.raises(ValueError, match="IVF"):
            gallery.configure_search(nprobe=4)
        with pytest.raises(ValueError, match="rerank"):
            gallery.configure_search(rerank=0)
    with create(tmp_path / "ivf_flat", index_type="ivf_flat") as gallery:
        gallery.add(unit_vectors(1200), grids(1200), items(0, 1200))
        assert gallery.manifest.index_type == "ivf_flat"
        assert gallery.manifest.index_params["bytes_per_item"] == 4 * DIM + 8
    with pytest.raises(ValueError, match="rerank"):
        create(tmp_path / "bad", rerank=0)


def test_reopen_rebuilds_straight_to_the_type_the_database_has_outgrown(tmp_path: Path) -> None:
    vectors = unit_vectors(2500)
    with create(tmp_path / "g", large_threshold=2000, compact_threshold=2000) as gallery:
        gallery.add(vectors[:1500], grids(1500), items(0, 1500))
        gallery.save()
        gallery.add(vectors[1500:], grids(1000), items(1500, 2500))  # switches, never saved
    with Gallery.open(tmp_path / "g") as gallery:
        assert gallery.manifest.index_type == "ivf" and len(gallery) == 2500
        assert gallery.manifest.index_params["trained_on"] == 2500
        gallery.configure_search(nprobe=gallery.manifest.index_params["nlist"])
        hits = gallery.search(vectors[1500::100], k=1)
        assert [row[0].id for row in hits] == list(range(1501, 2501, 100))


def test_auto_picks_fastscan_on_a_cpu_and_scalar_codes_where_faiss_searches_on_a_gpu() -> None:
    assert resolve_index_type("auto", 200_000, gpu=False) == "ivf_fastscan"
    assert resolve_index_type("auto", 200_000, gpu=True) == "ivf_sq8"
    assert resolve_index_type("auto", 50_000, gpu=False) == "flat"
    assert resolve_index_type("auto", 30_000_000, gpu=False) == "ivf"
    assert resolve_index_type("ivf_fastscan", 500) == "flat"  # too few items to train


def test_ivf_fastscan_refines_to_scalar_code_scores_and_keeps_ids_through_removes(
    tmp_path: Path,
) -> None:
    vectors, queries = unit_vectors(4000), unit_vectors(40, seed=7)
    truth = _exact_top(queries, vectors, 10)
    with create(tmp_path / "g", index_type="ivf_fastscan") as gallery:
        gallery.add(vectors, grids(4000), items(0, 4000))
        params = gallery.manifest.index_params
        assert gallery.manifest.index_type == "ivf_fastscan" and params["m"] == DIM // 2
        assert params["refine"] == 32 and params["nbits"] == 4
        gallery.configure_search(nprobe=params["nlist"])  # isolate the codes + refine stage
        hits = gallery.search(queries, k=10)
        for query, row in zip(queries, hits, strict=True):
            exact = vectors[[m.id - 1 for m in row]] @ query
            np.testing.assert_allclose([m.score for m in row], exact, rtol=0, atol=2e-2)
            assert [m.score for m in row] == sorted((m.score for m in row), reverse=True)
        found = [[m.id for m in row] for row in hits]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
        assert recall >= 0.9
        gallery.configure_search(refine=1)  # the 4-bit codes' own order is worse
        coarse = [[m.id for m in row] for row in gallery.search(queries, k=10)]
        worse = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(coarse, truth, strict=True)])
        assert worse < recall
        with pytest.raises(ValueError, match="refine"):
            gallery.configure_search(refine=0)
        removed = [row[0] for row in found[:5]]
        assert gallery.remove(removed) == 5 and gallery.remove(removed) == 0
        assert not {m.id for row in gallery.search(queries, k=10) for m in row} & set(removed)
        gallery.add(unit_vectors(3, seed=9), grids(3), items(5000, 5003))  # rows appended
        assert gallery.search(unit_vectors(3, seed=9), k=1)[2][0].id == 4003
        gallery.save()
    with Gallery.open(tmp_path / "g") as gallery:
        assert gallery.manifest.index_params["refine"] == 1 and len(gallery) == 3998
        assert gallery.search(vectors[5:6], k=1)[0][0].id == 6
        assert gallery.search(unit_vectors(3, seed=9), k=1)[2][0].id == 4003
        assert not {m.id for row in gallery.search(queries, k=10) for m in row} & set(removed)
        assert gallery.search(queries[:2], k=5, label="absent") == [[], []]


def test_ivf_fastscan_reclaims_removed_rows_by_rebuilding(tmp_path: Path) -> None:
    vectors = unit_vectors(3000)
    with create(tmp_path / "g", index_type="ivf_fastscan") as gallery:
        gallery.add(vectors, grids(3000), items(0, 3000))
        gallery.remove(list(range(1, 1401)))  # 47 % of the rows dead: kept
        assert gallery.manifest.index_params["trained_on"] == 3000
        gallery.remove(list(range(1401, 1601)))  # 53 %: rebuilt from the 1,400 live items
        assert gallery.manifest.index_type == "ivf_fastscan"
        assert gallery.manifest.index_params["trained_on"] == 1400 and len(gallery) == 1400
        gallery.configure_search(nprobe=gallery.manifest.index_params["nlist"])
        hits = gallery.search(vectors[1600::100], k=1)
        assert [row[0].id for row in hits] == list(range(1601, 3001, 100))
        gallery.remove(list(range(1601, 2701)))  # 300 left: too few to train, back to exact
        assert gallery.manifest.index_type == "flat" and len(gallery) == 300


def test_a_fastscan_gallery_without_its_row_table_is_reported_corrupt(tmp_path: Path) -> None:
    with create(tmp_path / "g", index_type="ivf_fastscan") as gallery:
        gallery.add(unit_vectors(1200), grids(1200), items(0, 1200))
        gallery.save()
    (tmp_path / "g" / "current" / "index.rows.npy").unlink()
    with pytest.raises(GalleryCorruptError, match="index"):
        Gallery.open(tmp_path / "g")


@pytest.mark.parametrize("count", [1_000, 120_000, 1_000_000, 10_000_000, 19_999_999])
def test_ivf_fastscan_scans_about_twice_what_ivf_sq8_scans(count: int) -> None:
    params = ivf_params(count, "ivf_fastscan", 512)
    assert params["m"] == 256 and params["nlist"] == ivf_params(count, "ivf_sq8", 512)["nlist"]
    scanned = count * params["nprobe"] / params["nlist"]
    assert params["nprobe"] == params["nlist"] or scanned >= 16_000


@pytest.mark.parametrize("count", [1_000, 120_000, 1_000_000, 10_000_000, 19_999_999])
def test_ivf_sq8_lists_and_probes_scan_a_steady_number_of_items(count: int) -> None:
    params = ivf_params(count, "ivf_sq8", 512)
    nlist, nprobe = params["nlist"], params["nprobe"]
    assert nlist & (nlist - 1) == 0 and nlist <= 8 * count**0.5 and count / nlist >= 39
    assert 16 <= nprobe <= nlist
    scanned = count * nprobe / nlist
    assert scanned >= min(count, 8_000) and (nprobe == 16 or scanned < 8_000 + count / nlist)
