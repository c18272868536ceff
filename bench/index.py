"""Gallery benchmarks: (a) the large-gallery index against exact search, (b) bulk-job throughput.

(a) ``python -m bench.index search [--n 1000000]``: clustered unit vectors with the spread of real
embeddings (a few thousand centres on the sphere; same-cluster cosine 0.5-0.8), the gallery's
default large index (``ivf`` with the parameters ``index.vectors.ivf_params`` picks) against
exact flat search: recall@10 and queries/s side by side, with a small ``nprobe`` sweep.

(b) ``python -m bench.index build [--images 1000]``: ``build_gallery`` over real CIFAR-10 JPEGs
(extracted from the shared archive into .cache/) against the model's own forward throughput at
the same batch size on ready tensors, which is the ceiling.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CACHE = REPO_ROOT / ".cache" / "bench-index"


def machine() -> str:
    import faiss
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}, "
        f"faiss {faiss.__version__} ({faiss.get_num_gpus()} faiss GPUs), torch {torch.__version__}"
    )


def clustered_vectors(
    rng: np.random.Generator, centres: np.ndarray, spread: np.ndarray, n: int
) -> np.ndarray:
    """``normalise(centre + noise)``; per-cluster noise sets the same-cluster cosine 0.5-0.8."""
    dim = centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        owner = rng.integers(0, len(centres), m)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        block = centres[owner] + noise * np.sqrt(spread[owner] / dim)[:, None]
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def timed_search(index, queries: np.ndarray, k: int, repeats: int = 1):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = index.search(queries, k)
        best = min(best, time.perf_counter() - started)
    return len(queries) / best, result


def bench_search(n: int, dim: int, clusters: int, queries: int, k: int) -> None:
    import faiss

    from index.vectors import VectorIndex, ivf_params

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # same-cluster cosine ≈ 1 / (1 + s), s the noise energy: s in [0.25, 1] gives 0.5-0.8
    spread = rng.uniform(0.25, 1.0, clusters).astype(np.float32)
    started = time.perf_counter()
    base = clustered_vectors(rng, centres, spread, n)
    probe = clustered_vectors(rng, centres, spread, queries)
    print(
        f"data: {n} x {dim}, {clusters} clusters, {queries} queries "
        f"({time.perf_counter() - started:.0f} s to draw)"
    )
    same = clustered_vectors(np.random.default_rng(1), centres[:1], spread[:1], 2)
    print(f"example same-cluster cosine: {float(same[0] @ same[1]):.2f}")

    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    exact_qps, (_, truth) = timed_search(exact, probe, k)
    print(f"exact flat: {exact_qps:.1f} queries/s")

    params = ivf_params(n)
    started = time.perf_counter()
    size = VectorIndex.training_size(n)
    sample = base[rng.choice(n, size=size, replace=False)]
    ivf = VectorIndex.trained_ivf(dim, n, sample)
    trained = time.perf_counter() - started
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        ivf.add(np.arange(start, stop, dtype=np.int64), base[start:stop])
    built = time.perf_counter() - started
    print(f"ivf {params}: trained on {size} in {trained:.0f} s, built in {built:.0f} s")
    inner = faiss.extract_index_ivf(ivf.index)
    default = params["nprobe"]
    for nprobe in sorted({max(1, default // 2), default, default * 2, default * 4}):
        inner.nprobe = nprobe
        qps, (_, found) = timed_search(ivf.index, probe, k, repeats=3)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])
        mark = "  <- default" if nprobe == default else ""
        print(
            f"ivf nprobe={nprobe:<4} recall@{k}={recall:.4f}  {qps:8.1f} queries/s  "
            f"{qps / exact_qps:6.1f}x exact{mark}"
        )


def extract_cifar(count: int) -> Path:
    """The first ``count`` CIFAR-10 test JPEGs, extracted once under .cache/."""
    target = CACHE / f"cifar-{count}"
    if target.is_dir():
        return target
    if not CIFAR_ARCHIVE.is_file():
        raise SystemExit(f"real data not available: {CIFAR_ARCHIVE} is absent")
    tmp = Path(tempfile.mkdtemp(dir=CACHE.parent if CACHE.parent.is_dir() else None))
    taken = 0
    with tarfile.open(CIFAR_ARCHIVE) as archive:
        for member in archive:
            if member.isfile() and member.name.startswith("cifar10/test/"):
                archive.extract(member, tmp, filter="data")
                taken += 1
                if taken == count:
                    break
    CACHE.mkdir(parents=True, exist_ok=True)
    (tmp / "cifar10" / "test").rename(target)
    shutil.rmtree(tmp)
    return target


def bench_build(count: int, batch_size: int, backbone: str, image_size: int, workers: str) -> None:
    import torch

    from index.build import build_gallery
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig, Preprocessing
    from model.net import build_embedding_net

    images = extract_cifar(count)
    config = ModelConfig(
        backbone=backbone,
        pretrained=False,
        embedding_dim=512,
        preprocessing=Preprocessing(image_size=image_size, resize_size=image_size * 8 // 7),
    )
    net = build_embedding_net(config).eval()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "ckpt"
        save_checkpoint(checkpoint, net, config)
        batch = torch.randn(batch_size, 3, image_size, image_size)
        with torch.inference_mode():
            net(batch)  # warm-up
            started = time.perf_counter()
            done = 0
            while done < count:
                net(batch)
                done += batch_size
        ceiling = done / (time.perf_counter() - started)
        report = build_gallery(
            images,
            checkpoint,
            Path(scratch) / "gallery",
            batch_size=batch_size,
            workers=workers,
            progress=False,
        )
    print(f"model forward (ceiling): {ceiling:.1f} images/s at batch {batch_size}")
    print(f"bulk job: {report.summary()}")
    print(f"bulk job / ceiling = {report.images_per_s / ceiling:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="which", required=True)
    search = sub.add_parser("search")
    search.add_argument("--n", type=int, default=1_000_000)
    search.add_argument("--dim", type=int, default=512)
    search.add_argument("--clusters", type=int, default=3000)
    search.add_argument("--queries", type=int, default=1000)
    search.add_argument("-k", type=int, default=10)
    build = sub.add_parser("build")
    build.add_argument("--images", type=int, default=1000)
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--backbone", default="resnet18")
    build.add_argument("--image-size", type=int, default=224)
    build.add_argument("--workers", default="auto")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if args.which == "search":
        bench_search(args.n, args.dim, args.clusters, args.queries, args.k)
    else:
        bench_build(args.images, args.batch_size, args.backbone, args.image_size, args.workers)


if __name__ == "__main__":
    main()
