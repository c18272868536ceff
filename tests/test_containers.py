"""The images and the compose deployment, run for real with podman and podman-compose.

docker/ci-containers.sh builds the CPU image and runs this module with ``GSP_CONTAINER_IMAGE``
set (and ``GSP_PODMAN_COMPOSE``, the podman-compose program); elsewhere it skips. The image
is checked on its own for what it holds and how it refuses bad mounts; everything else runs it
through compose as the README does, and a search in the containers is compared with the same
search run outside them: the same checkpoint and images, indexed and served by this checkout's
own code.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.test_service_support import ServiceAssets, build_assets, drawn_image, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("GSP_CONTAINER_IMAGE", "")
PODMAN_COMPOSE = os.environ.get("GSP_PODMAN_COMPOSE", "")
PODMAN = shutil.which("podman")
COMPOSE_PORT = 8591
BALANCER_PORT = 8592
API_KEY = "container-test-key"
# Container and host run the same torch build here; users' CPU wheels may differ in the last bits.
SCORE_TOLERANCE = 1e-4
START_TIMEOUT_S = 180

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(
        not (PODMAN and IMAGE),
        reason="needs podman and a built image: run docker/ci-containers.sh",
    ),
]


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def wait_for(condition: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1)


def readiness(url: str) -> dict | None:
    """The /readyz document, or None while the service is not ready or not listening."""
    try:
        response = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def search(url: str, query: bytes) -> list[tuple[str, float]]:
    """(file name, score) of each match, best first: ids and paths differ inside and out."""
    response = httpx.post(
        f"{url}/v1/search",
        files={"image": ("query.png", query, "image/png")},
        data={"k": "5", "heatmaps": "false"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return [(Path(m["source"]).name, m["score"]) for m in response.json()["matches"]]


def assert_same_search(found: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [name for name, _ in found] == [name for name, _ in expected]
    for (_, score), (_, reference) in zip(found, expected, strict=True):
        assert score == pytest.approx(reference, abs=SCORE_TOLERANCE)


def _readable_by_all(*paths: Path) -> None:
    """The containers run as uid 10001; the test's folders are the host root's."""
    for path in paths:
        path.chmod(0o755)
        for child in path.rglob("*"):
            child.chmod(0o755 if child.is_dir() else 0o644)


def _png(label: str, variant: int) -> bytes:
    buffer = io.BytesIO()
    drawn_image(label, variant).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Workspace:
    assets: ServiceAssets
    query: bytes
    expected: list[tuple[str, float]]  # the search outside the containers
    empty: Path  # a folder without images


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A checkpoint and images, and the search result this checkout gives outside containers."""
    from app.service.main import create_app
    from app.service.settings import Settings

    root = tmp_path_factory.mktemp("containers")
    assets = build_assets(root)
    empty = root / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.txt").write_text("not an image")
    _readable_by_all(assets.checkpoint, assets.images, empty)
    gallery = root / "outside-gallery"
    build = subprocess.run(
        [sys.executable, "-m", "app.cli", "index", "build", "--images", str(assets.images),
         "--checkpoint", str(assets.checkpoint), "--out", str(gallery), "--no-progress"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    settings = Settings(
        _env_file=None,
        checkpoint=assets.checkpoint,
        gallery=gallery,
        device="cpu",
        gallery_read_only=True,
    )
    query = _png("green", 5)
    with serve_in_thread(create_app(settings)) as url:
        expected = search(url, query)
    assert len(expected) == 5
    return Workspace(assets, query, expected, empty)


# ---- the image on its own --------------------------------------------------------------------


def test_image_runs_as_a_user_without_build_tools() -> None:
    probe = (
        "id -u; for tool in gcc cc make uv; do command -v $tool; done; "
        "ls -d /src /root/.cache /home/gsp/.cache 2>/dev/null; "
        "ls /opt/venv/lib/python3*/site-packages/torch/__pycache__ | head -1"
    )
    result = podman("run", "--rm", "--entrypoint", "sh", IMAGE, "-c", probe, check=False)
    lines = result.stdout.split()
    assert lines[0] == "10001", result.stdout + result.stderr
    assert len(lines) == 2, f"build tools or caches in the image: {lines[1:-1]}"
    assert lines[1].endswith(".pyc"), "bytecode is compiled at build time"


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"gsp-test-{os.getpid()}-{time.monotonic_ns()}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "--force", name, check=False)


def _mounts(assets: ServiceAssets, gallery: str, images: Path | None = None) -> list[str]:
    mounts = ["-v", f"{assets.checkpoint}:/models/current:ro", "-v", f"{gallery}:/data/gallery"]
    if images is not None:
        mounts += ["-v", f"{images}:/images:ro"]
    return mounts


def _index_in_container(
    workspace: Workspace, gallery: str, images: Path
) -> subprocess.CompletedProcess:
    return podman(
        "run", "--rm", *_mounts(workspace.assets, gallery, images), IMAGE,
        "index", "build", "--images", "/images", "--checkpoint", "/models/current",
        "--out", "/data/gallery", "--no-progress",
        check=False,
    )  # fmt: skip


def _fails_clearly(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_image_refuses_missing_model_empty_folder_and_unreadable_gallery(
    workspace: Workspace, volume: str
) -> None:
    no_model = podman("run", "--rm", "-v", f"{volume}:/data/gallery", IMAGE, check=False)
    _fails_clearly(no_model, "model checkpoint /models/current does not exist")
    no_gallery = podman("run", "--rm", *_mounts(workspace.assets, volume), IMAGE, check=False)
    _fails_clearly(no_gallery, "no gallery in /data/gallery yet")
    empty = _index_in_container(workspace, volume, workspace.empty)
    _fails_clearly(empty, "image folder /images holds no images")
    mountpoint = Path(
        podman("volume", "inspect", volume, "--format", "{{.Mountpoint}}").stdout.strip()
    )
    mountpoint.chmod(0o700)  # owned by uid 10001 in the image: make it root's alone
    os.chown(mountpoint, 0, 0)
    unreadable = podman("run", "--rm", *_mounts(workspace.assets, volume), IMAGE, check=False)
    _fails_clearly(unreadable, "cannot read gallery /data/gallery as uid 10001")


# ---- compose -----------------------------------------------------------------------------------


@dataclass
class ComposeProject:
    name: str
    env: dict[str, str]
    images: Path
    more_files: tuple[str, ...] = ()

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        files = ["docker-compose.yml", "docker-compose.cpu.yml", *self.more_files]
        files.append("docker/compose.ci.yml")
        command = [PODMAN_COMPOSE, "-p", self.name]
        for file in files:
            command += ["-f", file]
        result = subprocess.run(
            [*command, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=900, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman-compose {' '.join(args)}:\n{result.stdout}{result.stderr}"
            )
        return result

    def container(self, service: str) -> str:
        names = podman(
            "ps", "--all", "--format", "{{.Names}}",
            "--filter", f"label=com.docker.compose.project={self.name}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).stdout.split()  # fmt: skip
        assert len(names) == 1, f"expected one {service} container, found {names}"
        return names[0]

    def volume(self, name: str) -> str:
        return f"{self.name}_{name}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{COMPOSE_PORT}"

    def healthy(self) -> bool:
        return podman("healthcheck", "run", self.container("api"), check=False).returncode == 0


@pytest.fixture(scope="module")
def project(
    workspace: Workspace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComposeProject]:
    """The compose deployment as the README starts it: a checkpoint copied into the models
    volume, the indexer job over the images folder, then the api."""
    if not PODMAN_COMPOSE:
        pytest.skip("needs podman-compose (GSP_PODMAN_COMPOSE): run docker/ci-containers.sh")
    images = tmp_path_factory.mktemp("compose-images")
    for source in workspace.assets.images.iterdir():
        shutil.copy(source, images / source.name)
    datasets = tmp_path_factory.mktemp("datasets")
    _readable_by_all(images, datasets)
    env = {
        **os.environ,
        "GSP_IMAGE": IMAGE.rsplit(":", 1)[0],
        "GSP_PORT": str(COMPOSE_PORT),
        "GSP_IMAGES_DIR": str(images),
        "GSP_DATASETS_DIR": str(datasets),
        "GSP_API_KEYS": API_KEY,
    }
    project = ComposeProject(f"gsptest{os.getpid()}", env, images)
    try:
        project.compose(
            "--profile", "jobs", "run", "-T", "--rm",
            "-v", f"{workspace.assets.checkpoint}:/import:ro",
            "trainer", "cp", "-r", "/import", "/models/current",
        )  # fmt: skip
        indexed = project.compose("--profile", "jobs", "run", "-T", "--rm", "indexer")
        assert "12 indexed" in indexed.stdout, indexed.stdout + indexed.stderr
        assert "no API running" in indexed.stdout
        project.compose("up", "-d", "api")
        wait_for(project.healthy, "the api's health check to pass")
        yield project
    finally:
        project.compose("--profile", "jobs", "down", "--volumes", check=False)


def test_compose_serves_what_the_indexer_indexed(
    project: ComposeProject, workspace: Workspace
) -> None:
    assert readiness(project.url)["gallery_size"] == 12
    assert_same_search(search(project.url, workspace.query), workspace.expected)


def test_compose_indexer_updates_the_gallery_the_api_serves(project: ComposeProject) -> None:
    for variant in (6, 7, 8):
        (project.images / f"extra-{variant}.png").write_bytes(_png("blue", variant))
    _readable_by_all(project.images)
    indexed = project.compose("--profile", "jobs", "run", "-T", "--rm", "indexer")
    assert "3 indexed, 12 already in the gallery" in indexed.stdout, indexed.stdout
    assert "reload:" in indexed.stdout and "'gallery_size': 15" in indexed.stdout
    assert readiness(project.url)["gallery_size"] == 15


def test_compose_api_restart_keeps_its_gallery(project: ComposeProject) -> None:
    before = readiness(project.url)["gallery_size"]
    project.compose("restart", "api")
    wait_for(project.healthy, "the restarted api's health check to pass")
    assert readiness(project.url)["gallery_size"] == before


def _move_in_models_volume(project: ComposeProject, source: str, target: str) -> None:
    podman(
        "run", "--rm", "-v", f"{project.volume('models')}:/models", "--entrypoint", "mv", IMAGE,
        f"/models/{source}", f"/models/{target}",
    )  # fmt: skip


def test_compose_health_fails_without_the_model_and_recovers(project: ComposeProject) -> None:
    api = project.container("api")
    _move_in_models_volume(project, "current", "current.away")
    try:
        podman("restart", api)
        wait_for(lambda: not project.healthy(), "the health check to fail", timeout=60)
        logs = podman("logs", api).stderr
        assert "gsp container: model checkpoint /models/current does not exist" in logs
        assert "Traceback" not in logs
    finally:
        _move_in_models_volume(project, "current.away", "current")
    podman("start", api, check=False)  # the restart policy may have given up meanwhile
    wait_for(project.healthy, "the health check to recover")
    assert readiness(project.url)["gallery_size"] > 0


def test_compose_indexer_refuses_an_empty_image_folder(
    project: ComposeProject, workspace: Workspace
) -> None:
    env = {**project.env, "GSP_IMAGES_DIR": str(workspace.empty)}
    empty = ComposeProject(project.name, env, workspace.empty)
    result = empty.compose("--profile", "jobs", "run", "-T", "--rm", "indexer", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "image folder /images holds no images" in output
    assert "Traceback" not in output
    assert readiness(project.url)["gallery_size"] > 0, "the api keeps serving"


def test_compose_cpu_override_runs_the_cpu_image_without_gpu_devices(
    project: ComposeProject,
) -> None:
    api = project.container("api")
    inspected = podman("inspect", api, "--format", "{{.ImageName}}|{{json .HostConfig.Devices}}")
    image, devices = inspected.stdout.strip().split("|")
    assert image == IMAGE
    assert json.loads(devices) in (None, []), "the CPU override drops the GPU reservation"


def test_compose_replicas_behind_the_balancer_answer_as_the_writer_side(
    project: ComposeProject, workspace: Workspace
) -> None:
    """docker-compose.replicas.yml over the running deployment: the publisher copies the
    gallery into the published volume, two read-only replicas serve that version behind the
    nginx balancer, every search through the balancer answers as the writer-side api does, and
    both replicas answer some of them."""
    base = podman("images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/debian").stdout
    podman(
        "build", "--quiet", "--build-arg", f"BASE_IMAGE={base.split()[0]}",
        "-t", f"{project.env['GSP_IMAGE']}:lb", "-f", "docker/loadbalancer/Dockerfile", str(ROOT),
    )  # fmt: skip
    env = {
        **project.env,
        "GSP_IMAGE_TAG": "cpu",
        "GSP_LB_PORT": str(BALANCER_PORT),
        "GSP_PUBLISH_EVERY_S": "2",
    }
    replicas = ComposeProject(project.name, env, project.images, ("docker-compose.replicas.yml",))
    size = readiness(project.url)["gallery_size"]
    expected = search(project.url, workspace.query)
    balancer = f"http://127.0.0.1:{BALANCER_PORT}"
    try:
        replicas.compose("up", "-d", "publisher", "replica-1", "replica-2", "lb")
        wait_for(
            lambda: (readiness(balancer) or {}).get("gallery_size") == size,
            "the replicas to serve the published gallery",
        )
        for _ in range(8):
            assert_same_search(search(balancer, workspace.query), expected)
        for service in ("replica-1", "replica-2"):
            logs = podman("logs", replicas.container(service))
            assert "/v1/search" in logs.stdout + logs.stderr, f"{service} answered no search"
    finally:  # the module's `down` knows only the main files: remove what this test added
        for service in ("lb", "replica-1", "replica-2", "publisher"):  # dependents first
            ids = podman(
                "ps", "--all", "--quiet",
                "--filter", f"label=com.docker.compose.project={project.name}",
                "--filter", f"label=com.docker.compose.service={service}",
            ).stdout.split()  # fmt: skip
            if ids:
                podman("rm", "--force", *ids)
        podman("volume", "rm", "--force", project.volume("published"), check=False)
