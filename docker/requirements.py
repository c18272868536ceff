"""Print the project's runtime requirements for one image target, one per line.

The CUDA image swaps ``faiss-cpu`` for the GPU build and keeps PyPI's default (CUDA) torch;
the CPU image keeps ``faiss-cpu`` and gets torch from the PyTorch CPU index (set by the
Dockerfile).  Reading pyproject.toml keeps the images pinned exactly like the package.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

FAISS_GPU = "faiss-gpu-cu12>=1.8"


def requirements(pyproject: Path, target: str) -> list[str]:
    if target not in {"cpu", "cuda"}:
        raise SystemExit(f"target must be cpu or cuda, got {target!r}")
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    result = []
    for requirement in dependencies:
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()
        if target == "cuda" and name == "faiss-cpu":
            result.append(FAISS_GPU)
        else:
            result.append(requirement)
    return result


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print("\n".join(requirements(Path("pyproject.toml"), target)))
