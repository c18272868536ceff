"""The bulk indexing job on Ray Data, to spread it over many GPUs and machines.

The same job as :func:`index.build.build_gallery`, on another engine: the driver lists the
files and splits them into blocks; CPU tasks read, hash and decode each block (files the gallery
already holds are skipped by their sha256, as in the in-process job, so a rerun resumes); a pool
of actors, one per GPU (or CPU actors), embeds the decoded batches; the results stream back to
the driver, whose :class:`index.build.GalleryWriter` is the gallery's one writer (dedupe,
failure report, snapshots). Ray retries a task or restarts an actor whose worker dies, and what
reached the writer is kept whatever happens, so a rerun finishes an interrupted job.

On a cluster every node must see the images at the same paths (a shared mount) and run this
package with the ``ray`` extra; the network travels from the driver through Ray's object store,
and the gallery is written where the driver runs.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from index.build import (
    FAILURES_FILE,
    BuildReport,
    GalleryWriter,
    _FileDataset,
    list_files,
    open_or_create,
)
from index.gallery import ItemInput
from model.hardware import GraphMode

__all__ = ["RAY_INSTALL_HINT", "RayUnavailableError", "build_gallery_on_ray", "ray_session"]

RAY_INSTALL_HINT = "pip install 'gsp-retrieval[ray]'"
# What the decode tasks hand the actors, beside the pixels, and the actors hand the writer.
_FILE_COLUMNS = ("path", "label", "sha256", "status", "reason")


class RayUnavailableError(RuntimeError):
    """Ray is not installed: the message says how to install it."""


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise RayUnavailableError(
            f"the Ray engine needs Ray, which is not installed: {RAY_INSTALL_HINT}"
        ) from error
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """Ray, connected: the instance this process already started (a notebook's, a test's), else
    the cluster at ``address`` (``auto``: the one this machine joined; default: ``RAY_ADDRESS``
    when set, as for any Ray program), else a small local instance (this machine's CPUs, no
    dashboard) shut down on exit."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    from model.hardware import usable_cpus

    address = address or os.environ.get("RAY_ADDRESS")
    # at least two logical CPUs: one for a CPU embedding actor, one for the decode tasks
    options = {"address": address} if address else {"num_cpus": max(2, usable_cpus())}
    ray.init(**options, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def decode_files(
    batch: dict[str, np.ndarray], known_ref: Any, preprocessing: Any
) -> dict[str, np.ndarray]:
    """A CPU task: read, hash and decode a block of files to the network's uint8 crops, as the
    in-process job's loader workers do (the same code). A file whose sha256 is in the gallery is
    ``known``; one that cannot be read or decoded is ``failed`` with the reason; neither stops
    the job."""
    import ray
    import torch

    torch.set_num_threads(1)
    files = [
        (Path(path), _label(label))
        for path, label in zip(batch["path"], batch["label"], strict=True)
    ]
    loader = _FileDataset(files, _SortedDigests(ray.get(known_ref)), preprocessing)
    entries = [loader[position] for position in range(len(loader))]
    # every text column holds strings, "" for none: a block whose labels (or reasons) are all
    # None would otherwise reach Arrow as floats, which do not merge with other blocks' strings
    columns = {
        name: _column([entry.get(name) or "" for entry in entries]) for name in _FILE_COLUMNS
    }
    columns["crop"] = _column(
        [entry["crop"].numpy().tobytes() if "crop" in entry else b"" for entry in entries]
    )
    return columns


class _SortedDigests:
    """The gallery's sha256 digests as one sorted array: shared zero-copy by every decode task
    through the object store, where a set of a million strings would be rebuilt in each."""

    def __init__(self, digests: np.ndarray) -> None:
        self.digests = digests

    def __contains__(self, sha256: object) -> bool:
        key = str(sha256).encode()
        position = int(np.searchsorted(self.digests, key))
        return position < len(self.digests) and self.digests[position] == key


def _column(values: list[Any]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


class EmbeddingActor:
    """An actor: embeds the decoded files of each batch with the driver's network (sent through
    Ray's object store, so the nodes need no copy of the checkpoint) on the shared inference path
    (:class:`model.inference.Embedder`); the other rows pass through with zero vectors, for the
    writer to count and report."""

    def __init__(
        self, net: Any, preprocessing: Any, device: str, precision: str, graphs: GraphMode
    ) -> None:
        import torch

        from model.hardware import resolve_device, usable_cpus
        from model.inference import Embedder

        target = resolve_device(device)
        if target.type == "cpu":
            # Ray limits a one-CPU worker to one thread; on CPUs the network computes on every
            # core of its node, sharing them with the decode tasks, as the in-process job does
            torch.set_num_threads(usable_cpus())
        self.embedder = Embedder(net, preprocessing, target, precision, graphs)
        size = int(preprocessing.image_size)
        self.crop_shape = (size, size, 3)
        probe = self.embedder(torch.zeros((1, *self.crop_shape), dtype=torch.uint8))
        self.embedding_dim = probe.embedding.shape[1]
        self.weights_shape = tuple(probe.weights.shape[1:])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = np.flatnonzero(batch["status"] == "ok")
        embeddings = np.zeros((len(batch["status"]), self.embedding_dim), np.float32)
        weights = np.zeros((len(batch["status"]), *self.weights_shape), np.float32)
        if len(ok):
            crops = np.stack([np.frombuffer(batch["crop"][i], np.uint8) for i in ok])
            output = self.embedder(torch.from_numpy(crops.reshape(len(ok), *self.crop_shape)))
            embeddings[ok] = output.embedding.cpu().numpy()
            weights[ok] = output.weights.cpu().numpy()
        return {
            **{name: batch[name] for name in _FILE_COLUMNS},
            "embedding": embeddings,
            "weights": weights,
        }


def build_gallery_on_ray(
    images_dir: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    address: str | None = None,
    actors: int | str = "auto",
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    graphs: GraphMode = "off",
    index_type: str = "auto",
    report_path: str | os.PathLike[str] | None = None,
    labels_from_subfolders: bool = False,
    save_every: int = 50,
    progress: bool = True,
) -> BuildReport:
    """Index every image under ``images_dir`` into the gallery ``out_dir`` (created if absent)
    on Ray: the cluster at ``address``, or a local instance.

    ``actors``: how many embedding actors (``auto``: one per GPU of the cluster, else one);
    ``device``: ``auto`` embeds on GPUs when the cluster has any, ``cpu`` or ``cuda`` forces;
    ``precision`` and ``graphs`` as in :mod:`model.inference` (``auto``: fp16 on GPUs, fp32 on
    CPUs). The other arguments are :func:`index.build.build_gallery`'s.
    """
    from model.checkpoint import load_checkpoint

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _import_ray()
    files = list_files(images_dir, labels_from_subfolders)
    out = Path(out_dir)
    loaded = load_checkpoint(checkpoint_dir, device="cpu")
    with open_or_create(out, loaded, index_type) as gallery, ray_session(address) as ray:
        gpus = _gpus_per_actor(ray, device)  # checked before the writer starts a new report
        count = _actor_count(ray, actors, gpus)
        with GalleryWriter(
            gallery,
            len(files),
            Path(report_path) if report_path else out / FAILURES_FILE,
            save_every=save_every,
            progress=progress,
        ) as writer:
            if files:
                known = np.array(sorted(gallery.known_sha256()), dtype="S64")
                batches = _embedded_batches(
                    ray,
                    files,
                    known,
                    loaded,
                    gpus=gpus,
                    actors=count,
                    batch_size=batch_size,
                    precision=precision,
                    graphs=graphs,
                )
                for batch in batches:
                    _write(writer, batch)
    return writer.report()


def _embedded_batches(
    ray: Any,
    files: list[tuple[Path, str | None]],
    known: np.ndarray,
    loaded: Any,
    *,
    gpus: int,
    actors: int,
    batch_size: int,
    precision: str,
    graphs: GraphMode,
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data pipeline: blocks of files, decoded by CPU tasks, embedded by ``actors``
    actors (holding ``gpus`` GPUs each), streamed back to the driver in batches (in no
    particular order)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the writer shows the job's progress
    context.print_on_execution_start = False
    dataset = (
        ray.data.from_items(
            [{"path": str(path), "label": label} for path, label in files],
            override_num_blocks=math.ceil(len(files) / batch_size),
        )
        .map_batches(
            decode_files,
            batch_size=None,
            batch_format="numpy",
            fn_kwargs={"known_ref": ray.put(known), "preprocessing": loaded.config.preprocessing},
            num_cpus=1,
            # Ray's default for CPU tasks (a worker runs any number of them), spelt out: it also
            # keeps the decode tasks apart from CPU actors, into which Ray Data would otherwise
            # fuse them (one process decoding and embedding in turn)
            max_calls=0,
        )
        .map_batches(
            EmbeddingActor,
            batch_size=batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "net": loaded.net,
                "preprocessing": loaded.config.preprocessing,
                "device": "cuda" if gpus else "cpu",
                "precision": precision,
                "graphs": graphs,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=0 if gpus else 1,
        )
    )
    yield from dataset.iter_batches(batch_size=batch_size, batch_format="numpy")


def _write(writer: GalleryWriter, batch: dict[str, np.ndarray]) -> None:
    status = batch["status"]
    ok = np.flatnonzero(status == "ok")
    failed = np.flatnonzero(status == "failed")
    writer.write(
        [
            ItemInput(str(batch["path"][i]), str(batch["sha256"][i]), _label(batch["label"][i]))
            for i in ok
        ],
        batch["embedding"][ok],
        list(batch["weights"][ok]),
        known=int(np.count_nonzero(status == "known")),
        failed=[(str(batch["path"][i]), str(batch["reason"][i])) for i in failed],
    )


def _label(value: Any) -> str | None:
    """A label as it travels ("" or None for none; labels are subfolder names, never "")."""
    return str(value) if value else None


def _gpus_per_actor(ray: Any, device: str) -> int:
    """1 when the actors embed on GPUs, 0 on CPUs; ``cuda`` without a GPU in the cluster is an
    error now rather than actors that never start."""
    from model.hardware import DeviceError, check_device_name

    name = check_device_name(device)
    available = int(ray.cluster_resources().get("GPU", 0))
    if name == "auto":
        return 1 if available else 0
    if name.startswith("cuda"):
        if not available:
            raise DeviceError(f"device {device!r} was requested but the Ray cluster has no GPU")
        return 1
    return 0


def _actor_count(ray: Any, actors: int | str, gpus: int) -> int:
    """How many embedding actors; CPU actors hold a CPU each, and must leave the decode tasks
    at least one (else the job would wait for ever)."""
    resources = ray.cluster_resources()
    if actors == "auto":
        return max(1, int(resources.get("GPU", 0))) if gpus else 1
    try:
        count = int(actors)
    except ValueError:
        raise ValueError(f"actors must be a count or 'auto', got {actors!r}") from None
    if count <= 0:
        raise ValueError(f"actors must be positive, got {actors!r}")
    cpus = int(resources.get("CPU", 0))
    if not gpus and count >= cpus:
        raise ValueError(
            f"{count} CPU actors would leave none of the cluster's {cpus} CPUs to decoding: "
            f"use at most {max(1, cpus - 1)}"
        )
    return count
