"""The options several ``gsp`` subcommands share, each with one spelling, one default and one
help text: ``--gallery DIR``, ``--device`` (default ``auto``), ``--workers`` (default ``auto``).

The spellings they replaced still work, with a warning on stderr, until the next release:
``gsp index build --out DIR``, and the gallery as the first positional argument of ``gsp index
add|remove|info|search``.  argparse cannot say "this first positional is the gallery unless
``--gallery`` is given", so those commands leave a check in ``args.complete`` that
:func:`app.cli.parse_arguments` runs once parsing is done.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from model.hardware import DEVICE_NAMES, MAX_AUTO_WORKERS, check_device_name, resolve_workers

__all__ = [
    "add_device_option",
    "add_gallery_option",
    "add_workers_option",
    "warn_deprecated",
]


def warn_deprecated(old: str, new: str) -> None:
    """Tell the user on stderr that ``old`` still works for now and what replaces it."""
    print(
        f"gsp: warning: {old} is deprecated and will be removed in the next release; use {new}",
        file=sys.stderr,
    )


class _DeprecatedOption(argparse.Action):
    """A former spelling of an option: stores where the current one does, after a warning."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, replacement: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        warn_deprecated(str(option_string), self.replacement)
        setattr(namespace, self.dest, values)


def add_gallery_option(
    parser: argparse.ArgumentParser,
    *,
    required: bool = True,
    help_text: str = "gallery directory",
    old_option: str | None = None,
    old_positional: bool = False,
    positional_list: tuple[str, Callable[[str], Any]] | None = None,
) -> None:
    """``--gallery DIR``, optionally with a former spelling: ``old_option`` (another flag), or
    ``old_positional`` (the first positional argument; add the command's own positionals after
    this call).  ``positional_list`` names the command's positional list (dest, item type) whose
    first item that argument is when ``--gallery`` is given; without one it is an error."""
    if required:
        help_text += " (required)"
    parser.add_argument("--gallery", type=Path, metavar="DIR", help=help_text)
    if old_option is not None:
        parser.add_argument(
            old_option,
            dest="gallery",
            type=Path,
            action=_DeprecatedOption,
            replacement="--gallery",
            help=argparse.SUPPRESS,
        )
    if old_positional:
        parser.add_argument("old_gallery", nargs="?", help=argparse.SUPPRESS)
    parser.set_defaults(complete=partial(_complete_gallery, parser, required, positional_list))


def _complete_gallery(
    parser: argparse.ArgumentParser,
    required: bool,
    positional_list: tuple[str, Callable[[str], Any]] | None,
    args: argparse.Namespace,
) -> None:
    old = vars(args).pop("old_gallery", None)
    if old is not None:
        if args.gallery is None:
            warn_deprecated("naming the gallery as the first argument", "--gallery DIR")
            args.gallery = Path(old)
        elif positional_list is None:
            parser.error(f"unrecognized arguments: {old}")
        else:
            dest, item_type = positional_list
            try:
                first = item_type(old)
            except ValueError:
                parser.error(f"argument {dest}: invalid value: {old!r}")
            setattr(args, dest, [first, *getattr(args, dest)])
    if required and args.gallery is None:
        parser.error("the following arguments are required: --gallery")


def _device_name(text: str) -> str:
    try:
        return check_device_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_device_option(
    parser: argparse.ArgumentParser, *, default: str | None = "auto", default_text: str = "auto"
) -> None:
    """``--device``; ``default`` None leaves the choice to settings (``gsp serve``)."""
    parser.add_argument(
        "--device",
        type=_device_name,
        default=default,
        metavar="DEVICE",
        help=f"where the network runs: {DEVICE_NAMES}; auto is a CUDA GPU when there is one, "
        f"else the CPU (default: {default_text})",
    )


def _worker_count(text: str) -> int | str:
    """A count, or ``auto`` kept as such: its count depends on the device the job then uses."""
    try:
        return text if text == "auto" else resolve_workers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    """``--workers``: data-loading processes, a count or ``auto`` (resolved by the job)."""
    parser.add_argument(
        "--workers",
        type=_worker_count,
        default="auto",
        metavar="N",
        help="processes that read and decode images: a count (0 reads them in this process) "
        "or auto, the usable CPUs but one (at most "
        f"{MAX_AUTO_WORKERS} when the network runs on the CPU; default: auto)",
    )
