"""Demo preparation: the built-in model and gallery, made offline and cached under .cache/demo.

The demo model is EfficientNet-Lite0 with its shipped ImageNet weights, frozen, and a GSP head: by
default the head shipped in ``model/weights/`` (made by ``gsp train --config
configs/demo_head.yaml`` on the CIFAR-10 collages of bench/unseen.py's "textures" protocol and
``gsp demo export-head``, chosen for real photos of unseen classes, see docs/benchmarks.md), or
with ``head="scenes"`` one trained by :func:`model.training.train` (frozen-backbone mode) on
generated training scenes.  The demo gallery is a second, separately seeded set of scenes indexed
with that model.  Each stage lives in a directory named by a hash of everything that determines it
(scene parameters, seeds, sizes, model and training settings, code version), and is marked
complete by a ``ready.json`` written last: a later run with the same inputs reuses it, changed
inputs build a new one, and a run interrupted half-way is started again from scratch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import model
from app.demo.scenes import CLASSES, Scene, SceneConfig, generate_scenes
from model.config import ModelConfig
from model.version import package_version

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DemoAssets",
    "DemoSpec",
    "box_weight_share",
    "code_version",
    "prepare_demo",
    "prepare_model",
    "prepare_user_gallery",
    "upgrade_cached",
]

DEFAULT_CACHE_DIR = Path(".cache/demo")
# package data of the model package (pyproject.toml), so installs and images carry it
SHIPPED_HEAD = Path(model.__file__).resolve().parent / "weights" / "demo_gsp_head.safetensors"
READY_FILE = "ready.json"
SCENES_FILE = "scenes.json"
_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class DemoSpec:
    """Every input of the demo; :meth:`model_key` and :meth:`gallery_key` hash it."""

    scenes: SceneConfig = field(default_factory=SceneConfig)
    train_seed: int = 1
    gallery_seed: int = 2
    train_per_class: int = 48
    gallery_per_class: int = 24
    input_size: int = 224
    pretrained: bool = True
    embedding_dim: int = 128
    num_prototypes: int = 32
    transport_ratio: float = 0.1
    entropy_weight: float = 30.0
    epochs: int = 8
    batch_size: int = 64
    m_per_class: int = 8
    learning_rate: float = 1e-3
    head: str = "shipped"  # "shipped": SHIPPED_HEAD; "scenes": trained on generated scenes

    def __post_init__(self) -> None:
        if self.head not in ("shipped", "scenes"):
            raise ValueError(f"head must be 'shipped' or 'scenes', got {self.head!r}")

    def model_config(self) -> ModelConfig:
        """EfficientNet-Lite0 + GSP; the whole scene is the input (resize, no crop).  With the
        shipped head, its embedding size and pooling options come from the head's file."""
        from model.backbones import default_preprocessing

        preprocessing = dataclasses.replace(
            default_preprocessing(_BACKBONE),
            image_size=self.input_size,
            resize_size=self.input_size,
        )
        embedding_dim, options = (
            self.embedding_dim,
            {
                "num_prototypes": self.num_prototypes,
                "transport_ratio": self.transport_ratio,
                "entropy_weight": self.entropy_weight,
            },
        )
        if self.head == "shipped":
            embedding_dim, options = head_options()
        return ModelConfig(
            backbone=_BACKBONE,
            pretrained=self.pretrained,
            pooling="gsp",
            embedding_dim=embedding_dim,
            pooling_options=options,
            preprocessing=preprocessing,
        )

    def model_key(self) -> str:
        """Hash of what determines the trained model: training scenes, model, training, code."""
        return _digest(
            {
                "scenes": self.scenes.to_dict(),
                "train_seed": self.train_seed,
                "train_per_class": self.train_per_class,
                "model": self.model_config().to_dict(),
                "training": [self.epochs, self.batch_size, self.m_per_class, self.learning_rate],
                "head": _file_digest(SHIPPED_HEAD) if self.head == "shipped" else "scenes",
                "code": code_version(),
            }
        )

    def gallery_key(self) -> str:
        """Hash of what determines the demo gallery: the model and the gallery scenes."""
        return _digest(
            {
                "model": self.model_key(),
                "gallery_seed": self.gallery_seed,
                "gallery_per_class": self.gallery_per_class,
            }
        )


@dataclass(frozen=True)
class DemoAssets:
    """What ``gsp serve`` needs, where the gallery's images are, and the demo's measurements."""

    checkpoint: Path
    gallery: Path
    image_root: Path
    report: dict[str, Any]
    reused: bool


def code_version() -> str:
    """The package version plus a hash of this package's sources: code changes rebuild."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{package_version()}+{digest.hexdigest()[:12]}"


def head_options(path: Path = SHIPPED_HEAD) -> tuple[int, dict[str, Any]]:
    """Embedding size and GSP options of a head file (by default the shipped head), from its
    safetensors metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as head:
        metadata = head.metadata()
    return int(metadata["embedding_dim"]), {
        "num_prototypes": int(metadata["num_prototypes"]),
        "transport_ratio": float(metadata["transport_ratio"]),
        "entropy_weight": float(metadata["entropy_weight"]),
    }


def export_head(checkpoint: Path, out: Path, mu: float | None, command: str) -> dict[str, str]:
    """Write a GSP checkpoint's head as the demo's shipped-head file: its tensors, and as
    metadata its pooling options (pooling with ``mu`` when given), its backbone and ``command``.
    Returns the metadata."""
    from safetensors.torch import save_file

    from model.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    config = loaded.config
    if config.backbone != _BACKBONE or config.pooling != "gsp":
        raise ValueError(
            f"the demo takes a GSP head on {_BACKBONE}; {checkpoint} has "
            f"{config.pooling} on {config.backbone}"
        )
    options = config.pooling_options
    metadata = {
        "embedding_dim": str(config.embedding_dim),
        "num_prototypes": str(options["num_prototypes"]),
        "transport_ratio": str(options["transport_ratio"] if mu is None else mu),
        "trained_transport_ratio": str(options["transport_ratio"]),
        "entropy_weight": str(options["entropy_weight"]),
        "backbone": config.backbone,
        "checkpoint_fingerprint": loaded.fingerprint,
        "command": command,
    }
    tensors = {k: v.detach().contiguous() for k, v in loaded.net.pooling.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(out)
    return metadata


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _ready(directory: Path) -> dict[str, Any] | None:
    marker = directory / READY_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def _mark_ready(directory: Path, report: dict[str, Any]) -> None:
    staging = directory / f".{READY_FILE}.partial"
    staging.write_text(json.dumps(report, indent=2, sort_keys=True))
    staging.rename(directory / READY_FILE)


def _fresh(directory: Path) -> Path:
    """An empty directory (leftovers of an interrupted build are removed)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def write_scenes(scenes: Iterable[Scene], folder: Path, total: int, desc: str) -> dict[str, Any]:
    """Save scenes as ``folder/<class>/<nnnn>.png`` plus ``scenes.json`` (label, class, box)."""
    records: dict[str, Any] = {}
    for number, scene in enumerate(tqdm(scenes, total=total, desc=desc, unit="img")):
        relative = f"{scene.class_name}/{number:05d}.png"
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        scene.image.save(target, optimize=False, compress_level=1)
        records[relative] = {"label": scene.label, "class": scene.class_name, "box": scene.box}
    (folder / SCENES_FILE).write_text(json.dumps(records, indent=1, sort_keys=True))
    return records


# -- the model -------------------------------------------------------------------------------


def prepare_model(spec: DemoSpec, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The demo checkpoint directory, trained now unless a ready one matches ``spec``."""
    directory = Path(cache_dir).resolve() / f"model-{spec.model_key()}"
    checkpoint = directory / "checkpoint"
    if _ready(directory) is not None:
        return checkpoint
    from model.training import train
    from model.training_config import (
        DataConfig,
        LossConfig,
        OptimizerConfig,
        ScheduleConfig,
        TrainingConfig,
    )

    work = _fresh(directory)
    started = time.perf_counter()
    if spec.head == "shipped":
        _install_shipped_head(spec, checkpoint)
        _mark_ready(directory, {"built": time.time(), "head": str(SHIPPED_HEAD)})
        return checkpoint
    scenes_dir = work / "train-scenes"
    total = spec.train_per_class * len(CLASSES)
    print(f"demo: drawing {total} training scenes", flush=True)
    write_scenes(
        generate_scenes(spec.scenes, spec.train_seed, spec.train_per_class),
        scenes_dir,
        total,
        "training scenes",
    )
    (scenes_dir / SCENES_FILE).rename(work / SCENES_FILE)  # not an image class folder
    config = TrainingConfig(
        model=spec.model_config(),
        data=DataConfig(
            train={"folder": str(scenes_dir)},
            batch_size=spec.batch_size,
            m_per_class=spec.m_per_class,
            num_workers=0,
        ),
        loss=LossConfig(name="proxy_anchor", zsr=False),
        optimizer=OptimizerConfig(lr_pooling=spec.learning_rate),
        schedule=ScheduleConfig(epochs=spec.epochs, warmup_epochs=0.5),
        seed=spec.train_seed,
        output_dir=str(work / "run"),
        frozen_backbone=True,
        cache_dir=str(work / "features"),
        prototype_init="kcenter",
        amp=False,
        keep_checkpoints=1,
    )
    print(f"demo: training the GSP head on the frozen {_BACKBONE} backbone", flush=True)
    train(config)
    (work / "run" / f"epoch-{spec.epochs:03d}").rename(checkpoint)
    for leftover in ("run", "features", "train-scenes"):
        shutil.rmtree(work / leftover)
    _mark_ready(
        directory, {"built": time.time(), "seconds": round(time.perf_counter() - started, 1)}
    )
    return checkpoint


def _install_shipped_head(spec: DemoSpec, checkpoint: Path) -> None:
    """The frozen backbone with the shipped GSP head, written as a checkpoint (no training)."""
    from safetensors.torch import load_file

    from model.checkpoint import save_checkpoint
    from model.net import build_embedding_net

    config = spec.model_config()
    net = build_embedding_net(config)
    net.pooling.load_state_dict(load_file(str(SHIPPED_HEAD)))
    print(f"demo: EfficientNet-Lite0 with the GSP head shipped in {SHIPPED_HEAD.name}", flush=True)
    save_checkpoint(
        checkpoint,
        net.eval(),
        config,
        head=SHIPPED_HEAD.name,
        training_data="CIFAR-10 collages (textures protocol), configs/demo_head.yaml",
    )


# -- galleries -------------------------------------------------------------------------------


def box_weight_share(
    weights: np.ndarray, box: tuple[int, int, int, int], image_size: tuple[int, int]
) -> tuple[float, float]:
    """Share of the pooling weight inside ``box``, and the box's share of the image area.

    ``weights`` ``(h, w)`` covers the whole image (the demo's preprocessing does not crop); a
    cell partly inside the box counts with the fraction of its area inside.
    """
    height, width = weights.shape
    image_w, image_h = image_size
    x0, y0, x1, y1 = box

    def overlap(start: float, stop: float, extent: int, cells: int) -> np.ndarray:
        edges = np.linspace(0, extent, cells + 1)
        inside = np.clip(np.minimum(stop, edges[1:]) - np.maximum(start, edges[:-1]), 0, None)
        return inside / (extent / cells)

    coverage = np.outer(overlap(y0, y1, image_h, height), overlap(x0, x1, image_w, width))
    total = float(weights.sum())
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return float((weights * coverage).sum() / total), float(coverage.mean())


def evaluate_gallery(index_dir: Path, images_dir: Path, image_size: int) -> dict[str, Any]:
    """Leave-one-out P@1 of the gallery and the GSP weight share on the recorded object boxes."""
    from index.gallery import Gallery
    from model.evaluate import retrieval_metrics

    records = json.loads((images_dir / SCENES_FILE).read_text())
    embeddings, labels, shares, areas = [], [], [], []
    with Gallery.open(index_dir, read_only=True) as gallery:
        for relative, scene in records.items():
            sha256 = hashlib.sha256((images_dir / relative).read_bytes()).hexdigest()
            item_id = gallery.find_sha256(sha256)
            item = gallery.get(item_id) if item_id is not None else None
            embedding = gallery.embedding(item.id) if item is not None else None
            if item is None or embedding is None:
                raise RuntimeError(f"{relative} is missing from the gallery {index_dir}")
            embeddings.append(embedding)
            labels.append(scene["label"])
            share, area = box_weight_share(item.weights, scene["box"], (image_size, image_size))
            shares.append(share)
            areas.append(area)
    metrics = retrieval_metrics(np.stack(embeddings), np.asarray(labels))
    return {
        "items": len(labels),
        "precision_at_1": metrics["precision_at_1"],
        "map_at_r": metrics["map_at_r"],
        "object_weight_share": float(np.mean(shares)),
        "object_area_share": float(np.mean(areas)),
    }


def _index(images_dir: Path, checkpoint: Path, index_dir: Path, labelled: bool) -> None:
    from index.build import build_gallery

    report = build_gallery(
        images_dir, checkpoint, index_dir, labels_from_subfolders=labelled, workers=0
    )
    print(f"demo: {report.summary()}", flush=True)
    if report.failed:
        print(f"demo: {report.failed} file(s) could not be indexed, see {report.failures_path}")


def upgrade_cached(index_dir: Path) -> None:
    """Bring a gallery cached by an older version to this version's format (served writable,
    it would be refused); a no-op when there is none or it is current."""
    from index.layout import CURRENT
    from index.upgrade import upgrade_gallery

    if (index_dir / CURRENT).is_symlink():
        upgrade_gallery(index_dir)


def prepare_demo(spec: DemoSpec | None = None, cache_dir: Path = DEFAULT_CACHE_DIR) -> DemoAssets:
    """The demo model and the built-in gallery, built now unless ready ones match ``spec``."""
    spec = spec or DemoSpec()
    # absolute paths: the gallery records its images' paths, the service resolves them later
    directory = Path(cache_dir).resolve() / f"gallery-{spec.gallery_key()}"
    images, index_dir = directory / "images", directory / "index"
    checkpoint = prepare_model(spec, cache_dir)
    model_built = (_ready(checkpoint.parent) or {}).get("built")
    report = _ready(directory)
    if report is not None and report.get("model_built") == model_built:
        reused = True
        upgrade_cached(index_dir)
    else:
        reused = False
        _fresh(directory)
        total = spec.gallery_per_class * len(CLASSES)
        print(f"demo: drawing {total} gallery scenes", flush=True)
        write_scenes(
            generate_scenes(spec.scenes, spec.gallery_seed, spec.gallery_per_class),
            images,
            total,
            "gallery scenes",
        )
        _index(images, checkpoint, index_dir, labelled=True)
        report = evaluate_gallery(index_dir, images, spec.scenes.image_size)
        report["model_built"] = model_built
        _mark_ready(directory, report)
    return DemoAssets(checkpoint, index_dir, images, report, reused)


def prepare_user_gallery(
    folder: Path, spec: DemoSpec | None = None, cache_dir: Path = DEFAULT_CACHE_DIR
) -> DemoAssets:
    """Index the user's own image folder with the demo model (cache keyed by the folder path).

    The indexing job resumes, so a later run embeds only images added since.
    """
    spec = spec or DemoSpec()
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"gallery source {folder} is not a directory")
    checkpoint = prepare_model(spec, cache_dir)
    key = _digest({"folder": str(folder), "model": spec.model_key()})
    index_dir = Path(cache_dir).resolve() / f"user-{key}" / "index"
    print(f"demo: indexing {folder}", flush=True)
    upgrade_cached(index_dir)
    _index(folder, checkpoint, index_dir, labelled=False)
    return DemoAssets(checkpoint, index_dir, folder, {"source": str(folder)}, reused=False)
