"""``gsp eval --checkpoint DIR --data SPEC [--cells FILE] [--out results.json]``: retrieval metrics
of a model on a named split, and the share of its pooling weight on objects."""

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
        description="Precision@1, R-Precision, MAP@R, Recall@1/2/4/8 of a checkpoint on a data "
        "set's test split (or the split the spec names), and the object-weight share against the "
        "share uniform weights give (collages, or --cells). Frozen-backbone checkpoints read "
        "the backbone's features from their run's feature cache.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument(
        "--data",
        required=True,
        help="data spec: cub=ROOT, inshop=ROOT, folder=DIR, collage=,per_class=400 or YAML",
    )
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument(
        "--cells",
        type=Path,
        metavar="FILE",
        help="CSV of object regions (header path,x0,y0,x1,y1 in fractions or "
        "path,left,top,right,bottom in pixels; paths relative to the CSV): adds the share of "
        "pooling weight on the objects and the share uniform weights give",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="feature cache to read and fill (default: the run's, when it froze the backbone)",
    )
    cache.add_argument(
        "--no-cache", action="store_true", help="run the backbone, never the feature cache"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
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
    cache: bool | Path = False if args.no_cache else (args.cache_dir or True)
    try:
        result = evaluate_checkpoint(
            args.checkpoint,
            spec,
            args.batch_size,
            device,
            workers,
            cache=cache,
            regions=args.cells,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as error:
        print(f"gsp eval: {error}", file=sys.stderr)
        return 1
    print(f"split: {' vs '.join(result.splits)}  features: {result.features}")
    print(format_table(result.metrics))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "checkpoint": str(args.checkpoint),
            "data": spec,
            "splits": result.splits,
            "metrics": result.metrics,
        }
        out.write_text(json.dumps(record, indent=2) + "\n")
    return 0
