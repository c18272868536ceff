"""Principal-component projection starts, against their defining properties."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.projection_init import principal_projection, set_projection


def test_whitened_pca_whitens() -> None:
    generator = torch.Generator().manual_seed(2)
    data = torch.randn(4000, 12, generator=generator) @ torch.randn(12, 12, generator=generator)
    weight, bias = principal_projection(data, 5, whiten=True)
    projected = (data @ weight.T + bias).double()
    assert projected.mean(dim=0).abs().max() < 1e-4
    covariance = projected.T @ projected / projected.shape[0]
    assert torch.allclose(covariance, torch.eye(5, dtype=torch.float64), atol=1e-3)


def test_plain_pca_keeps_the_spectrum() -> None:
    generator = torch.Generator().manual_seed(5)
    data = torch.randn(4000, 12, generator=generator) * torch.linspace(1, 4, 12)
    weight, bias = principal_projection(data, 5, whiten=False)
    projected = (data @ weight.T + bias).double()
    covariance = projected.T @ projected / projected.shape[0]
    variances = covariance.diagonal()
    assert torch.allclose(covariance - torch.diag(variances), torch.zeros(5, 5).double(), atol=1e-2)
    assert bool((variances[:-1] >= variances[1:]).all()) and abs(float(variances.mean()) - 1) < 1e-3


def test_set_projection_copies_and_freezes() -> None:
    generator = torch.Generator().manual_seed(4)
    weight, bias = principal_projection(torch.randn(300, 10, generator=generator), 4, whiten=False)
    projection = nn.Conv2d(10, 4, kernel_size=1)
    set_projection(projection, weight, bias, freeze=True)
    features = torch.randn(2, 10, 3, 3, generator=generator)
    expected = torch.einsum("dc,nchw->ndhw", weight, features) + bias[None, :, None, None]
    assert torch.allclose(projection(features), expected, atol=1e-5)
    assert not any(p.requires_grad for p in projection.parameters())
    with pytest.raises(ValueError, match="does not fit"):
        set_projection(nn.Conv2d(10, 5, kernel_size=1), weight, bias, freeze=False)
