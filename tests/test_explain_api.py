"""POST /v1/explain and POST /v1/search/regions on the tiny service checkpoint and gallery."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.service.main import create_app
from tests.conftest import assert_error
from tests.test_service_support import ServiceAssets, drawn_image, png_bytes


@pytest.fixture(scope="module")
def client(service_assets: ServiceAssets) -> Iterator[TestClient]:
    # the explain routes come with create_app itself: the test would fail if they were not mounted
    app = create_app(
        service_assets.settings(gallery=service_assets.gallery_full, gallery_read_only=True)
    )
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def ids(client: TestClient) -> dict[str, int]:
    found = {}
    for item_id in range(64):
        response = client.get(f"/v1/gallery/{item_id}")
        if response.status_code == 200:
            found[response.json()["metadata"].get("name", str(item_id))] = item_id
    return found


def image_file(image: Image.Image, name: str = "image") -> dict[str, tuple[str, bytes, str]]:
    return {name: ("q.png", png_bytes(image), "image/png")}


def explain(client: TestClient, files: dict | None = None, **fields: object):
    data = {key: str(value) for key, value in fields.items()}
    return client.post("/v1/explain", files=files or {}, data=data)


def grid(heatmap: dict) -> np.ndarray:
    values = np.array(heatmap["grid"])
    assert values.shape == (heatmap["height"], heatmap["width"])
    return values


# -- /v1/explain ---------------------------------------------------------------------------------


def test_explain_an_upload_against_its_own_gallery_copy(
    client: TestClient, ids: dict[str, int]
) -> None:
    target = ids["blue-1.png"]
    response = explain(client, image_file(drawn_image("blue", 1)), gallery_id=target, top=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["score"] == pytest.approx(1.0, abs=1e-4)
    assert body["stored_score"] == pytest.approx(body["score"], abs=1e-3)
    assert body["decomposition_error"] < 1e-4
    assert body["match"]["id"] == target and body["match"]["label"] == "blue"
    assert body["query"]["id"] is None
    prototypes = body["prototypes"]
    assert len(prototypes) == 3
    terms = [p["term"] for p in prototypes]
    assert terms == sorted(terms, reverse=True)
    for part in prototypes:
        assert part["share"] == pytest.approx(part["term"] / body["score"], rel=1e-6)
        assert np.isfinite(part["contribution"])
        assert (grid(part["query"]) >= 0).all() and (grid(part["match"]) >= 0).all()
        assert part["query"]["overlay_url"].startswith("data:image/png;base64,")
        # Same image on both sides: the same regions feed the same prototype.
        assert np.allclose(grid(part["query"]), grid(part["match"]), atol=1e-3)
    assert sum(terms) <= body["shared_share"] * body["score"] + 1e-6


def test_explain_an_item_outside_the_top_k(client: TestClient, ids: dict[str, int]) -> None:
    query = drawn_image("red", 0)
    found = client.post("/v1/search", files=image_file(query), data={"k": "2"}).json()
    in_top = {m["id"]: m["score"] for m in found["matches"]}
    outside = next(i for name, i in ids.items() if name.startswith("green") and i not in in_top)
    far = explain(client, image_file(query), gallery_id=outside, top=2, overlays="false")
    assert far.status_code == 200, far.text
    body = far.json()
    assert body["stored_score"] == pytest.approx(body["score"], abs=1e-3)
    assert body["score"] < min(in_top.values())
    assert body["prototypes"][0]["query"]["overlay_url"] is None
    # And for an item inside the top-k the score is the one search reported.
    inside, score = next(iter(in_top.items()))
    near = explain(client, image_file(query), gallery_id=inside).json()
    assert near["score"] == pytest.approx(score, abs=1e-3)


def test_explain_with_a_gallery_item_as_query(client: TestClient, ids: dict[str, int]) -> None:
    response = explain(client, query_id=ids["green-0.png"], gallery_id=ids["green-3.png"], top=1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["id"] == ids["green-0.png"] and body["query"]["label"] == "green"
    assert body["query"]["thumbnail_url"] == f"/v1/gallery/{ids['green-0.png']}/thumbnail"
    assert len(body["prototypes"]) == 1


def test_explain_bad_input(
    client: TestClient, ids: dict[str, int], service_assets: ServiceAssets
) -> None:
    upload = image_file(drawn_image("red", 1))
    some = ids["red-1.png"]
    assert_error(explain(client, gallery_id=some), 400, "bad_query")
    assert_error(explain(client, upload, query_id=some, gallery_id=some), 400, "bad_query")
    assert_error(explain(client, upload, gallery_id=987654), 404, "unknown_id")
    assert_error(explain(client, query_id=987654, gallery_id=some), 404, "unknown_id")
    assert_error(
        explain(client, upload, gallery_id=service_assets.escape_ids[0]), 404, "image_unavailable"
    )
    not_image = {"image": ("q.png", b"definitely not an image", "image/png")}
    assert_error(explain(client, not_image, gallery_id=some), 400, "not_an_image")
    assert_error(explain(client, upload), 422)
    assert_error(explain(client, upload, gallery_id=some, top=0), 422)
    assert_error(explain(client, upload, gallery_id="ten"), 422)
    # Ids past SQLite's 64-bit range are refused up front (schemathesis once found a 500 here).
    assert_error(explain(client, upload, gallery_id=2**70), 422)
    assert_error(explain(client, query_id=2**63, gallery_id=some), 422)


# -- /v1/search/regions --------------------------------------------------------------------------


def search_regions(client: TestClient, image: Image.Image, **fields: object):
    files = image_file(image)
    for name in ("favour_mask", "ignore_mask"):
        if name in fields:
            files[name] = ("mask.png", png_bytes(fields.pop(name)), "image/png")
    data = {
        key: json.dumps(value) if isinstance(value, dict) else str(value)
        for key, value in fields.items()
    }
    return client.post("/v1/search/regions", files=files, data=data)


LEFT = {"favour": [[0.0, 0.0, 0.5, 1.0]]}


def test_region_search_without_regions_is_plain_search(client: TestClient) -> None:
    query = drawn_image("green", 1)
    plain = client.post("/v1/search", files=image_file(query), data={"k": "5"}).json()
    same = search_regions(client, query, k=5)
    assert same.status_code == 200, same.text
    body = same.json()
    assert [m["id"] for m in body["matches"]] == [m["id"] for m in plain["matches"]]
    assert np.allclose(
        [m["score"] for m in body["matches"]], [m["score"] for m in plain["matches"]], atol=1e-5
    )
    assert body["query"]["format"] == "PNG"


def test_favour_and_ignore_move_the_query_weights(client: TestClient) -> None:
    query = drawn_image("blue", 2)
    plain = grid(search_regions(client, query, k=3).json()["query"]["heatmap"])
    favoured = search_regions(client, query, k=3, regions=LEFT)
    assert favoured.status_code == 200, favoured.text
    body = favoured.json()
    assert len(body["matches"]) == 3
    weights = grid(body["query"]["heatmap"])
    assert body["query"]["heatmap"]["overlay_url"].startswith("data:image/png;base64,")
    left = slice(0, weights.shape[1] // 2)
    assert weights[:, left].sum() > plain[:, left].sum()
    ignored = grid(
        search_regions(client, query, k=3, regions={"ignore": LEFT["favour"]}).json()["query"][
            "heatmap"
        ]
    )
    assert ignored[:, left].sum() < plain[:, left].sum()
    # The same region as a mask picture does the same as the rectangle.
    width, height = query.size
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    by_mask = grid(search_regions(client, query, k=3, favour_mask=mask).json()["query"]["heatmap"])
    assert np.allclose(by_mask, weights, atol=1e-3)


def test_region_search_with_a_transport_ratio(client: TestClient) -> None:
    query = drawn_image("red", 2)
    wide = search_regions(client, query, k=3, transport_ratio=1.0)
    assert wide.status_code == 200, wide.text
    assert np.allclose(grid(wide.json()["query"]["heatmap"]), 1.0, atol=1e-3)  # GAP


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"regions": "{not json"}, 400, "bad_regions"),
        ({"regions": {"favor": [[0, 0, 1, 1]]}}, 400, "bad_regions"),
        ({"regions": {"favour": [[0, 0, 1]]}}, 400, "bad_regions"),
        ({"regions": {"favour": [[0.5, 0, 0.2, 1]]}}, 400, "bad_regions"),
        ({"regions": {"favour": [[0, 0, 1, 1]], "units": "inches"}}, 400, "bad_regions"),
        ({"regions": {"favour": [[0, 0, 1, 1]], "ignore": [[0, 0, 1, 1]]}}, 400, "bad_regions"),
        ({"favour_mask": Image.new("L", (40, 200), 255)}, 400, "bad_mask"),
        ({"transport_ratio": 0}, 422, None),
        ({"strength": -1}, 422, None),
        ({"k": 10_000}, 422, "bad_k"),
    ],
)
def test_region_search_bad_input(
    client: TestClient, fields: dict, status: int, code: str | None
) -> None:
    assert_error(search_regions(client, drawn_image("red", 1), **fields), status, code)


@pytest.mark.parametrize(
    ("regions", "reason"),
    [
        ("[" * 100_000 + "]" * 100_000, "the limit is 16384 bytes"),  # the 500
        ("[" * 5_000 + "]" * 5_000, "nested deeper than 8 levels"),
        ('{"favour": ' + "[" * 20 + "]" * 20 + "}", "nested deeper than 8 levels"),
        (json.dumps({"favour": [[0.1, 0.1, 0.2, 0.2]] * 800}), "the limit is 16384 bytes"),
    ],
)
def test_hostile_regions_are_400_not_500(client: TestClient, regions: str, reason: str) -> None:
    body = assert_error(
        search_regions(client, drawn_image("red", 1), regions=regions), 400, "bad_regions"
    )
    assert reason in body["detail"]
    assert search_regions(client, drawn_image("red", 1), k=2, regions=LEFT).status_code == 200


def test_region_search_rejects_a_non_image_mask(client: TestClient) -> None:
    files = image_file(drawn_image("red", 1))
    files["ignore_mask"] = ("m.png", b"\x89PNG broken", "image/png")
    response = client.post("/v1/search/regions", files=files)
    assert_error(response, 400)
    assert "ignore_mask" in response.json()["detail"]


def test_the_network_runs_on_the_engine_thread_only(
    client: TestClient, ids: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explanations and region re-pooling enter the network only on the inference engine's
    model thread (its micro-batcher's), never on an image worker; their pictures are drawn on
    the image workers."""
    import app.service.routes.explain as explain_routes
    import app.service.searching as searching
    from model.gsp import GeneralizedSumPooling
    from model.net import EmbeddingNet

    threads: dict[str, set[str]] = defaultdict(set)

    def recorded(name: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            threads[name].add(threading.current_thread().name)
            return function(*args, **kwargs)

        return wrapper

    for owner, name in ((EmbeddingNet, "features"), (GeneralizedSumPooling, "forward")):
        monkeypatch.setattr(owner, name, recorded("network", getattr(owner, name)))
    for module in (explain_routes, searching):
        monkeypatch.setattr(module, "inline_heatmap", recorded("drawing", module.inline_heatmap))
    query = drawn_image("blue", 2)
    explained = explain(client, image_file(query), gallery_id=ids["blue-1.png"], top=1)
    assert explained.status_code == 200, explained.text
    from_items = explain(client, query_id=ids["red-0.png"], gallery_id=ids["red-2.png"], top=1)
    assert from_items.status_code == 200, from_items.text
    assert search_regions(client, query, k=2, regions=LEFT).status_code == 200
    assert threads["network"] and threads["drawing"]
    assert all(name.startswith("gsp-model") for name in threads["network"]), threads
    assert all(name.startswith("gsp-cpu") for name in threads["drawing"]), threads
