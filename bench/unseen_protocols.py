"""Class-disjoint protocols of bench/unseen.py, fixed here before any head was tuned on them.

Two protocols share one set of collages, so the frozen backbone sees every image once:

- **instance in clutter**: each object photo is pasted into ``COPIES`` collages (a ``GRID`` x
  ``GRID`` canvas of ``CELL`` px CIFAR-10 photos), each time at a fresh random cell among fresh
  clutter photos; the copies of one photo are one "class" and must find each other.  Train,
  validation and test photos come from disjoint CIFAR-10 classes (``SPLIT_CLASSES``);
- **class-disjoint collage**: the same training collages labelled by CIFAR-10 class; validation
  and test are the first copy of every validation / test photo, labelled by class, so that no
  two of them share a photo.

Clutter comes from ``CLUTTER_CLASSES`` only (never an object class); train and validation use
CIFAR-10 train photos, test uses CIFAR-10 test photos.  Validation classes are carved from the
training side (never the test classes): every setting is chosen on them, the test split is
read once per reported run.  ``REAL_PHOTO_*`` is the third check, for the demo model: plain
CIFAR-10 test photos (no collage) of the classes no head was trained on, retrieved by class.

:func:`protocol_digest` hashes all of it; the feature cache is named by it, so a changed
protocol never reuses stale features.
"""

from __future__ import annotations

import hashlib
import json

from model.data.cifar import CIFAR10_CLASSES

SPLIT_CLASSES: dict[str, tuple[str, ...]] = {
    "train": ("airplane", "automobile", "bird"),
    "val": ("cat", "deer"),
    "test": ("dog", "ship", "truck"),
}
CLUTTER_CLASSES: tuple[str, ...] = ("frog", "horse")
PHOTOS_PER_CLASS: dict[str, int] = {"train": 100, "val": 50, "test": 100}
COPIES = 4  # collages per object photo, each with fresh clutter and a fresh position
GRID = 3  # 3 x 3 cells: uniform weights give 1/9 of the cells' weight to the object
CELL = 32  # CIFAR-10's own size, pasted unscaled
INPUT_SIZE = 192  # the 96 px canvas resized to 192: a 6 x 6 EfficientNet-Lite0 map, 2 x 2 per cell
DATA_SEED = 0  # which photos, clutter and positions: the same for every head and seed
SEEDS: tuple[int, ...] = (0, 1, 2)  # head initialisation and batch order
EMBEDDING_DIM = 128
BACKBONE = "efficientnet_lite0"  # ImageNet weights, frozen
REAL_PHOTO_CLASSES: tuple[str, ...] = tuple(
    name for name in CIFAR10_CLASSES if name not in SPLIT_CLASSES["train"]
)
REAL_PHOTOS_PER_CLASS = 100  # CIFAR-10 test photos, at the demo's 224 px input, no crop
REAL_PHOTO_INPUT_SIZE = 224


def protocol() -> dict[str, object]:
    """Every parameter above, as one JSON-able record (printed with each run)."""
    return {
        "split_classes": SPLIT_CLASSES,
        "clutter_classes": CLUTTER_CLASSES,
        "photos_per_class": PHOTOS_PER_CLASS,
        "copies": COPIES,
        "grid": GRID,
        "cell": CELL,
        "input_size": INPUT_SIZE,
        "data_seed": DATA_SEED,
        "seeds": SEEDS,
        "embedding_dim": EMBEDDING_DIM,
        "backbone": BACKBONE,
        "real_photo_classes": REAL_PHOTO_CLASSES,
        "real_photos_per_class": REAL_PHOTOS_PER_CLASS,
        "real_photo_input_size": REAL_PHOTO_INPUT_SIZE,
    }


def protocol_digest() -> str:
    """Short hash of :func:`protocol`; names the feature cache."""
    return hashlib.sha256(json.dumps(protocol(), sort_keys=True).encode()).hexdigest()[:12]
