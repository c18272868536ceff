"""The bulk indexing job on a real local Ray instance (`--engine ray`): the same gallery as the
in-process job, bad files reported, a killed worker, resume, the command line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index.build import build_gallery
from index.gallery import Gallery
from index.layout import DATABASE
from tests.conftest import gallery_of_another_model, image_bytes, write_images

ray = pytest.importorskip("ray", reason="the Ray engine's tests need the ray extra")

from index.ray_job import build_gallery_on_ray  # noqa: E402 (needs ray, checked above)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def test_the_command_line_starts_a_local_ray_instance(tmp_path: Path, checkpoint: Path) -> None:
    write_images(tmp_path / "images", range(20))
    command = [sys.executable, "-m", "app.cli", "index", "build", "--engine", "ray"]
    arguments = ["--images", str(tmp_path / "images"), "--checkpoint", str(checkpoint)]
    arguments += ["--gallery", str(tmp_path / "g"), "--no-progress"]
    done = subprocess.run(command + arguments, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "20 indexed" in done.stdout
    with Gallery.open(tmp_path / "g", read_only=True) as gallery:
        assert len(gallery) == 20


def test_without_ray_the_command_line_says_how_to_install_it(
    tmp_path: Path, checkpoint: Path
) -> None:
    write_images(tmp_path / "images", range(2))
    hide_ray = "import sys; sys.modules['ray'] = None; from app.cli import main; sys.exit(main())"
    arguments = ["index", "build", "--engine", "ray", "--images", str(tmp_path / "images")]
    arguments += ["--checkpoint", str(checkpoint), "--gallery", str(tmp_path / "g")]
    done = subprocess.run(
        [sys.executable, "-c", hide_ray, *arguments], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "pip install 'gsp-retrieval[ray]'" in done.stderr
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--address", "auto"], "--address needs --engine ray"),
        (["--actors", "2"], "--actors needs --engine ray"),
        (["--engine", "ray", "--workers", "3"], "--workers sizes the in-process job's loader"),
        (["--engine", "ray", "--decode", "gpu"], "--decode gpu is for the in-process job"),
    ],
)
def test_one_engines_options_are_refused_for_the_other(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str], options, message
) -> None:
    from app.cli import main

    arguments = ["index", "build", "--images", str(tmp_path), "--checkpoint", str(checkpoint)]
    assert main([*arguments, "--gallery", str(tmp_path / "g"), *options]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


@pytest.fixture(scope="module")
def local_ray():
    """One real local Ray instance for the module (it takes seconds to start)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def image_folder(root: Path, count: int) -> Path:
    """``count`` tiny JPEGs in two labelled subfolders and the unlabelled top level, one copy
    of a file, four bad files."""
    write_images(root / "cats", range(count // 2))
    write_images(root / "dogs", range(count // 2, count - 2))
    write_images(root, range(count - 2, count))
    (root / "dogs" / "copy.jpg").write_bytes(image_bytes(0))
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image\n")
    truncated = image_bytes(999, size=(200, 160))
    (bad / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (bad / "unreadable.jpg").symlink_to(bad / "gone.jpg")  # listed, but cannot be read
    return root


def gallery_contents(path: Path) -> dict[str, tuple[str, str | None, np.ndarray, np.ndarray]]:
    """sha256 -> (source, label, embedding, weights) for every item."""
    with Gallery.open(path, read_only=True) as gallery:
        contents = {}
        for sha256 in gallery.known_sha256():
            item_id = gallery.find_sha256(sha256)
            assert item_id is not None
            record = gallery.get(item_id)
            embedding = gallery.embedding(item_id)
            assert record is not None and embedding is not None
            contents[sha256] = (record.source, record.label, embedding, record.weights)
        return contents


def failures(report_path: Path) -> dict[str, str]:
    lines = report_path.read_text().splitlines()
    return {Path(line["path"]).name: line["reason"] for line in map(json.loads, lines)}


def test_the_ray_job_indexes_the_same_files_with_the_same_vectors_and_resumes(
    tmp_path: Path, checkpoint: Path, local_ray: None
) -> None:
    images = image_folder(tmp_path / "images", 200)
    options = {"batch_size": 32, "labels_from_subfolders": True, "progress": False}

    local = build_gallery(images, checkpoint, tmp_path / "local", workers=1, **options)
    on_ray = build_gallery_on_ray(images, checkpoint, tmp_path / "ray", **options)

    counts = ("total_files", "indexed", "already_indexed", "duplicates", "failed")
    assert [getattr(on_ray, name) for name in counts] == [getattr(local, name) for name in counts]
    assert (on_ray.indexed, on_ray.duplicates, on_ray.failed) == (200, 1, 4)
    assert failures(on_ray.failures_path) == failures(local.failures_path)
    assert set(failures(on_ray.failures_path)) == {
        "empty.jpg",
        "text.jpg",
        "truncated.jpg",
        "unreadable.jpg",
    }
    expected, got = gallery_contents(tmp_path / "local"), gallery_contents(tmp_path / "ray")
    assert set(got) == set(expected) and len(got) == 200
    for sha256, (source, label, embedding, weights) in expected.items():
        ray_source, ray_label, ray_embedding, ray_weights = got[sha256]
        # the copy of 0000.jpg may be the one kept: Ray delivers in no particular order
        assert ray_label == label
        assert Path(ray_source).name in {Path(source).name, "copy.jpg", "0000.jpg"}
        np.testing.assert_allclose(ray_embedding, embedding, atol=1e-5)
        np.testing.assert_allclose(ray_weights, weights, atol=1e-5)

    write_images(images / "cats", range(200, 210))
    rerun = build_gallery_on_ray(images, checkpoint, tmp_path / "ray", **options)
    assert (rerun.indexed, rerun.already_indexed, rerun.failed) == (10, 201, 4)
    assert rerun.gallery_count == 210


def test_a_gallery_of_another_model_is_refused(
    tmp_path: Path, checkpoint: Path, local_ray: None
) -> None:
    from index.errors import GalleryMismatchError

    write_images(tmp_path / "images", range(2))
    gallery_of_another_model(tmp_path / "g", "another-model")
    with pytest.raises(GalleryMismatchError, match="another-model"):
        build_gallery_on_ray(tmp_path / "images", checkpoint, tmp_path / "g", progress=False)


def test_actors_or_devices_the_cluster_cannot_run_are_refused_before_any_work(
    tmp_path: Path, checkpoint: Path, local_ray: None
) -> None:
    from index.build import open_or_create
    from model.checkpoint import load_checkpoint
    from model.hardware import DeviceError

    write_images(tmp_path / "images", range(2))
    open_or_create(tmp_path / "g", load_checkpoint(checkpoint, device="cpu")).close()
    (tmp_path / "g" / "build-failures.jsonl").write_text("the previous run's report\n")
    job = {"images_dir": tmp_path / "images", "checkpoint_dir": checkpoint, "progress": False}
    with pytest.raises(ValueError, match="leave none of the cluster's 2 CPUs to decoding"):
        build_gallery_on_ray(out_dir=tmp_path / "g", actors=2, device="cpu", **job)
    with pytest.raises(DeviceError, match="the Ray cluster has no GPU"):
        build_gallery_on_ray(out_dir=tmp_path / "g", device="cuda", **job)
    assert (tmp_path / "g" / "build-failures.jsonl").read_text() == "the previous run's report\n"


def embedding_actor_pids() -> list[int]:
    """Ray names its worker processes after what they run: MapWorker(MapBatches(EmbeddingActor))."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if command.startswith(b"ray::MapWorker(MapBatches(EmbeddingActor))"):
                pids.append(int(entry.name))
    return pids


def items_written(gallery: Path) -> int:
    """Items the job's writer has committed so far (read beside it: the database is in WAL)."""
    database = gallery / DATABASE
    if not database.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        try:
            return int(connection.execute("SELECT count(*) FROM items").fetchone()[0])
        except sqlite3.OperationalError:  # the table is not there yet
            return 0


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes in /proc")
def test_a_worker_killed_mid_job_still_ends_in_a_complete_gallery(
    tmp_path: Path, checkpoint: Path, local_ray: None
) -> None:
    images = tmp_path / "images"
    write_images(images, range(200))
    killed: list[int] = []

    def kill_the_embedding_actor_once_items_are_written() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            pids = embedding_actor_pids()
            if pids and 0 < items_written(tmp_path / "g") < 200:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(items_written(tmp_path / "g"))
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_embedding_actor_once_items_are_written)
    killer.start()
    try:  # Ray restarts the actor and retries its batches: the job itself finishes
        report = build_gallery_on_ray(
            images, checkpoint, tmp_path / "g", batch_size=8, progress=False
        )
    finally:
        killer.join()

    assert killed and killed[0] < 200, "the embedding actor was not killed mid-job"
    assert report.gallery_count == 200 and report.failed == 0
    assert len(gallery_contents(tmp_path / "g")) == 200
