"""Registry, hyper-parameter validation and objective parsing."""

from __future__ import annotations

import math

import pytest
import torch

from preftune import losses
from preftune.errors import ConfigError
from preftune.types import PreferenceBatch


def test_get_unknown_loss_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean 'dpo'"):
        losses.get("dpoo")


def test_validate_fills_defaults_and_names_range_and_close_name():
    spec = losses.get("dpo")
    # every hyper-parameter resolved, wpo_weighting (which any pairwise loss takes) included
    assert spec.validate({}) == {"beta": 0.1, "wpo_weighting": False}
    assert spec.validate({"beta": "0.5"}) == {"beta": 0.5, "wpo_weighting": False}
    assert spec.validate({"wpo_weighting": "true"}) == {
        "beta": 0.1,
        "wpo_weighting": True,
    }  # any pairwise loss
    with pytest.raises(ConfigError, match=r"'bta' — did you mean 'beta'"):
        spec.validate({"bta": 1.0})
    with pytest.raises(ConfigError, match=r"'beta' = -1.*\(0, inf\)"):
        spec.validate({"beta": -1})
    with pytest.raises(ConfigError, match="beta"):
        spec.validate({"beta": True})


def test_parse_objective_weights_default_and_errors():
    terms = losses.parse_objective("dpo:1.0,sft:0.2")
    assert [(s.name, w) for s, w in terms] == [("dpo", 1.0), ("sft", 0.2)]
    assert [(s.name, w) for s, w in losses.parse_objective("dpo")] == [("dpo", 1.0)]
    for bad in ("dpo:x", "dpo:-1", "dpo,dpo", "dpo,,sft", "dop:1"):
        with pytest.raises(ConfigError):
            losses.parse_objective(bad)


def test_spec_call_dpo_equal_policy_and_reference_is_log2():
    """ρ_w = ρ_l = 0 ⇒ −log σ(0) = log 2 (docs/algorithms.md §6)."""
    batch = PreferenceBatch(
        policy_logps=torch.tensor([[-1.0, -2.0]]),
        lengths=torch.tensor([[3, 4]]),
        ref_logps=torch.tensor([[-1.0, -2.0]]),
    )
    out = losses.get("dpo")(batch)
    assert out.losses.item() == pytest.approx(math.log(2))
    assert out.metrics["rewards/margin"].item() == 0.0


def test_sft_is_summed_nll_of_branch_zero_of_labelled_desirable_examples():
    """losses = −logp(branch 0) per example: 5 and 0 (label 0 excluded); token count 4."""
    batch = PreferenceBatch(
        policy_logps=torch.tensor([[-5.0], [-7.0]]),
        lengths=torch.tensor([[4], [6]]),
        labels=torch.tensor([1.0, 0.0]),
    )
    out = losses.get("sft")(batch)
    assert out.losses.tolist() == [5.0, 0.0]
    assert losses.sft_token_count(batch).item() == 4.0
    assert losses.get("sft").reduction == "token"
