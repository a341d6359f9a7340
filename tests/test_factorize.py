"""Weight SVD factorization: error bookkeeping, optimality, grouped weights, bad weights."""

from __future__ import annotations

import pytest
import torch

from convert.factorize import channel_spectra, factorize_weight, full_rank, truncation_error
from convert.layers import DepthwiseSeparableConv2d


def reconstruct(weight: torch.Tensor, multiplier: int, groups: int = 1) -> torch.Tensor:
    layer = DepthwiseSeparableConv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), groups=groups, depth_multiplier=multiplier)
    factors = factorize_weight(weight, multiplier, groups=groups)
    layer.load_factors(factors.depthwise, factors.pointwise)
    return layer.dense_weight().detach()


@pytest.mark.parametrize("multiplier", [1, 2, 5, 9])
def test_reported_error_matches_reconstruction(multiplier):
    weight = torch.randn(16, 4, 3, 3)
    factors = factorize_weight(weight, multiplier)
    measured = float((reconstruct(weight, multiplier) - weight).norm() / weight.norm())
    assert factors.relative_error == pytest.approx(measured, rel=1e-4, abs=1e-6)


def test_error_falls_to_zero_at_full_rank():
    weight = torch.randn(12, 3, 3, 3)
    errors = [factorize_weight(weight, k).relative_error for k in range(1, 10)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-6


def test_svd_beats_random_factors_of_same_rank():
    # Eckart-Young: no rank-2-per-channel approximation is closer than the truncated SVD.
    weight = torch.randn(8, 2, 3, 3)
    best = factorize_weight(weight, 2).relative_error
    for _ in range(20):
        layer = DepthwiseSeparableConv2d(2, 8, 3, depth_multiplier=2)
        error = float((layer.dense_weight().detach() - weight).norm() / weight.norm())
        assert error > best


def test_low_rank_weight_recovered_exactly():
    # each channel slice W[:, c] of rank 2 -> K=2 is exact even though full rank is 9
    left = torch.randn(3, 10, 2)
    right = torch.randn(3, 2, 9)
    weight = torch.einsum("cor,crk->ock", left, right).reshape(10, 3, 3, 3)
    assert factorize_weight(weight, 2).relative_error < 1e-6
    torch.testing.assert_close(reconstruct(weight, 2), weight, rtol=1e-4, atol=1e-5)


def test_grouped_weight_factors_each_group():
    weight = torch.randn(12, 2, 3, 3)  # groups=3 over 6 input channels
    torch.testing.assert_close(reconstruct(weight, full_rank(12, (3, 3), 3), groups=3), weight, rtol=1e-4, atol=1e-5)


def test_spectra_give_the_same_error():
    weight = torch.randn(8, 4, 5, 5)
    spectra = channel_spectra(weight)
    assert spectra.shape == (4, 8)
    for multiplier in (1, 3, 8):
        assert truncation_error(spectra, multiplier) == pytest.approx(factorize_weight(weight, multiplier).relative_error, rel=1e-5)


def test_zero_weight_has_zero_error():
    factors = factorize_weight(torch.zeros(4, 2, 3, 3), 1)
    assert factors.relative_error == 0.0
    assert torch.count_nonzero(factors.pointwise) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises(bad):
    weight = torch.randn(4, 2, 3, 3)
    weight[1, 1, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        factorize_weight(weight, 1)


@pytest.mark.parametrize("multiplier", [0, 10])
def test_multiplier_out_of_range_raises(multiplier):
    with pytest.raises(ValueError, match=f"depth_multiplier={multiplier}: must be between 1 and the full rank 9"):
        factorize_weight(torch.randn(16, 2, 3, 3), multiplier)


def test_half_weight_returns_half_factors():
    factors = factorize_weight(torch.randn(8, 4, 3, 3).half(), 2)
    assert factors.depthwise.dtype == torch.float16
    assert factors.pointwise.dtype == torch.float16
