"""The GSP layer and the baseline poolings behind the same interface."""

from __future__ import annotations

import shutil

import pytest
import torch

import model.compiling as compiling
from model.gsp import (
    GeneralizedSumPooling,
    PoolingResult,
    build_pooling,
    greedy_k_center,
)
from model.runtime import Kernel, using_runtime_options


def feature_map(batch: int = 3, channels: int = 16, size: int = 5, dtype=torch.float64):
    torch.manual_seed(0)
    return torch.randn(batch, channels, size, size, dtype=dtype)


def test_result_shapes_and_marginals() -> None:
    layer = GeneralizedSumPooling(16, 8, num_prototypes=6).double()
    result = layer(feature_map())
    assert isinstance(result, PoolingResult)
    assert result.embedding.shape == (3, 8)
    assert result.weights.shape == (3, 5, 5)
    assert result.plan.shape == (3, 6, 5, 5)
    assert result.histogram.shape == (3, 6)
    assert torch.allclose(result.weights.mean(dim=(1, 2)), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(result.histogram.sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(result.plan.sum((1, 2, 3)), torch.full((3,), 0.3, dtype=torch.float64))
    # weights are g_i / mu with g_i in (0, 1): no location can weigh more than 1 / mu
    assert (result.weights > 0).all() and (result.weights <= 1 / 0.3 + 1e-12).all()


def test_embedding_is_weighted_mean_of_projection() -> None:
    layer = GeneralizedSumPooling(16, 8, num_prototypes=4).double()
    features = feature_map()
    result = layer(features)
    projected = layer.projection(features).flatten(2)
    expected = (projected * result.weights.flatten(1)[:, None, :]).mean(dim=2)
    assert torch.allclose(result.embedding, expected, atol=1e-12)


def test_full_transport_ratio_is_global_average_pooling() -> None:
    layer = GeneralizedSumPooling(16, 8, num_prototypes=4, transport_ratio=1.0).double()
    features = feature_map()
    result = layer(features)
    mean_projection = layer.projection(features).mean(dim=(2, 3))
    assert torch.equal(result.weights, torch.ones_like(result.weights))
    assert torch.allclose(result.embedding, mean_projection, atol=1e-14)


def test_gradcheck_whole_layer() -> None:
    layer = GeneralizedSumPooling(6, 4, num_prototypes=3, entropy_weight=3.0).double()
    features = feature_map(batch=2, channels=6, size=3).requires_grad_()

    def pooled(x, prototypes):
        result = torch.func.functional_call(layer, {"prototypes": prototypes}, (x,))
        return result.embedding, result.histogram

    prototypes = layer.prototypes.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(pooled, (features, prototypes))


def test_gradcheck_through_query_ratio_and_unary_cost() -> None:
    """Every output of the fused layer function, w.r.t. ratio and unary cost as well."""
    layer = GeneralizedSumPooling(6, 4, num_prototypes=3, entropy_weight=3.0).double()
    features = feature_map(batch=2, channels=6, size=3).requires_grad_()
    ratio = torch.tensor([0.25, 0.7], dtype=torch.float64, requires_grad=True)
    unary = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)

    def pooled(x, r, u):
        result = layer(x, transport_ratio=r, unary_cost=u)
        return result.embedding, result.weights, result.plan, result.histogram

    assert torch.autograd.gradcheck(pooled, (features, ratio, unary))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs g++")
def test_compiled_layer_equals_the_eager_one(monkeypatch) -> None:
    """The parts CUDA runs compiled (costs, solve, pooling), here on the CPU: same results."""
    layer = GeneralizedSumPooling(16, 8, num_prototypes=4).double()
    features = feature_map()
    unary = torch.randn(3, 5, 5, dtype=torch.float64)
    ratio = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)

    def run() -> list[torch.Tensor]:
        layer.zero_grad()
        result = layer(features, transport_ratio=ratio, unary_cost=unary)
        (result.embedding.square().sum() + result.histogram[:, 0].sum()).backward()
        outputs = [result.embedding, result.weights, result.plan, result.histogram]
        return [t.detach() for t in outputs] + [p.grad.clone() for p in layer.parameters()]

    eager = run()
    monkeypatch.setattr(compiling, "compile_enabled", lambda device: True)
    for ours, reference in zip(run(), eager, strict=True):
        assert (ours - reference).abs().max() < 1e-12


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs g++")
def test_after_batches_of_one_and_two_no_batch_size_compiles_again(monkeypatch) -> None:
    """The service warms up with batches of 1 and 2 (``InferenceEngine.warm_up``) so that no
    request waits for a compile: every later batch size must reuse those graphs."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiling, "compile_enabled", lambda device: True)
    torch._dynamo.reset()  # no graph of an earlier test may stand in for the warm-up
    layer = GeneralizedSumPooling(16, 8, num_prototypes=4).eval()
    try:
        with torch.inference_mode():
            for batch in (1, 2):
                layer(torch.randn(batch, 16, 5, 5))
            warmed = counters["stats"]["unique_graphs"]
            assert warmed > 0  # the layer did compile
            for batch in (3, 5, 16, 1, 7):
                layer(torch.randn(batch, 16, 5, 5))
            assert counters["stats"]["unique_graphs"] == warmed
    finally:
        torch._dynamo.reset()


def test_query_time_ratio_and_unary_cost() -> None:
    layer = GeneralizedSumPooling(16, 8, num_prototypes=4).double()
    features = feature_map()
    sharper = layer(features, transport_ratio=0.1)
    assert torch.allclose(sharper.plan.sum((1, 2, 3)), torch.full((3,), 0.1, dtype=torch.float64))
    favour = torch.zeros(3, 5, 5, dtype=torch.float64)
    favour[:, 0, 0] = -3.0
    base = layer(features)
    favoured = layer(features, unary_cost=favour)
    assert (favoured.weights[:, 0, 0] > base.weights[:, 0, 0]).all()


def test_half_precision_autocast_stays_finite_at_large_entropy_weight() -> None:
    layer = GeneralizedSumPooling(32, 16, num_prototypes=8, entropy_weight=100.0)
    features = torch.randn(4, 32, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = layer(features)
        result.embedding.sum().backward()
    assert torch.isfinite(result.embedding).all() and torch.isfinite(result.weights).all()
    assert torch.allclose(result.weights.mean(dim=(1, 2)), torch.ones(4), atol=1e-4)
    assert torch.isfinite(layer.prototypes.grad).all()


def test_k_center_initialisation_covers_the_points() -> None:
    clusters = torch.eye(4) * 10
    points = torch.cat([clusters + 0.01 * torch.randn(4, 4) for _ in range(20)])
    centers = greedy_k_center(points, 4, generator=torch.Generator().manual_seed(1))
    # one pick per well-separated cluster
    assert sorted(centers.argmax(1).tolist()) == [0, 1, 2, 3]


def test_warmup_collects_projected_features_then_initialises_prototypes() -> None:
    layer = GeneralizedSumPooling(16, 8, num_prototypes=5)
    before = layer.prototypes.detach().clone()
    layer.train()
    layer.start_warmup(memory_size=40)
    for _ in range(3):
        layer(torch.randn(2, 16, 4, 4))
    layer.finish_warmup(generator=torch.Generator().manual_seed(0))
    after = layer.prototypes.detach()
    assert not torch.allclose(before, after)
    assert torch.allclose(after.norm(dim=1), torch.ones(5), atol=1e-5)
    with pytest.raises(RuntimeError, match="no features"):
        layer.finish_warmup()


def test_init_prototypes_rejects_wrong_width() -> None:
    layer = GeneralizedSumPooling(16, 8, num_prototypes=5)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        layer.init_prototypes(torch.randn(10, 7))


@pytest.mark.parametrize("name", ["gsp", "gap", "gmp", "gem"])
def test_all_poolings_share_the_interface(name: str) -> None:
    pooling = build_pooling(name, 16, 8)
    features = torch.rand(2, 16, 4, 6)
    result = pooling(features)
    assert result.embedding.shape == (2, 8)
    assert result.weights.shape == (2, 4, 6)
    assert torch.allclose(result.weights.mean(dim=(1, 2)), torch.ones(2), atol=1e-5)
    result.embedding.sum().backward()


def test_gap_weights_are_ones_and_gmp_marks_the_maximum() -> None:
    features = torch.zeros(1, 4, 3, 3)
    features[0, :, 2, 1] = 5.0
    gap = build_pooling("gap", 4, 2)(features)
    gmp = build_pooling("gmp", 4, 2)(features)
    assert torch.equal(gap.weights, torch.ones(1, 3, 3))
    assert gmp.weights[0, 2, 1] == 9.0 and gmp.weights.sum() == 9.0


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (torch.randn(2, 16, 4), "(B, C, H, W)"),
        (torch.randn(2, 15, 4, 4), "16 channels"),
        (torch.full((2, 16, 4, 4), float("inf")), "NaN or infinite"),
    ],
)
@pytest.mark.parametrize("name", ["gsp", "gap", "gmp", "gem"])
def test_bad_feature_maps_are_rejected(name: str, features, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_pooling(name, 16, 8)(features)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"transport_ratio": 0.0}, "transport_ratio"),
        ({"transport_ratio": 1.2}, "transport_ratio"),
        ({"entropy_weight": 0.0}, "entropy_weight"),
        ({"num_prototypes": 0}, "num_prototypes"),
    ],
)
def test_bad_hyper_parameters_are_rejected(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        GeneralizedSumPooling(16, 8, **options)


def test_unknown_pooling_name() -> None:
    with pytest.raises(ValueError, match="unknown pooling"):
        build_pooling("avg", 16, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["compiled", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype: torch.dtype, kernel: Kernel) -> None:
    with using_runtime_options(kernel=kernel):
        layer = GeneralizedSumPooling(64, 32, entropy_weight=100.0).cuda()
        features = torch.randn(8, 64, 14, 14, device="cuda")
        with torch.autocast("cuda", dtype=dtype):
            result = layer(features)
            result.embedding.float().sum().backward()
        assert torch.isfinite(result.embedding).all()
        assert torch.allclose(
            result.weights.mean(dim=(1, 2)), torch.ones(8, device="cuda"), atol=1e-4
        )
        # At a moderate temperature half precision changes the weights only slightly.
        moderate = GeneralizedSumPooling(64, 32, entropy_weight=5.0).cuda()
        with torch.autocast("cuda", dtype=dtype):
            half = moderate(features).weights
        full = moderate(features).weights
        assert (half - full).abs().max() < 0.05 * full.max()
