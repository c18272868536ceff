"""Choosing the demo head's query-time ``mu`` on validation photos, never on the test photos.

The demo meets plain photos of classes its head never trained on.  This check uses CIFAR-10
*train* photos (``PHOTOS`` per class) of the 7 classes no head trains on (disjoint from the test
photos of bench/unseen.py's real-photo table), at the demo's 224 px without crop, retrieved by
class; and the validation collages for the object share.  It trains the recipe's GSP head
(bench/unseen.py defaults, seed 0) and pools with several ``mu`` beside the untrained backbone's
average pooling.  ``mu = 1`` pools uniformly: the head's whitened-PCA projection of GAP.

    .venv/bin/python bench/unseen_demo.py [--mu 0.1 0.3 0.5 1.0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen
import unseen_data
import unseen_protocols as P

PHOTOS = 50


def validation_photos() -> dict[str, torch.Tensor]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=sorted(P.PROTOCOLS), default=P.DEFAULT)
    parser.add_argument("--mu", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0])
    parser.add_argument(
        "--test-shipped",
        action="store_true",
        help="instead: the shipped head (model/weights/), once, on the real test photos and the "
        "test collages of bench/unseen.py, beside the untrained backbone",
    )
    args = parser.parse_args()
    P.use(args.protocol)
    torch.set_num_threads(2)
    if args.test_shipped:
        test_shipped()
        return
    photos = validation_photos()
    data = unseen_data.load()
    recipe = unseen.recipe_of(unseen.parse_defaults(args.protocol))
    start = unseen.head_start(data)
    began = time.perf_counter()
    head = unseen.train_head(
        "GSP", recipe, unseen.training_inputs(data, start, "instance"), start, 0
    )
    print(f"GSP head trained in {time.perf_counter() - began:.0f} s\n{recipe}\n")
    photo_maps = unseen.project(photos["maps"], *start)
    collage_maps = unseen.project(data["val_maps"], *start)
    backbone = unseen.measures(photos["maps"].float().mean(dim=(2, 3)), photos["label"])
    print("| pooling | val photos P@1 | MAP@R | eff dim | cos | val collages object share |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| untrained backbone GAP | {backbone['P@1']:.1f} | {backbone['MAP@R']:.1f} | "
        f"{backbone['eff dim']:.1f} | {backbone['cos']:.3f} | {P.current().uniform_share:.3f} |"
    )
    for mu in args.mu:
        head.transport_ratio = mu
        measured = unseen.measures(unseen.pool(head, photo_maps)[0], photos["label"])
        weights = unseen.pool(head, collage_maps)[1]
        share = unseen.object_share(weights, data["val_position"])
        print(
            f"| GSP head, mu {mu} | {measured['P@1']:.1f} | {measured['MAP@R']:.1f} | "
            f"{measured['eff dim']:.1f} | {measured['cos']:.3f} | {share:.3f} |"
        )


def test_shipped() -> None:
    from app.demo.prepare import SHIPPED_HEAD, shipped_head_options
    from model.gsp import GeneralizedSumPooling

    data = unseen_data.load()
    dim, options = shipped_head_options()
    head = GeneralizedSumPooling(data["real_maps"].shape[1], dim, **options)
    head.load_state_dict(load_file(str(SHIPPED_HEAD)))
    head.eval()
    backbone = unseen.measures(data["real_maps"].float().mean(dim=(2, 3)), data["real_label"])
    shipped = unseen.measures(unseen.pool(head, data["real_maps"])[0], data["real_label"])
    share = unseen.object_share(unseen.pool(head, data["test_maps"])[1], data["test_position"])
    print(f"shipped head {SHIPPED_HEAD.name}: {options}")
    print("| real test photos, 7 unseen classes | P@1 | MAP@R | eff dim | cos |")
    print("| --- | --- | --- | --- | --- |")
    for name, measured in (("untrained backbone GAP", backbone), ("shipped head", shipped)):
        cells = " | ".join(f"{measured[k]:.{3 if k == 'cos' else 1}f}" for k in measured)
        print(f"| {name} | {cells} |")
    uniform = P.current().uniform_share
    print(f"object share on the test collages: {share:.3f} (uniform {uniform:.3f})")


if __name__ == "__main__":
    main()
