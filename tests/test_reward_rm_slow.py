"""Slow: an outcome reward model trained on the SFT policy's own verifier-labelled samples.

    python -m pytest -m slow tests/test_reward_rm_slow.py -s

The quickstart's SFT model (level 2, seed 0, ~50 % greedy accuracy) samples 8 completions at
temperature 1 for 4000 training prompts and for 1000 held-out prompts (never trained on, by SFT
either). Pairs: a fully correct sample ≻ a wrong one of the same prompt (`build_pairs`, whole wrong
samples; up to 4 per training prompt, 2 per held-out prompt, held-out pairs only from the policy's own
samples — the kind of pair best-of-n scores). `preftune train rm` (bt, 300 steps of 32 pairs, lr 1e-3,
one thread) from the SFT model; then held-out pairwise accuracy and the best-of-n curve on the held-out
samples, judged by the verifier, next to the SFT model's own summed log-likelihood as a re-ranker.

Measured (docs/reward_models.md, "On the built-in task"): RM held-out accuracy 0.617 on 1186 pairs
(84 s training CPU), best-of-8 0.270 against 0.353 for one sample; the SFT log-likelihood 0.890 and
0.552. The goal of ≥ 95 % is not reached. The floor asserted, 0.55, is more than 3 standard
deviations above chance (a random scorer: 0.5 ± 0.015 on ~1200 pairs).
"""

from __future__ import annotations

import json
import resource

import pytest
import torch

from preftune.cli import main
from preftune.models.load import load_causal_lm
from preftune.models.logprobs import sequence_logps
from preftune.reward.best_of_n import best_of_n_curve
from preftune.reward.model_reward import RewardModelFn
from preftune.tasks.arithmetic import ArithmeticTask
from preftune.tasks.quickstart import build_pairs, sample_responses
from preftune.tasks.sft import SFTConfig, encode, train_sft
from test_train_fixtures import write_jsonl


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _own_pairs(task, prompts, samples, per_prompt):
    pairs, _, _ = build_pairs(task, prompts, samples, pairs_per_prompt=per_prompt, seed=0, rejected="full")
    sampled = dict(zip(prompts, (set(s) for s in samples)))
    return [r for r in pairs if r["chosen"] in sampled[r["prompt"]]]  # no reference solutions


def _loglik(folder, prompts, samples):
    from transformers import AutoTokenizer

    model, tok = load_causal_lm(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        out = sequence_logps(model, [encode(tok, p)[0] for p in prompts],
                             [[encode(tok, p, s)[1] for s in ss] for p, ss in zip(prompts, samples)])  # fmt: skip
    return torch.stack([o.flatten() for o in out]).double()  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~6 CPU-minutes: SFT, 40 000 samples, the RM, scoring
def test_rm_on_policy_samples_heldout_accuracy_and_best_of_n(tmp_path):
    torch.set_num_threads(1)
    task = ArithmeticTask(level=2)
    held = [p.prompt for p in task.problems(1000, seed=777)]
    sft = tmp_path / "sft"
    train_sft(task, sft, SFTConfig(seed=0), exclude_prompts=set(held))
    prompts = [p.prompt for p in task.problems(4000, seed=1, exclude=set(held))]
    samples = sample_responses(sft, task, prompts, num_samples=8, temperature=1.0, seed=1)
    held_samples = sample_responses(sft, task, held, num_samples=8, temperature=1.0, seed=0)
    train_pairs = _own_pairs(task, prompts, samples, 4)
    write_jsonl(tmp_path / "train.jsonl", train_pairs)
    held_pairs = _own_pairs(task, held, held_samples, 2)
    write_jsonl(tmp_path / "held.jsonl", held_pairs)
    args = ["train", "rm", "--model", str(sft), "--data", str(tmp_path / "train.jsonl"), "--out",
            str(tmp_path / "rm"), "--max-steps", "300", "--batch-size", "32", "--lr", "1e-3", "--log-every", "50"]  # fmt: skip
    start = _cpu()
    assert main(args) == 0
    train_cpu = _cpu() - start
    assert main(["eval", str(tmp_path / "rm"), "--data", str(tmp_path / "held.jsonl")]) == 0
    accuracy = json.loads((tmp_path / "rm" / "eval.json").read_text())["metrics"]["accuracy"]
    gold = torch.tensor(
        [[task.reward(p, s) for s in ss] for p, ss in zip(held, held_samples)], dtype=torch.float64
    )
    flat_p = [p for p, ss in zip(held, held_samples) for _ in ss]
    scores = torch.tensor(
        RewardModelFn(tmp_path / "rm" / "final")(flat_p, [s for ss in held_samples for s in ss])
    )
    rm_curve = best_of_n_curve(scores.view(len(held), -1).double(), gold, [1, 2, 4, 8])
    loglik = _loglik(sft, held, held_samples)
    ll_curve = best_of_n_curve(loglik, gold, [1, 2, 4, 8])
    index = {(p, s): (i, j) for i, (p, ss) in enumerate(zip(held, held_samples)) for j, s in enumerate(ss)}
    ll_acc = sum(float(loglik[index[r["prompt"], r["chosen"]]] > loglik[index[r["prompt"], r["rejected"]]])
                 for r in held_pairs) / len(held_pairs)  # fmt: skip
    print(json.dumps({"train_pairs": len(train_pairs), "held_pairs": len(held_pairs), "rm_accuracy": accuracy,
                      "train_cpu_s": round(train_cpu, 1), "rm_best_of_n": rm_curve,
                      "loglik_accuracy": ll_acc, "loglik_best_of_n": ll_curve}))  # fmt: skip
    assert accuracy >= 0.55
