"""Print the image's requirements file for one target: pyproject.toml's ``dependencies`` (plus
the optional extras asked for), and for the CPU target the index that serves torch's CPU wheels.

Usage: requirements.py PYPROJECT TARGET [TORCH_INDEX_URL [EXTRAS]]

Both targets install faiss-cpu: the CUDA target's torch (PyPI's CUDA 13 build) brings its own
CUDA libraries, and no faiss GPU build for CUDA 13 is on PyPI, so the image keeps one CUDA stack.
A target's whole difference lies in this file, so that targets whose files are equal (the CPU
target without its index, where that index cannot be reached) share every image layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

TARGETS = ("cpu", "cuda")


def requirements(
    pyproject: Path, target: str, torch_index: str = "", extras: str = ""
) -> list[str]:
    """``extras``: optional-dependency groups to add, comma-separated (``ray`` for the Ray
    engine's image; the default image has none)."""
    if target not in TARGETS:
        raise SystemExit(f"target must be one of {TARGETS}, got {target!r}")
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in filter(None, extras.split(",")):
        if extra not in project["optional-dependencies"]:
            raise SystemExit(f"no extra {extra!r} in {pyproject}")
        lines.extend(project["optional-dependencies"][extra])
    if target == "cpu" and torch_index:
        lines.insert(0, f"--extra-index-url {torch_index}")
    return lines


if __name__ == "__main__":
    path, target, *rest = sys.argv[1:] or ["pyproject.toml", "cpu"]
    print("\n".join(requirements(Path(path), target, *rest)))
