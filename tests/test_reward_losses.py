"""Reward-model losses, ensembles and the LSC transform against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.errors import ConfigError
from preftune.reward.ensemble import aggregate, lsc, reference_score, summed_utilities
from preftune.reward.losses import PAIR_LOSSES, parse_rm_loss, regression


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_equal_scores_closed_forms():
    s = torch.tensor([0.7, -2.0])
    m = torch.tensor([1.5, 3.0])
    torch.testing.assert_close(PAIR_LOSSES["bt"](s, s, m), torch.full((2,), math.log(2)))
    torch.testing.assert_close(PAIR_LOSSES["bt_margin"](s, s, m), torch.log1p(torch.exp(m)))
    torch.testing.assert_close(PAIR_LOSSES["bt_scaled"](s, s, m), m * math.log(2))
    torch.testing.assert_close(PAIR_LOSSES["center"](s, s, m), (2 * s) ** 2)


@pytest.mark.parametrize(
    ("name", "d_chosen", "d_rejected"),
    [  # s_c = 1, s_r = -0.5, m = 2: derivatives by hand
        ("bt", -(1 - _sig(1.5)), 1 - _sig(1.5)),
        ("bt_margin", -(1 - _sig(1.5 - 2)), 1 - _sig(1.5 - 2)),
        ("bt_scaled", -2 * (1 - _sig(1.5)), 2 * (1 - _sig(1.5))),
        ("center", 2 * 0.5, 2 * 0.5),
    ],
)
def test_gradients_by_hand(name, d_chosen, d_rejected):
    s_c = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    s_r = torch.tensor([-0.5], dtype=torch.float64, requires_grad=True)
    PAIR_LOSSES[name](s_c, s_r, torch.tensor([2.0], dtype=torch.float64)).sum().backward()
    assert s_c.grad.item() == pytest.approx(d_chosen, abs=1e-12)
    assert s_r.grad.item() == pytest.approx(d_rejected, abs=1e-12)


def test_regression_value_and_gradient():
    s = torch.tensor([1.0, 4.0], requires_grad=True)
    loss = regression(s, torch.tensor([3.0, 4.0]))
    assert loss.tolist() == [4.0, 0.0]
    loss.sum().backward()
    assert s.grad.tolist() == [-4.0, 0.0]


def test_weighted_sum_and_default_margins():
    obj = parse_rm_loss("bt:1, center:0.01")
    s_c, s_r = torch.tensor([2.0]), torch.tensor([1.0])
    expect = -math.log(_sig(1.0)) + 0.01 * 9.0
    assert obj(s_c, s_r).item() == pytest.approx(expect, rel=1e-6)
    assert not obj.needs_margin and parse_rm_loss("bt_margin").needs_margin
    # without a margin column: m = 0 for bt_margin (= bt), m = 1 for bt_scaled (= bt)
    assert parse_rm_loss("bt_margin")(s_c, s_r).item() == pytest.approx(-math.log(_sig(1.0)), rel=1e-6)
    assert parse_rm_loss("bt_scaled")(s_c, s_r).item() == pytest.approx(-math.log(_sig(1.0)), rel=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bradley", "unknown reward-model loss 'bradley'.*known: bt, bt_margin"),
        ("bt:x", "weight 'x' of 'bt' is not a number"),
        ("bt:0", "weight of 'bt' must be finite and non-zero"),
        ("bt,bt:2", "'bt' appears twice"),
        ("regression", "fitted to rating data"),
    ],
)
def test_bad_specs_are_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_rm_loss(spec)


def test_aggregators_on_known_inputs():
    scores = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [6.0, 4.0]])  # 4 members, 2 samples
    assert aggregate(scores, "mean").tolist() == [3.0, 1.0]
    assert aggregate(scores, "min").tolist() == [1.0, 0.0]
    assert aggregate(scores, "median").tolist() == [2.5, 0.0]
    # population variance: sample 0: (4+1+0+9)/4 = 3.5; sample 1: (1+1+1+9)/4 = 3
    assert aggregate(scores, "uwo").tolist() == [3.0 - 0.5 * 3.5, 1.0 - 0.5 * 3.0]
    assert aggregate(scores, "uwo", lam=1.0).tolist() == [-0.5, -2.0]
    assert aggregate(scores[:3], "median").tolist() == [2.0, 0.0]
    with pytest.raises(ConfigError, match="unknown ensemble aggregator 'max'"):
        aggregate(scores, "max")


def test_lsc_is_monotone_non_positive_and_sums():
    r = torch.linspace(-30, 30, 601)
    u = lsc(r, torch.tensor(0.5))
    assert (u <= 0).all() and (u.diff() > 0).all()
    assert lsc(torch.tensor(0.5), torch.tensor(0.5)).item() == pytest.approx(-math.log(2))
    base = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    assert reference_score(base, 0.5).tolist() == [2.0]
    assert reference_score(base, 0.75).tolist() == [3.0]
    total = summed_utilities(
        [torch.tensor([2.0]), torch.tensor([0.0])], [torch.tensor([2.0]), torch.tensor([1.0])]
    )
    assert total.item() == pytest.approx(math.log(0.5) + math.log(_sig(-1.0)), rel=1e-6)


def test_calibration_on_known_gaps():
    from preftune.reward.evaluation import calibration

    ties = calibration(torch.zeros(2))  # p = 0.5: confidence 0.5, never right
    assert ties == {"ece": pytest.approx(0.5), "brier": pytest.approx(0.25)}
    # p = 0.75 and 0.25: confidence 0.75 in one bin, half right; Brier (0.25² + 0.75²) / 2
    got = calibration(torch.tensor([math.log(3), -math.log(3)]))
    assert got == {"ece": pytest.approx(0.25), "brier": pytest.approx(0.3125)}
    assert calibration(torch.tensor([50.0]))["ece"] == pytest.approx(0.0, abs=1e-12)
