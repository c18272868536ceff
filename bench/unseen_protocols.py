"""Class-disjoint protocols of bench/unseen.py, each fixed here before any head was tuned on it.

Two protocols share one set of collages, so the frozen backbone sees every image once:

- **instance in clutter**: each object photo is pasted into ``copies`` collages (a ``grid`` x
  ``grid`` canvas of ``cell`` px CIFAR-10 photos), each time at a fresh random cell among fresh
  clutter; the copies of one photo are one "class" and must find each other.  Train, validation
  and test photos come from disjoint CIFAR-10 classes (``split_classes``);
- **class-disjoint collage**: the same training collages labelled by CIFAR-10 class; validation
  and test are the first copy of every validation / test photo, labelled by class, so that no
  two of them share a photo.

Train and validation use CIFAR-10 train photos, test uses CIFAR-10 test photos.  Validation
classes are carved from the training side (never the test classes): every setting is chosen on
them, the test split is read once per reported run.  ``real_photo_*`` is the third check, for the
demo model: plain CIFAR-10 test photos (no collage) of the classes no head was trained on,
retrieved by class.

Two versions, both kept so that every reported figure can be re-run:

- ``objects`` (committed f7655e6, the first): clutter is photos of two further classes (frog,
  horse), 3 training classes, 32 px cells shown at 64 px (a 6 x 6 map, 2 x 2 locations per cell).
  Its diagnosis (docs/benchmarks.md): even a location classifier *trained on the true object
  masks* puts 0.15 of its weight on the object cells of the validation classes (uniform 0.11),
  so no pooling head on these frozen features can learn where an unseen object is: the clutter
  (animals) is the same kind of thing as half the unseen objects, and 3 classes teach "airplane,
  car or bird", not "object";
- ``textures`` (the second, fixed before any run on it): clutter is *background*, not objects:
  CIFAR-10 photos of the split's own folder cut into ``shuffle_block`` px blocks and shuffled,
  which keeps their colours and textures and destroys their shapes (what shelves, floors and
  foliage are behind a product); 5 training classes, validation classes one vehicle and one
  animal like the test classes; 32 px cells shown at 96 px (a 9 x 9 map, 3 x 3 locations per
  cell), so that a location sees mostly its own cell.  The test classes are the same as
  ``objects``'.

:meth:`Protocol.digest` hashes a version's parameters; the feature cache is named by it, so a
changed protocol never reuses stale features.  Scripts pick a version with ``--protocol``
(:func:`use`); :func:`current` is the one in use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from model.data.cifar import CIFAR10_CLASSES


@dataclass(frozen=True)
class Protocol:
    """One version's parameters (see the module docstring)."""

    name: str
    split_classes: dict[str, tuple[str, ...]]
    clutter_classes: tuple[str, ...]  # empty: shuffled blocks of every class's photos
    photos_per_class: dict[str, int]
    copies: int  # collages per object photo, each with fresh clutter and a fresh position
    grid: int  # grid x grid cells: uniform weights give 1/grid^2 of the weight to the object
    cell: int  # CIFAR-10's own 32 px, pasted unscaled
    input_size: int  # the canvas resized to this: the backbone's map is input_size / 32 wide
    shuffle_block: int = 0  # > 0: clutter photos cut into blocks this wide and shuffled
    data_seed: int = 0  # which photos, clutter and positions: the same for every head and seed
    seeds: tuple[int, ...] = (0, 1, 2)  # head initialisation and batch order
    embedding_dim: int = 128
    backbone: str = "efficientnet_lite0"  # ImageNet weights, frozen
    real_photos_per_class: int = 100  # CIFAR-10 test photos at the demo's 224 px, no crop
    real_photo_input_size: int = 224

    @property
    def real_photo_classes(self) -> tuple[str, ...]:
        """Every CIFAR-10 class no head trains on."""
        return tuple(n for n in CIFAR10_CLASSES if n not in self.split_classes["train"])

    def record(self) -> dict[str, object]:
        """Every parameter, as one JSON-able record (printed with each run; the first version's
        record is unchanged, so its cache keeps its name)."""
        record: dict[str, object] = {
            "split_classes": self.split_classes,
            "clutter_classes": self.clutter_classes,
            "photos_per_class": self.photos_per_class,
            "copies": self.copies,
            "grid": self.grid,
            "cell": self.cell,
            "input_size": self.input_size,
            "data_seed": self.data_seed,
            "seeds": self.seeds,
            "embedding_dim": self.embedding_dim,
            "backbone": self.backbone,
            "real_photo_classes": self.real_photo_classes,
            "real_photos_per_class": self.real_photos_per_class,
            "real_photo_input_size": self.real_photo_input_size,
        }
        if self.shuffle_block:
            record["shuffle_block"] = self.shuffle_block
        return record

    def digest(self) -> str:
        """Short hash of :meth:`record`; names the feature cache."""
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def map_size(self) -> int:
        """Width of the backbone's feature map (stride 32)."""
        return self.input_size // 32

    @property
    def uniform_share(self) -> float:
        """The object cell's share of uniform pooling weights."""
        return 1 / (self.grid * self.grid)


PROTOCOLS: dict[str, Protocol] = {
    "objects": Protocol(
        name="objects",
        split_classes={
            "train": ("airplane", "automobile", "bird"),
            "val": ("cat", "deer"),
            "test": ("dog", "ship", "truck"),
        },
        clutter_classes=("frog", "horse"),
        photos_per_class={"train": 100, "val": 50, "test": 100},
        copies=4,
        grid=3,
        cell=32,
        input_size=192,
    ),
    "textures": Protocol(
        name="textures",
        split_classes={
            "train": ("airplane", "bird", "cat", "deer", "frog"),
            "val": ("automobile", "horse"),
            "test": ("dog", "ship", "truck"),
        },
        clutter_classes=(),
        photos_per_class={"train": 100, "val": 50, "test": 100},
        copies=4,
        grid=3,
        cell=32,
        input_size=288,
        shuffle_block=8,
    ),
}
DEFAULT = "textures"
_in_use = [PROTOCOLS[DEFAULT]]


def use(name: str) -> Protocol:
    """Make ``name`` the protocol of this process (the scripts' ``--protocol``)."""
    _in_use[0] = PROTOCOLS[name]
    return _in_use[0]


def current() -> Protocol:
    """The protocol in use."""
    return _in_use[0]
