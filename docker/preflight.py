#!/usr/bin/env python3
"""Check a container's mounts before ``gsp serve`` or ``gsp index build`` starts, and say what to
fix in the deployment's terms (volumes, compose jobs, the container's user) instead of letting a
missing or unreadable mount end in a stack trace.

Usage: gsp-preflight serve [serve options] | index build [build options]
Exits 0 when the command may run, 1 with one message on stderr otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from index.images import find_images
from model.image_files import IMAGE_EXTENSIONS

CHECKPOINT_FILE = "config.json"
GALLERY_POINTER = "current"


class MountProblem(Exception):
    """A mount the command needs is missing, empty or not usable by the container's user."""


def _user() -> str:
    return f"uid {os.getuid()}"


def _readable_dir(path: Path, what: str, hint: str) -> None:
    if not path.exists():
        raise MountProblem(f"{what} {path} does not exist: {hint}")
    if not path.is_dir():
        raise MountProblem(f"{what} {path} is not a directory: {hint}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise MountProblem(
            f"cannot read {what} {path} as {_user()}: make it readable (chmod -R a+rX) "
            "or owned by that user"
        )


def check_checkpoint(path: Path) -> None:
    hint = "the models volume holds no checkpoint there; copy a checkpoint directory in (README)"
    _readable_dir(path, "model checkpoint", hint)
    config = path / CHECKPOINT_FILE
    if not config.is_file():
        raise MountProblem(f"model checkpoint {path} has no {CHECKPOINT_FILE}: {hint}")
    if not os.access(config, os.R_OK):
        raise MountProblem(f"cannot read {config} as {_user()}: make it readable (chmod a+r)")


def check_gallery(path: Path) -> None:
    hint = "build one with the indexer job first (docker compose --profile jobs run indexer)"
    _readable_dir(path, "gallery", hint)
    if not (path / GALLERY_POINTER).exists():
        raise MountProblem(f"no gallery in {path} yet: {hint}")


def check_images(path: Path) -> None:
    hint = "mount a folder of images there (GSP_IMAGES_DIR)"
    _readable_dir(path, "image folder", hint)
    if next(find_images(path), None) is None:
        kinds = ", ".join(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
        raise MountProblem(f"image folder {path} holds no images ({kinds}): {hint}")


def check_gallery_writable(path: Path) -> None:
    parent = path if path.exists() else path.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MountProblem(
            f"cannot write the gallery volume {parent} as {_user()}: give that user write access"
        )


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("command", nargs="+")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--gallery", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--out", type=Path)
    args, _ = parser.parse_known_args(argv)
    return args


def check(argv: list[str]) -> None:
    """Raise :class:`MountProblem` for the first problem with the mounts ``gsp argv`` needs."""
    if "--help" in argv or "-h" in argv:
        return
    args = _parse(argv)
    checkpoint = args.checkpoint or Path(os.environ.get("GSP_CHECKPOINT", "/models/current"))
    if args.command[:1] == ["serve"]:
        check_checkpoint(checkpoint)
        check_gallery(args.gallery or Path(os.environ.get("GSP_GALLERY", "/data/gallery")))
    elif args.command[:2] == ["index", "build"]:
        check_checkpoint(checkpoint)
        check_images(args.images or Path("/images"))
        gallery = args.gallery or args.out  # --out: the older spelling of --gallery
        check_gallery_writable(gallery or Path(os.environ.get("GSP_GALLERY", "/data/gallery")))


def main(argv: list[str]) -> int:
    try:
        check(argv)
    except MountProblem as problem:
        print(f"gsp container: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
