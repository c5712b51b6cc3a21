"""Samplers (`preftune.rl.samplers`): each one's defining behaviour on a model-free source with known
success rates, GVM's allocation and head-gradient norms against hand / autograd values, and the
phase wiring (pool baseline, presets, options)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from preftune.errors import ConfigError
from preftune.rl import SAMPLERS, make_sampler
from preftune.rl.adaptive import VADE, balanced_subset, gvm_allocation
from preftune.rl.draws import Drawn, head_gradient_norms
from preftune.rl.samplers import flat, largest_remainder


class FakeSource:
    """A StepSource without a model: prompt p's completions are accepted with probability rates[p]."""

    def __init__(self, rates: list[float], batch: list[int], seed: int = 0) -> None:
        self.rates, self.batch = rates, list(batch)
        self.rng = np.random.default_rng(seed)
        self.taken = set(batch)
        self.draws: list[tuple[list[int], int]] = []

    def more(self, k: int) -> list[int]:
        out = [i for i in range(len(self.rates)) if i not in self.taken][: max(k, 0)]
        self.taken.update(out)
        return out

    def draw(self, prompts: list[int], n: int) -> Drawn:
        self.draws.append((list(prompts), n))
        rows = [p for p in prompts for _ in range(n)]
        wins = [float(self.rng.random() < self.rates[p]) for p in rows]
        return Drawn(
            prompt=rows,
            completions=[[1, 2]] * len(rows),
            logps=[torch.zeros(2)] * len(rows),
            min_logits=[torch.full((2,), float("-inf"))] * len(rows),
            rewards=torch.tensor(wins, dtype=torch.float64),
            finished=[True] * len(rows),
        )

    def draw_each(self, counts: dict[int, int]) -> Drawn:
        drawn = Drawn()
        for p, n in counts.items():
            drawn.extend(self.draw([p], n) if n else Drawn())
        return drawn

    def head_grad_norms(self, drawn: Drawn, rows: list[int]) -> torch.Tensor:
        return torch.tensor([1.0 + drawn.prompt[r] for r in rows], dtype=torch.float64)


RATES = [0.0, 1.0, 0.5, 0.1, 0.9, 0.3, 0.0, 1.0, 0.6, 0.2, 0.05, 0.7, 0.4, 0.95, 0.0, 0.5]


def test_dapo_filter_never_keeps_a_zero_variance_group_and_refills() -> None:
    sampler = make_sampler("dapo_filter", {"max_draws": 6})
    for seed in range(20):
        source = FakeSource(RATES, batch=[0, 1, 6, 7, 2, 3], seed=seed)
        sel = sampler.select(source, batch_size=6, num_generations=4)  # type: ignore[arg-type]
        assert sel.groups and not any(flat(sel.drawn, g) for g in sel.groups)
        prompts = [sel.drawn.prompt[g[0]] for g in sel.groups]
        assert len(prompts) == len(set(prompts)) <= 6  # a prompt at most once, batch_size at most
        assert not {0, 1, 6, 7} & set(prompts)  # always 0 or always 1: never kept
        missing = 6 - sum(1 for p in (2, 3) if p in prompts)  # 4 flat groups at least
        assert source.draws[1][0] == [4, 5, 8, 9, 10, 11][:missing]  # refills: unused prompts only


def test_dapo_filter_trains_on_the_first_draw_when_every_group_is_flat() -> None:
    source = FakeSource([0.0, 1.0, 0.0, 1.0], batch=[0, 1])
    sel = make_sampler("dapo_filter", {"max_draws": 3}).select(source, 2, 4)  # type: ignore[arg-type]
    assert [len(d[0]) for d in source.draws] == [2, 2]  # the refill ran out of prompts after one draw
    assert sel.groups == [[0, 1, 2, 3], [4, 5, 6, 7]] and sel.metrics["sampler/kept"] == 0


@pytest.mark.parametrize("exit", ["balance", "pos"])
def test_reinforce_ada_balance_gives_zero_signal_fraction_zero(exit: str) -> None:
    from preftune.rl import estimate

    sampler = make_sampler("reinforce_ada", {"exit": exit})  # N = 4 rounds of M = 8, keep n = 4
    for seed in range(10):
        source = FakeSource(RATES, batch=list(range(16)), seed=seed)
        sel = sampler.select(source, 16, 8)  # type: ignore[arg-type]
        rows = [r for g in sel.groups for r in g]
        groups = torch.tensor([i for i, g in enumerate(sel.groups) for _ in g])
        est = estimate("global_mean", sel.drawn.rewards[rows], groups)
        assert est.metrics["zero_signal_fraction"] == 0.0
        assert all(len(g) == 4 for g in sel.groups)
        kept = {sel.drawn.prompt[g[0]] for g in sel.groups}
        assert not {0, 1, 6, 7, 14} & kept  # flat pools (rates 0 and 1) are dropped
        for g in sel.groups:
            pool = sel.drawn.rows_of(sel.drawn.prompt[g[0]])
            wins = int(sel.drawn.rewards[pool].sum())
            if exit == "balance" and 2 <= wins <= len(pool) - 2:
                assert int(sel.drawn.rewards[g].sum()) == 2  # balanced: 2 accepted, 2 rejected
        rounds = [n for _, n in source.draws]
        assert rounds == [8] * len(rounds) and len(rounds) <= 4
        assert source.draws[0][0] == list(range(16))  # round 1: every prompt; then the active ones
    # pos exits at the first accepted completion: prompt 2 (rate ½) is never sampled past round 1 there


def test_reinforce_ada_rounds_follow_the_exit_rules() -> None:
    source = FakeSource([0.0, 1.0, 0.5], batch=[0, 1, 2], seed=3)
    pos = make_sampler("reinforce_ada", {"exit": "pos"}).select(source, 3, 8)  # type: ignore[arg-type]
    assert source.draws[1][0] == [0]  # after round 1 only the never-accepted prompt is active
    assert pos.metrics["sampler/unresolved"] == pytest.approx(1 / 3)  # prompt 0 never exits
    source = FakeSource([0.0, 1.0, 0.5], batch=[0, 1, 2], seed=3)
    make_sampler("reinforce_ada", {"exit": "balance"}).select(source, 3, 8)  # type: ignore[arg-type]
    assert source.draws[1][0] == [0, 1]  # balance also keeps sampling the always-accepted prompt
    picked = balanced_subset([1, 2, 7], [3, 4, 5, 6], 4, np.random.default_rng(0))
    assert len(picked) == 4 and len(set(picked) & {1, 2, 7}) == 2  # keep // 2 accepted
    picked = balanced_subset([9], [1, 2, 3, 4, 5], 4, np.random.default_rng(0))
    assert 9 in picked and len(picked) == 4  # one accepted available: it, then 3 rejected


def test_vade_posterior_update_is_the_beta_bernoulli_count_update() -> None:
    plain = VADE(3, pool=2, target=0.5, decay=1.0, prior=1.0, accept=1.0)
    plain.update([0, 2], [3.0, 0.0], [8.0, 8.0])
    assert plain.alpha.tolist() == [4.0, 1.0, 1.0] and plain.beta.tolist() == [6.0, 1.0, 9.0]
    plain.update([0], [8.0], [8.0])  # counts add up: Beta(1 + 11, 1 + 5)
    assert plain.alpha[0] == 12.0 and plain.beta[0] == 6.0
    decayed = VADE(2, pool=2, target=0.5, decay=0.5, prior=1.0, accept=1.0)
    decayed.update([1], [3.0], [4.0])  # α = ½·1 + ½·1 + 3 = 4, β = ½·1 + ½·1 + 1 = 2
    decayed.update([1], [0.0], [4.0])  # α = ½·4 + ½ + 0 = 2.5, β = ½·2 + ½ + 4 = 5.5
    assert decayed.alpha.tolist() == [1.0, 2.5] and decayed.beta.tolist() == [1.0, 5.5]


def test_vade_selects_prompts_near_one_half_and_updates_them() -> None:
    sampler = make_sampler("vade", {"pool": 4, "decay": 1.0}, prompts=16)
    assert isinstance(sampler, VADE)
    sampler.alpha[:] = torch.tensor([1000.0 if i % 2 else 1.0 for i in range(16)])
    sampler.beta[:] = torch.tensor([1000.0 if i % 2 else 999.0 for i in range(16)])  # odd: θ ≈ ½
    source = FakeSource([0.5] * 16, batch=[0, 1, 2, 3])
    sel = sampler.select(source, 4, 8)  # type: ignore[arg-type]
    chosen = source.draws[0][0]
    assert len(chosen) == 4 and all(p % 2 == 1 for p in chosen)  # the θ ≈ ½ prompts of 16 candidates
    wins = {p: int(sel.drawn.rewards[sel.drawn.rows_of(p)].sum()) for p in chosen}
    for p in chosen:
        assert sampler.alpha[p] == 1000.0 + wins[p] and sampler.beta[p] == 1000.0 + 8 - wins[p]
    state = sampler.state_dict()
    again = make_sampler("vade", {}, prompts=16)
    again.load_state_dict(state)
    assert torch.equal(again.state_dict()["alpha"], state["alpha"])
    with pytest.raises(ConfigError, match="does not fit 5 prompts"):
        make_sampler("vade", {}, prompts=5).load_state_dict(state)


def test_gvm_allocation_matches_a_hand_computed_case() -> None:
    p = torch.tensor([0.5, 0.25, 0.0, 1.0, 0.75])
    g = torch.tensor([2.0, 1.0, 3.0, 0.0, 1.5])
    # w = G / sqrt(p + 1e-3 / p): 2/√0.502 = 2.822790, 1/√0.254 = 1.984189, 0 (p = 0), 0 (G = 0),
    # 1.5/√0.7513333 = 1.730514; × 16 / 6.537493 = 6.9086, 4.8562, 0, 0, 4.2352 → floors 6, 4, 0, 0, 4
    # and the 2 left go to the largest remainders (0.9086, 0.8562)
    assert gvm_allocation(p, g, 16).tolist() == [7, 5, 0, 0, 4]
    assert gvm_allocation(torch.zeros(3), torch.ones(3), 7).tolist() == [3, 2, 2]  # nothing accepted: equal
    assert largest_remainder(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [1, 1, 0]  # ties: lower index


def test_gvm_probes_then_samples_the_allocated_budget() -> None:
    source = FakeSource([0.5, 0.0, 1.0, 0.25], batch=[0, 1, 2, 3], seed=1)
    sel = make_sampler("gvm", {"probe": 8}).select(source, 4, 4)  # type: ignore[arg-type]
    assert source.draws[0] == ([0, 1, 2, 3], 8)  # stage 1
    stage2 = {p: n for ps, n in source.draws[1:] for p in ps}
    assert sum(stage2.values()) == 16 and 1 not in stage2  # budget batch × G; p = 0: no samples
    assert sorted(len(gr) for gr in sel.groups) == sorted(stage2.values())
    assert all(r >= 32 for gr in sel.groups for r in gr)  # trains on stage-2 samples only


def test_head_gradient_norms_equal_autograd(tmp_path: Any) -> None:
    from transformers import AutoModelForCausalLM

    from test_train_fixtures import tiny_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model(tmp_path / "m"))
    prompts, completions = [[1, 5, 7], [2, 3]], [[4, 9, 9, 2], [11]]
    got = head_gradient_norms(model, prompts, completions, temperature=0.7)
    head = model.get_output_embeddings().weight
    for i, (p, c) in enumerate(zip(prompts, completions)):
        model.zero_grad()
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1] / 0.7
        logits.log_softmax(-1).gather(1, torch.tensor(c)[:, None]).sum().backward()
        assert got[i] == pytest.approx(float(head.grad.norm()), rel=1e-5)  # type: ignore[union-attr]


def test_sampler_registry_and_options() -> None:
    assert {"uniform", "dapo_filter", "reinforce_ada", "gvm", "vade"} <= set(SAMPLERS)
    with pytest.raises(ConfigError, match="unknown sampler 'vadee' — did you mean 'vade'"):
        make_sampler("vadee")
    with pytest.raises(ConfigError, match="unknown option 'round'"):
        make_sampler("reinforce_ada", {"round": 3})
    with pytest.raises(ConfigError, match="exit"):
        make_sampler("reinforce_ada", {"exit": "neg"})
    with pytest.raises(ConfigError, match="keep=40 exceeds"):
        make_sampler("reinforce_ada", {"keep": 40})
    assert math.isclose(SAMPLERS["gvm"].hparams["alpha"].default, 1e-3)


def test_every_sampler_is_documented() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "online.md").read_text()
    assert not [name for name in SAMPLERS if f"| `{name}` |" not in text]
    assert "## Samplers" in text
