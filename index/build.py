"""The bulk indexing job: walk a folder, decode in DataLoader workers, embed in batches, add.

It resumes: every file's sha256 is checked against the gallery before decoding, so a rerun after
Ctrl-C or a kill embeds only what is missing (the gallery's database commits every batch and the
index is snapshotted every ``save_every`` batches). Memory stays bounded by a few batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from index.gallery import Gallery, ItemInput
from index.images import decode_image, find_images
from index.layout import CURRENT, FAILURES_FILE
from model.hardware import resolve_device, resolve_workers

__all__ = [
    "FAILURES_FILE",
    "BuildReport",
    "build_gallery",
    "index_files",
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
    """Reads, hashes and decodes one file; never raises, so one bad file cannot stop the job."""

    def __init__(
        self,
        files: Sequence[tuple[Path, str | None]],
        known: frozenset[str],
        preprocessing: Any,
    ) -> None:
        from model.transforms import eval_transform

        self.files = files
        self.known = known
        self.min_side = int(preprocessing.resize_size)
        self.transform = eval_transform(preprocessing)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> dict[str, Any]:
        path, label = self.files[position]
        entry: dict[str, Any] = {"path": str(path), "label": label, "tensor": None}
        try:
            data = path.read_bytes()
        except OSError as error:
            return {**entry, "status": "failed", "reason": f"unreadable: {error}"}
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        if entry["sha256"] in self.known:
            return {**entry, "status": "known"}
        try:
            tensor = self.transform(decode_image(data, self.min_side))
        except (ValueError, OSError) as error:  # ImageDecodeError is a ValueError
            return {**entry, "status": "failed", "reason": str(error)}
        return {**entry, "status": "ok", "tensor": tensor}


def _collate(entries: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [e for e in entries if e["status"] == "ok"]
    return {
        "ok": ok,
        "tensors": torch.stack([e["tensor"] for e in ok]) if ok else None,
        "known": sum(e["status"] == "known" for e in entries),
        "failed": [e for e in entries if e["status"] == "failed"],
    }


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)


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


def index_files(
    gallery: Gallery,
    loaded: Any,
    files: Sequence[tuple[Path, str | None]],
    *,
    batch_size: int = 64,
    workers: int | str = "auto",
    device: str = "auto",
    failures_path: Path,
    save_every: int = 50,
    progress: bool = True,
) -> BuildReport:
    """Embed and add ``(path, label)`` files not yet in ``gallery``; saves at the end and on
    interruption, so an interrupted run loses nothing already embedded."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    started = time.perf_counter()
    target = resolve_device(device)
    net = loaded.net.to(target).eval()
    dataset = _FileDataset(files, frozenset(gallery.known_sha256()), loaded.config.preprocessing)
    num_workers = resolve_workers(workers)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=target.type == "cuda",
        worker_init_fn=_init_worker if num_workers else None,
    )
    counts = {"indexed": 0, "known": 0, "duplicates": 0, "failed": 0}
    failures_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(files), unit="img", desc="indexing", disable=not progress)
    try:
        with failures_path.open("w", encoding="utf-8") as failures, torch.inference_mode():
            for number, batch in enumerate(loader, 1):
                for entry in batch["failed"]:
                    failures.write(json.dumps({"path": entry["path"], "reason": entry["reason"]}))
                    failures.write("\n")
                counts["failed"] += len(batch["failed"])
                counts["known"] += batch["known"]
                if batch["ok"]:
                    output = net(batch["tensors"].to(target, non_blocking=True))
                    result = gallery.add(
                        output.embedding.float().cpu().numpy(),
                        list(output.weights.float().cpu().numpy()),
                        [ItemInput(e["path"], e["sha256"], e["label"]) for e in batch["ok"]],
                    )
                    counts["indexed"] += result.added
                    counts["duplicates"] += len(result.duplicates)
                if number % save_every == 0:
                    gallery.save()
                bar.update(len(batch["ok"]) + batch["known"] + len(batch["failed"]))
    finally:
        bar.close()
        gallery.save()
    return BuildReport(
        total_files=len(files),
        indexed=counts["indexed"],
        already_indexed=counts["known"],
        duplicates=counts["duplicates"],
        failed=counts["failed"],
        gallery_count=len(gallery),
        elapsed_s=time.perf_counter() - started,
        failures_path=failures_path,
    )


def build_gallery(
    images_dir: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    workers: int | str = "auto",
    device: str = "auto",
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

    root = Path(images_dir)
    files = [
        (path, _label_of(path, root) if labels_from_subfolders else None)
        for path in find_images(root)
    ]
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
            failures_path=Path(report_path) if report_path else out / FAILURES_FILE,
            save_every=save_every,
            progress=progress,
        )
    finally:
        gallery.close()


def _label_of(path: Path, root: Path) -> str | None:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None
