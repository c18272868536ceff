"""The ``gsp`` command line: one parser, subcommands registered by the modules in app.commands.

Each command module exposes ``register(subparsers)``; heavy imports happen inside the handlers so
that ``gsp --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from model.runtime import RuntimeOptions, set_runtime_options
from model.version import package_version

COMMAND_MODULES: tuple[str, ...] = ("serve", "train", "evaluate", "index", "demo", "explain")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gsp",
        description="Image retrieval with Generalized Sum Pooling: train, index, search, serve.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"app.commands.{name}").register(subparsers)
    return parser


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """``argv`` parsed, then checked where argparse cannot check (``args.complete``: a gallery
    named the old way, app/commands/options.py)."""
    args = parser.parse_args(argv)
    complete = vars(args).pop("complete", None)
    if complete is not None:
        complete(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        # The GSP layer's switches, read once for the whole command (model/runtime.py);
        # `gsp serve` then applies its settings', which also read .env.
        set_runtime_options(RuntimeOptions.from_environment())
    except ValueError as error:
        print(f"gsp: {error}", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
