"""The demo's default head: chosen on validation photos, read once on the test photos.

The demo meets plain photos of classes its head never trained on, and draws heatmaps of where it
pools.  Its head is a GSP head trained on the "textures" instance collages with the protocol's
chosen recipe plus :data:`DEMO_FLAGS` (made by ``gsp train --config configs/demo_head.yaml`` and
``gsp demo export-head``; bench/unseen.py's loop trains the same recipe) and shipped with a
query-time ``mu`` (:data:`SHIP_MU`).  For every head (pooled over seeds) and ``mu`` it measures:

- retrieval by class of plain CIFAR-10 photos of the classes no head trains on, at the demo's
  224 px without crop, beside the untrained backbone's average pooling (which it must match);
- the share of its pooling weight on the object cell of the instance protocol's collages (its
  heatmaps; 1.5x the uniform share is the aim).

By default on validation (``PHOTOS`` CIFAR-10 *train* photos per class and the validation
collages); ``--test`` reads the test photos and test collages once, at :data:`SHIP_MU`.

    .venv/bin/python bench/unseen_demo.py [--heads FILE ...] [--bench-seeds 0 1 2] [--test]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen
import unseen_data
import unseen_protocols as P

from app.demo.prepare import SHIPPED_HEAD, head_options
from model.gsp import GeneralizedSumPooling

PHOTOS = 50
# On top of the protocol's chosen recipe; chosen on validation photos (docs/benchmarks.md): a
# frozen plain-PCA projection of the clean training photos keeps what plain photos need, and a
# sharper transport (entropy weight 300) keeps the object share at the shipped mu.
DEMO_FLAGS = (
    "--start plain --start-from clean --start-dim 256 --lr-gsp-projection 0 --entropy-weight 300"
)
SHIP_MU = 0.55


def validation_photos() -> dict[str, Tensor]:
    """Feature maps and labels of the validation photos, cached by protocol digest."""
    path = unseen_data.CACHE_DIR / f"demo-val-{P.current().digest()}-{PHOTOS}.safetensors"
    if path.is_file():
        return load_file(str(path))
    from model.data.cifar import ensure_cifar10

    root = ensure_cifar10()
    rng = np.random.default_rng([P.current().data_seed, 2])
    paths, labels = [], []
    for label, name in enumerate(P.current().real_photo_classes):
        photos = sorted((root / "train" / name).glob("*.jpg"))
        paths += [photos[i] for i in rng.choice(len(photos), PHOTOS, replace=False)]
        labels += [label] * PHOTOS
    loaders = [unseen_data._photo_loader(p) for p in paths]
    tensors = {
        "maps": unseen_data._extract(
            loaders, P.current().real_photo_input_size, "validation photos"
        ),
        "label": torch.tensor(labels),
    }
    save_file(tensors, str(path))
    return tensors


def demo_recipe(protocol: str) -> unseen.Recipe:
    """The protocol's chosen recipe with :data:`DEMO_FLAGS`."""
    return unseen.recipe_of(
        unseen.build_parser(protocol).parse_args(["--protocol", protocol, *DEMO_FLAGS.split()])
    )


def measure_head(
    head: torch.nn.Module, photos: Tensor, labels: Tensor, collages: Tensor, positions: Tensor
) -> dict[str, float]:
    """P@1, MAP@R, eff dim and cos on the photos; object share on the collages."""
    measured = unseen.measures(unseen.pool(head, photos)[0], labels)
    measured["share"] = unseen.object_share(unseen.pool(head, collages)[1], positions)
    return measured


def print_rows(rows: dict[str, list[dict[str, float]]], title: str) -> None:
    keys = ("P@1", "MAP@R", "eff dim", "cos", "share")
    print(f"| {title} | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for name, runs in rows.items():
        cells = [
            unseen.mean_spread([run[key] for run in runs], 3 if key in ("cos", "share") else 1)
            for key in keys
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=sorted(P.PROTOCOLS), default=P.DEFAULT)
    parser.add_argument("--mu", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    parser.add_argument(
        "--heads",
        type=Path,
        nargs="*",
        default=[SHIPPED_HEAD],
        help="head files to measure, pooled as seeds of one row (default: the shipped head)",
    )
    parser.add_argument(
        "--bench-seeds",
        type=int,
        nargs="*",
        default=[],
        help="also train the demo recipe with bench/unseen.py's loop, one head per seed",
    )
    parser.add_argument(
        "--test",
        action="store_true",
        help=f"instead of validation: the test photos and collages, once, at mu {SHIP_MU}",
    )
    args = parser.parse_args()
    P.use(args.protocol)
    torch.set_num_threads(2)
    data = unseen_data.load()
    split = "test" if args.test else "val"
    if args.test:
        photos = {"maps": data["real_maps"], "label": data["real_label"]}
        mus = [SHIP_MU]
    else:
        photos, mus = validation_photos(), args.mu
    collages, positions = data[f"{split}_maps"], data[f"{split}_position"]
    backbone = unseen.measures(photos["maps"].float().mean(dim=(2, 3)), photos["label"])
    backbone["share"] = P.current().uniform_share
    rows: dict[str, list[dict[str, float]]] = {"untrained backbone GAP": [backbone]}
    channels = photos["maps"].shape[1]
    heads = [(f"{len(args.heads)} head files", load_head(p, channels)) for p in args.heads]
    if args.bench_seeds:
        recipe = demo_recipe(args.protocol)
        print(f"{recipe}\n")
        start = unseen.head_start(data, recipe)
        inputs = unseen.training_inputs(data, start, "instance", recipe)
        for seed in args.bench_seeds:
            trained = unseen.full_head(unseen.train_head("GSP", recipe, inputs, start, seed), start)
            assert isinstance(trained, GeneralizedSumPooling)
            heads.append((f"bench/unseen.py heads ({len(args.bench_seeds)} seeds)", trained))
    for name, head in heads:
        for mu in mus:
            head.transport_ratio = mu
            measured = measure_head(head, photos["maps"], photos["label"], collages, positions)
            rows.setdefault(f"{name}, mu {mu}", []).append(measured)
    print(
        f"protocol {P.current().name}; {split}: {len(photos['label'])} photos of "
        f"{len(P.current().real_photo_classes)} unseen classes; share on the {split} collages"
    )
    print_rows(rows, f"pooling ({split})")


def load_head(path: Path, channels: int) -> GeneralizedSumPooling:
    """A head file (``gsp demo export-head``) as the demo loads it."""
    dim, options = head_options(path)
    head = GeneralizedSumPooling(channels, dim, **options)
    head.load_state_dict(load_file(str(path)))
    return head.eval()


if __name__ == "__main__":
    main()
