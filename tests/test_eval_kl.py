"""The sequence-level KL estimator: hand-computed values, its sampling contract, and the exact one-token KL."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.errors import ConfigError
from preftune.eval.kl import kl_from_logps, sequence_kl


def test_kl_from_logps_hand_computed():
    # differences 0.5, 0.5, 1.0 → mean 2/3; sample variance ((1/6)² + (1/6)² + (1/3)²) / 2 = 1/12,
    # so the standard error is √(1/12) / √3 = 1/6.
    est = kl_from_logps(
        torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -2.5, -4.0]), torch.tensor([2, 3, 4])
    )
    assert est.mean == pytest.approx(2 / 3)
    assert est.stderr == pytest.approx(1 / 6)
    assert est.samples == 3 and est.mean_length == pytest.approx(3.0)
    one = kl_from_logps(torch.tensor([-1.0]), torch.tensor([-1.25]))
    assert one.mean == pytest.approx(0.25) and one.stderr == 0.0 and math.isnan(one.mean_length)
    with pytest.raises(ConfigError, match="equal shape"):
        kl_from_logps(torch.zeros(2), torch.zeros(3))


def test_sequence_kl_samples_the_policy_at_temperature_one_and_drops_empty_samples():
    calls = {}

    def fake_generate(model, tok, prompts, **kw):
        calls["generate"] = (model, kw)
        return [[[5, 2], []], [[6, 7, 2], [8, 2]]]  # prompt 0's second sample is empty

    def fake_logps(model, prompts, responses):
        calls.setdefault("logps", []).append((model, prompts, responses))
        # logp = −(sum of token ids) / 10 under the policy, −(sum) / 5 under the reference
        scale = 10.0 if model == "policy" else 5.0
        return [torch.tensor([-sum(y) / scale for y in ys]) for ys in responses]

    est = sequence_kl(
        "policy",
        "reference",
        2,
        [[1, 3], [1, 4]],
        samples_per_prompt=2,
        max_new_tokens=3,
        seed=7,
        generate_fn=fake_generate,
        logps_fn=fake_logps,
    )
    model, kw = calls["generate"]
    assert model == "policy" and kw["temperature"] == 1.0 and kw["top_p"] == 1.0 and kw["seed"] == 7
    assert kw["num_samples"] == 2 and kw["max_new_tokens"] == 3
    assert [c[0] for c in calls["logps"]] == ["policy", "reference"]
    assert calls["logps"][0][2] == [[[5, 2]], [[6, 7, 2], [8, 2]]]
    # per-sample difference = sum/5 − sum/10 = sum/10 over sums 7, 15, 10 → mean 32/30
    assert est.mean == pytest.approx(32 / 30) and est.samples == 3
    assert est.mean_length == pytest.approx(7 / 3)


def test_one_token_estimate_matches_the_exact_kl_of_two_tiny_models(tmp_path):
    for module in ("preftune.generation", "preftune.models.load", "preftune.models.tiny"):
        pytest.importorskip(module)  # engineers 3 and 5's modules, until they land
    from preftune.models.load import load_causal_lm
    from preftune.models.tiny import save_tiny_model

    vocab = 24
    policy = load_causal_lm(save_tiny_model("llama", tmp_path / "p", vocab_size=vocab, seed=1))
    reference = load_causal_lm(save_tiny_model("llama", tmp_path / "r", vocab_size=vocab, seed=2))
    with torch.no_grad():  # a sharp policy against a near-uniform reference: KL(p‖q) ≪ KL(q‖p)
        policy.get_output_embeddings().weight.mul_(30.0)
    prompts = [[1, 5, 6], [1, 7], [1, 9, 10, 11]]
    eos = vocab - 1
    est = sequence_kl(policy, reference, eos, prompts, samples_per_prompt=300, max_new_tokens=1, seed=0)
    # One new token: KL = mean over prompts of Σ_v p(v|x) (log p(v|x) − log q(v|x)), from the logits.
    forward, backward = [], []
    with torch.no_grad():
        for x in prompts:
            ids = torch.tensor([x])
            logp = torch.log_softmax(policy(input_ids=ids).logits[0, -1].double(), -1)
            logq = torch.log_softmax(reference(input_ids=ids).logits[0, -1].double(), -1)
            forward.append(float((logp.exp() * (logp - logq)).sum()))
            backward.append(float((logq.exp() * (logq - logp)).sum()))
    truth, wrong = sum(forward) / len(prompts), sum(backward) / len(prompts)
    assert est.samples == 900 and est.mean_length == 1.0
    assert abs(est.mean - truth) < 3 * est.stderr, (est, truth)
    # the check can fail: sampling from the reference instead would estimate KL(ref ‖ policy), far off
    assert abs(wrong - truth) > 6 * est.stderr, (est, truth, wrong)


def test_kl_of_a_model_to_itself_is_zero_sample_by_sample(tmp_path):
    for module in ("preftune.generation", "preftune.models.load", "preftune.models.tiny"):
        pytest.importorskip(module)
    from preftune.models.load import load_causal_lm
    from preftune.models.tiny import save_tiny_model

    model = load_causal_lm(save_tiny_model("llama", tmp_path / "m", vocab_size=24, seed=3))
    est = sequence_kl(model, model, 23, [[1, 5], [1, 6, 7]], samples_per_prompt=3, max_new_tokens=5, seed=1)
    assert est.samples == 6 and 1 <= est.mean_length <= 5
    assert est.mean == pytest.approx(0.0, abs=1e-6) and est.stderr == pytest.approx(0.0, abs=1e-6)
