"""The frozen-backbone feature cache: computed once, reused, and recomputed when its key changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from model.config import Preprocessing
from model.feature_cache import (
    FeatureMapSet,
    cached_feature_maps,
    feature_cache_key,
    module_digest,
)


class _CountingBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1)
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(images)


def _batches(count: int = 10, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, 8, 8, generator=generator)
    labels = torch.arange(count) % 3
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, count, batch)]


def _key(backbone: nn.Module, dataset: str = "toy", size: int = 8) -> str:
    preprocessing = Preprocessing(image_size=size, resize_size=size)
    return feature_cache_key(
        weights_digest=module_digest(backbone), preprocessing=preprocessing, dataset=dataset
    )


def test_second_run_reads_the_cache_without_calling_the_backbone(tmp_path: Path) -> None:
    backbone = _CountingBackbone()
    key = _key(backbone)
    first = cached_feature_maps(backbone, _batches(), 10, key, tmp_path)
    assert first.computed and backbone.calls == 3
    assert first.features.dtype == torch.float16 and first.features.shape == (10, 5, 4, 4)
    second = cached_feature_maps(backbone, _batches(), 10, key, tmp_path)
    assert not second.computed and backbone.calls == 3
    assert torch.equal(first.features, second.features)
    assert torch.equal(second.labels, torch.arange(10) % 3)
    with torch.no_grad():
        expected = backbone.conv(torch.cat([images for images, _ in _batches()]))
    assert torch.allclose(second.features.float(), expected, atol=1e-2)


def test_key_changes_with_weights_preprocessing_and_data(tmp_path: Path) -> None:
    backbone = _CountingBackbone()
    key = _key(backbone)
    assert _key(backbone) == key
    assert _key(backbone, dataset="other") != key
    assert _key(backbone, size=16) != key
    with torch.no_grad():
        backbone.conv.weight.add_(0.1)
    changed = _key(backbone)
    assert changed != key
    cached_feature_maps(backbone, _batches(), 10, key, tmp_path)
    calls = backbone.calls
    recomputed = cached_feature_maps(backbone, _batches(), 10, changed, tmp_path)
    assert recomputed.computed and backbone.calls == calls + 3


def test_wrong_sample_count_is_an_error_and_leaves_no_cache(tmp_path: Path) -> None:
    backbone = _CountingBackbone()
    with pytest.raises(ValueError, match="expected 12 samples"):
        cached_feature_maps(backbone, _batches(), 12, "k", tmp_path)
    assert not (tmp_path / "k").exists()


def test_feature_map_set_gathers_channels_last_batches_of_the_cached_maps() -> None:
    features = torch.randn(6, 5, 3, 2).half()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    maps = FeatureMapSet(features, labels)
    batch, batch_labels = maps.batch([4, 0, 4])
    assert torch.equal(batch, features[[4, 0, 4]])
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch_labels, torch.tensor([1, 0, 1]))
    item, label = maps[3]
    assert torch.equal(item, features[3]) and int(label) == 0 and len(maps) == 6
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        FeatureMapSet(features, labels[:5])
