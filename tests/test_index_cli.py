"""``gsp index`` end to end through ``app.cli.main``: build, info, search, add, remove."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from app.heatmap import overlay_heatmap
from index.gallery import Gallery
from tests.conftest import gallery_of_another_model, write_images


def test_build_info_search_add_remove(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    write_images(images / "a", range(4))
    write_images(images / "b", range(4, 7))
    gallery = tmp_path / "g"
    common = ["--checkpoint", str(checkpoint), "--workers", "0", "--no-progress"]
    assert (
        main(
            [
                "index",
                "build",
                "--images",
                str(images),
                "--gallery",
                str(gallery),
                "--labels-from-subfolders",
                "--batch-size",
                "4",
                *common,
            ]
        )
        == 0
    )
    assert "7 indexed" in capsys.readouterr().out

    assert main(["index", "info", "--gallery", str(gallery), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == 7 and info["labels"] == {"a": 4, "b": 3}
    assert info["index_type"] == "flat" and info["embedding_dim"] == 32
    assert (
        info["model_fingerprint"]
        == Gallery.open(gallery, read_only=True).manifest.model_fingerprint
    )
    assert info["total_bytes"] > 0 and "items.sqlite" in info["bytes_on_disk"]

    query = images / "b" / "0005.jpg"
    sheet = tmp_path / "sheet.png"
    assert (
        main(
            [
                "index",
                "search",
                "--gallery",
                str(gallery),
                str(query),
                "--checkpoint",
                str(checkpoint),
                "-k",
                "3",
                "--contact-sheet",
                str(sheet),
            ]
        )
        == 0
    )
    rows = capsys.readouterr().out.splitlines()
    first = rows[1].split()
    assert (
        first[0] == "1"
        and first[-1] == str(query)
        and float(first[1]) == pytest.approx(1, abs=1e-4)
    )
    assert len([r for r in rows if r.split()[:1] in (["1"], ["2"], ["3"])]) == 3
    with Image.open(sheet) as picture:
        assert picture.size[0] == 4 * 160  # query and three matches in one row
        captions = np.asarray(picture.convert("L"))[160:, :]
        assert all(captions[:, i * 160 : (i + 1) * 160].min() < 128 for i in range(4))

    extra = write_images(tmp_path / "extra", range(7, 9))
    assert (
        main(
            [
                "index",
                "add",
                "--gallery",
                str(gallery),
                *map(str, extra),
                str(images / "a" / "0000.jpg"),
                "--label",
                "new",
                *common,
            ]
        )
        == 0
    )
    assert "2 indexed, 1 already in the gallery" in capsys.readouterr().out
    assert main(["index", "remove", "--gallery", str(gallery), "1", "2", "999"]) == 0
    assert "removed 2 of 3 ids; gallery holds 7 items" in capsys.readouterr().out
    with Gallery.open(gallery, read_only=True) as reopened:
        assert reopened.get(1) is None and reopened.labels()["new"] == 2


def test_errors_are_reported_not_raised(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", "info", "--gallery", str(tmp_path / "nowhere")]) == 1
    assert "no gallery" in capsys.readouterr().err
    gallery_of_another_model(tmp_path / "g", "someone-else")
    write_images(tmp_path / "q", range(1))
    assert (
        main(
            [
                "index",
                "search",
                "--gallery",
                str(tmp_path / "g"),
                str(tmp_path / "q" / "0000.jpg"),
                "--checkpoint",
                str(checkpoint),
            ]
        )
        == 1
    )
    assert "someone-else" in capsys.readouterr().err
    (tmp_path / "bad.jpg").write_text("not an image")
    assert (
        main(
            [
                "index",
                "search",
                "--gallery",
                str(tmp_path / "g"),
                str(tmp_path / "bad.jpg"),
                "--checkpoint",
                str(checkpoint),
            ]
        )
        == 1
    )
    assert "not an image" in capsys.readouterr().err


def test_overlay_heatmap_marks_where_the_weights_are() -> None:
    image = Image.new("RGB", (70, 70), (255, 255, 255))
    weights = np.zeros((7, 7), dtype=np.float32)
    weights[0, 0] = 3.0
    blended = np.asarray(overlay_heatmap(image, weights, opacity=0.5)).astype(int)
    assert blended.shape == (70, 70, 3)
    hot, cold = blended[2, 2], blended[-3, -3]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where the weight is, blue elsewhere
    assert (np.asarray(overlay_heatmap(image, weights, opacity=0.0)) == 255).all()
    with pytest.raises(ValueError, match="2-D"):
        overlay_heatmap(image, np.zeros(3))


def test_index_type_choices_are_the_gallery_types() -> None:
    from app.commands.index import INDEX_TYPES as CLI_TYPES
    from index.vectors import INDEX_TYPES

    assert CLI_TYPES == INDEX_TYPES


def test_contact_sheet_captions_tell_close_scores_and_labels_apart() -> None:
    from app.commands.index import match_caption

    close = [match_caption(1, 0.99712, "cat"), match_caption(2, 0.99748, "cat")]
    assert close == ["#1  0.9971  cat", "#2  0.9975  cat"]
    assert match_caption(3, 0.5, None) == "#3  0.5000  (no label)"
    assert match_caption(4, 0.5, "a-very-long-class-name") == "#4  0.5000  a-very-long-.."


def test_no_progress_leaves_stderr_free_of_bars(
    tmp_path: Path, checkpoint: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    write_images(images, range(3))
    build = ["index", "build", "--images", str(images), "--gallery", str(tmp_path / "g")]
    build += ["--checkpoint", str(checkpoint), "--workers", "0"]
    assert main([*build, "--no-progress"]) == 0
    assert "indexing" not in capfd.readouterr().err
    assert main([*build, "--gallery", str(tmp_path / "again")]) == 0
    assert "indexing" in capfd.readouterr().err  # the bar the flag turns off
