"""The GSP layer's runtime switches (model/runtime.py): read once, from the environment, the
service's settings (``.env`` included) or the command line at start, and followed by the layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import model.runtime as runtime
from app.cli import main
from model.compiling import compile_enabled
from model.gsp_function import triton_selected
from model.runtime import RuntimeOptions, runtime_options, using_runtime_options
from tests.test_service_support import ServiceAssets

CUDA = torch.device("cuda")  # only asked about, never used: no GPU is needed


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No switch in the environment; the defaults in force, and what was before restored."""
    monkeypatch.delenv("GSP_KERNEL", raising=False)
    monkeypatch.delenv("GSP_COMPILE", raising=False)
    monkeypatch.setattr(runtime, "_current", RuntimeOptions())
    return monkeypatch


def test_the_environment_sets_the_options_and_unset_means_the_defaults() -> None:
    assert RuntimeOptions.from_environment({}) == RuntimeOptions(kernel="compiled", compile=True)
    env = {"GSP_KERNEL": "triton", "GSP_COMPILE": "0"}
    assert RuntimeOptions.from_environment(env) == RuntimeOptions(kernel="triton", compile=False)
    for text, value in [("1", True), ("true", True), ("ON", True), ("no", False), ("off", False)]:
        assert RuntimeOptions.from_environment({"GSP_COMPILE": text}).compile is value


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GSP_KERNEL": "fast"}, "GSP_KERNEL must be one of compiled, triton, got 'fast'"),
        ({"GSP_KERNEL": ""}, "GSP_KERNEL must be one of compiled, triton, got ''"),
        ({"GSP_COMPILE": "2"}, r"GSP_COMPILE must be 1 or 0 \(true/false, yes/no, on/off\)"),
    ],
)
def test_a_value_not_understood_is_an_error_naming_the_variable(env, message) -> None:
    with pytest.raises(ValueError, match=message):
        RuntimeOptions.from_environment(env)


def test_options_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="kernel must be one of compiled, triton, got 'fast'"):
        RuntimeOptions(kernel="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="compile must be a bool"):
        RuntimeOptions(compile="0")  # type: ignore[arg-type]


def test_the_environment_is_read_once_on_first_use(clean_environment) -> None:
    clean_environment.setattr(runtime, "_current", None)  # as in a fresh process
    clean_environment.setenv("GSP_COMPILE", "0")
    assert runtime_options().compile is False
    clean_environment.setenv("GSP_COMPILE", "1")  # too late: the layer does not look again
    assert runtime_options().compile is False
    assert not compile_enabled(CUDA)


def test_a_block_changes_the_options_and_restores_them_after(clean_environment) -> None:
    with using_runtime_options(compile=False) as inner:
        assert inner == RuntimeOptions(kernel="compiled", compile=False)
        assert runtime_options() is inner
    assert runtime_options() == RuntimeOptions(kernel="compiled", compile=True)
    with pytest.raises(KeyError), using_runtime_options(kernel="triton"):
        raise KeyError("the block fails")
    assert runtime_options().kernel == "compiled"
    with using_runtime_options():
        runtime.set_runtime_options(RuntimeOptions(kernel="triton"))
    assert runtime_options().kernel == "compiled"


def test_the_layer_follows_the_options_not_the_environment(clean_environment) -> None:
    clean_environment.setenv("GSP_KERNEL", "triton")
    clean_environment.setenv("GSP_COMPILE", "0")
    assert compile_enabled(CUDA)
    assert not compile_enabled(torch.device("cpu"))  # compiling never pays on a CPU
    assert not triton_selected(CUDA, 49)
    with using_runtime_options(compile=False):
        assert not compile_enabled(CUDA)


def test_the_command_line_reads_the_environment_at_start(
    clean_environment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_environment.setenv("GSP_KERNEL", "triton")
    clean_environment.setenv("GSP_COMPILE", "off")
    assert main(["index", "info", "--gallery", str(tmp_path / "none")]) == 1
    assert runtime_options() == RuntimeOptions(kernel="triton", compile=False)
    assert not compile_enabled(CUDA)
    clean_environment.setenv("GSP_KERNEL", "fast")
    assert main(["index", "info", "--gallery", str(tmp_path / "none")]) == 2
    assert "gsp: GSP_KERNEL must be one of compiled, triton, got 'fast'" in capsys.readouterr().err


def test_a_dotenv_value_reaches_the_layer(
    clean_environment, service_assets: ServiceAssets, tmp_path: Path
) -> None:
    """The README says the service applies ``.env``; these two switches once bypassed it."""
    from app.service.main import create_app
    from app.service.settings import Settings

    (tmp_path / ".env").write_text(
        f"GSP_CHECKPOINT={service_assets.checkpoint}\n"
        f"GSP_GALLERY={service_assets.gallery_link}\n"
        "GSP_GALLERY_READ_ONLY=true\n"
        "GSP_DEVICE=cpu\n"
        "GSP_KERNEL=triton\n"
        "GSP_COMPILE=false\n"
    )
    clean_environment.chdir(tmp_path)
    with TestClient(create_app(Settings())) as client:
        assert client.get("/readyz").status_code == 200
    assert runtime_options() == RuntimeOptions(kernel="triton", compile=False)
    assert not compile_enabled(CUDA)
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    assert triton_selected(CUDA, 49)
