"""The code's version, as checkpoints record it and ``gsp --version`` prints it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["DISTRIBUTION", "package_version"]

DISTRIBUTION = "gsp-retrieval"


def package_version() -> str:
    """The installed distribution's version, or ``0+unknown`` for a source tree run without
    installing it (a valid version string that sorts before every release)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"
