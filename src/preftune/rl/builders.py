"""Builders: an online step's scored samples → examples of an offline data kind, trained by any loss
of the offline registry (`dpo`, `ipo`, `sft`, `copg_loss`, ...) in the prefix-shared packed layout.

    best_worst  online / iterative DPO: per prompt, chosen = the best-rewarded of its G samples,
                rejected = the worst; a prompt whose G rewards are all equal gives no pair
    dno         DNO-Prct (Rosset et al. 2024, Alg. 2): the pool is the G samples plus a teacher
                response; best vs worst of the pool, kept only when r_best − r_worst > margin
    xpo         as best_worst, plus a third branch ỹ ~ π_ref per pair, the sample of the `xpo_loss` term's
                exploration bonus α·log π_θ(ỹ) (Xie et al. 2024, Alg. 1); not drawn when α = 0 (the
                bonus is 0: the run is online DPO's exactly)
    (`pairing all`: every distinct better-vs-worse pair of a prompt's pool instead of best vs worst;
    XPO's ỹ is then drawn once per prompt and shared by its pairs)
    best_of_k   RAFT (Dong et al. 2023): the `keep` best samples of each prompt (reward ≥ min_reward)
                as SFT targets (unpaired, label 1)
    groups      CoPG: each prompt's G samples as one ranked list, best first, the rewards as scores

Ties: the best is the first sample with the highest reward, the worst the first with the lowest
(DNO's teacher comes after the samples, so an on-policy sample wins a tie with it). With
`cut_rejected` the pair builders end each rejected response at its first token that differs from
the chosen one (`cut_at_divergence`): where the chosen response is right, at its first mistake. The builders'
options are run options (`--margin 0.5`, `--keep 0 --min-reward 1`), validated like loss options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from preftune.errors import ConfigError
from preftune.losses.registry import HParam
from preftune.types import Example


@dataclass(frozen=True)
class BuilderSpec:
    """A builder: the data kind it makes, its options and its paper."""

    name: str
    kind: str  # "pairwise", "unpaired" or "listwise" (the objective's data kind)
    paper: str
    hparams: Mapping[str, HParam] = field(default_factory=dict)
    min_samples: int = 1  # samples of one prompt it needs to build anything (a pair: 2)

    def validate(self, given: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: p.default for k, p in self.hparams.items()}
        for key, value in given.items():
            out[key] = self.hparams[key].coerce(key, value, f"method option '{key}'")
        return out


CUT_REJECTED = HParam(
    False,
    "end the rejected response at its first token that differs from the chosen one (the mistake, where "
    "the chosen response is correct; the quickstart's first-error cut)",
)
PAIRING = HParam(
    "best_worst",
    "which pairs of a prompt's samples: best_worst (one: the best vs the worst) or all (every distinct "
    "better-vs-worse pair, as offline pairs from K samples; pairs of one prompt share its packed row)",
    choices=("best_worst", "all"),
)
BUILDERS: dict[str, BuilderSpec] = {
    "best_worst": BuilderSpec(
        "best_worst",
        "pairwise",
        "Guo et al. 2024, online AI feedback; Xiong et al. 2024",
        {"cut_rejected": CUT_REJECTED, "pairing": PAIRING},
        min_samples=2,
    ),
    "dno": BuilderSpec(
        "dno",
        "pairwise",
        "Rosset et al. 2024, Direct Nash Optimization, Alg. 2 (DNO-Prct)",
        {
            "margin": HParam(0.0, "DNO: keep a pair only when r_best − r_worst > margin", low=0.0),
            "cut_rejected": CUT_REJECTED,
            "pairing": PAIRING,
        },
    ),
    "xpo": BuilderSpec(
        "xpo",
        "pairwise",
        "Xie et al. 2024, Exploratory Preference Optimization, Alg. 1",
        {"cut_rejected": CUT_REJECTED, "pairing": PAIRING},
        min_samples=2,
    ),
    "best_of_k": BuilderSpec(
        "best_of_k",
        "unpaired",
        "Dong et al. 2023, RAFT, Alg. 1",
        {
            "keep": HParam(1, "RAFT: samples kept per prompt, best first (0: every one ≥ min_reward)", low=0),
            "min_reward": HParam(None, "RAFT: keep only samples with reward ≥ this (unset: no bound)", type="float"),
        },
    ),
    "groups": BuilderSpec(
        "groups", "listwise", "Flet-Berliac et al. 2024, CoPG (all pairs of a prompt's samples)", min_samples=2
    ),
}  # fmt: skip


def best_worst(values: Sequence[float], margin: float = 0.0) -> tuple[int, int] | None:
    """(best, worst) indices of one prompt's rewards — the first maximum and the first minimum — or
    None unless r_best − r_worst > margin (margin 0: the rewards differ)."""
    best = max(range(len(values)), key=lambda i: values[i])
    worst = min(range(len(values)), key=lambda i: values[i])
    return (best, worst) if values[best] - values[worst] > margin else None


def all_pairs(
    values: Sequence[float], branches: Sequence[Sequence[int]], margin: float = 0.0
) -> list[tuple[int, int]]:
    """Every (better, worse) pair of one prompt's samples with r_better − r_worse > margin, each distinct
    response once (a repeated response is its first copy), better first in sample order."""
    seen: dict[tuple[int, ...], int] = {}
    for i, b in enumerate(branches):
        seen.setdefault(tuple(b), i)
    distinct = sorted(seen.values())
    return [(i, j) for i in distinct for j in distinct if values[i] - values[j] > margin]


def cut_at_divergence(chosen: Sequence[int], rejected: Sequence[int]) -> list[int]:
    """`rejected` up to and including its first token that differs from `chosen` — whole when it is a
    prefix of `chosen` (its divergence is then its end, EOS included)."""
    k = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), len(rejected))
    return list(rejected[: k + 1])


def best_of_k(values: Sequence[float], keep: int, min_reward: float | None) -> list[int]:
    """Indices of the kept samples of one prompt: by reward, best first (stable), at most `keep`
    (0: no limit), only those with reward ≥ min_reward when it is set."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    if min_reward is not None:
        order = [i for i in order if values[i] >= min_reward]
    return order if keep == 0 else order[:keep]


def builder_options(method: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The validated options of online `method`'s builder (defaults filled in) among `hparams`."""
    from preftune.online_methods import builder_of

    spec = BUILDERS[builder_of(method)]
    return spec.validate({k: v for k, v in hparams.items() if k in spec.hparams})


def builder_settings(config: Any) -> tuple[str, dict[str, Any]]:
    """(builder name, its validated options from the config's hparams) of an online method; ("", {})
    for a policy-gradient method."""
    from preftune.online_methods import PRESETS

    name = PRESETS[config.method.strip()].builder
    if not name:
        return "", {}
    hparams = builder_options(config.method, config.hparams)
    if name == "xpo":  # ỹ is sampled only when it is trained on: an xpo term with α > 0
        from preftune.config import resolve_objective

        hparams["explore"] = any(
            s.name == "xpo_loss" and h["alpha"] > 0 for s, _, h in resolve_objective(config)
        )
    return name, hparams


def check_objective(
    method: str, objective: Sequence[tuple[Any, float, dict[str, Any]]], strategy: str
) -> None:
    """ConfigError unless the objective of builder method `method` trains on the data kind its builder
    makes (e.g. online_dpo's pairs: a pairwise loss), and XPO's has a reference model to sample from."""
    from preftune.online_methods import builder_of

    spec = BUILDERS[builder_of(method)]
    kinds = {s.kind for s, _, _ in objective} - {"any"}
    kind = kinds.pop() if kinds else "any"
    fits = kind == spec.kind or (spec.kind == "unpaired" and kind == "any")
    if not fits:
        names = ",".join(s.name for s, _, _ in objective)
        raise ConfigError(
            f"method '{method}' makes {spec.kind} examples of its samples, but objective '{names}' trains "
            f"on {kind} data — give --objective a {spec.kind} loss (preftune losses lists them)"
        )
    if spec.name == "xpo" and strategy not in ("model", "adapter"):
        raise ConfigError(
            f"method '{method}' samples ỹ from the reference model: use reference=model or adapter (or auto)"
        )


def _eos_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def teacher_responses(phase: Any, rows: Sequence[Any]) -> list[str | None]:
    """DNO's teacher response of each prompt: its `teacher` column, else (with the arithmetic reward)
    the task's reference solution; None where there is neither."""
    from preftune.tasks.arithmetic import parse_prompt, solution

    out: list[str | None] = []
    for r in rows:
        text = r.columns.get("teacher")
        if text is None and phase.verifier:
            text = solution(parse_prompt(r.text))
        out.append(None if text is None else str(text))
    return out


def reference_samples(phase: Any, rows: Sequence[Any], sampling: Any) -> list[list[int]]:
    """One completion ỹ ~ π_ref per prompt (XPO), from the phase's reference, with its own seed (the
    policy's samples are those of online DPO with the same seed)."""
    from preftune.rl.rollout import RolloutEngine

    provider = phase.reference
    model: Any = getattr(provider, "model", None)
    adapter: Any = getattr(provider, "policy", None)
    if model is None and adapter is None:
        raise ConfigError(
            "xpo samples ỹ from the reference model: use an objective with a reference (dpo, ipo, ...)"
        )
    seeded = replace(sampling, seed=(int(sampling.seed or 0) * 31 + 17) % (2**63))
    prompts = [r.ids for r in rows]
    if model is not None:
        return RolloutEngine(model, eos=phase.tokenizer).generate(prompts, 1, seeded).completions()
    with adapter.disable_adapter():
        return RolloutEngine(adapter, eos=phase.tokenizer).generate(prompts, 1, seeded).completions()


def build_examples(
    phase: Any, rows: Sequence[Any], completions: list[list[int]], rewards: torch.Tensor, sampling: Any
) -> tuple[list[Example], dict[str, float]]:
    """The examples `phase.builder` makes of one step's samples (G per prompt, row-major), and its
    metrics: `pairs` (pairs per prompt), `kept` (RAFT: fraction of samples kept), `teacher_chosen`
    (DNO: fraction of pairs whose chosen response is the teacher's)."""
    g = phase.num_generations
    values = rewards.double().view(len(rows), g).tolist()
    branches = [completions[p * g : (p + 1) * g] for p in range(len(rows))]
    name, hp = phase.builder, phase.builder_hparams
    if name == "best_of_k":
        kept = [best_of_k(v, hp["keep"], hp["min_reward"]) for v in values]
        examples = [
            Example(r.ids, [b[i]], kind="unpaired", label=1.0, source_row=r.row)
            for r, b, idx in zip(rows, branches, kept)
            for i in idx
        ]
        return examples, {"kept": sum(map(len, kept)) / max(len(rows) * g, 1)}
    if name == "groups":
        orders = [best_of_k(v, 0, None) for v in values]
        return [
            Example(r.ids, [b[i] for i in o], kind="ranked", scores=[v[i] for i in o], source_row=r.row)
            for r, b, v, o in zip(rows, branches, values, orders)
        ], {}
    metrics: dict[str, float] = {}
    if name == "dno":
        teachers = teacher_responses(phase, rows)
        present = [(i, t) for i, t in enumerate(teachers) if t is not None]
        if present:
            scored = phase.reward([rows[i].text for i, _ in present], [t for _, t in present])
            for (i, t), s in zip(present, scored.tolist()):
                values[i].append(float(s))
                branches[i] = [*branches[i], _eos_ids(phase.tokenizer, t)]
    examples, chosen, owner = _pair_examples(rows, branches, values, hp)
    if name == "dno":
        metrics["teacher_chosen"] = sum(c == g for c in chosen) / max(len(chosen), 1)
    if name == "xpo" and examples and hp.get("explore", True):  # one ỹ per prompt, shared by its pairs
        order = list(dict.fromkeys(owner))
        explore = dict(zip(order, reference_samples(phase, [rows[p] for p in order], sampling)))
        examples = [replace(e, response_ids=[*e.response_ids, explore[p]]) for e, p in zip(examples, owner)]
    metrics["pairs"] = len(examples) / max(len(rows), 1)
    return examples, metrics


def _pair_examples(
    rows: Sequence[Any], branches: list[list[list[int]]], values: list[list[float]], hp: Mapping[str, Any]
) -> tuple[list[Example], list[int], list[int]]:
    """The pairs of each prompt (`pairing`: best vs worst, or all), rejected cut with `cut_rejected`;
    each pair's chosen index in its pool and its prompt's index in `rows`."""
    margin = hp.get("margin", 0.0)
    examples: list[Example] = []
    chosen: list[int] = []
    owner: list[int] = []
    for p, (r, b, v) in enumerate(zip(rows, branches, values)):
        if hp.get("pairing", "best_worst") == "all":
            pairs = all_pairs(v, b, margin)
        else:
            one = best_worst(v, margin)
            pairs = [] if one is None else [one]
        for i, j in pairs:
            rejected = cut_at_divergence(b[i], b[j]) if hp.get("cut_rejected") else b[j]
            examples.append(Example(r.ids, [b[i], rejected], source_row=r.row))
            chosen.append(i)
            owner.append(p)
    return examples, chosen, owner
