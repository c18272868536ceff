"""Gallery search benchmark: the large-gallery index against exact search (the bulk job's
benchmark is bench/bulk.py).

``python -m bench.index search [--n 1000000]``: clustered unit vectors with the spread of real
embeddings, on two data sets: ``easy`` (a few thousand independent centres on the sphere, equal
cluster sizes; same-cluster cosine 0.5-0.8) and ``hard`` (centres grouped in families whose
members overlap, cluster sizes from a long-tailed Zipf law, wider noise). For each, a real
gallery is filled through its SQLite store and reopened, which builds the index ``auto`` picks
for that size (``ivf_sq8`` at 1M items; ``--index-type ivf`` for the compact IVF-PQ tier, whose
search adds an exact re-rank that reads candidates' embeddings back from SQLite);
``Gallery.search`` is compared with exact flat search: recall@10 and queries/s side by side,
over an ``nprobe`` (x ``rerank`` for ``ivf``) sweep, and the index's RAM per item.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = REPO_ROOT / ".cache" / "bench-index"
DATASETS = ("easy", "hard")
_BLOCK = 100_000


def machine() -> str:
    import faiss
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}, "
        f"faiss {faiss.__version__} ({faiss.get_num_gpus()} faiss GPUs), torch {torch.__version__}"
    )


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@dataclass(frozen=True)
class Clusters:
    """Where items are drawn: ``normalise(centre + noise)``, noise energy ``spread`` per
    cluster, a cluster picked with probability ``share``; ``axes`` (scaled rows) shapes the noise
    when it is not isotropic."""

    centres: np.ndarray
    spread: np.ndarray
    share: np.ndarray
    axes: np.ndarray | None = None

    @classmethod
    def easy(cls, rng: np.random.Generator, clusters: int, dim: int) -> Clusters:
        """Independent centres (nearly orthogonal in high dimension), equal sizes, isotropic."""
        centres = _normalised(rng.standard_normal((clusters, dim), dtype=np.float32))
        # same-cluster cosine ≈ 1 / (1 + s), s the noise energy: s in [0.25, 1] gives 0.5-0.8
        spread = rng.uniform(0.25, 1.0, clusters).astype(np.float32)
        return cls(centres, spread, np.full(clusters, 1.0 / clusters))

    @classmethod
    def hard(cls, rng: np.random.Generator, clusters: int, dim: int) -> Clusters:
        """Families of ~30 sibling clusters whose centres have cosine ≈ 0.5 with each other,
        Zipf(1.1) cluster sizes in random order, same-cluster cosine 0.4-0.75, and noise that,
        like a trained network's, spends its energy unevenly: variance ∝ 1/i along random
        orthogonal axes (about 30 effective dimensions of 512)."""
        families = _normalised(rng.standard_normal((max(1, clusters // 30), dim), np.float32))
        family = rng.integers(0, len(families), clusters)
        offset = rng.standard_normal((clusters, dim), dtype=np.float32) / np.sqrt(dim)
        centres = _normalised(families[family] + offset)
        spread = rng.uniform(0.33, 1.5, clusters).astype(np.float32)
        share = rng.permutation(1.0 / np.arange(1, clusters + 1) ** 1.1)
        energy = 1.0 / np.arange(1, dim + 1)
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        axes = (np.sqrt(energy * dim / energy.sum())[:, None] * rotation.T).astype(np.float32)
        return cls(centres, spread, share / share.sum(), axes)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        dim = self.centres.shape[1]
        out = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, _BLOCK):
            m = min(_BLOCK, n - start)
            owner = rng.choice(len(self.centres), m, p=self.share)
            noise = rng.standard_normal((m, dim), dtype=np.float32)
            if self.axes is not None:
                noise = noise @ self.axes
            block = self.centres[owner] + noise * np.sqrt(self.spread[owner] / dim)[:, None]
            out[start : start + m] = _normalised(block)
        return out

    def describe(self, rng: np.random.Generator) -> str:
        """Typical cosines within a cluster and to the nearest other cluster, size skew."""
        one = Clusters(self.centres[:1], self.spread[:1], np.ones(1), self.axes).draw(rng, 2)
        nearest = np.sort(self.centres[:200] @ self.centres.T, axis=1)[:, -2]
        largest = float(self.share.max() * len(self.share))
        return (
            f"example same-cluster cosine {float(one[0] @ one[1]):.2f}, centre cosine to the "
            f"nearest other centre {float(np.median(nearest)):.2f} (median), largest cluster "
            f"{largest:.0f}x the mean size"
        )


def timed(search, queries: np.ndarray, repeats: int):
    """Queries/s (median of ``repeats`` runs) and the last result."""
    rates, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = search(queries)
        rates.append(len(queries) / (time.perf_counter() - started))
    return statistics.median(rates), result


def fill_gallery(directory: Path, vectors: np.ndarray, index_type: str) -> None:
    """A gallery whose SQLite store holds ``vectors`` (ids 1..n) and whose saved index is still
    the empty one it was created with: the next open builds the large index from the store."""
    from index.gallery import DATABASE, Gallery
    from index.metadata import ItemRow, MetadataStore

    Gallery.create(
        directory,
        model_fingerprint="bench",
        preprocessing={},
        embedding_dim=vectors.shape[1],
        index_type=index_type,
    ).close()
    store = MetadataStore(directory / DATABASE)
    grid = np.zeros((7, 7), dtype=np.float32)
    for start in tqdm(range(0, len(vectors), _BLOCK // 2), desc="SQLite", unit="block"):
        stop = min(len(vectors), start + _BLOCK // 2)
        store.insert(
            [
                ItemRow(f"{i}", hashlib.sha256(b"%d" % i).hexdigest(), None, "", {}, v, grid)
                for i, v in zip(range(start, stop), vectors[start:stop], strict=True)
            ]
        )
    store.checkpoint()
    store.close()


def bench_search(
    n: int,
    dim: int,
    clusters: int,
    queries: int,
    k: int,
    dataset: str,
    scratch: Path,
    index_type: str,
) -> None:
    import faiss

    from index.gallery import INDEX_FILE, Gallery
    from index.snapshot import current_snapshot

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    source = getattr(Clusters, dataset)(rng, clusters, dim)
    base = source.draw(rng, n)
    probe = source.draw(rng, queries)
    print(
        f"\n== {dataset}: {n} x {dim}, {clusters} clusters, {queries} queries, k={k} "
        f"({time.perf_counter() - started:.0f} s to draw)\n{source.describe(rng)}"
    )
    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    exact_search = functools.partial(exact.search, k=k)
    exact_before, (_, truth) = timed(exact_search, probe, repeats=1)
    print(f"exact flat: {exact_before:.1f} queries/s")

    directory = scratch / f"gallery-{dataset}"
    started = time.perf_counter()
    fill_gallery(directory, base, index_type)
    filled = time.perf_counter() - started
    del base
    started = time.perf_counter()
    gallery = Gallery.open(directory)
    built = time.perf_counter() - started
    params = gallery.manifest.index_params
    file_bytes = (current_snapshot(directory) / INDEX_FILE).stat().st_size
    print(
        f"SQLite store filled in {filled:.0f} s; open built {gallery.manifest.index_type} "
        f"{params} in {built:.0f} s (train + add, read from SQLite)"
    )
    gallery.save()
    saved = (current_snapshot(directory) / INDEX_FILE).stat().st_size
    print(
        f"index RAM per item: {params['bytes_per_item']} B (codes + id); saved index file "
        f"{saved / n:.1f} B/item incl. centroids and codebooks (empty index was {file_bytes} B); "
        f"full vectors would be {4 * dim + 8} B/item"
    )
    # The knobs this type has: nprobe always; candidates re-scored from SQLite (ivf, "rerank")
    # or from the in-RAM 8-bit codes (ivf_fastscan, "refine").
    knob = {"ivf": "rerank", "ivf_fastscan": "refine"}.get(gallery.manifest.index_type)
    default = {"nprobe": int(params["nprobe"])}
    if knob:
        default[knob] = int(params[knob])
    settings = [{**default, "nprobe": default["nprobe"] * f} for f in (0.5, 1, 2)]
    if knob:
        settings += [{**default, knob: r} for r in (1, 4, 16, 64) if r != default[knob]]
    rows = []
    for setting in tqdm(sorted(settings, key=lambda c: tuple(c.values())), desc="sweep"):
        setting = {name: int(value) for name, value in setting.items()}
        gallery.configure_search(**setting)
        qps, hits = timed(lambda q: gallery.search(q, k), probe, repeats=3)
        found = [[m.id - 1 for m in row] for row in hits]  # ids are rows + 1
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])
        rows.append((setting, recall, qps))
    # Exact search timed again after the sweep: a ratio is only as good as its baseline, so the
    # faster of the two timings is the one divided by (the conservative ratio).
    exact_after, _ = timed(exact_search, probe, repeats=1)
    exact_qps = max(exact_before, exact_after)
    print(f"exact flat after the sweep: {exact_after:.1f} queries/s; ratios use {exact_qps:.1f}")
    print(f"| nprobe | {knob or '-'} | recall@10 | queries/s | vs exact |")
    for setting, recall, qps in rows:
        mark = "  <- default" if setting == default else ""
        print(
            f"| {setting['nprobe']} | {setting.get(knob, '-')} | {recall:.4f} | {qps:.1f} | "
            f"{qps / exact_qps:.1f}x |{mark}"
        )
    gallery.close()
    del exact
    shutil.rmtree(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="which", required=True)
    search = sub.add_parser("search")
    search.add_argument("--n", type=int, default=1_000_000)
    search.add_argument("--dim", type=int, default=512)
    search.add_argument("--clusters", type=int, default=3000)
    search.add_argument("--queries", type=int, default=1000)
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--data", choices=(*DATASETS, "both"), default="both")
    search.add_argument("--scratch", type=Path, default=CACHE, help="where galleries are built")
    search.add_argument(
        "--index-type", default="auto", help="auto (what the gallery picks for --n) or a type"
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    args.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for dataset in DATASETS if args.data == "both" else (args.data,):
            bench_search(
                args.n,
                args.dim,
                args.clusters,
                args.queries,
                args.k,
                dataset,
                Path(scratch),
                args.index_type,
            )


if __name__ == "__main__":
    main()
