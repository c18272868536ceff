"""tools/install.py hands uv exactly the package sources pip is configured with."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("install", ROOT / "tools" / "install.py")
install = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(install)


def _pip_config_list(config_file: Path, **environment: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=str(config_file), **environment)
    return subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout


def test_settings_come_from_files_and_environment_with_pips_precedence(tmp_path: Path) -> None:
    config = tmp_path / "pip.conf"
    config.write_text(
        "[global]\n"
        "index-url = https://mirror.example/simple\n"
        "extra-index-url =\n    file:///a/simple\n    file:///b/simple\n"
        "find-links = /from/global\n"
        "timeout = 60\n"
        "[install]\n"
        "find-links = /from/install\n"
    )
    listing = _pip_config_list(config, PIP_CONSTRAINT="/env/constraints.txt")
    settings = install.pip_settings(listing)
    assert settings == {
        "index-url": "https://mirror.example/simple",
        "extra-index-url": "file:///a/simple file:///b/simple",
        "find-links": "/from/install",  # [install] overrides [global]
        "constraint": "/env/constraints.txt",
    }
    overridden = install.pip_settings(
        _pip_config_list(config, PIP_INDEX_URL="https://env.example/simple")
    )
    assert overridden["index-url"] == "https://env.example/simple"  # PIP_* beats the file


def test_uv_arguments_repeat_each_source_and_resolve_like_pip() -> None:
    arguments = install.uv_arguments(
        {"extra-index-url": "file:///a/simple file:///b/simple", "constraint": "/c.txt"}
    )
    assert arguments == [
        "--index-strategy",
        "unsafe-best-match",
        "--compile-bytecode",
        "--extra-index-url",
        "file:///a/simple",
        "--extra-index-url",
        "file:///b/simple",
        "--constraint",
        "/c.txt",
    ]
    assert install.uv_arguments({}) == [
        "--index-strategy",
        "unsafe-best-match",
        "--compile-bytecode",
    ]


def test_without_requirements_it_prints_usage_and_fails() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "install.py")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Usage: python tools/install.py" in result.stderr


@pytest.mark.parametrize(
    ("installer", "command"), [("uv", "-m uv pip install"), ("pip", "-m pip install")]
)
def test_each_installer_installs_into_the_running_environment(installer: str, command: str) -> None:
    # "pip" is already installed in every venv, so either installer only confirms it.
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "install.py"), "pip"],
        capture_output=True,
        text=True,
        env={**os.environ, "GSP_INSTALLER": installer},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ran = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert ran and ran[-1].startswith(f"+ {sys.executable} {command}")
