"""model.explain: the prototype decomposition of a similarity, region re-pooling, image-space
regions to feature-map masks, and the ``gsp explain`` panel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model.config import Preprocessing
from model.explain import (
    ExplainError,
    NotGSPError,
    crop_box,
    explain_pair,
    image_mask_to_feature_mask,
    location_terms,
    pooled_parts,
    rectangles_to_mask,
    repool_with_ratio,
    repool_with_regions,
)
from model.gsp import build_pooling
from model.net import EmbeddingNet
from tests.test_service_support import ServiceAssets, drawn_image

CHANNELS = 16


def tiny_net(pooling: str = "gsp", seed: int = 0) -> EmbeddingNet:
    """A pooling head on an identity backbone: the tests hand it feature maps directly."""
    torch.manual_seed(seed)
    options = {"num_prototypes": 6, "transport_ratio": 0.3} if pooling == "gsp" else {}
    pooling_layer = build_pooling(pooling, CHANNELS, 8, **options)
    return EmbeddingNet(nn.Identity(), pooling_layer).eval().requires_grad_(False)


def feature_maps(count: int = 2, size: int = 5, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, CHANNELS, size, size, generator=generator)


# -- decomposition -----------------------------------------------------------------------------


def test_prototype_terms_sum_to_the_cosine_similarity() -> None:
    net, maps = tiny_net(), feature_maps()
    explained = explain_pair(net, maps[0], maps[1], top=3)
    pooled = net.pool(maps)
    cosine = float(pooled.embedding[0] @ pooled.embedding[1])
    assert explained.score == pytest.approx(cosine, abs=1e-6)
    assert float(explained.terms.sum()) == pytest.approx(cosine, abs=1e-6)
    assert explained.decomposition_error < 1e-6
    assert float(explained.contributions.sum()) == pytest.approx(cosine, abs=1e-6)
    assert explained.terms.shape == (6, 6)
    # Off-diagonal terms are real: the shared share is not the whole score for random inputs.
    assert explained.shared_share == pytest.approx(
        float(torch.diagonal(explained.terms).sum()) / explained.score
    )


def test_parts_sum_to_the_pooled_vector() -> None:
    net, maps = tiny_net(), feature_maps(1)
    parts = pooled_parts(net, maps[0])
    unnormalised = net.pooling(maps).embedding[0].double()
    assert torch.allclose(parts.parts.sum(0), unnormalised, atol=1e-5)
    assert torch.allclose(parts.embedding, unnormalised, atol=1e-6)


def test_top_prototypes_are_the_largest_shared_terms_with_plan_maps() -> None:
    net, maps = tiny_net(), feature_maps()
    explained = explain_pair(net, maps[0], maps[1], top=4)
    diagonal = torch.diagonal(explained.terms)
    assert [p.prototype for p in explained.top] == torch.argsort(diagonal, descending=True)[
        :4
    ].tolist()
    result = net.pooling(maps)
    n = maps.shape[2] * maps.shape[3]
    for part in explained.top:
        k = part.prototype
        assert part.term == pytest.approx(float(diagonal[k]))
        assert part.share == pytest.approx(part.term / explained.score)
        assert part.contribution == pytest.approx(float(explained.contributions[k]))
        assert part.query_map.shape == part.match_map.shape == (5, 5)
        assert bool((part.query_map >= 0).all()) and bool((part.match_map >= 0).all())
        expected = result.plan[:, k].double() * n / net.pooling.transport_ratio
        assert torch.allclose(part.query_map, expected[0], atol=1e-6)
        assert torch.allclose(part.match_map, expected[1], atol=1e-6)
    # Every prototype's map together is the pooling weights heatmap.
    assert torch.allclose(explained.query.maps.sum(0), result.weights[0].double(), atol=1e-5)


def test_identical_images_are_explained_by_shared_prototypes() -> None:
    net, maps = tiny_net(), feature_maps(1)
    explained = explain_pair(net, maps[0], maps[0], top=6)
    assert explained.score == pytest.approx(1.0, abs=1e-6)
    assert sum(part.term for part in explained.top) == pytest.approx(explained.shared_share)
    assert all(part.term >= 0 for part in explained.top)  # |f_k|^2 / |f|^2


def test_location_terms_sum_to_the_similarity() -> None:
    net, maps = tiny_net(), feature_maps()
    pooled = net.pool(maps)
    terms = location_terms(net, maps[1], pooled.embedding[0])
    assert terms.shape == (5, 5)
    assert float(terms.sum()) == pytest.approx(float(pooled.embedding[0] @ pooled.embedding[1]))
    # Locations the transport left out contribute (almost) nothing.
    assert float(terms.abs()[pooled.weights[1] < 1e-3].sum()) < 1e-3 * float(terms.abs().sum())
    with pytest.raises(ExplainError, match="values"):
        location_terms(net, maps[1], torch.ones(3))


def test_explain_rejects_bad_input() -> None:
    net, maps = tiny_net(), feature_maps()
    with pytest.raises(ExplainError, match="top"):
        explain_pair(net, maps[0], maps[1], top=0)
    with pytest.raises(ExplainError, match=r"\(C, h, w\)"):
        explain_pair(net, maps, maps[1])


@pytest.mark.parametrize("pooling", ["gap", "gem"])
def test_non_gsp_networks_are_refused_with_a_clear_message(pooling: str) -> None:
    net, maps = tiny_net(pooling), feature_maps()
    with pytest.raises(NotGSPError, match="needs a GSP network"):
        explain_pair(net, maps[0], maps[1])
    with pytest.raises(NotGSPError, match="needs a GSP network"):
        repool_with_regions(net, maps[0], favour_mask=torch.ones(5, 5))
    with pytest.raises(NotGSPError, match="needs a GSP network"):
        repool_with_ratio(net, maps[0], 0.5)


# -- region re-pooling -------------------------------------------------------------------------


def corner_mask(size: int = 5) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[:2, :2] = True
    return mask


def test_empty_masks_repool_exactly_like_the_network() -> None:
    net, maps = tiny_net(), feature_maps(1)
    plain = net.pool(maps)
    for favour, ignore in [(None, None), (torch.zeros(5, 5), torch.zeros(5, 5, dtype=torch.bool))]:
        again = repool_with_regions(net, maps[0], favour_mask=favour, ignore_mask=ignore)
        assert torch.equal(again.embedding, plain.embedding)
        assert torch.equal(again.weights, plain.weights)


def test_favour_raises_and_ignore_lowers_the_marked_weights() -> None:
    net, maps = tiny_net(), feature_maps(1)
    mask = corner_mask()
    plain = net.pool(maps).weights[0]
    favoured = repool_with_regions(net, maps[0], favour_mask=mask)
    ignored = repool_with_regions(net, maps[0], ignore_mask=mask)
    assert float(favoured.weights[0][mask].sum()) > float(plain[mask].sum()) + 1.0
    assert float(ignored.weights[0][mask].sum()) < 0.5 * float(plain[mask].sum())
    for output in (favoured, ignored):
        assert float(output.embedding.norm()) == pytest.approx(1.0, abs=1e-5)
        assert float(output.weights.mean()) == pytest.approx(1.0, abs=1e-4)  # same total mass
    assert not torch.allclose(favoured.embedding, net.pool(maps).embedding)
    # A soft (partial coverage) mark moves the weights less than a full one.
    half = repool_with_regions(net, maps[0], favour_mask=mask.float() * 0.25)
    assert float(plain[mask].sum()) < float(half.weights[0][mask].sum())
    assert float(half.weights[0][mask].sum()) < float(favoured.weights[0][mask].sum())


def test_region_masks_are_validated() -> None:
    net, maps = tiny_net(), feature_maps(1)
    with pytest.raises(ExplainError, match="shape"):
        repool_with_regions(net, maps[0], favour_mask=torch.ones(4, 5))
    with pytest.raises(ExplainError, match="both favoured and ignored"):
        repool_with_regions(net, maps[0], favour_mask=corner_mask(), ignore_mask=corner_mask())
    with pytest.raises(ExplainError, match=r"\[0, 1\]"):
        repool_with_regions(net, maps[0], favour_mask=corner_mask().float() * 2)
    with pytest.raises(ExplainError, match="strength"):
        repool_with_regions(net, maps[0], favour_mask=corner_mask(), strength=0.0)


def test_repool_with_ratio_changes_selectivity() -> None:
    net, maps = tiny_net(), feature_maps(1)
    narrow = repool_with_ratio(net, maps[0], 0.1)
    wide = repool_with_ratio(net, maps[0], 1.0)
    assert torch.allclose(narrow.embedding, net.pool(maps, transport_ratio=0.1).embedding)
    assert torch.allclose(wide.weights, torch.ones_like(wide.weights), atol=1e-5)  # GAP
    assert float(narrow.weights.max()) > float(net.pool(maps).weights.max())
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ExplainError, match="transport_ratio"):
            repool_with_ratio(net, maps[0], bad)


# -- image space to feature-map masks ----------------------------------------------------------

# A 400 x 200 image resized to short side 256 and centre-cropped to 224: the network sees the
# centred 175 x 175 px square (left 112.5, top 12.5); a 7 x 7 map has 25 px cells.
CROPPED = Preprocessing(image_size=224, resize_size=256)


def test_crop_box_is_the_centred_square_of_the_preprocessing() -> None:
    assert crop_box(400, 200, CROPPED) == pytest.approx((112.5, 12.5, 175.0))
    assert crop_box(64, 64, Preprocessing(image_size=64, resize_size=64)) == (0.0, 0.0, 64.0)


def test_rectangles_map_through_the_centre_crop() -> None:
    left_half = rectangles_to_mask([(0.0, 0.0, 0.5, 1.0)], (400, 200), (7, 7), CROPPED)
    # x < 200 covers 87.5 px of the crop: 3.5 cells of 25 px.
    assert torch.equal(left_half[:, :3], torch.ones(7, 3))
    assert torch.allclose(left_half[:, 3], torch.full((7,), 0.5))
    assert torch.equal(left_half[:, 4:], torch.zeros(7, 3))
    in_pixels = rectangles_to_mask([(0, 0, 200, 200)], (400, 200), (7, 7), CROPPED, pixels=True)
    assert torch.equal(in_pixels, left_half)
    # Left of the crop: marks nothing.  Two rectangles: their union.
    outside = rectangles_to_mask([(0.0, 0.0, 0.25, 1.0)], (400, 200), (7, 7), CROPPED)
    assert float(outside.sum()) == 0.0
    top_rows = rectangles_to_mask(
        [(0.0, 0.0, 1.0, 0.0625 + 2 * 25 / 200), (0.0, 0.0, 0.5, 1.0)], (400, 200), (7, 7), CROPPED
    )
    assert torch.equal(top_rows[:2], torch.ones(2, 7))
    assert torch.equal(top_rows[2:, :3], torch.ones(5, 3))


def test_image_masks_map_through_the_centre_crop() -> None:
    mask = np.zeros((200, 400))
    mask[:, :200] = 1.0
    converted = image_mask_to_feature_mask(mask, (7, 7), CROPPED)
    expected = rectangles_to_mask([(0.0, 0.0, 0.5, 1.0)], (400, 200), (7, 7), CROPPED)
    assert torch.allclose(converted, expected)
    with pytest.raises(ExplainError, match=r"\[0, 1\]"):
        image_mask_to_feature_mask(mask * 255, (7, 7), CROPPED)


@pytest.mark.parametrize(
    ("rectangle", "pixels"),
    [((0.5, 0.0, 0.4, 1.0), False), ((0.0, 0.0, 1.2, 1.0), False), ((0, 0, 500, 10), True)],
)
def test_bad_rectangles_are_refused(rectangle: tuple[float, ...], pixels: bool) -> None:
    with pytest.raises(ExplainError, match="rectangle"):
        rectangles_to_mask([rectangle], (400, 200), (7, 7), CROPPED, pixels=pixels)


# -- the gsp explain panel ---------------------------------------------------------------------


def _item_ids(service_assets: ServiceAssets) -> dict[str, int]:
    from index.gallery import Gallery

    with Gallery.open(service_assets.gallery_full, read_only=True) as gallery:
        records = gallery.get_many(range(64))
    return {record.extra["name"]: record.id for record in records}


def test_cli_writes_an_explanation_panel(service_assets: ServiceAssets, tmp_path) -> None:
    from app.cli import main

    ids = _item_ids(service_assets)
    query = tmp_path / "query.png"
    drawn_image("blue", 1).save(query)
    out = tmp_path / "panels" / "panel.png"
    options = [
        "--checkpoint",
        str(service_assets.checkpoint),
        "--gallery",
        str(service_assets.gallery_full),
    ]

    def explain(query_arg: str, match_id: int, target, *extra: str) -> int:
        return main(["explain", query_arg, str(match_id), *options, "--out", str(target), *extra])

    assert explain(str(query), ids["blue-2.png"], out, "--top", "2") == 0
    with Image.open(out) as panel:
        assert panel.format == "PNG"
        assert panel.size == (2 * 224, 3 * (224 + 26))  # header row + one row per prototype
        pixels = np.asarray(panel.convert("RGB"))
    assert pixels[:224].std() > 0  # images were drawn, not a blank canvas

    # A gallery id works as the query too; an unknown match id is a clean error.
    assert explain(str(ids["red-0.png"]), ids["blue-2.png"], tmp_path / "by-id.png") == 0
    assert (tmp_path / "by-id.png").is_file()
    assert explain(str(query), 999999, tmp_path / "x.png") == 1
    assert not (tmp_path / "x.png").exists()
