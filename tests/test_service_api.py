"""Every route of the service through FastAPI's TestClient, including every kind of bad input."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.service.inference import InferenceEngine, StartupError
from app.service.main import create_app
from tests.conftest import assert_error, bomb_png, encode
from tests.test_service_support import (
    API_KEY,
    PER_LABEL,
    ServiceAssets,
    drawn_image,
    png_bytes,
    point_gallery_link,
)

AUTH = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def client(service_assets: ServiceAssets) -> Iterator[TestClient]:
    with TestClient(create_app(service_assets.settings())) as test_client:
        yield test_client


def search(client: TestClient, data: bytes, content_type: str = "image/png", **fields: object):
    form = {key: str(value) for key, value in fields.items()}
    return client.post("/v1/search", files={"image": ("q", data, content_type)}, data=form)


# -- search ------------------------------------------------------------------------------------


def test_search_returns_ranked_matches_with_heatmaps(client: TestClient) -> None:
    response = search(client, png_bytes(drawn_image("blue", 1)), k=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["x-request-id"]
    assert body["model_fingerprint"] == client.app.state.service.engine.fingerprint
    matches = body["matches"]
    assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5]
    scores = [m["score"] for m in matches]
    assert scores == sorted(scores, reverse=True)
    # The identical image is in the gallery: it must come first with cosine ~1.
    assert matches[0]["metadata"]["name"] == "blue-1.png"
    assert matches[0]["score"] == pytest.approx(1.0, abs=1e-3)
    first = matches[0]
    assert first["thumbnail_url"] == f"/v1/gallery/{first['id']}/thumbnail"
    grid = np.array(first["heatmap"]["grid"])
    assert grid.shape == (first["heatmap"]["height"], first["heatmap"]["width"])
    query = body["query"]["heatmap"]
    assert np.array(query["grid"]).shape == (query["height"], query["width"])
    assert np.allclose(np.array(query["grid"]), grid, atol=1e-3)  # same image, same weights
    assert query["overlay_url"].startswith("data:image/png;base64,")
    timings = body["timings"]
    assert timings["total_ms"] >= timings["embed_ms"] > 0
    assert 0 < body["crop_fraction"] <= 1


def test_search_with_a_large_jpeg_sees_what_the_indexer_would(client: TestClient) -> None:
    """Uploads decode as `gsp index` decodes files (reduced-scale JPEG), so a photo queried
    over HTTP gets the embedding its indexed copy has; the reported size is the upload's."""
    from index.images import decode_image as indexer_decode
    from model.transforms import eval_transform

    # The grid comes rounded to 4 decimals: atol 6e-5. A full-scale decode misses by 4e-4.
    photo = drawn_image("blue", 1).resize((1440, 1200), Image.Resampling.BICUBIC)
    data = encode(photo, "JPEG", quality=92)
    response = search(client, data, "image/jpeg", k=1)
    assert response.status_code == 200, response.text
    query = response.json()["query"]
    assert (query["width"], query["height"]) == (1440, 1200)
    engine = client.app.state.service.engine
    indexed = indexer_decode(data, engine.preprocessing.resize_size)
    with torch.inference_mode():
        weights = engine.net(eval_transform(engine.preprocessing)(indexed)[None]).weights[0]
    np.testing.assert_allclose(np.array(query["heatmap"]["grid"]), weights.numpy(), atol=6e-5)


def test_search_label_filter_and_no_heatmaps(client: TestClient) -> None:
    response = search(client, png_bytes(drawn_image("red", 0)), k=20, label="green", heatmaps=False)
    body = response.json()
    assert response.status_code == 200
    assert len(body["matches"]) == PER_LABEL
    assert {m["label"] for m in body["matches"]} == {"green"}
    assert body["query"]["heatmap"] is None
    assert all(m["heatmap"] is None for m in body["matches"])


@pytest.mark.parametrize("k", [0, -1, 21, "ten"])
def test_bad_k_is_422(client: TestClient, k: object) -> None:
    assert_error(search(client, png_bytes(drawn_image("red", 0)), k=k), 422)


def test_k_bounds_come_from_each_applications_settings(
    client: TestClient, service_assets: ServiceAssets
) -> None:
    """The routers are module-level and shared by every application: each application's
    OpenAPI document and validation still state its own ``max_k`` and ``default_k``."""
    query = png_bytes(drawn_image("red", 0))
    wide_settings = service_assets.settings(max_k=30, default_k=3, gallery_read_only=True)
    with TestClient(create_app(wide_settings)) as wide:
        for app_client, max_k, default_k in ((client, 20, 10), (wide, 30, 3)):
            document = app_client.get("/openapi.json").json()
            assert "x-bound-by-settings" not in json.dumps(document)
            body = document["components"]["schemas"]["Body_search_v1_search_post"]
            parameters = document["paths"]["/v1/search/by-id/{item_id}"]["post"]["parameters"]
            by_id = next(parameter for parameter in parameters if parameter["name"] == "k")
            description = f"number of matches, 1 to {max_k}"
            assert by_id["description"] == description
            for schema in (body["properties"]["k"], by_id["schema"]):
                assert schema["type"] == "integer" and "anyOf" not in schema
                assert (schema["minimum"], schema["maximum"]) == (1, max_k)
                assert (schema["default"], schema["description"]) == (default_k, description)
            assert app_client.post("/v1/search/by-id/1").json()["k"] == default_k
            assert search(app_client, query, heatmaps="false").json()["k"] == default_k
        assert search(wide, query, k=25).json()["k"] == 25
        # Above max_k: FastAPI's own validation error, as for a declared le=max_k.
        refused = assert_error(search(client, query, k=25), 422)["detail"]
        assert refused == [
            {
                "type": "less_than_equal",
                "loc": ["body", "k"],
                "msg": "Input should be less than or equal to 20",
                "input": "25",
                "ctx": {"le": 20},
            }
        ]
        refused = assert_error(client.post("/v1/search/by-id/1?k=21"), 422)["detail"]
        assert [(problem["loc"], problem["input"]) for problem in refused] == [
            (["query", "k"], "21")
        ]
        assert wide.post("/v1/search/by-id/1?k=21").json()["k"] == 21


@pytest.mark.parametrize(
    ("mode", "fmt", "content_type"),
    [
        ("CMYK", "JPEG", "image/jpeg"),
        ("P", "PNG", "image/png"),
        ("LA", "PNG", "image/png"),
        ("RGBA", "PNG", "image/png"),
        ("L", "PNG", "application/octet-stream"),
    ],
)
def test_image_modes_are_searchable(
    client: TestClient, mode: str, fmt: str, content_type: str
) -> None:
    image = drawn_image("green", 2).convert(mode)
    response = search(client, encode(image, fmt), content_type, k=3)
    assert response.status_code == 200, response.text
    assert response.json()["query"]["format"] == fmt


def test_sixteen_bit_image_is_searchable(client: TestClient) -> None:
    values = (np.asarray(drawn_image("red", 0).convert("L"), dtype=np.uint16) * 257).astype(
        np.uint16
    )
    response = search(client, encode(Image.fromarray(values), "PNG"), k=3)
    assert response.status_code == 200, response.text


def test_multi_frame_gif_uses_first_frame(client: TestClient) -> None:
    frames = [drawn_image("blue", 1), drawn_image("red", 0)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40)
    body = search(client, data, "image/gif", k=3).json()
    assert body["query"]["frames"] == 2
    assert body["matches"][0]["label"] == "blue"


def test_exif_rotated_jpeg_is_turned_upright(client: TestClient) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    wide = Image.new("RGB", (60, 30), (200, 10, 10))
    body = search(client, encode(wide, "JPEG", exif=exif.tobytes()), "image/jpeg", k=1).json()
    assert (body["query"]["width"], body["query"]["height"]) == (30, 60)


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"", "image/png", 400, "empty_upload"),
        (b"just some text, not pixels", "text/plain", 415, "unsupported_media_type"),
        (b"just some text, not pixels", "image/png", 400, "not_an_image"),
        (bomb_png(60_000, 60_000), "image/png", 413, "too_many_pixels"),
        (bomb_png(4_000, 4_000), "image/png", 413, "too_many_pixels"),
        (b"\x00" * 1_000_001, "image/png", 413, "upload_too_large"),
    ],
)
def test_bad_uploads_are_clear_4xx(
    client: TestClient, data: bytes, content_type: str, status: int, code: str
) -> None:
    assert_error(search(client, data, content_type), status, code)


def test_truncated_jpeg_is_400(client: TestClient) -> None:
    noise = np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    assert_error(search(client, data[: len(data) // 2], "image/jpeg"), 400, "bad_image")


def test_missing_image_field_is_422(client: TestClient) -> None:
    assert_error(client.post("/v1/search", data={"k": "3"}), 422)


def test_server_survives_bad_input(client: TestClient) -> None:
    search(client, b"\xff\xd8\xff garbage", "image/jpeg")
    assert client.get("/readyz").status_code == 200


# -- search by id ------------------------------------------------------------------------------


def test_search_by_id_excludes_the_item(client: TestClient) -> None:
    first = search(client, png_bytes(drawn_image("green", 0)), k=1).json()["matches"][0]
    response = client.post(f"/v1/search/by-id/{first['id']}", params={"k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["id"] == first["id"]
    assert first["id"] not in [m["id"] for m in body["matches"]]
    assert len(body["matches"]) == 3
    assert body["matches"][0]["label"] == "green"


def test_search_by_unknown_id_is_404(client: TestClient) -> None:
    assert_error(client.post("/v1/search/by-id/987654321"), 404, "unknown_id")
    assert_error(client.post("/v1/search/by-id/1", params={"k": 0}), 422)


# -- gallery items and files -------------------------------------------------------------------


def first_match(client: TestClient, label: str = "red") -> dict:
    return search(client, png_bytes(drawn_image(label, 0)), k=1).json()["matches"][0]


def test_item_metadata_image_thumbnail_and_heatmap(client: TestClient) -> None:
    match = first_match(client)
    item = client.get(f"/v1/gallery/{match['id']}").json()
    assert item["label"] == "red" and item["metadata"]["name"] == "red-0.png"
    assert len(item["sha256"]) == 64
    image = client.get(item["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == png_bytes(drawn_image("red", 0))
    thumb = client.get(item["thumbnail_url"])
    assert thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] <= 256
    heatmap = client.get(item["heatmap"]["overlay_url"], params={"opacity": 0.8})
    assert heatmap.status_code == 200 and heatmap.content.startswith(b"\x89PNG")


def test_unknown_item_is_404_everywhere(client: TestClient) -> None:
    for suffix in ("", "/image", "/thumbnail", "/heatmap"):
        assert_error(client.get(f"/v1/gallery/987654321{suffix}"), 404, "unknown_id")
    assert_error(client.get("/v1/gallery/not-a-number"), 422)


def test_files_outside_the_gallery_are_never_served(
    client: TestClient, service_assets: ServiceAssets
) -> None:
    secret = service_assets.outside_file.read_bytes()
    for item_id in service_assets.escape_ids:
        assert client.get(f"/v1/gallery/{item_id}").status_code == 200  # metadata is fine
        for suffix in ("/image", "/thumbnail", "/heatmap"):
            response = client.get(f"/v1/gallery/{item_id}{suffix}")
            assert_error(response, 404, "image_unavailable")
            assert secret not in response.content
    # Paths are never taken from the client: traversal attempts do not even route.
    assert client.get("/v1/gallery/..%2F..%2Fsecret.png/image").status_code in (404, 422)


def test_an_item_file_that_is_no_image_is_404_for_every_reader(client: TestClient) -> None:
    """Thumbnail, heatmap and explain read an item's file through one lookup: a stored file
    that no longer decodes is 404 ``image_unavailable`` for each of them, never a 500."""
    teal = Image.new("RGB", (75, 60), (20, 160, 150))
    files = {"images": ("teal.png", png_bytes(teal), "image/png")}
    added = client.post("/v1/gallery", files=files, headers=AUTH)
    assert added.status_code == 200, added.text
    item = added.json()["items"][0]
    store = client.app.state.service.store
    store.resolve_source(item["source"]).write_bytes(b"no longer an image")
    try:
        for suffix in ("/thumbnail", "/heatmap"):
            response = client.get(f"/v1/gallery/{item['id']}{suffix}")
            assert "is unusable" in assert_error(response, 404, "image_unavailable")["detail"]
        for query, match in ((1, item["id"]), (item["id"], 1)):
            fields = {"query_id": str(query), "gallery_id": str(match)}
            response = client.post("/v1/explain", data=fields)
            assert "is unusable" in assert_error(response, 404, "image_unavailable")["detail"]
    finally:
        assert client.delete(f"/v1/gallery/{item['id']}", headers=AUTH).status_code == 200


# -- writes ------------------------------------------------------------------------------------


def test_writes_need_an_api_key(client: TestClient) -> None:
    files = [("images", ("a.png", png_bytes(drawn_image("red", 3)), "image/png"))]
    assert_error(client.post("/v1/gallery", files=files), 401, "missing_api_key")
    assert_error(
        client.post("/v1/gallery", files=files, headers={"X-API-Key": "nope"}), 403, "bad_api_key"
    )
    assert_error(client.delete("/v1/gallery/1"), 401)
    assert_error(client.post("/v1/admin/reload-gallery"), 401)


READ_KEY = "read-key-93ad"


def test_read_keys_close_search_and_images_but_not_probes_or_the_page(
    service_assets: ServiceAssets,
) -> None:
    # Read-only: the module's client holds the gallery open for writing.
    settings = service_assets.settings(read_keys=[READ_KEY], gallery_read_only=True)
    query = png_bytes(drawn_image("red", 0))
    with TestClient(create_app(settings)) as private:
        item = search(private, query, k=1)  # no key
        assert "X-API-Key" in assert_error(item, 401, "missing_api_key")["detail"]
        assert_error(private.get("/v1/gallery/0/image"), 401, "missing_api_key")
        assert_error(private.post("/v1/search/by-id/0"), 401, "missing_api_key")
        bad = private.post(
            "/v1/search", files={"image": ("q", query, "image/png")}, headers={"X-API-Key": "x"}
        )
        assert_error(bad, 403, "bad_api_key")
        for key in (READ_KEY, API_KEY):  # a write key reads too
            found = private.post(
                "/v1/search", files={"image": ("q", query, "image/png")}, headers={"X-API-Key": key}
            )
            assert found.status_code == 200, found.text
        match = found.json()["matches"][0]["id"]
        assert private.get(f"/v1/gallery/{match}/image", headers=AUTH).status_code == 200
        for probe in ("/healthz", "/readyz", "/metrics", "/static/app.js", "/key"):
            assert private.get(probe).status_code == 200, probe
        page = private.get("/", follow_redirects=False)
        assert (page.status_code, page.headers["location"]) == (303, "key")
        paths = private.get("/openapi.json").json()["paths"]
        assert "401" in paths["/v1/search"]["post"]["responses"]


def test_the_key_form_lets_the_page_read_but_never_write(service_assets: ServiceAssets) -> None:
    settings = service_assets.settings(read_keys=[READ_KEY], gallery_read_only=True)
    with TestClient(create_app(settings)) as browser:
        refused = browser.post("/key", data={"key": "wrong"})
        assert refused.status_code == 403 and "not valid" in refused.text
        assert "gsp_key" not in browser.cookies
        entered = browser.post("/key", data={"key": READ_KEY}, follow_redirects=False)
        assert (entered.status_code, entered.headers["location"]) == (303, ".")
        cookie = entered.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        # the page and everything it asks for, with the cookie alone
        page = browser.get("/")
        assert page.status_code == 200 and "drop-zone" in page.text
        found = search(browser, png_bytes(drawn_image("red", 0)), k=1)
        assert found.status_code == 200
        match = found.json()["matches"][0]["id"]
        assert browser.get(f"/v1/gallery/{match}/thumbnail").status_code == 200
        # a cookie holding even a write key grants no writes: no other site can make a
        # visitor's browser write
        browser.post("/key", data={"key": API_KEY})
        files = [("images", ("a.png", png_bytes(drawn_image("red", 3)), "image/png"))]
        assert_error(browser.post("/v1/gallery", files=files), 401, "missing_api_key")


def test_add_search_and_delete_uploaded_images(
    client: TestClient, service_assets: ServiceAssets
) -> None:
    size = client.get("/readyz").json()["gallery_size"]
    yellow = Image.new("RGB", (90, 70), (240, 230, 20))
    purple = Image.new("RGB", (70, 90), (120, 20, 160))
    files = [
        ("images", ("y.png", png_bytes(yellow), "image/png")),
        ("images", ("p.jpg", encode(purple, "JPEG"), "image/jpeg")),
    ]
    metadata = json.dumps([{"colour": "yellow"}, {"colour": "purple"}])
    response = client.post(
        "/v1/gallery",
        files=files,
        data={"labels": ["yellow", "purple"], "metadata": metadata},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    added = response.json()
    assert added["gallery_size"] == size + 2
    yellow_item, purple_item = added["items"]
    assert not yellow_item["duplicate"]
    assert yellow_item["source"] == f"uploads/{yellow_item['sha256']}.png"
    assert purple_item["source"].endswith(".jpg")
    stored = service_assets.gallery_link / yellow_item["source"]
    assert stored.read_bytes() == png_bytes(yellow)

    found = search(client, png_bytes(yellow), k=1).json()["matches"][0]
    assert found["id"] == yellow_item["id"] and found["metadata"] == {"colour": "yellow"}
    assert client.get(found["image_url"]).content == png_bytes(yellow)

    again = client.post("/v1/gallery", files=files[:1], headers=AUTH).json()
    assert again["items"][0]["duplicate"] and again["items"][0]["id"] == yellow_item["id"]

    for item in (yellow_item, purple_item):
        deleted = client.delete(f"/v1/gallery/{item['id']}", headers=AUTH)
        assert deleted.status_code == 200 and deleted.json()["deleted"]
        assert_error(client.get(f"/v1/gallery/{item['id']}"), 404)
    assert not stored.exists()
    assert client.get("/readyz").json()["gallery_size"] == size
    assert_error(client.delete(f"/v1/gallery/{yellow_item['id']}", headers=AUTH), 404)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"labels": ["a", "b", "c"]}, "bad_labels"),
        ({"metadata": "{not json"}, "bad_metadata"),
        ({"metadata": "[1, 2]"}, "bad_metadata"),
    ],
)
def test_add_rejects_inconsistent_fields(client: TestClient, data: dict, code: str) -> None:
    files = [
        ("images", (f"{i}.png", png_bytes(drawn_image("red", i)), "image/png")) for i in (0, 1)
    ]
    assert_error(client.post("/v1/gallery", files=files, data=data, headers=AUTH), 400, code)


def test_add_with_one_bad_image_adds_nothing(client: TestClient) -> None:
    size = client.get("/readyz").json()["gallery_size"]
    files = [
        ("images", ("ok.png", png_bytes(Image.new("RGB", (40, 40), (1, 2, 3))), "image/png")),
        ("images", ("bad.png", b"not an image", "image/png")),
    ]
    body = assert_error(client.post("/v1/gallery", files=files, headers=AUTH), 400, "not_an_image")
    assert body["detail"].startswith("image 1:")
    assert client.get("/readyz").json()["gallery_size"] == size


# -- reload ------------------------------------------------------------------------------------


def test_admin_reload_swaps_in_a_rebuilt_gallery(
    client: TestClient, service_assets: ServiceAssets
) -> None:
    full = client.get("/readyz").json()["gallery_size"]
    point_gallery_link(service_assets, service_assets.gallery_small)
    try:
        body = client.post("/v1/admin/reload-gallery", headers=AUTH).json()
        assert (body["previous_size"], body["gallery_size"]) == (full, 3)
        assert len(search(client, png_bytes(drawn_image("red", 0)), k=20).json()["matches"]) == 3
    finally:
        point_gallery_link(service_assets, service_assets.gallery_full)
        client.post("/v1/admin/reload-gallery", headers=AUTH)
    assert client.get("/readyz").json()["gallery_size"] == full


def test_failed_reload_keeps_serving(client: TestClient, service_assets: ServiceAssets) -> None:
    point_gallery_link(service_assets, service_assets.root / "missing-gallery")
    try:
        assert_error(client.post("/v1/admin/reload-gallery", headers=AUTH), 409, "reload_failed")
    finally:
        point_gallery_link(service_assets, service_assets.gallery_full)
    assert search(client, png_bytes(drawn_image("red", 0)), k=1).status_code == 200


# -- operations --------------------------------------------------------------------------------


def test_health_ready_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["device"] == "cpu"
    search(client, png_bytes(drawn_image("red", 0)), k=2)
    text = client.get("/metrics").text
    assert 'gsp_http_requests_total{method="POST",route="/v1/search",status="200"}' in text
    assert (
        'gsp_http_request_duration_seconds_bucket{le="0.002",method="POST",route="/v1/search"'
        in text
    )
    assert "gsp_batch_size_count" in text
    assert f"gsp_gallery_items {float(ready['gallery_size'])}" in text
    assert f'fingerprint="{ready["model_fingerprint"]}"' in text
    assert "gsp_gallery_info{" in text


def test_page_and_static_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "drop-zone" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from a CDN
    for name in ("app.js", "app.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/v1/search"]["post"]


def test_request_id_is_echoed_and_logs_are_clean(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    data = png_bytes(drawn_image("red", 2))
    logger = logging.getLogger("gsp.access")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="gsp.access"):
            response = client.post(
                "/v1/search",
                files={"image": ("q.png", data, "image/png")},
                headers={"X-Request-ID": "req-123", **AUTH},
            )
            client.delete("/v1/gallery/987654321", headers=AUTH)
    finally:
        logger.removeHandler(caplog.handler)
    assert response.headers["x-request-id"] == "req-123"
    records = [r.fields for r in caplog.records if hasattr(r, "fields")]
    search_line = next(r for r in records if r["request_id"] == "req-123")
    assert search_line["route"] == "/v1/search" and search_line["status"] == 200
    assert set(search_line["stages_ms"]) == {"decode", "embed", "search"}
    text = json.dumps(records)
    assert API_KEY not in text
    assert data[:64].hex() not in text and "PNG" not in text
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32 and generated != "req-123"


# -- startup -----------------------------------------------------------------------------------


def test_startup_fails_fast_with_clear_messages(service_assets: ServiceAssets, tmp_path) -> None:
    with pytest.raises(StartupError, match="checkpoint directory not found"):
        create_app(service_assets.settings(checkpoint=tmp_path / "nope"))
    with pytest.raises(StartupError, match="gallery directory not found"):
        create_app(service_assets.settings(gallery=tmp_path / "nope"))


def test_startup_refuses_a_gallery_from_another_model(
    service_assets: ServiceAssets, tmp_path
) -> None:
    from index.gallery import Gallery

    other = tmp_path / "other"
    Gallery.create(
        other,
        model_fingerprint="0" * 16,
        preprocessing=client_preprocessing(service_assets),
        embedding_dim=32,
    ).close()
    with pytest.raises(StartupError, match="0000000000000000"):
        create_app(service_assets.settings(gallery=other))


def client_preprocessing(assets: ServiceAssets) -> dict:
    from model.checkpoint import load_checkpoint

    return load_checkpoint(assets.checkpoint, device="cpu").config.preprocessing.to_dict()


def test_writes_are_closed_without_api_keys_or_when_read_only(
    service_assets: ServiceAssets,
) -> None:
    # A second application beside the module's writer: it must open the gallery read-only.
    files = [("images", ("a.png", png_bytes(drawn_image("red", 3)), "image/png"))]
    keyless = service_assets.settings(api_keys=[], batching=False, gallery_read_only=True)
    with TestClient(create_app(keyless)) as other:
        assert_error(other.post("/v1/gallery", files=files, headers=AUTH), 403, "writes_disabled")
        assert other.get("/readyz").json()["batch_max_size"] == 1
    with TestClient(create_app(service_assets.settings(gallery_read_only=True))) as other:
        assert_error(other.post("/v1/gallery", files=files, headers=AUTH), 409, "read_only")
        assert_error(other.delete("/v1/gallery/1", headers=AUTH), 409, "read_only")
        assert search(other, png_bytes(drawn_image("red", 0)), k=1).status_code == 200


def test_a_second_writer_is_refused_at_startup(
    client: TestClient, service_assets: ServiceAssets
) -> None:
    with pytest.raises(StartupError, match="open for writing"):
        create_app(service_assets.settings())


def test_warm_up_embeds_a_single_image_and_a_batch(
    service_assets: ServiceAssets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before a GPU service says ready it has run (and compiled) both batch shapes."""
    engine = InferenceEngine(
        service_assets.checkpoint, torch.device("cpu"), max_batch_size=4, max_wait_ms=1
    )
    seen: list[list[tuple[int, ...]]] = []
    real = engine.embed_tensors

    def recording(tensors):
        seen.append([tuple(t.shape) for t in tensors])
        return real(tensors)

    monkeypatch.setattr(engine, "embed_tensors", recording)
    engine.warm_up()
    size = engine.preprocessing.image_size
    assert seen == [[(size, size, 3)], [(size, size, 3)] * 2]


@pytest.mark.parametrize(
    ("device", "tolerance"),
    [("cpu", 0.0), pytest.param("cuda", 1e-5, marks=pytest.mark.gpu)],
)
def test_engine_embeds_as_the_indexer_transform(
    service_assets: ServiceAssets, device: str, tolerance: float
) -> None:
    """The service ships uint8 crops and normalises on the device: the same input and output
    as ``eval_transform`` (bit for bit on the CPU)."""
    from model.transforms import eval_transform

    engine = InferenceEngine(
        service_assets.checkpoint, torch.device(device), max_batch_size=4, max_wait_ms=1
    )
    images = [drawn_image("red", 0, size=120), drawn_image("blue", 2, size=70).convert("P")]
    prepared = [engine.prepare(image) for image in images]
    assert all(one.dtype == torch.uint8 for one in prepared)
    reference = torch.stack([eval_transform(engine.preprocessing)(image) for image in images])
    inputs = engine.inputs(prepared)
    assert inputs.device.type == device and inputs.is_contiguous()
    exact = {"rtol": 0.0, "atol": tolerance / 10}
    torch.testing.assert_close(inputs.cpu(), reference, **exact)
    torch.testing.assert_close(engine.inputs(prepared[:1]).cpu(), reference[:1], **exact)
    with torch.inference_mode():
        expected = engine.net(reference.to(device))
    embedded = engine.embed_images(images)
    for index, one in enumerate(embedded):
        np.testing.assert_allclose(
            one.embedding, expected.embedding[index].cpu().numpy(), rtol=0, atol=tolerance
        )
        np.testing.assert_allclose(
            one.weights, expected.weights[index].cpu().numpy(), rtol=0, atol=tolerance
        )


def test_dependencies_run_on_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI hands a plain-``def`` dependency to its thread pool, one thread hand-off per
    request; the service's dependencies are ``async`` so that no request pays for that."""
    import fastapi.dependencies.utils as dependency_utils

    handed_off: list[str] = []
    real = dependency_utils.run_in_threadpool

    async def counting(function, *args, **kwargs):
        handed_off.append(getattr(function, "__name__", repr(function)))
        return await real(function, *args, **kwargs)

    monkeypatch.setattr(dependency_utils, "run_in_threadpool", counting)
    assert search(client, png_bytes(drawn_image("red", 0)), k=2).status_code == 200
    assert client.post("/v1/search/by-id/1?k=2").status_code == 200
    denied = client.delete("/v1/gallery/999999", headers={"X-API-Key": "wrong"})
    assert denied.status_code == 403
    assert handed_off == []


def test_image_work_runs_on_the_service_workers(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding and drawing use the service's bounded pool, not Starlette's 40-thread one."""
    import app.service.dependencies as dependencies
    import app.service.routes.gallery as gallery_routes
    import app.service.searching as searching

    threads: dict[str, str] = {}

    def recorded(name: str, function):
        def wrapper(*args, **kwargs):
            threads[name] = threading.current_thread().name
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        dependencies, "decode_upload", recorded("decode", dependencies.decode_upload)
    )
    monkeypatch.setattr(searching, "inline_heatmap", recorded("heatmap", searching.inline_heatmap))
    monkeypatch.setattr(
        gallery_routes, "thumbnail_jpeg", recorded("thumbnail", gallery_routes.thumbnail_jpeg)
    )
    response = search(client, png_bytes(drawn_image("red", 0)), k=1, heatmaps="true")
    assert response.status_code == 200, response.text
    item = response.json()["matches"][0]["id"]
    assert client.get(f"/v1/gallery/{item}/thumbnail").status_code == 200
    assert set(threads) == {"decode", "heatmap", "thumbnail"}
    assert all(name.startswith("gsp-cpu") for name in threads.values()), threads


def test_requests_beyond_the_in_flight_limit_get_503_and_probes_still_answer(
    service_assets: ServiceAssets, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.service.dependencies as dependencies

    entered = threading.Semaphore(0)
    release = threading.Event()
    real_decode = dependencies.decode_upload

    def held_decode(*args, **kwargs):
        entered.release()
        assert release.wait(30), "the test never released the decodes"
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(dependencies, "decode_upload", held_decode)
    # Read-only: the module's client holds the gallery open for writing.
    settings = service_assets.settings(max_in_flight=2, cpu_workers=2, gallery_read_only=True)
    query = png_bytes(drawn_image("red", 0))
    with TestClient(create_app(settings)) as limited:
        with ThreadPoolExecutor(2) as senders:
            held = [senders.submit(search, limited, query, k=1) for _ in range(2)]
            for _ in range(2):
                assert entered.acquire(timeout=30)  # both searches are in progress
            refused = search(limited, query, k=1)
            body = assert_error(refused, 503, "overloaded")
            assert "GSP_MAX_IN_FLIGHT" in body["detail"]
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["x-request-id"]  # logged like any other request
            for probe in ("/healthz", "/readyz", "/metrics"):
                assert limited.get(probe).status_code == 200, probe
            assert "gsp_http_requests_in_flight 2.0" in limited.get("/metrics").text
            release.set()
            assert [future.result().status_code for future in held] == [200, 200]
        assert search(limited, query, k=1).status_code == 200  # the slots were given back
        assert "gsp_http_requests_in_flight 0.0" in limited.get("/metrics").text
        paths = limited.get("/openapi.json").json()["paths"]
        for path, operations in paths.items():
            if path.startswith("/v1/"):  # every route the limit can refuse documents it
                assert all("503" in op["responses"] for op in operations.values()), path
