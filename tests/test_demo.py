"""The demo: deterministic scenes with correct boxes, and the cached demo preparation."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import build_parser
from app.demo.prepare import DemoSpec, box_weight_share, prepare_demo, prepare_user_gallery
from app.demo.scenes import CLASSES, SceneConfig, generate_scenes, render_scene
from index.gallery import Gallery
from tests.conftest import write_images

SMALL = SceneConfig(image_size=96)


def _pixels(scene) -> np.ndarray:
    return np.asarray(scene.image, dtype=np.int16)


def test_scenes_are_deterministic_per_seed_and_index() -> None:
    first = [_pixels(s) for s in generate_scenes(SMALL, seed=3, per_class=1)]
    again = [_pixels(s) for s in generate_scenes(SMALL, seed=3, per_class=1)]
    other = [_pixels(s) for s in generate_scenes(SMALL, seed=4, per_class=1)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    alone = render_scene(SMALL, seed=3, index=5, label=5)
    assert np.array_equal(_pixels(alone), first[5])


def test_classes_are_balanced_and_interleaved() -> None:
    scenes = list(generate_scenes(SMALL, seed=0, per_class=3))
    counts = Counter(scene.label for scene in scenes)
    assert counts == {label: 3 for label in range(len(CLASSES))}
    assert [scene.class_name for scene in scenes[: len(CLASSES)]] == [n for n, _ in CLASSES]


@pytest.mark.parametrize("index", range(16))
def test_object_pixels_lie_inside_the_recorded_box(index: int) -> None:
    config = SceneConfig(image_size=128)
    label = index % len(CLASSES)
    scene = render_scene(config, seed=7, index=index, label=label)
    empty = render_scene(config, seed=7, index=index, label=label, draw_object=False)
    assert scene.box == empty.box
    changed = np.abs(_pixels(scene) - _pixels(empty)).sum(axis=2) > 0
    ys, xs = np.nonzero(changed)
    x0, y0, x1, y1 = scene.box
    assert changed.any(), "the object must change the image"
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    # tight: the changed pixels reach (nearly) every side of the box
    assert xs.min() - x0 <= 2 and x1 - 1 - xs.max() <= 2
    assert ys.min() - y0 <= 2 and y1 - 1 - ys.max() <= 2
    area = (x1 - x0) * (y1 - y0) / config.image_size**2
    assert 0.01 < area < 0.5, "the object covers a minority of the image"


def test_scenes_of_a_group_share_their_clutter_but_not_their_class() -> None:
    config = SceneConfig(image_size=96, scenes_per_background=4)
    scenes = [render_scene(config, seed=1, index=i, label=i) for i in range(5)]
    empties = [render_scene(config, seed=1, index=i, label=i, draw_object=False) for i in range(5)]
    assert np.array_equal(_pixels(empties[0]), _pixels(empties[3]))
    assert not np.array_equal(_pixels(empties[0]), _pixels(empties[4]))
    assert len({scene.label for scene in scenes[:4]}) == 4


def test_bad_scene_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="object fractions"):
        SceneConfig(min_object_fraction=0.5, max_object_fraction=0.3)
    with pytest.raises(ValueError, match="label"):
        render_scene(SMALL, seed=0, index=0, label=len(CLASSES))
    with pytest.raises(ValueError, match="per_class"):
        next(generate_scenes(SMALL, seed=0, per_class=0))


def test_box_weight_share() -> None:
    uniform = np.ones((4, 4))
    share, area = box_weight_share(uniform, (0, 0, 50, 100), (100, 100))
    assert share == pytest.approx(0.5) and area == pytest.approx(0.5)
    peaked = np.zeros((4, 4))
    peaked[0, 0] = 3.0
    share, area = box_weight_share(peaked, (0, 0, 25, 25), (100, 100))
    assert share == pytest.approx(1.0) and area == pytest.approx(1 / 16)
    share, _ = box_weight_share(peaked, (50, 50, 100, 100), (100, 100))
    assert share == 0.0
    # a box covering half of a cell counts half of that cell's weight
    share, _ = box_weight_share(peaked, (0, 0, 12.5, 25), (100, 100))
    assert share == pytest.approx(0.5)


def _tiny_spec(**changes) -> DemoSpec:
    values = dict(
        scenes=SceneConfig(image_size=64),
        train_per_class=2,
        gallery_per_class=2,
        input_size=64,
        pretrained=False,
        embedding_dim=16,
        num_prototypes=4,
        epochs=1,
        batch_size=16,
        m_per_class=2,
        head="scenes",
    )
    values.update(changes)
    return DemoSpec(**values)


def test_prepare_demo_caches_and_rebuilds_on_changed_inputs(tmp_path: Path) -> None:
    spec = _tiny_spec()
    started = time.perf_counter()
    built = prepare_demo(spec, cache_dir=tmp_path)
    first_s = time.perf_counter() - started
    assert not built.reused
    assert built.report["items"] == 2 * len(CLASSES)
    assert 0.0 <= built.report["precision_at_1"] <= 1.0
    assert 0.0 < built.report["object_area_share"] < 0.5
    records = json.loads((built.image_root / "scenes.json").read_text())
    assert len(records) == 2 * len(CLASSES)
    assert (built.checkpoint / "model.safetensors").is_file()
    first = built.image_root / next(iter(records))
    with Gallery.open(built.gallery, read_only=True) as gallery:
        item = gallery.get(gallery.find_sha256(hashlib.sha256(first.read_bytes()).hexdigest()))
    assert item.label == records[next(iter(records))]["class"]
    assert Path(item.source).is_absolute() and Path(item.source) == first, "servable source"

    started = time.perf_counter()
    again = prepare_demo(spec, cache_dir=tmp_path)
    second_s = time.perf_counter() - started
    assert again.reused and again.gallery == built.gallery and again.report == built.report
    assert second_s < max(1.0, first_s / 4)

    model_marker = (built.checkpoint.parent / "ready.json").read_text()
    other_gallery = prepare_demo(_tiny_spec(gallery_seed=9), cache_dir=tmp_path)
    assert not other_gallery.reused and other_gallery.gallery != built.gallery
    assert other_gallery.checkpoint == built.checkpoint, "same model inputs: model reused"
    assert (built.checkpoint.parent / "ready.json").read_text() == model_marker

    other_model = prepare_demo(_tiny_spec(train_seed=5), cache_dir=tmp_path)
    assert other_model.checkpoint != built.checkpoint and not other_model.reused


def test_the_default_demo_model_is_the_shipped_head(tmp_path: Path) -> None:
    """The default spec writes the backbone plus the head in model/weights/ as its checkpoint:
    its pooling tensors are the file's, its options the file's metadata; no training runs."""
    from safetensors.torch import load_file

    from app.demo.prepare import SHIPPED_HEAD, head_options, prepare_model
    from model.checkpoint import load_checkpoint

    assert SHIPPED_HEAD.stat().st_size < 2 * 1024 * 1024
    spec = DemoSpec()
    checkpoint = prepare_model(spec, cache_dir=tmp_path)
    loaded = load_checkpoint(checkpoint)
    shipped = load_file(str(SHIPPED_HEAD))
    pooling = loaded.net.pooling.state_dict()
    assert set(pooling) == set(shipped)
    for name, tensor in shipped.items():
        assert torch.equal(pooling[name], tensor), name
    dim, options = head_options()
    assert loaded.config.embedding_dim == dim and loaded.config.pooling_options == options
    assert spec.model_key() != DemoSpec(head="scenes").model_key()
    with pytest.raises(ValueError, match="head must be"):
        DemoSpec(head="other")


def test_prepare_demo_restarts_an_interrupted_build(tmp_path: Path) -> None:
    spec = _tiny_spec()
    leftover = tmp_path / f"gallery-{spec.gallery_key()}"
    (leftover / "images").mkdir(parents=True)
    (leftover / "images" / "half-written.png").write_bytes(b"")
    assets = prepare_demo(spec, cache_dir=tmp_path)
    assert not (leftover / "images" / "half-written.png").exists()
    assert assets.report["items"] == 2 * len(CLASSES)


def test_user_gallery_uses_the_demo_model(tmp_path: Path) -> None:
    spec = _tiny_spec()
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        render_scene(SMALL, seed=11, index=index, label=index).image.save(photos / f"{index}.jpg")
    assets = prepare_user_gallery(photos, spec, cache_dir=tmp_path / "cache")
    with Gallery.open(assets.gallery, read_only=True) as gallery:
        assert len(gallery) == 3
    assert assets.image_root == photos.resolve()
    with pytest.raises(FileNotFoundError, match="not a directory"):
        prepare_user_gallery(tmp_path / "absent", spec, cache_dir=tmp_path / "cache")


def test_demo_command_line() -> None:
    parser = build_parser()
    args = parser.parse_args(["demo", "serve", "--gallery-source", "x", "--port", "9000"])
    assert args.gallery_source == Path("x") and args.port == 9000 and args.host == "127.0.0.1"
    args = parser.parse_args(["demo", "prepare"])
    assert args.gallery_source is None and args.cache_dir == Path(".cache/demo")
    with pytest.raises(SystemExit):
        parser.parse_args(["demo"])


def test_demo_serve_hands_the_prepared_model_gallery_and_images_to_the_service(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gsp demo serve` starts the service itself (app/commands/serve.py's ``serve``) with the
    prepared assets; uvicorn's loop is replaced by a client of the application it was given."""
    import uvicorn
    from fastapi.testclient import TestClient

    import app.demo.prepare as prepare
    from app.cli import main
    from app.demo.prepare import DemoAssets
    from index.build import build_gallery

    photos = tmp_path / "photos"
    write_images(photos, range(3))
    gallery = tmp_path / "gallery"
    build_gallery(photos, checkpoint, gallery, workers=0, progress=False)
    assets = DemoAssets(checkpoint, gallery, photos, report={}, reused=True)
    monkeypatch.setattr(prepare, "prepare_user_gallery", lambda source, cache_dir: assets)
    served: dict[str, object] = {}

    def run(app, *, host: str, port: int, **options: object) -> None:
        with TestClient(app) as client:
            served.update(
                host=host,
                port=port,
                ready=client.get("/readyz").json(),
                image=client.get("/v1/gallery/1/image").status_code,
            )

    monkeypatch.setattr(uvicorn, "run", run)
    argv = ["demo", "serve", "--gallery-source", str(photos), "--port", "8391"]
    assert main(argv) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8391
    assert served["ready"]["gallery_size"] == 3  # the prepared gallery
    assert served["image"] == 200  # its images are under the image root the demo passed


def test_export_head_writes_a_checkpoints_head_as_the_demo_loads_it(tmp_path: Path) -> None:
    """`gsp demo export-head` (how `gsp train`'s head becomes the shipped file): the tensors are
    the checkpoint's pooling, the options its config's, with `--mu` as the pooling ratio; a
    checkpoint the demo cannot use is refused."""
    import dataclasses

    from safetensors.torch import load_file

    from app.cli import main
    from app.demo.prepare import head_options, prepare_model
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.net import build_embedding_net

    checkpoint = prepare_model(DemoSpec(), cache_dir=tmp_path)
    loaded = load_checkpoint(checkpoint)
    out = tmp_path / "head.safetensors"
    argv = ["demo", "export-head", "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main([*argv, "--mu", "0.3"]) == 0
    written = load_file(str(out))
    for name, tensor in loaded.net.pooling.state_dict().items():
        assert torch.equal(written[name], tensor), name
    dim, options = head_options(out)
    trained = loaded.config.pooling_options
    assert dim == loaded.config.embedding_dim
    assert options == {**trained, "transport_ratio": 0.3}

    gap = dataclasses.replace(loaded.config, pooling="gap", pooling_options={}, pretrained=False)
    save_checkpoint(tmp_path / "gap", build_embedding_net(gap).eval(), gap)
    refused = ["demo", "export-head", "--checkpoint", str(tmp_path / "gap"), "--out", str(out)]
    assert main(refused) == 2
    assert load_file(str(out)).keys() == written.keys()  # the earlier file is untouched
