"""EmbeddingNet: output contract, the features/pool split, GSP options, mixed precision."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.net import EmbeddingNet, build_embedding_net

IMAGE_SIZE = 96  # resnet18 at stride 32: a 3x3 map


def tiny_net(pooling: str = "gsp", **options: float) -> EmbeddingNet:
    torch.manual_seed(0)
    if pooling == "gsp":
        options = {"num_prototypes": 4, **options}
    config = ModelConfig(
        backbone="resnet18",
        pretrained=False,
        pooling=pooling,
        embedding_dim=16,
        pooling_options=options,
    )
    return build_embedding_net(config).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pooling", ["gsp", "gap", "gmp", "gem"])
def test_output_contract(pooling: str, images: torch.Tensor) -> None:
    net = tiny_net(pooling)
    with torch.no_grad():
        output = net(images)
    assert output.embedding.shape == (2, 16) and output.embedding.dtype == torch.float32
    torch.testing.assert_close(output.embedding.norm(dim=1), torch.ones(2))
    assert output.weights.shape == (2, 3, 3)
    torch.testing.assert_close(output.weights.mean(dim=(1, 2)), torch.ones(2))
    if pooling == "gsp":
        assert output.histogram is not None and output.histogram.shape == (2, 4)
    else:
        assert output.histogram is None
    assert net.embedding_dim == 16


def test_pool_of_features_is_forward(images: torch.Tensor) -> None:
    net = tiny_net()
    with torch.no_grad():
        features = net.features(images)
        direct, split = net(images), net.pool(features)
    assert features.shape == (2, 512, 3, 3)
    torch.testing.assert_close(direct.embedding, split.embedding)
    torch.testing.assert_close(direct.weights, split.weights)


def test_gsp_options_pass_through(images: torch.Tensor) -> None:
    net = tiny_net(transport_ratio=0.3)
    with torch.no_grad():
        features = net.features(images)
        trained = net.pool(features)
        everything = net.pool(features, transport_ratio=1.0)
        penalty = torch.zeros(2, 3, 3)
        penalty[:, 0, 0] = 10.0
        avoided = net.pool(features, unary_cost=penalty)
        defaults = net.pool(features, transport_ratio=None, unary_cost=None)
    # moving all mass pools every location equally: plain average pooling
    torch.testing.assert_close(everything.weights, torch.ones(2, 3, 3))
    assert not torch.allclose(trained.weights, everything.weights)
    assert (avoided.weights[:, 0, 0] < 0.01).all()
    assert (trained.weights[:, 0, 0] > avoided.weights[:, 0, 0]).all()
    torch.testing.assert_close(defaults.embedding, trained.embedding)


def test_options_need_gsp(images: torch.Tensor) -> None:
    net = tiny_net("gap")
    with torch.no_grad():
        features = net.features(images)
        net.pool(features, transport_ratio=None)
        with pytest.raises(ValueError, match="need GSP pooling"):
            net.pool(features, transport_ratio=0.5)


def test_bad_images_are_refused() -> None:
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\) images"):
        tiny_net()(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE))


def test_build_honours_config() -> None:
    config = ModelConfig(
        backbone="efficientnet_lite0", pretrained=False, output_stride=16, pooling="gem"
    )
    net = build_embedding_net(config).eval()
    with torch.no_grad():
        output = net(torch.randn(1, 3, 64, 64))
    assert output.embedding.shape == (1, config.embedding_dim)
    assert output.weights.shape == (1, 4, 4)


@pytest.mark.parametrize("pooling", ["gsp", "gap"])
def test_bfloat16_autocast_matches_float32(pooling: str, images: torch.Tensor) -> None:
    net = tiny_net(pooling)
    with torch.no_grad():
        reference = net(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net(images)
    assert mixed.embedding.dtype == torch.float32
    torch.testing.assert_close(mixed.embedding.norm(dim=1), torch.ones(2))
    cosine = (mixed.embedding * reference.embedding).sum(dim=1)
    assert (cosine > 0.98).all(), cosine


@pytest.mark.gpu
def test_float16_autocast_on_gpu(images: torch.Tensor) -> None:
    net = tiny_net().cuda()
    batch = images.cuda()
    with torch.no_grad():
        reference = net(batch)
        with torch.autocast("cuda", dtype=torch.float16):
            mixed = net(batch)
    assert torch.isfinite(mixed.embedding).all() and torch.isfinite(mixed.weights).all()
    cosine = (mixed.embedding * reference.embedding).sum(dim=1)
    assert (cosine > 0.99).all(), cosine
