"""``gsp train --config FILE.yaml [key.sub=value ...] [--resume]``: run a training job.

Under ``torchrun`` the same command trains with DistributedDataParallel on every rank.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an embedding network from a YAML config",
        description="Train an embedding network. Overrides are dotted keys with YAML values, "
        "e.g. schedule.epochs=5 optimizer.lr_pooling=3e-4 model.pooling=gap.",
    )
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last epoch in output_dir"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide every progress bar (training, feature caching, embedding)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from model.training import train
    from model.training.inputs import check_data
    from model.training_config import load_training_config

    try:  # a config or data mistake is a message, before any slow work, not a traceback
        config = load_training_config(args.config, args.overrides)
        check_data(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"gsp train: {error}", file=sys.stderr)
        return 2
    try:
        result = train(config, resume=args.resume, show_progress=not args.no_progress)
    except FileExistsError as error:  # output_dir holds another run
        print(f"gsp train: {error}", file=sys.stderr)
        return 2
    if result.history:
        print(json.dumps({"output_dir": str(result.output_dir), "last": result.history[-1]}))
        if result.best_epoch is not None:
            best = result.output_dir / "best"
            print(f"best epoch {result.best_epoch} (chosen on val MAP@R): {best}")
    if result.test is not None:
        print(f"test (scored once, on {result.test['checkpoint']}/): {json.dumps(result.test)}")
    return 0
