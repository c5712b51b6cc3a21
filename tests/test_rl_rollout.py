"""Rollout engine: sampling log-probs equal the trainer's recomputation (so the on-policy ratio is 1),
also over a top-k/top-p support; one prefill per prompt samples like a prefill per sample; greedy
rollouts equal `generate`; the recorded support threshold by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.errors import ConfigError
from preftune.generation import generate
from preftune.models.logprobs import sequence_logps
from preftune.rl import RolloutEngine, Sampling
from preftune.rl.sampling import support_threshold

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = 3
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(3.0)
    return m.eval()


def recompute(model, out, n: int, *, support: bool) -> torch.Tensor:
    extra = {"min_logits": out.grouped_min_logits(n)} if support else {}
    _, tokens = sequence_logps(
        model, PROMPTS, out.grouped(n), token_logps=True, temperature=out.temperature, **extra
    )
    return out.align(tokens).detach()


def test_sampling_logps_equal_the_trainers(model) -> None:
    engine = RolloutEngine(model, EOS)
    out = engine.generate(PROMPTS, 4, Sampling(max_new_tokens=8, temperature=0.7, seed=0))
    assert out.completion_ids.shape[0] == 12 and out.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert bool(out.finished.any()) and not bool(out.finished.all())  # some rows end at EOS
    assert torch.isinf(out.min_logits).all()  # no top-k/top-p: the whole vocabulary
    again = recompute(model, out, 4, support=False)
    diff = (again - out.logps)[out.mask].abs().max()
    assert float(diff) <= 1e-5
    assert float(torch.exp((again - out.logps)[out.mask]).sub(1).abs().max()) <= 1e-5  # ratio 1


def test_top_k_top_p_logps_are_renormalised_over_the_support(model) -> None:
    engine = RolloutEngine(model, EOS)
    out = engine.generate(PROMPTS, 4, Sampling(max_new_tokens=8, temperature=0.9, top_k=6, top_p=0.7, seed=1))
    assert bool(torch.isfinite(out.min_logits[out.mask]).all())
    again = recompute(model, out, 4, support=True)
    assert float((again - out.logps)[out.mask].abs().max()) <= 1e-5
    full = recompute(model, out, 4, support=False)
    # over the whole vocabulary each token is less likely: the renormalisation matters
    assert bool((full[out.mask] < out.logps[out.mask] + 1e-6).all())
    assert float((out.logps - full)[out.mask].max()) > 0.05


def test_trainer_example_path_recomputes_the_same_logps(model) -> None:
    from preftune.models.logprobs import example_stats
    from preftune.types import Example

    out = RolloutEngine(model, EOS).generate(PROMPTS, 3, Sampling(max_new_tokens=5, top_p=0.8, seed=2))
    groups = out.grouped(3)
    examples = [Example(p, groups[i], kind="ranked", scores=[0.0] * 3) for i, p in enumerate(PROMPTS)]
    stats = example_stats(model, examples, token_logps=True, min_logits=out.grouped_min_logits(3))
    again = stats.token_logps.detach()
    assert float((again[:, : out.logps.shape[1]] - out.logps)[out.mask].abs().max()) <= 1e-5


def test_shared_prefill_samples_like_repeated_prefill(model) -> None:
    engine = RolloutEngine(model, EOS, batch_rows=8)  # 2 prompts per batch: chunking is exercised
    sampling = Sampling(max_new_tokens=6, temperature=1.0, seed=3)
    shared = engine.generate(PROMPTS, 4, sampling)
    repeated = engine.generate(PROMPTS, 4, sampling, share_prefill=False)
    assert shared.completions() == repeated.completions()
    torch.testing.assert_close(shared.logps, repeated.logps, atol=1e-5, rtol=0)


def test_greedy_equals_generate_and_versions(model) -> None:
    engine = RolloutEngine(model, EOS)
    out = engine.generate(PROMPTS, 1, Sampling(max_new_tokens=7, temperature=0.0))
    expected = [rows[0] for rows in generate(model, EOS, PROMPTS, max_new_tokens=7, temperature=0.0)]
    assert out.completions() == expected
    assert out.weight_version == 0
    assert engine.update_weights() == 1
    assert engine.generate(PROMPTS[:1], 2, Sampling(max_new_tokens=2, seed=0)).weight_version == 1
    with pytest.raises(ConfigError, match="n=0 samples per prompt must be ≥ 1"):
        engine.generate(PROMPTS, 0, Sampling(max_new_tokens=2))
    with pytest.raises(ConfigError, match=r"top_p=0.0 must be in \(0, 1\]"):
        engine.generate(PROMPTS, 1, Sampling(max_new_tokens=2, top_p=0.0))


def test_support_threshold_by_hand() -> None:
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 0.0, -1.0]])
    # top-k 2: halfway between the 2nd and 3rd largest; a tie with the last kept logit is kept
    torch.testing.assert_close(support_threshold(z, 2, 1.0), torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(support_threshold(z, 1, 1.0), torch.tensor([2.5, 0.5]))
    # top-p 0.6 on softmax([3, 2, 1, 0]) = [0.644, 0.237, 0.087, 0.032]: the first token reaches it
    torch.testing.assert_close(support_threshold(z[:1], 0, 0.6), torch.tensor([2.5]))
    torch.testing.assert_close(support_threshold(z[:1], 0, 0.7), torch.tensor([1.5]))
    assert torch.isinf(support_threshold(z, 0, 1.0)).all()


def test_sampler_draws_from_the_renormalised_distribution() -> None:
    from preftune.rl.sampling import sample_step

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]])).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    ids, logp, thr = sample_step(logits, Sampling(max_new_tokens=1, top_k=3), g)
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    kept = torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9  # top-3, renormalised
    assert float((freq - kept).abs().max()) < 0.01
    assert int((ids == 3).sum()) == 0
    torch.testing.assert_close(logp, kept.log()[ids])
    torch.testing.assert_close(
        thr,
        torch.full(
            (40000,), (float(torch.log(torch.tensor(0.15))) + float(torch.log(torch.tensor(0.1)))) / 2
        ),
    )


@pytest.mark.slow
def test_prefill_benchmark_smoke() -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    args = ["--quick", "--prompts", "2", "--samples", "2", "--prompt-len", "12"]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "rollout_prefill.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_tokens"] is True and result["new_tokens"] == 16 and result["speedup"] > 0
