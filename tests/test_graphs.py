"""The bucketed forward of ``model/graphs.py``: padding and cutting on the CPU (a padded batch's
real rows equal the unpadded batch's), deferred checks, and on a GPU the captured and compiled
graphs against the eager float32 forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.checks import DeferredChecks, deferred_verification
from model.graphs import BucketedForward, bucket_for, cut, padded
from model.net import EmbeddingOutput
from tests.test_net import tiny_net

SIZE = 64


def _images(count: int, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, SIZE, SIZE, generator=generator).to(device)


def _assert_outputs_close(got: EmbeddingOutput, want: EmbeddingOutput, atol: float) -> None:
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape, field.name
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=field.name)


def test_bucket_for_picks_the_smallest_bucket_that_holds_the_batch() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 5, 16, 17, 64)] == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_for(65) is None
    assert bucket_for(3, (8, 2)) == 8
    with pytest.raises(ValueError, match="at least one row"):
        bucket_for(0)


def test_padding_repeats_the_first_row_and_cut_clones_the_real_rows() -> None:
    batch = _images(3)
    full = padded(batch, 8)
    assert full.shape == (8, 3, SIZE, SIZE)
    assert torch.equal(full[:3], batch) and all(torch.equal(row, batch[0]) for row in full[3:])
    assert padded(batch, 3) is batch
    with pytest.raises(ValueError, match="cannot pad"):
        padded(batch, 2)
    output = EmbeddingOutput(embedding=full[:, 0, 0], weights=full[:, 0], histogram=None)
    kept = cut(output, 3)
    assert kept.histogram is None and kept.embedding.shape == (3, SIZE)
    assert kept.embedding.data_ptr() != full.data_ptr()  # a copy, safe from the next replay
    assert [t.shape[0] for t in cut((full, [full]), 2)[1]] == [2]


@pytest.mark.parametrize("pooling", ["gsp", "gap"])
def test_a_padded_batch_gives_the_unpadded_batchs_results(pooling: str) -> None:
    net = tiny_net(pooling)
    batch = _images(3)
    with torch.inference_mode():
        alone = net(batch)
        within = cut(net(padded(batch, 8)), 3)
        one = cut(net(padded(batch[:1], 4)), 1)
    _assert_outputs_close(within, alone, atol=1e-5)
    _assert_outputs_close(one, cut(alone, 1), atol=1e-5)


def test_graphs_are_off_on_a_cpu() -> None:
    net = tiny_net()
    for mode in ("graphs", "reduce-overhead"):
        forward = BucketedForward(net, torch.device("cpu"), mode)  # type: ignore[arg-type]
        assert forward.mode == "off"
        with torch.inference_mode():
            _assert_outputs_close(forward(_images(2)), net(_images(2)), atol=0)
    with pytest.raises(ValueError, match="unknown CUDA graph mode"):
        BucketedForward(net, torch.device("cpu"), "always")  # type: ignore[arg-type]


def test_deferred_verification_reads_nothing_and_folds_the_checks_into_one_flag() -> None:
    bad = DeferredChecks().require(torch.tensor(False), "feature map not finite")
    with pytest.raises(ValueError, match="not finite"):
        bad.verify()
    with deferred_verification() as flags:
        assert DeferredChecks().require(torch.tensor(True), "x").verify(torch.tensor(False)) == [
            True
        ]
        assert DeferredChecks().require(torch.tensor(False), "not finite").verify() == []
    assert [bool(flag) for flag in flags] == [False, False]
    with deferred_verification() as flags:
        DeferredChecks().require(torch.tensor(True), "x").verify(torch.tensor(True))
    assert [bool(flag) for flag in flags] == [True]


def test_a_gsp_forward_under_deferred_verification_flags_a_bad_input_instead_of_raising() -> None:
    net = tiny_net()
    broken = _images(2)
    broken[1, 0, 0, 0] = float("nan")
    with torch.inference_mode():
        with pytest.raises(ValueError):
            net(broken)
        with deferred_verification() as flags:
            net(broken)
        assert flags and not bool(torch.stack(flags).all())
        with deferred_verification() as flags:
            net(_images(2))
        # One flag per forward; whether it holds here depends on the device's first Newton
        # block (one step on a CPU, several on CUDA), which the GPU test covers.
        assert len(flags) == 1 and flags[0].shape == ()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graphs", "reduce-overhead"])
def test_cuda_graphs_agree_with_the_eager_float32_forward(mode: str) -> None:
    device = torch.device("cuda")
    net = tiny_net().to(device)
    forward = BucketedForward(net, device, mode)  # type: ignore[arg-type]
    with torch.inference_mode():
        forward.warm_up(_images(1, device="cuda"), largest=8)
        for count, seed in ((1, 2), (3, 3), (5, 4), (3, 5), (8, 6)):
            batch = _images(count, seed, "cuda")
            _assert_outputs_close(forward(batch), net(batch), atol=1e-4)
        broken = _images(2, device="cuda")
        broken[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError):  # the failed flag sends the batch down the eager path
            forward(broken)
    if mode == "graphs":
        assert sorted(key[0] for key in forward._captured) == [1, 2, 4, 8]
