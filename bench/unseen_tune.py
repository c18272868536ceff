"""One GSP instance head on the validation split: the quick loop that chose the recipe.

Takes bench/unseen.py's recipe flags; trains the GSP instance head (and, with ``--gap``, the GAP
one) per seed on the training classes and prints its validation P@1, MAP@R, effective dimension,
mean cosine and object share.  Validation only: it cannot read the test split.

    .venv/bin/python bench/unseen_tune.py [--protocol NAME] --seeds 0 [recipe flags] [--gap]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen
import unseen_data


def main() -> None:
    parser = unseen.build_parser()
    parser.add_argument("--gap", action="store_true", help="also the GAP instance head")
    args = parser.parse_args()
    unseen.P.use(args.protocol)
    if args.split != "val":
        raise SystemExit("bench/unseen_tune.py reads the validation split only")
    torch.set_num_threads(args.threads)
    recipe = unseen.recipe_of(args)
    data = unseen_data.load()
    start = unseen.head_start(data, recipe)
    inputs = unseen.training_inputs(data, start, "instance", recipe)
    evaluated = unseen.head_inputs(data["val_maps"], start)
    if inputs.location_targets is not None:
        share = unseen.object_share(inputs.location_targets, data["train_position"])
        print(f"teacher's pooling targets: object share {share:.3f} on the training collages")
    print(recipe)
    for seed in args.seeds:
        for kind in ("GAP", "GSP") if args.gap else ("GSP",):
            began = time.perf_counter()
            head = unseen.train_head(kind, recipe, inputs, start, seed)
            embeddings, weights = unseen.pool(head, evaluated[kind])
            row = unseen.measures(embeddings, data["val_instance"])
            share = (
                unseen.object_share(weights, data["val_position"])
                if kind == "GSP"
                else unseen.P.current().uniform_share
            )
            print(
                f"seed {seed} {kind} val instance: P@1 {row['P@1']:.2f} MAP@R {row['MAP@R']:.2f} "
                f"eff dim {row['eff dim']:.1f} cos {row['cos']:.3f} share {share:.3f} "
                f"({time.perf_counter() - began:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
