"""The README's commands work as written: the curl examples against a real server, the
quick start's non-serving part, and every `gsp` command it names exists with those flags."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import build_parser
from app.service.main import create_app
from tests.test_service_support import build_assets, drawn_image, serve_in_thread

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
README_URL = "http://127.0.0.1:8000"
README_KEY = "secret"


def bash_blocks() -> list[list[str]]:
    """Command lines of the README's ```bash blocks (comments and blank lines dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    return [
        [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
        for block in blocks
    ]


def curl_lines() -> list[str]:
    return [line for block in bash_blocks() for line in block if line.startswith("curl ")]


def test_readme_has_the_two_quick_start_commands() -> None:
    quick_start = bash_blocks()[0]
    assert quick_start == ["make serve", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)


def subcommand(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser of the longest subcommand path that ``words`` start with."""
    for word in words:
        choices = [
            action.choices
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
        ]
        if not choices or word not in choices[0]:
            break
        parser = choices[0][word]
    return parser


def test_every_gsp_command_in_the_readme_exists_with_its_flags() -> None:
    commands = re.findall(r"`(gsp [^`]+)`", README)
    commands += [line for block in bash_blocks() for line in block if line.startswith("gsp ")]
    assert len(commands) >= 10
    for command in commands:
        for alternative in command.split(" / "):
            words = alternative.split()[1:]
            parser = subcommand(build_parser(), words)
            assert parser.prog != "gsp", f"no such command: {alternative!r}"
            known = {flag for action in parser._actions for flag in action.option_strings}
            for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", alternative):
                assert flag in known, f"{alternative!r}: {parser.prog} has no {flag}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples_against_a_started_server(tmp_path: Path) -> None:
    assets = build_assets(tmp_path / "assets")
    app = create_app(assets.settings(api_keys=[README_KEY]))
    work = tmp_path / "work"
    work.mkdir()
    drawn_image("red", 2).save(work / "query.jpg")
    drawn_image("blue", 3).save(work / "new.jpg")
    lines = curl_lines()
    assert len(lines) >= 10
    with serve_in_thread(app) as url:
        for line in lines:
            command = line.replace(README_URL, url).replace("curl -s", "curl -sS --fail", 1)
            result = subprocess.run(
                ["bash", "-c", command], cwd=work, capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, f"{line}\n{result.stderr}"
    assert (work / "thumb.jpg").stat().st_size > 0


@pytest.mark.slow
def test_quick_start_prepares_the_demo_offline_then_reuses_it(tmp_path: Path) -> None:
    """`make serve` minus the serving: `gsp demo prepare` builds model and gallery, then caches."""
    command = [sys.executable, "-m", "app.cli", "demo", "prepare", "--cache-dir", str(tmp_path)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    pattern = r"demo gallery built: (\d+) scenes, leave-one-out P@1 ([0-9.]+)"
    built = re.search(pattern, first.stdout)
    assert built, first.stdout
    assert int(built.group(1)) > 0 and float(built.group(2)) > 0.8
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "demo gallery reused from the cache" in second.stdout
