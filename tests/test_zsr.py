"""Zero-shot regularisation: ridge regression across batch halves, cross-entropy on classes."""

from __future__ import annotations

import pytest
import torch

from model.zsr import ZeroShotRegularization


def test_loss_is_finite_and_trains_histograms() -> None:
    torch.manual_seed(0)
    zsr = ZeroShotRegularization(num_classes=4, num_prototypes=8)
    logits = torch.randn(16, 8, requires_grad=True)
    labels = torch.arange(4).repeat(4)
    loss = zsr(torch.softmax(logits, 1), labels)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    assert zsr.class_embeddings.grad.abs().sum() > 0


def test_informative_histograms_score_better_than_uninformative_ones() -> None:
    torch.manual_seed(0)
    zsr = ZeroShotRegularization(num_classes=4, num_prototypes=4, class_embedding_dim=4)
    with torch.no_grad():
        zsr.class_embeddings.copy_(torch.eye(4))
    labels = torch.arange(4).repeat(4)
    informative = torch.nn.functional.one_hot(labels, 4).float() * 0.9 + 0.025
    uniform = torch.full((16, 4), 0.25) + 0.01 * torch.rand(16, 4)
    assert zsr(informative, labels) < zsr(uniform, labels)


def test_ridge_regression_matches_closed_form() -> None:
    zsr = ZeroShotRegularization(num_classes=3, num_prototypes=5, ridge=0.1)
    source = torch.rand(6, 5, dtype=torch.float64)
    targets = torch.rand(6, 2, dtype=torch.float64)
    weights = zsr._regress(source, targets)
    gradient = source.T @ (source @ weights - targets) + 0.1 * weights
    assert gradient.abs().max() < 1e-10


@pytest.mark.parametrize(
    ("hist", "labels", "message"),
    [
        (torch.rand(8, 7), torch.zeros(8, dtype=torch.long), r"\(B, 8\)"),
        (torch.rand(8, 8), torch.zeros(7, dtype=torch.long), "labels must be"),
        (torch.rand(2, 8), torch.zeros(2, dtype=torch.long), "at least 4"),
        (torch.rand(8, 8), torch.full((8,), 9), r"\[0, 4\)"),
    ],
)
def test_bad_input(hist, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        ZeroShotRegularization(num_classes=4, num_prototypes=8)(hist, labels)
