"""Losses by name: each gives a finite loss and gradient; proxies are parameters; ZSR is added."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.losses import LOSSES, TrainingObjective, build_loss
from model.zsr import ZeroShotRegularization


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(4)
    embeddings = torch.randn(16, 8, generator=generator, requires_grad=True)
    return embeddings, labels


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_gives_finite_loss_and_gradient(name: str) -> None:
    loss = build_loss(name, num_classes=4, embedding_dim=8)
    embeddings, labels = _batch()
    value = loss(F.normalize(embeddings, dim=1), labels)
    value.backward()
    assert value.dim() == 0 and torch.isfinite(value)
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()
    assert embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["proxy_nca", "proxy_anchor", "normalized_softmax", "margin"])
def test_learnable_loss_parameters_receive_gradients(name: str) -> None:
    loss = build_loss(name, num_classes=4, embedding_dim=8)
    params = list(loss.parameters())
    assert params, f"{name} should own learnable parameters"
    embeddings, labels = _batch()
    loss(F.normalize(embeddings, dim=1), labels).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_pair_losses_have_no_parameters() -> None:
    assert list(build_loss("multi_similarity", 4, 8).parameters()) == []


def test_bad_name_and_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("arcface_typo", 4, 8)
    with pytest.raises(ValueError, match="bad options"):
        build_loss("proxy_anchor", 4, 8, not_an_option=1)


def test_objective_adds_weighted_zsr_only_with_histograms() -> None:
    metric = build_loss("proxy_anchor", 4, 8)
    zsr = ZeroShotRegularization(num_classes=4, num_prototypes=6)
    objective = TrainingObjective(metric, zsr, zsr_weight=0.1)
    embeddings, labels = _batch()
    histograms = torch.softmax(torch.randn(16, 6), dim=1).requires_grad_()
    terms = objective(F.normalize(embeddings, dim=1), labels, histograms)
    expected = terms["metric"] + 0.1 * terms["zsr"]
    assert torch.allclose(terms["total"], expected)
    terms["total"].backward()
    assert histograms.grad is not None and histograms.grad.abs().sum() > 0
    without = objective(F.normalize(embeddings, dim=1), labels, None)
    assert "zsr" not in without and torch.allclose(without["total"], without["metric"])
