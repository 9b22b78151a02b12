"""Loss terms and temperature schedules against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from edgeseg.distill.config import LossConfig, TemperatureConfig
from edgeseg.distill.losses import (DistillationLoss, bce_loss, binary_kl, dice_loss, feature_mse, probability_mse,
                            temperature_at)


def _full(value: float, shape=(2, 1, 4, 4)) -> torch.Tensor:
    return torch.full(shape, float(value))


def _binary_kl_by_hand(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_binary_kl_matches_hand_value():
    # teacher p = sigmoid(0) = 0.5, student q = sigmoid(ln 3) = 0.75
    kl = binary_kl(_full(0.0), _full(math.log(3.0)), temperature=1.0)
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    # binary KL, not a softmax KL over a one-channel axis (which would be exactly 0)
    assert kl.item() > 0.1


def test_binary_kl_temperature_scaling():
    T = 2.0
    q = 1 / (1 + math.exp(-math.log(3.0) / T))
    expected = _binary_kl_by_hand(0.5, q) * T ** 2
    assert binary_kl(_full(0.0), _full(math.log(3.0)), temperature=T).item() == pytest.approx(expected, abs=1e-6)


def test_binary_kl_zero_for_equal_and_finite_when_saturated():
    x = torch.randn(2, 1, 8, 8) * 5
    assert binary_kl(x, x.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    big = binary_kl(_full(100.0), _full(-100.0), 1.0)
    assert torch.isfinite(big) and big.item() == pytest.approx(100.0, rel=1e-3)  # log(1/q) with q = sigmoid(-100)


def test_binary_kl_gradient_is_finite_when_saturated():
    s = _full(-80.0).requires_grad_()
    binary_kl(_full(80.0), s, 1.0).backward()
    assert torch.isfinite(s.grad).all() and (s.grad < 0).all()


def test_probability_mse_and_bce():
    assert probability_mse(_full(0.0), _full(math.log(3.0))).item() == pytest.approx(0.0625, abs=1e-7)
    assert bce_loss(_full(0.0), _full(1.0)).item() == pytest.approx(math.log(2), abs=1e-6)


def test_dice_of_half_overlap_is_two_thirds():
    probs = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(1, 1, 2, 2)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    assert dice_loss(probs, mask).item() == pytest.approx(1 - 2 / 3, abs=1e-6)
    assert dice_loss(mask, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_mse_channel_norm_ignores_affine_changes():
    b = torch.randn(2, 5, 4, 4)
    a = 2 * b + 3
    assert feature_mse(a, b, normalise=False).item() > 1
    assert feature_mse(a, b, normalise=True).item() == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("schedule, progress, expected", [
    ("constant", 0.7, 3.0),
    ("linear", 0.0, 3.0), ("linear", 0.5, 2.0), ("linear", 1.0, 1.0),
    ("cosine", 0.0, 3.0), ("cosine", 0.5, 2.0), ("cosine", 1.0, 1.0), ("cosine", 0.25, 1 + math.cos(math.pi / 4) + 1),
    ("exponential", 0.5, math.sqrt(3.0)), ("exponential", 1.0, 1.0),
])
def test_temperature_schedules(schedule, progress, expected):
    cfg = TemperatureConfig(schedule=schedule, t0=3.0, t1=1.0)
    assert temperature_at(cfg, progress) == pytest.approx(expected, abs=1e-9)


def test_distillation_loss_is_the_weighted_sum():
    weights = LossConfig(kl=1.0, mse=0.5, bce=0.5, dice=1.0, feature=0.5)
    loss_fn = DistillationLoss(weights)
    s, t = _full(math.log(3.0)), _full(0.0)
    mask = _full(1.0)
    feat_s, feat_t = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    total, terms = loss_fn(s, mask, 1.0, t, feat_s, feat_t)
    q = 0.75
    expected = {"kl": 0.5 * math.log(4 / 3), "mse": 0.0625, "bce": -math.log(q), "dice": 1 - 2 * q / (q + 1), "feature": 1.0}
    for k, v in expected.items():
        assert terms[k].item() == pytest.approx(v, abs=1e-6), k
    weighted = sum(getattr(weights, k) * v for k, v in expected.items())
    assert total.item() == pytest.approx(weighted, abs=1e-6)


def test_feature_grid_mismatch_is_resized_bilinearly():
    loss_fn = DistillationLoss(LossConfig(kl=0, mse=0, bce=0, dice=0, feature=1.0))
    projected = torch.ones(1, 4, 8, 8, requires_grad=True)
    total, terms = loss_fn(_full(0.0, (1, 1, 64, 64)), _full(1.0, (1, 1, 64, 64)), 1.0, None, projected,
                           torch.zeros(1, 4, 4, 4))
    assert terms["feature"].item() == pytest.approx(1.0)
    total.backward()
    assert projected.grad.abs().sum() > 0
