"""Bulk indexing on photo-like files: decoding alone, the model alone, the in-process job, the Ray
job and the gallery's write path, side by side in one run (issue 19).

    .venv/bin/python -m bench.bulk                      # this machine's device, defaults below
    .venv/bin/python -m bench.bulk --device cuda --images 4000 --large 500 --decode cpu,gpu

Files: ``--images`` JPEGs of 800x600 at quality 85 (about 110 kB) and ``--large`` of 4000x3000
(about 2.5 MB), written once under .cache/bench-bulk/. Sixty-four distinct pictures are drawn
(smooth fields, shapes, film grain); further files repeat them with a unique tail after the
JPEG end marker, so every file is read, hashed and decoded in full yet none is a duplicate.

Printed, in one run and one process:

- decoding alone, per core: a loader worker's whole work per file (read, sha256, reduced-scale
  decode, resize, crop to uint8) on one thread;
- the model alone at the job's precision, from uint8 batches in host memory;
- the in-process job (``index.build.build_gallery``) per decoder, and its ratio to the model
  and to ``1/(1/M + 1/D)``, the rate of model and decoders sharing the same cores perfectly;
  and, since wall-clock rates on a shared machine follow everyone else's load, the job's CPU
  time per image (its process and its workers) against the model's plus the decoder's: the
  pipeline's overhead in work, whatever the load;
- the Ray job (``--ray``): ``index.ray_job.build_gallery`` with ``build_gallery``'s arguments,
  when that module exists, on the same folder;
- the write path per 1,000 items at 1k, 10k, 100k and 1M items (``--max-items`` caps it):
  synthetic unit vectors into a ``flat`` gallery (index type fixed), ``Gallery.add`` of 1,000
  items then ``Gallery.save`` (median over blocks of saves that carried the index by hard link;
  each block's items are removed again, untimed, so every block meets a gallery of that size),
  plus the save that rewrites the index (timed at that size) once per ``REWRITE_SHARE`` of the
  gallery's items, or per 1,000 where that is fewer, amortised per 1,000 items.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = REPO_ROOT / ".cache" / "bench-bulk"
DISTINCT = 64
SIZES = {"800x600": (800, 600), "4000x3000": (4000, 3000)}
WRITE_SIZES = (1_000, 10_000, 100_000, 1_000_000)
_FILL_BLOCK = 50_000


def photo_like(seed: int, size: tuple[int, int], quality: int = 85) -> bytes:
    """A JPEG that compresses like a photo: a smooth colour field, a dozen flat shapes, a light
    blur and film grain (a tiled noise patch), so that 800x600 at quality 85 is ~110 kB."""
    rng = np.random.default_rng(seed)
    width, height = size
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        rx = int(rng.integers(width // 40, width // 5))
        ry = int(rng.integers(height // 40, height // 5))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - rx, y - ry, x + rx, y + ry), fill=colour)
    image = image.filter(ImageFilter.BoxBlur(2))
    tile = rng.normal(0, 7, (256, 256, 1)).astype(np.int16)
    grain = np.tile(tile, (height // 256 + 1, width // 256 + 1, 1))[:height, :width]
    noisy = np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def photo_folder(name: str, count: int) -> Path:
    """``count`` photo-like JPEGs of size ``name`` under .cache/, written once."""
    folder = CACHE / f"{name}-{count}"
    if folder.is_dir() and len(list(folder.iterdir())) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    seeds = range(min(count, DISTINCT))
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        distinct = list(pool.map(photo_like, seeds, [SIZES[name]] * len(seeds)))
    for number in range(count):
        tail = b"" if number < DISTINCT else b"copy %d" % number  # after the end marker
        (folder / f"{number:06d}.jpg").write_bytes(distinct[number % DISTINCT] + tail)
    return folder


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT
    ).stdout.strip()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"({len(os.sched_getaffinity(0))} usable), {device}, torch {torch.__version__}, "
        f"commit {commit or 'unknown'}, load average {os.getloadavg()[0]:.1f}"
    )


def decode_per_core(folder: Path, preprocessing: Any, repeats: int) -> tuple[float, float]:
    """Milliseconds of one loader worker's work per file on one thread, as CPU time (what a
    core spends, whatever else shares the machine) and wall time (median of repeats)."""
    import torch

    from index.build import _FileDataset

    files = [(path, None) for path in sorted(folder.iterdir())[:DISTINCT]]
    dataset = _FileDataset(files, frozenset(), preprocessing)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu, wall = [], []
        for _ in range(repeats):
            started, clock = time.thread_time(), time.perf_counter()
            for position in range(len(dataset)):
                assert dataset[position]["status"] == "ok"
            cpu.append((time.thread_time() - started) / len(dataset))
            wall.append((time.perf_counter() - clock) / len(dataset))
    finally:
        torch.set_num_threads(threads)
    return 1000 * statistics.median(cpu), 1000 * statistics.median(wall)


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the loader's worker processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def model_alone(embedder: Any, batch_size: int, batches: int) -> tuple[float, float]:
    """Images/s of the model from uint8 host batches to float32 host embeddings, and its CPU
    milliseconds per image."""
    import torch

    size = embedder.preprocessing.image_size
    batch = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)
    if embedder.device.type == "cuda":
        batch = batch.pin_memory()
    embedder(batch).embedding.cpu()  # warm-up: kernels, cuDNN plans
    started, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        embedder(batch).embedding.cpu()
    images = batch_size * batches
    return images / (time.perf_counter() - started), 1000 * (cpu_seconds() - cpu) / images


def run_job(
    build: Callable[..., Any], folder: Path, checkpoint: Path, **options: Any
) -> tuple[float, float]:
    """Images/s of one job over ``folder`` into a fresh gallery, and the CPU milliseconds per
    image it spent in this process and its workers (the whole call: load, embed, save)."""
    cpu = cpu_seconds()
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        report = build(folder, checkpoint, Path(scratch) / "gallery", progress=False, **options)
    if report.failed or report.indexed != report.total_files:
        raise SystemExit(f"the job did not index every file: {report.summary()}")
    return float(report.images_per_s), 1000 * (cpu_seconds() - cpu) / report.indexed


def ray_build() -> Callable[..., Any] | None:
    """The Ray job's entry point where index.ray_job provides one, else None."""
    try:
        from index import ray_job
    except ImportError:
        return None
    build: Callable[..., Any] | None = getattr(ray_job, "build_gallery", None)
    return build


def fill_store(directory: Path, start: int, stop: int, dim: int) -> None:
    """Rows ``start..stop`` straight into the gallery's database (setup, not measured)."""
    from index.layout import DATABASE
    from index.metadata import ItemRow, MetadataStore

    store = MetadataStore(directory / DATABASE)
    grid = np.zeros((7, 7), dtype=np.float32)
    for first in range(start, stop, _FILL_BLOCK):
        last = min(stop, first + _FILL_BLOCK)
        vectors = unit_vectors(first, last - first, dim)
        store.insert(
            [
                ItemRow(f"{i}.jpg", _sha(i), None, "", {}, vector, grid)
                for i, vector in zip(range(first, last), vectors, strict=True)
            ]
        )
    store.checkpoint()
    store.close()


def unit_vectors(seed: int, count: int, dim: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _sha(number: int) -> str:
    return hashlib.sha256(b"%d" % number).hexdigest()


def _timed(work: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) that ``work`` took."""
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - cpu, time.perf_counter() - wall


def _add_into(results: list[Any], gallery: Any, *arguments: Any) -> None:
    results.append(gallery.add(*arguments))


def write_path(sizes: list[int], dim: int, blocks: int) -> list[dict[str, float]]:
    """Per gallery size: ms per 1,000 items added (``Gallery.add``) and saved (``Gallery.save``),
    and the amortised index rewrite (see the module's docstring)."""
    from index.gallery import REWRITE_SHARE, Gallery, ItemInput
    from index.layout import INDEX_FILE
    from index.snapshot import current_snapshot

    rows = []
    grids = [np.zeros((7, 7), dtype=np.float32)] * 1000
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        directory = Path(scratch) / "gallery"
        Gallery.create(
            directory,
            model_fingerprint="bench",
            preprocessing={},
            embedding_dim=dim,
            index_type="flat",
            large_threshold=10**9,
            compact_threshold=10**9,
        ).close()
        count, filled, added = 0, 0, 0
        for size in sizes:
            fill_store(directory, filled, filled + size - count, dim)
            filled += size - count
            gallery = Gallery.open(directory)
            rewrite = _timed(gallery.save)  # the whole index written
            adds, carried_saves = [], []
            for block in range(blocks + 1):  # the first, untimed, warms the caches after open
                first = 10**12 + added
                added += 1000
                items = [ItemInput(f"{i}.jpg", _sha(i)) for i in range(first, first + 1000)]
                vectors = unit_vectors(first, 1000, dim)
                written = (current_snapshot(directory) / INDEX_FILE).stat().st_ino
                results: list[Any] = []
                add = _timed(partial(_add_into, results, gallery, vectors, grids, items))
                save = _timed(gallery.save)
                carried = (current_snapshot(directory) / INDEX_FILE).stat().st_ino == written
                gallery.remove(results[0].ids)  # untimed: every block meets a gallery of ``size``
                gallery.save()
                if block == 0:
                    continue
                adds.append(add)
                if carried:
                    carried_saves.append(save)
            count = len(gallery)
            gallery.close()
            # Saves carry the index until REWRITE_SHARE of it has changed, then rewrite it.
            between = max(1000, REWRITE_SHARE * size)
            if between > 1000 and not carried_saves:
                raise SystemExit(f"no save carried the index at {size} items")
            row: dict[str, float] = {"items": size}
            cells = []
            for clock in (0, 1):  # CPU time, wall time
                add_ms = 1000 * statistics.median(a[clock] for a in adds)
                save_ms = 0.0
                if between > 1000:
                    save_ms = 1000 * statistics.median(c[clock] for c in carried_saves)
                amortised_ms = 1000 * rewrite[clock] * 1000 / between
                row[f"per_1k_{clock}"] = add_ms + save_ms + amortised_ms
                cells.append(
                    f"{add_ms:.0f} | {save_ms:.0f} | {1000 * rewrite[clock]:.0f} | "
                    f"{amortised_ms:.0f} | **{row[f'per_1k_{clock}']:.0f}**"
                )
            rows.append(row)
            print(f"| {size:,} | every {between:,.0f} | {' | '.join(cells)} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="800x600 JPEGs")
    parser.add_argument("--large", type=int, default=16, help="4000x3000 JPEGs (0: none)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--decode", default="cpu", help="comma-separated: cpu, gpu")
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--ray", action="store_true", help="also the Ray job (index.ray_job)")
    parser.add_argument("--repeats", type=int, default=3, help="decode timing repeats")
    parser.add_argument("--model-images", type=int, default=256, help="images the model times")
    parser.add_argument(
        "--job-runs", type=int, default=1, help="runs of each job in this process (warm-up effects)"
    )
    parser.add_argument("--max-items", type=int, default=1_000_000, help="write path's largest")
    parser.add_argument("--write-dim", type=int, default=512)
    parser.add_argument("--write-blocks", type=int, default=7, help="1k blocks timed per size")
    parser.add_argument(
        "--only", default="decode,model,job,write", help="sections to run, comma-separated"
    )
    args = parser.parse_args()
    sections = set(args.only.split(","))
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    if sections & {"decode", "model", "job"}:
        bench_jobs(args, sections)
    if "write" in sections:
        sizes = [size for size in WRITE_SIZES if size <= args.max_items]
        print(
            f"\n== write path, flat index, {args.write_dim}-d, {args.write_blocks} blocks per size"
        )
        columns = "add 1k | save, index carried | index rewrite | rewrite per 1k | per 1k"
        print(f"| items | index rewritten | CPU ms: {columns} | wall ms: {columns} |")
        print("| --- " * 12 + "|")
        rows = write_path(sizes, args.write_dim, args.write_blocks)
        for clock, name in ((0, "CPU time"), (1, "wall time")):
            ratio = rows[-1][f"per_1k_{clock}"] / rows[0][f"per_1k_{clock}"]
            print(
                f"{name}: per 1k at {rows[-1]['items']:,} / at {rows[0]['items']:,} = "
                f"{ratio:.2f} (target <= 1.2)"
            )


def bench_jobs(args: argparse.Namespace, sections: set[str]) -> None:
    from index.build import build_gallery
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig, Preprocessing
    from model.hardware import resolve_device, usable_cpus
    from model.inference import Embedder
    from model.net import build_embedding_net

    device = resolve_device(args.device)
    config = ModelConfig(
        backbone=args.backbone,
        pretrained=False,
        embedding_dim=512,
        preprocessing=Preprocessing(
            image_size=args.image_size, resize_size=args.image_size * 8 // 7
        ),
    )
    folders = {"800x600": photo_folder("800x600", args.images)}
    if args.large:
        folders["4000x3000"] = photo_folder("4000x3000", args.large)
    for name, folder in folders.items():
        sample = next(folder.iterdir())
        print(
            f"files: {name}, {len(list(folder.iterdir()))} JPEGs, e.g. {sample.stat().st_size:,} B"
        )
    decode_ms = {}
    if "decode" in sections:
        print("\n== decoding alone (read, sha256, decode, resize, crop; one thread)")
        for name, folder in folders.items():
            decode_ms[name], wall = decode_per_core(folder, config.preprocessing, args.repeats)
            print(
                f"{name}: {decode_ms[name]:.2f} ms CPU time per image per core "
                f"({wall:.2f} ms wall)",
                flush=True,
            )
    net = build_embedding_net(config).eval()
    checkpoint = CACHE / f"ckpt-{args.backbone}-{args.image_size}"
    save_checkpoint(checkpoint, net, config)  # before the embedder moves it to the device
    embedder = Embedder(net, config.preprocessing, device, args.precision)
    precision = str(embedder.dtype).removeprefix("torch.")
    batches = max(3, args.model_images // args.batch_size)
    model_rates: list[float] = []
    model_cpu: list[float] = []

    def time_model() -> None:
        if "model" in sections:
            rate, cpu_ms = model_alone(embedder, args.batch_size, batches)
            model_rates.append(rate)
            model_cpu.append(cpu_ms)
            print(
                f"model alone: {args.backbone} GSP at {args.image_size}, {precision}, batch "
                f"{args.batch_size}, {device}: {rate:.1f} images/s, {cpu_ms:.1f} CPU ms per image",
                flush=True,
            )

    time_model()
    if "job" not in sections:
        return
    cores = usable_cpus()
    jobs: dict[str, Callable[..., Any]] = {"in-process": build_gallery}
    if args.ray:
        ray = ray_build()
        if ray is None:
            print("Ray job: index.ray_job.build_gallery is not available in this checkout")
        else:
            jobs["ray"] = ray
    table = [
        f"\n== jobs ({precision}, batch {args.batch_size}, workers {args.workers})",
        "| files | job | decode | images/s | / model M | / 1/(1/M + 1/D) | CPU ms per image "
        "| / (model + decode CPU ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, folder in folders.items():
        rates = {
            (job, decode, run): run_job(
                build,
                folder,
                checkpoint,
                batch_size=args.batch_size,
                workers=args.workers,
                device=str(device),
                precision=args.precision,
                decode=decode,
            )
            for job, build in jobs.items()
            for decode in args.decode.split(",")
            for run in range(1, args.job_runs + 1)
        }
        time_model()  # again after the jobs: the faster of the two is the ratios' M
        model_rate = max(model_rates[-2:], default=None)
        bound = None
        if model_rate and name in decode_ms:
            decoders = cores * 1000 / decode_ms[name]
            bound = 1 / (1 / model_rate + 1 / decoders)
        parts_cpu = min(model_cpu[-2:]) + decode_ms[name] if model_cpu and decode_ms else None
        for (job, decode, run), (rate, cpu_ms) in rates.items():
            decode_run = decode if args.job_runs == 1 else f"{decode}, run {run}"
            of_model = f"{rate / model_rate:.3f}" if model_rate else "-"
            of_bound = f"{rate / bound:.3f}" if bound else "-"
            of_parts = f"{cpu_ms / parts_cpu:.3f}" if parts_cpu else "-"
            table.append(
                f"| {name} | {job} | {decode_run} | {rate:.1f} | {of_model} | {of_bound} "
                f"| {cpu_ms:.1f} | {of_parts} |"
            )
    print("\n".join(table))
    if model_rates and decode_ms:
        print(
            f"M = the faster model run before or after each folder's jobs; D = {cores} cores "
            "x 1/(decode CPU time): the decoders' rate on the same cores"
        )


if __name__ == "__main__":
    main()
