"""The bulk indexing job: walk a folder, decode in DataLoader workers, embed in batches, add.

Workers hand over whole batches of 8-bit crops, which the loader pins once per batch; the
network normalises them on its device and runs at the job's precision (:mod:`model.inference`,
the service's path too).

It resumes: every file's sha256 is checked against the gallery before decoding, so a rerun after
Ctrl-C or a kill embeds only what is missing (the gallery's database commits every batch and the
index is snapshotted every ``save_every`` batches). Memory stays bounded by a few batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from index.gallery import Gallery, ItemInput
from index.images import check_image_header, decode_image, find_images
from index.layout import CURRENT, FAILURES_FILE
from model.hardware import DECODERS, GraphMode, resolve_device, resolve_workers
from model.inference import Embedder, decode_jpegs, is_jpeg, stack_crops
from model.transforms import eval_crop, to_uint8_tensor

# Batches each loader worker prepares ahead: enough to ride out a slow file or a save.
PREFETCH_BATCHES = 4

__all__ = [
    "FAILURES_FILE",
    "BuildReport",
    "GalleryWriter",
    "build_gallery",
    "index_files",
    "list_files",
    "open_for_model",
    "open_or_create",
]


@dataclass(frozen=True)
class BuildReport:
    """What a run did; ``failures_path`` lists each failed file as JSON lines (path, reason)."""

    total_files: int
    indexed: int
    already_indexed: int
    duplicates: int
    failed: int
    gallery_count: int
    elapsed_s: float
    failures_path: Path

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.total_files} files: {self.indexed} indexed, {self.already_indexed} already in "
            f"the gallery, {self.duplicates} duplicates, {self.failed} failed "
            f"(listed in {self.failures_path}); gallery holds {self.gallery_count} items; "
            f"{self.elapsed_s:.1f} s, {self.images_per_s:.1f} images/s"
        )


class _FileDataset(Dataset):
    """Reads, hashes and decodes one file to its uint8 crop; never raises, so one bad file
    cannot stop the job. With ``gpu_jpegs`` a JPEG is only checked (header, pixel count) and
    its bytes go to the main process, which decodes the batch's JPEGs on the GPU at once."""

    def __init__(
        self,
        files: Sequence[tuple[Path, str | None]],
        known: Container[str],
        preprocessing: Any,
        gpu_jpegs: bool = False,
    ) -> None:
        self.files = files
        self.known = known
        self.min_side = int(preprocessing.resize_size)
        self.crop = eval_crop(preprocessing)
        self.gpu_jpegs = gpu_jpegs

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> dict[str, Any]:
        path, label = self.files[position]
        entry: dict[str, Any] = {"path": str(path), "label": label}
        try:
            data = path.read_bytes()
        except OSError as error:
            return {**entry, "status": "failed", "reason": f"unreadable: {error}"}
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        if entry["sha256"] in self.known:
            return {**entry, "status": "known"}
        try:
            if self.gpu_jpegs and is_jpeg(data):
                check_image_header(data)
                return {**entry, "status": "ok", "jpeg": data}
            crop = to_uint8_tensor(self.crop(decode_image(data, self.min_side)))
        except (ValueError, OSError) as error:  # ImageDecodeError is a ValueError
            return {**entry, "status": "failed", "reason": str(error)}
        return {**entry, "status": "ok", "crop": crop}


def _collate(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch holding one tensor, the stacked CPU crops, so that the loader pins one block
    per batch; JPEG bytes for the GPU decoder travel as ``bytes``, which are never pinned."""
    ok = [e for e in entries if e["status"] == "ok"]
    crops = [e.pop("crop") for e in ok if "crop" in e]
    return {
        "ok": ok,
        "crops": stack_crops(crops) if crops else None,
        "known": sum(e["status"] == "known" for e in entries),
        "failed": [e for e in entries if e["status"] == "failed"],
    }


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)


def _device_batch(
    batch: dict[str, Any], embedder: Embedder, min_side: int
) -> tuple[list[dict[str, Any]], torch.Tensor | None, list[dict[str, Any]]]:
    """The batch's embeddable entries, their uint8 crops as one tensor on the device, and the
    entries that failed to decode there. CPU crops keep their order; JPEGs decoded on the GPU
    follow them (a JPEG nvJPEG refuses is decoded on the CPU for its reason or its pixels)."""
    cpu = [e for e in batch["ok"] if "jpeg" not in e]
    jpegs = [e for e in batch["ok"] if "jpeg" in e]
    host = batch["crops"]
    parts = [] if host is None else [host.to(embedder.device, non_blocking=True)]
    failed: list[dict[str, Any]] = []
    if jpegs:
        crop = eval_crop(embedder.preprocessing)
        decoded = decode_jpegs([e["jpeg"] for e in jpegs], embedder.preprocessing, embedder.device)
        for entry, image in zip(jpegs, decoded, strict=True):
            data = entry.pop("jpeg")
            if image is None:
                try:
                    image = to_uint8_tensor(crop(decode_image(data, min_side))).to(embedder.device)
                except (ValueError, OSError) as error:
                    failed.append({**entry, "status": "failed", "reason": str(error)})
                    continue
            parts.append(image[None])
            cpu.append(entry)
    return cpu, (torch.cat(parts) if parts else None), failed


def open_for_model(directory: Path, loaded: Any, *, read_only: bool = False) -> Gallery:
    """Open the gallery at ``directory``; one built by another model or preprocessing than the
    loaded checkpoint's is refused, since its embeddings could not be compared."""
    return Gallery.open(
        directory,
        expected_fingerprint=loaded.fingerprint,
        expected_preprocessing=loaded.config.preprocessing,
        read_only=read_only,
    )


def open_or_create(out_dir: Path, loaded: Any, index_type: str = "auto") -> Gallery:
    """Open the gallery built by this checkpoint's model, or create it when absent (or when
    its creation was interrupted)."""
    if (out_dir / CURRENT).is_symlink():
        return open_for_model(out_dir, loaded)
    return Gallery.create(
        out_dir,
        model_fingerprint=loaded.fingerprint,
        preprocessing=loaded.config.preprocessing,
        embedding_dim=loaded.config.embedding_dim,
        index_type=index_type,
    )


class GalleryWriter:
    """The one writer of a bulk job, whatever engine embeds: adds each embedded batch (the
    gallery drops duplicates), writes each failed file to the report, counts files already
    indexed, snapshots every ``save_every`` batches and, whatever happens, at the end.

    Use as a context manager; :meth:`report` gives the counts once it is closed.
    """

    def __init__(
        self,
        gallery: Gallery,
        total_files: int,
        failures_path: Path,
        *,
        save_every: int = 50,
        progress: bool = True,
    ) -> None:
        self.gallery = gallery
        self.total_files = total_files
        self.failures_path = failures_path
        self.save_every = save_every
        self.counts = {"indexed": 0, "known": 0, "duplicates": 0, "failed": 0}
        self._batches = 0
        self._started = time.perf_counter()
        self._progress = progress

    def __enter__(self) -> GalleryWriter:
        self.failures_path.parent.mkdir(parents=True, exist_ok=True)
        self._failures = self.failures_path.open("w", encoding="utf-8")
        self._bar = tqdm(
            total=self.total_files, unit="img", desc="indexing", disable=not self._progress
        )
        return self

    def __exit__(self, *_: object) -> None:
        try:
            self._bar.close()
            self._failures.close()
        finally:
            self.gallery.save()

    def write(
        self,
        items: Sequence[ItemInput],
        embeddings: np.ndarray,
        weights: Sequence[np.ndarray],
        *,
        known: int = 0,
        failed: Sequence[tuple[str, str]] = (),
    ) -> None:
        """One batch: ``items`` embedded as ``embeddings`` and ``weights`` (row by row),
        ``known`` files skipped as already in the gallery, ``failed`` (path, reason) pairs."""
        for path, reason in failed:
            self._failures.write(json.dumps({"path": path, "reason": reason}) + "\n")
        self.counts["failed"] += len(failed)
        self.counts["known"] += known
        if items:
            result = self.gallery.add(embeddings, list(weights), list(items))
            self.counts["indexed"] += result.added
            self.counts["duplicates"] += len(result.duplicates)
        self._batches += 1
        if self._batches % self.save_every == 0:
            self.gallery.save()
        self._bar.update(len(items) + known + len(failed))

    def report(self) -> BuildReport:
        return BuildReport(
            total_files=self.total_files,
            indexed=self.counts["indexed"],
            already_indexed=self.counts["known"],
            duplicates=self.counts["duplicates"],
            failed=self.counts["failed"],
            gallery_count=len(self.gallery),
            elapsed_s=time.perf_counter() - self._started,
            failures_path=self.failures_path,
        )


def index_files(
    gallery: Gallery,
    loaded: Any,
    files: Sequence[tuple[Path, str | None]],
    *,
    batch_size: int = 64,
    workers: int | str = "auto",
    device: str = "auto",
    precision: str = "auto",
    decode: str = "cpu",
    graphs: GraphMode = "off",
    failures_path: Path,
    save_every: int = 50,
    progress: bool = True,
) -> BuildReport:
    """Embed and add ``(path, label)`` files not yet in ``gallery``; saves at the end and on
    interruption, so an interrupted run loses nothing already embedded.

    ``precision`` (:data:`~model.hardware.PRECISIONS`; ``auto``: fp16 on CUDA, else fp32) and
    ``decode`` (``cpu``, or ``gpu``: JPEGs decoded in batches by nvJPEG) and ``graphs`` (CUDA
    graphs per batch size, :mod:`model.graphs`) as in :mod:`model.inference`."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    writer = GalleryWriter(
        gallery, len(files), failures_path, save_every=save_every, progress=progress
    )
    target = resolve_device(device)
    if decode == "gpu" and target.type != "cuda":
        raise ValueError("decode 'gpu' needs a CUDA device; use decode 'cpu'")
    embedder = Embedder(loaded.net, loaded.config.preprocessing, target, precision, graphs)
    dataset = _FileDataset(
        files,
        frozenset(gallery.known_sha256()),
        loaded.config.preprocessing,
        gpu_jpegs=decode == "gpu",
    )
    num_workers = resolve_workers(workers, accelerator=target.type == "cuda")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=target.type == "cuda",
        worker_init_fn=_init_worker if num_workers else None,
        prefetch_factor=PREFETCH_BATCHES if num_workers else None,
    )
    with writer:
        for batch in loader:
            ok, crops, undecoded = _device_batch(batch, embedder, dataset.min_side)
            items = [ItemInput(e["path"], e["sha256"], e["label"]) for e in ok]
            embeddings, weights = np.empty((0, 0), np.float32), []
            if crops is not None:
                output = embedder(crops)
                embeddings = output.embedding.cpu().numpy()
                weights = list(output.weights.cpu().numpy())
            writer.write(
                items,
                embeddings,
                weights,
                known=batch["known"],
                failed=[(e["path"], e["reason"]) for e in [*batch["failed"], *undecoded]],
            )
    return writer.report()


def build_gallery(
    images_dir: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    workers: int | str = "auto",
    device: str = "auto",
    precision: str = "auto",
    decode: str = "cpu",
    graphs: GraphMode = "off",
    index_type: str = "auto",
    report_path: str | os.PathLike[str] | None = None,
    labels_from_subfolders: bool = False,
    save_every: int = 50,
    progress: bool = True,
) -> BuildReport:
    """Index every image under ``images_dir`` into the gallery ``out_dir`` (created if absent).

    ``labels_from_subfolders`` labels each file with its first-level subfolder's name.
    Failures go to ``report_path`` (default ``out_dir/build-failures.jsonl``).
    """
    from model.checkpoint import load_checkpoint

    files = list_files(images_dir, labels_from_subfolders)
    out = Path(out_dir)
    loaded = load_checkpoint(checkpoint_dir, device="cpu")
    gallery = open_or_create(out, loaded, index_type)
    try:
        return index_files(
            gallery,
            loaded,
            files,
            batch_size=batch_size,
            workers=workers,
            device=device,
            precision=precision,
            decode=decode,
            graphs=graphs,
            failures_path=Path(report_path) if report_path else out / FAILURES_FILE,
            save_every=save_every,
            progress=progress,
        )
    finally:
        gallery.close()


def list_files(
    images_dir: str | os.PathLike[str], labels_from_subfolders: bool = False
) -> list[tuple[Path, str | None]]:
    """``(path, label)`` for every image under ``images_dir``, in a stable sorted order; the
    label is the first-level subfolder's name with ``labels_from_subfolders``, else None."""
    root = Path(images_dir)
    return [
        (path, _label_of(path, root) if labels_from_subfolders else None)
        for path in find_images(root)
    ]


def _label_of(path: Path, root: Path) -> str | None:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None
