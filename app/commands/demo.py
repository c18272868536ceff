"""``gsp demo``: prepare the built-in demo (model + gallery, offline, cached) and serve it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="prepare and serve the built-in demo (generated scenes, EfficientNet-Lite0 + GSP)",
        description="The demo needs nothing but this package: it puts the GSP head shipped in "
        "model/weights/ on the frozen EfficientNet-Lite0 (ImageNet weights shipped as a "
        "package), draws its own scenes, indexes a gallery and caches everything under "
        "--cache-dir.",
    )
    actions = parser.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="build (or reuse) the demo model and gallery")
    serve = actions.add_parser("serve", help="prepare, then serve the demo gallery over HTTP")
    for action in (prepare, serve):
        action.add_argument(
            "--gallery-source",
            type=Path,
            help="index this image folder with the demo model instead of the generated gallery",
        )
        action.add_argument(
            "--cache-dir",
            type=Path,
            default=Path(".cache/demo"),
            help="where the demo's model and galleries are cached (default .cache/demo)",
        )
    export = actions.add_parser(
        "export-head",
        help="write a trained GSP checkpoint's head as the demo's shipped head file",
        description="The demo's default head is made by `gsp train --config "
        "configs/demo_head.yaml` and this command (docs/benchmarks.md).",
    )
    export.add_argument("--checkpoint", type=Path, required=True, help="a gsp train checkpoint")
    export.add_argument(
        "--mu", type=float, help="the transport ratio the demo pools with (default: as trained)"
    )
    export.add_argument(
        "--out",
        type=Path,
        default=Path("model/weights/demo_gsp_head.safetensors"),
        help="where to write it (default model/weights/demo_gsp_head.safetensors)",
    )
    export.set_defaults(handler=run_export_head)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    prepare.set_defaults(handler=run_prepare)
    serve.set_defaults(handler=run_serve)


def _prepare(args: argparse.Namespace):
    from app.demo.prepare import prepare_demo, prepare_user_gallery

    started = time.perf_counter()
    if args.gallery_source is not None:
        assets = prepare_user_gallery(args.gallery_source, cache_dir=args.cache_dir)
    else:
        assets = prepare_demo(cache_dir=args.cache_dir)
        report = assets.report
        state = "reused from the cache" if assets.reused else "built"
        print(
            f"demo gallery {state}: {report['items']} scenes, leave-one-out P@1 "
            f"{report['precision_at_1']:.3f}, GSP weight on the objects "
            f"{report['object_weight_share']:.1%} (objects cover "
            f"{report['object_area_share']:.1%} of the images)"
        )
    print(
        f"demo ready in {time.perf_counter() - started:.1f} s: checkpoint {assets.checkpoint}, "
        f"gallery {assets.gallery}",
        flush=True,
    )
    return assets


def run_prepare(args: argparse.Namespace) -> int:
    try:
        _prepare(args)
    except FileNotFoundError as error:
        print(f"gsp demo: {error}", file=sys.stderr)
        return 2
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from app.commands.serve import serve

    try:
        assets = _prepare(args)
    except FileNotFoundError as error:
        print(f"gsp demo: {error}", file=sys.stderr)
        return 2
    demo = {
        "checkpoint": assets.checkpoint,
        "gallery": assets.gallery,
        "image_roots": [assets.image_root],
    }
    return serve(demo, host=args.host, port=args.port)


def run_export_head(args: argparse.Namespace) -> int:
    from app.demo.prepare import export_head
    from model.checkpoint import CheckpointError

    command = f"gsp demo export-head --checkpoint {args.checkpoint} --out {args.out}"
    if args.mu is not None:
        command += f" --mu {args.mu}"
    try:
        metadata = export_head(args.checkpoint, args.out, args.mu, command)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"gsp demo export-head: {error}", file=sys.stderr)
        return 2
    print(f"head written to {args.out} ({args.out.stat().st_size} bytes): {metadata}")
    return 0
