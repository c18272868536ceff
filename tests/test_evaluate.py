"""Retrieval metrics against hand-computed cases, and the target-cell mass share."""

from __future__ import annotations

import pytest
import torch

from model.evaluate import format_table, retrieval_metrics, target_mass_share


def _points(xs: list[float]) -> torch.Tensor:
    return torch.tensor([[x, 0.0] for x in xs])


def test_perfectly_separated_classes_score_one() -> None:
    centers = torch.eye(3) * 10
    embeddings = centers.repeat_interleave(4, dim=0) + 0.01 * torch.randn(12, 3)
    labels = torch.arange(3).repeat_interleave(4)
    metrics = retrieval_metrics(embeddings, labels)
    assert set(metrics) == {
        "precision_at_1",
        "r_precision",
        "map_at_r",
        "recall_at_1",
        "recall_at_2",
        "recall_at_4",
        "recall_at_8",
    }
    assert all(value == pytest.approx(1.0) for value in metrics.values())


def test_query_gallery_case_with_known_values() -> None:
    # Gallery on a line at x = 1..5 with labels 0,1,0,1,1; queries at 0 (label 0), 5.9 and 0.4
    # (label 1).  By hand: MAP@R = (1/2 + 2/3 + 1/6) / 3, R-Precision = (1/2 + 2/3 + 1/3) / 3,
    # P@1 = 2/3, Recall@1 = 2/3, Recall@2 = Recall@4 = 1.
    gallery, gallery_labels = _points([1, 2, 3, 4, 5]), torch.tensor([0, 1, 0, 1, 1])
    query, query_labels = _points([0.0, 5.9, 0.4]), torch.tensor([0, 1, 1])
    metrics = retrieval_metrics(query, query_labels, gallery, gallery_labels, recall_ks=(1, 2, 4))
    assert metrics["map_at_r"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 6) / 3)
    assert metrics["r_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 3) / 3)
    assert metrics["precision_at_1"] == pytest.approx(2 / 3)
    assert metrics["recall_at_1"] == pytest.approx(2 / 3)
    assert metrics["recall_at_2"] == pytest.approx(1.0)
    assert metrics["recall_at_4"] == pytest.approx(1.0)


def test_recall_at_k_looks_beyond_the_class_size() -> None:
    # Two members per class, so MAP@R needs one neighbour; Recall@8 needs eight.  Leave-one-out
    # ranks of each query's positive, by hand: 4, 1, 1, 5, 4, 4, 1, 1.
    embeddings = _points([0.0, 1.0, 1.3, 1.7, 2.2, 6.0, 9.0, 9.5])
    labels = torch.tensor([0, 1, 1, 2, 0, 2, 3, 3])
    metrics = retrieval_metrics(embeddings, labels, recall_ks=(1, 2, 4, 8))
    assert metrics["recall_at_1"] == pytest.approx(4 / 8)
    assert metrics["recall_at_2"] == pytest.approx(4 / 8)
    assert metrics["recall_at_4"] == pytest.approx(7 / 8)
    assert metrics["recall_at_8"] == pytest.approx(1.0)
    assert metrics["precision_at_1"] == pytest.approx(metrics["recall_at_1"])


def test_mass_share_of_uniform_weights_is_the_cell_area() -> None:
    masks = torch.zeros(2, 4, 4)
    masks[0, :2, :2] = 1
    masks[1, 2:, :2] = 1
    assert target_mass_share(torch.ones(2, 4, 4), masks) == pytest.approx(0.25)
    peaked = torch.zeros(2, 4, 4)
    peaked[0, 0, 0] = 16
    peaked[1, 0, 0] = 16  # outside the second mask
    assert target_mass_share(peaked, masks) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must all be"):
        target_mass_share(torch.ones(2, 4, 4), torch.ones(2, 3, 3))


def test_bad_inputs_and_table() -> None:
    with pytest.raises(ValueError, match="query must be"):
        retrieval_metrics(torch.zeros(3, 2), torch.zeros(4))
    table = format_table({"map_at_r": 0.5, "recall_at_2": 1.0})
    assert "MAP@R" in table and "Recall@2" in table and "0.5000" in table


def test_embedding_in_memory_maps_matches_the_loader_path() -> None:
    from torch.utils.data import TensorDataset

    from model.evaluate import embed
    from model.feature_cache import FeatureMapSet
    from model.gsp import build_pooling
    from model.net import EmbeddingNet

    torch.manual_seed(0)
    pooling = build_pooling("gsp", 6, 4, num_prototypes=3, transport_ratio=0.4)
    net = EmbeddingNet(torch.nn.Identity(), pooling).eval()
    features, labels = torch.randn(10, 6, 3, 3).half(), torch.arange(10) % 2
    fast = embed(net.pool, FeatureMapSet(features, labels), batch_size=4)
    slow = embed(net.pool, TensorDataset(features, labels), batch_size=4)
    for a, b in zip(fast, slow, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert fast[2].shape == (10, 3, 3) and not torch.allclose(fast[2], torch.ones(10, 3, 3))


def test_uniform_share_is_per_image_where_cells_cover_unequal_locations() -> None:
    """3 x 3 grid over a 7 x 7 map: corner, edge and centre cells cover 4, 6 and 9 locations,
    so uniform weights give 4/49, 6/49 and 9/49 -- not one share for every position."""
    from types import SimpleNamespace

    from model.data import collage_masks

    cells = [(0, 0), (0, 1), (1, 1)]
    collage = SimpleNamespace(grid=3, target_cells=cells)
    masks = collage_masks(collage, (7, 7))  # type: ignore[arg-type]
    pairs = zip(*masks, strict=True)
    shares = [target_mass_share(torch.ones(1, 7, 7), t[None], c[None]) for t, c in pairs]
    assert shares == pytest.approx([4 / 49, 6 / 49, 9 / 49])
    assert target_mass_share(torch.ones(3, 7, 7), *masks) == pytest.approx(19 / 147)


def test_images_without_a_marked_region_are_left_out_of_the_share() -> None:
    weights = torch.tensor([[[3.0, 1.0]], [[1.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    area = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])
    assert target_mass_share(weights, target, area) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no image has a marked region"):
        target_mass_share(weights, target, torch.zeros_like(area))
