"""``gsp eval --checkpoint DIR --data SPEC [--out results.json]``: retrieval metrics of a model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from app.commands.options import add_device_option, add_workers_option


def parse_data_spec(text: str) -> dict[str, Any]:
    """A data spec from a YAML file, an inline YAML mapping, or ``kind=root[,key=value...]``."""
    path = Path(text)
    if path.suffix in {".yaml", ".yml", ".json"} and path.is_file():
        loaded = yaml.safe_load(path.read_text())
    else:
        loaded = yaml.safe_load(text)
    if isinstance(loaded, str) and "=" in loaded:
        loaded = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            loaded[key.strip()] = yaml.safe_load(value) if value else None
    if not isinstance(loaded, dict):
        raise ValueError(
            f"--data must be a YAML mapping, a YAML file or kind=root[,key=value], got {text!r}"
        )
    return loaded


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure retrieval quality of a checkpoint",
        description="Precision@1, R-Precision, MAP@R, Recall@1/2/4/8 (and the target-cell "
        "mass share on collage data) of a checkpoint on a data set's test split.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument(
        "--data",
        required=True,
        help="data spec: cub=ROOT, inshop=ROOT, folder=DIR, collage=,per_class=400 or YAML",
    )
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--batch-size", type=int, default=128)
    add_device_option(parser)
    add_workers_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from model.evaluate import evaluate_checkpoint, format_table
    from model.hardware import DeviceError, resolve_device, resolve_workers

    spec = parse_data_spec(args.data)
    try:
        device = str(resolve_device(args.device))
    except DeviceError as error:
        print(f"gsp eval: {error}", file=sys.stderr)
        return 2
    workers = resolve_workers(args.workers, accelerator=device.startswith("cuda"))
    metrics = evaluate_checkpoint(args.checkpoint, spec, args.batch_size, device, workers)
    print(format_table(metrics))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": str(args.checkpoint), "data": spec, "metrics": metrics}
        out.write_text(json.dumps(record, indent=2) + "\n")
    return 0
