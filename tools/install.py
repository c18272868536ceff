"""Install the project into the running interpreter's environment, fast.

pip needs about 2 minutes to unpack torch and its CUDA libraries (5.7 GB) on two cores; uv
does the same install, bytecode compiled, in about 45 s. uv does not read pip's configuration,
so the package indexes, find-links folders and constraints that pip is configured with (files
and PIP_* variables) are handed to uv explicitly, and uv resolves across all of them as pip
does. Without uv (no package index to fetch it from, or GSP_INSTALLER=pip) or if uv fails, pip
does the install as before. Standard library only: it runs before anything is installed.

Usage: python tools/install.py REQUIREMENT [REQUIREMENT ...]   (for example -e '.[test]')
"""

from __future__ import annotations

import ast
import os
import shlex
import subprocess
import sys

# Where a pip setting comes from, weakest first: a config file's [global] section, its
# [install] section, then a PIP_* environment variable (`pip config list` shows it as ":env:").
_SOURCE_ORDER = {"global": 0, "install": 1, ":env:": 2}
_PIP_TO_UV = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_settings(listing: str) -> dict[str, str]:
    """The effective install-related values in `pip config list` output, strongest source wins.

    Lines look like `global.find-links='/opt/wheels'` or `:env:.constraint='c.txt'`.
    """
    ranked: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        name, sep, quoted = line.partition("=")
        source, _, key = name.rpartition(".")
        if not sep or key not in _PIP_TO_UV or source not in _SOURCE_ORDER:
            continue
        rank = _SOURCE_ORDER[source]
        if key not in ranked or rank >= ranked[key][0]:
            ranked[key] = (rank, " ".join(str(ast.literal_eval(quoted)).split()))
    return {key: value for key, (_, value) in ranked.items()}


def uv_arguments(settings: dict[str, str]) -> list[str]:
    """uv pip options that reproduce pip's view of where packages come from."""
    # pip's rules: the best version from any index, and bytecode compiled at install (without
    # it every start recompiles torch's sources wherever .pyc files cannot be cached, e.g. under
    # PYTHONDONTWRITEBYTECODE: imports took 17 s instead of 8 here).
    arguments = ["--index-strategy", "unsafe-best-match", "--compile-bytecode"]
    for key, option in _PIP_TO_UV.items():
        for entry in settings.get(key, "").split():
            arguments += [option, entry]
    return arguments


def _run(command: list[str]) -> bool:
    print("+", shlex.join(command), flush=True)
    return subprocess.call(command) == 0


def _uv_install(requirements: list[str]) -> bool:
    pip = [sys.executable, "-m", "pip"]
    if not _run([*pip, "install", "--quiet", "uv"]):
        print("install: uv is not available, using pip", flush=True)
        return False
    listing = subprocess.run(
        [*pip, "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    uv = [sys.executable, "-m", "uv", "pip", "install", "--python", sys.executable]
    if _run([*uv, *uv_arguments(pip_settings(listing)), *requirements]):
        return True
    print("install: uv failed (see above), retrying with pip", flush=True)
    return False


def main(requirements: list[str]) -> int:
    if not requirements:
        print(__doc__, file=sys.stderr)
        return 2
    if os.environ.get("GSP_INSTALLER", "uv") != "pip" and _uv_install(requirements):
        return 0
    return 0 if _run([sys.executable, "-m", "pip", "install", *requirements]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
