"""One spelling for the gallery and one default for ``--device`` and ``--workers`` across the
``gsp`` subcommands (app/commands/options.py); the old spellings still work, with a warning."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from app.cli import build_parser, main, parse_arguments
from model.hardware import resolve_workers

DEPRECATED = "is deprecated and will be removed in the next release"
TWO = {"images": [Path("a.jpg"), Path("b")]}
QUERY = {"image": Path("q.jpg")}
CKPT = ["--checkpoint", "c"]


def parse(argv: list[str]) -> argparse.Namespace:
    return parse_arguments(build_parser(), argv)


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every runnable subcommand's parser by its words, e.g. ``index build``."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: str) -> None:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            found[words] = parser
        for action in actions:
            for name, child in action.choices.items():
                walk(child, f"{words} {name}".strip())

    walk(build_parser(), "")
    return found


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


@pytest.mark.parametrize(
    ("argv", "gallery", "rest"),
    [
        (["index", "build", "--images", "i", *CKPT, "--gallery", "g"], "g", {}),
        (["index", "add", *CKPT, "--gallery", "g", "a.jpg", "b"], "g", TWO),
        (["index", "add", "a.jpg", "--gallery", "g", *CKPT], "g", {"images": [Path("a.jpg")]}),
        (["index", "remove", "--gallery", "g", "4", "5"], "g", {"ids": [4, 5]}),
        (["index", "remove", "--gallery", "g", "4"], "g", {"ids": [4]}),
        (["index", "info", "--gallery", "g", "--json"], "g", {"json": True}),
        (["index", "search", "--gallery", "g", "q.jpg", *CKPT], "g", QUERY),
        (["explain", "q.jpg", "3", "--gallery", "g", *CKPT, "--out", "p.png"], "g", {}),
        (["serve", "--gallery", "g"], "g", {}),
        (["serve"], None, {}),
    ],
)  # fmt: skip
def test_every_command_names_its_gallery_with_the_gallery_option(
    argv: list[str], gallery: str | None, rest: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(argv)
    assert args.gallery == (Path(gallery) if gallery else None)
    for key, value in rest.items():
        assert getattr(args, key) == value
    assert not hasattr(args, "old_gallery")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "old", "rest"),
    [
        (["index", "build", "--images", "i", *CKPT, "--out", "g"], "--out", {}),
        (["index", "add", "g", "a.jpg", "b", *CKPT], "first argument", TWO),
        (["index", "remove", "g", "4", "5"], "first argument", {"ids": [4, 5]}),
        (["index", "info", "g", "--json"], "first argument", {"json": True}),
        (["index", "search", "g", "q.jpg", *CKPT], "first argument", QUERY),
    ],
)  # fmt: skip
def test_the_old_spellings_still_work_with_a_warning(
    argv: list[str], old: str, rest: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(argv)
    assert args.gallery == Path("g")
    for key, value in rest.items():
        assert getattr(args, key) == value
    warning = capsys.readouterr().err
    assert warning.startswith("gsp: warning: ") and DEPRECATED in warning
    assert old in warning and "use --gallery" in warning


def test_an_old_spelling_runs_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", "info", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert DEPRECATED in err and f"no gallery at {tmp_path / 'none'}" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["index", "info"], "the following arguments are required: --gallery"),
        (["index", "build", "--images", "i", *CKPT], "required: --gallery"),
        (["index", "add", "a.jpg", *CKPT], "required: --gallery"),
        (["explain", "q.jpg", "3", *CKPT, "--out", "p.png"], "required: --gallery"),
        (["index", "info", "g", "--gallery", "h"], "unrecognized arguments: g"),
        (["index", "search", "--gallery", "g", "q", "r", *CKPT], "unrecognized arguments: q"),
        (["index", "remove", "--gallery", "g", "x", "4"], "argument ids: invalid value: 'x'"),
        (["index", "search", "--gallery", "g", "q", *CKPT, "--device", "gpu"],
         "argument --device: device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["eval", "--checkpoint", "c", "--data", "d", "--workers", "-1"],
         "argument --workers: workers must be 0 or more, or 'auto', got '-1'"),
    ],
)  # fmt: skip
def test_wrong_command_lines_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_device_and_workers_mean_the_same_in_every_subcommand() -> None:
    parsers = subcommand_parsers()
    with_device = {words for words, parser in parsers.items() if option(parser, "--device")}
    with_workers = {words for words, parser in parsers.items() if option(parser, "--workers")}
    assert with_device == {"eval", "index build", "index add", "index search", "serve"}
    assert with_workers == {"eval", "index build", "index add"}
    for words in with_device:
        device = option(parsers[words], "--device")
        # gsp serve leaves it to GSP_DEVICE, whose own default is auto (app/service/settings.py)
        assert device.default == (None if words == "serve" else "auto"), words
        assert "auto, cpu, cuda or cuda:N" in device.help, words
    for words in with_workers:
        workers = option(parsers[words], "--workers")
        assert workers.default == "auto" and workers.type("auto") == "auto"
        assert workers.type("3") == resolve_workers("3") == 3
    from app.service.settings import Settings

    assert Settings.model_fields["device"].default == "auto"


def test_gsp_serve_options_override_the_settings_device() -> None:
    assert parse(["serve", "--device", "cuda:1"]).device == "cuda:1"
