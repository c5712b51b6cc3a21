"""Reward-model ensembles of M seeds (Coste et al. 2023; Eisenstein et al. 2023):

    preftune train rm --model ./sft --data prefs.jsonl --out runs/ens --ensemble 4 --aggregate min

trains M members, each a whole `preftune train rm` run in OUT/member-i with seed + i (its own head
initialisation and batch order), and writes OUT/final/ensemble.json naming the members' final folders
and the aggregator (`preftune.reward.ensemble.aggregate`: mean, min, uwo, median). OUT/final is then
a reward (`--reward runs/ens/final`, or `ensemble:AGG:PATH` for another aggregator), and
`preftune eval OUT` scores held-out pairs with the aggregated reward.

Members may be implicit RMs (`--head implicit --beta B`: each member r = β log π_θ/π_ref from the
same trunk, seeded batch order): the seeds then differ only in the order they see the pairs.

Or M heads on one trunk (Zhang et al. 2024, "Improving Reinforcement Learning from Human Feedback
with Efficient Reward Model Ensemble", the linear-layer ensemble):

    preftune train rm --model ./sft --data prefs.jsonl --out runs/heads --heads 4 --aggregate min

one run whose model is `AutoModelForSequenceClassification(num_labels=M)`: M scalar heads, each
initialised from the seeded RNG, read at the same last token; a pair's loss is the mean of the heads'
losses, so each head is fitted to the data on the shared trunk. OUT/final/ensemble.json says
`{"heads": M, "aggregate": …}`, and the folder is a reward like a seed ensemble's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from preftune.config import TrainConfig, config_to_dict
from preftune.errors import ConfigError
from preftune.reward.ensemble import AGGREGATORS, aggregate

MANIFEST = "ensemble.json"


def _settings(config: TrainConfig) -> tuple[int, str]:
    raw = config.hparams.get("ensemble", 1)
    try:
        members = int(str(raw))
    except ValueError:
        members = 0
    if members < 2:
        raise ConfigError(f"--ensemble {raw}: give the number of members, ≥ 2 (e.g. --ensemble 4)")
    if "heads" in config.hparams:
        raise ConfigError("--heads M and --ensemble M are two kinds of ensemble: give one of them")
    how = str(config.hparams.get("aggregate", "mean"))
    if how not in AGGREGATORS:
        raise ConfigError(f"--aggregate {how}: use one of {', '.join(AGGREGATORS)}")
    return members, how


def head_settings(config: TrainConfig) -> tuple[int, str]:
    """(M, aggregator) of `--heads M`: M ≥ 2, pairwise losses only (`--ensemble` with it is refused by
    `_settings`: `train_rm` sends any `--ensemble` run there first)."""
    raw = config.hparams.get("heads")
    try:
        heads = int(str(raw))
    except ValueError:
        heads = 0
    if heads < 2:
        raise ConfigError(f"--heads {raw}: give the number of heads on the trunk, ≥ 2 (e.g. --heads 4)")
    if str(config.hparams.get("loss", "bt")) == "regression":
        raise ConfigError("--heads trains pairwise losses (bt, bt_margin, …), not --loss regression")
    how = str(config.hparams.get("aggregate", "mean"))
    if how not in AGGREGATORS:
        raise ConfigError(f"--aggregate {how}: use one of {', '.join(AGGREGATORS)}")
    return heads, how


def heads_manifest(heads: int, how: str) -> dict[str, str]:
    """{file name: text} of a heads ensemble's OUT/final/ensemble.json (the folder is its own member)."""
    return {MANIFEST: json.dumps({"heads": heads, "aggregate": how, "lam": 0.5}, indent=1) + "\n"}


def train_ensemble(config: TrainConfig, log: Any = print) -> Any:
    """Train the members one after the other (each resumable with --resume), then write the manifest."""
    from preftune.reward.training import train_rm
    from preftune.train.api import RunResult
    from preftune.train.runfolder import write_atomic

    members, how = _settings(config)
    out = Path(config.out)
    own = {k: v for k, v in config.hparams.items() if k not in ("ensemble", "aggregate")}  # loss, head, β
    results = []
    for i in range(members):
        member = replace(config, out=str(out / f"member-{i}"), seed=config.seed + i, hparams=dict(own))
        log(f"ensemble member {i + 1}/{members}: seed {member.seed}, {member.out}")
        results.append(train_rm(member, log))
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    manifest = {"members": [f"../member-{i}/final" for i in range(members)], "aggregate": how, "lam": 0.5}
    write_atomic(final / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    import yaml

    write_atomic(
        out / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
    )
    summaries = [json.loads((out / f"member-{i}" / "summary.json").read_text()) for i in range(members)]
    summary = {"method": f"rm ensemble of {members} ({how})", "steps": results[0].steps,
               "members": {f"member-{i}": s for i, s in enumerate(summaries)}, "final": manifest}  # fmt: skip
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    keys = [k for k in results[0].metrics if all(k in r.metrics for r in results)]
    mean = {k: sum(r.metrics[k] for r in results) / members for k in keys}  # the members' mean, as logged
    return RunResult(out, final, results[0].steps, mean)


def _manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if "heads" in data:
            data["heads"] = int(data["heads"])
        else:
            data["members"] = [(Path(folder) / m).resolve() for m in data["members"]]
        data["aggregate"], data["lam"] = str(data.get("aggregate", "mean")), float(data.get("lam", 0.5))
        return dict(data)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a reward-model ensemble manifest ({err})") from None


def read_manifest(folder: str | Path) -> tuple[list[Path], str, float]:
    """(member folders, aggregator, λ) of an ensemble folder (OUT/final with ensemble.json); a heads
    ensemble is its own single member folder (`read_heads` gives its M)."""
    data = _manifest(folder)
    members = [Path(folder).resolve()] if "heads" in data else list(data["members"])
    return members, data["aggregate"], data["lam"]


def read_heads(folder: str | Path) -> int:
    """M of a heads ensemble folder (M heads on one trunk); 0 for an ensemble of seeds."""
    return int(_manifest(folder).get("heads", 0))


def is_ensemble(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def _member_pair_scores(folder: Path, examples: list[Any], batch_size: int) -> tuple[torch.Tensor, ...]:
    """(s_chosen [P], s_rejected [P]) of one member: a scalar-head RM's scores, or an implicit RM's r_θ."""
    from preftune.reward.implicit import is_implicit, load_implicit
    from preftune.reward.implicit_training import implicit_pair_scores
    from preftune.reward.scoring import load_scorer
    from preftune.reward.training import all_pair_scores

    if is_implicit(folder):
        return implicit_pair_scores(load_implicit(folder)[0], examples, batch_size)
    return all_pair_scores(load_scorer(folder), examples, batch_size)


def _member_reward(folder: Path, heads: int) -> Any:
    """One member as a reward function: `ImplicitRewardFn` (r_θ) for an implicit RM, else `RewardModelFn`."""
    from preftune.reward.implicit import is_implicit

    if is_implicit(folder):
        from preftune.reward.implicit_reward import ImplicitRewardFn

        return ImplicitRewardFn(folder, aggregation="outcome")
    from preftune.reward.model_reward import RewardModelFn

    return RewardModelFn(folder, heads=heads)


class EnsembleRewardFn:
    """The aggregated score of an ensemble's members (each a `RewardModelFn`, or an `ImplicitRewardFn`
    for members trained with `--head implicit`) for each completion."""

    def __init__(self, folder: str | Path, how: str | None = None) -> None:
        paths, default, self.lam = read_manifest(folder)
        self.how = how or default
        if self.how not in AGGREGATORS:
            raise ConfigError(f"ensemble aggregator '{self.how}': use one of {', '.join(AGGREGATORS)}")
        self.heads = read_heads(folder)
        self.members = [_member_reward(p, self.heads or 1) for p in paths]
        self.__name__ = f"ensemble:{self.how}:{folder}"

    def member_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """[M, N] float64: every member's (or head's) score of every completion."""
        if self.heads:
            return self.members[0].scores(prompts, completions).double().T.contiguous()
        return torch.tensor([m(prompts, completions) for m in self.members], dtype=torch.float64)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        if not completions:
            return []
        return aggregate(self.member_scores(prompts, completions), self.how, lam=self.lam).tolist()


def ensemble_pair_scores(
    folder: Path, examples: list[Any], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(aggregated s_chosen [P], s_rejected [P]) of tokenized pairs under an ensemble folder."""
    from preftune.reward.scoring import load_scorer
    from preftune.reward.training import all_pair_scores

    paths, how, lam = read_manifest(folder)
    heads = read_heads(folder)
    if heads:  # M heads on one trunk: all_pair_scores gives [P, M]
        c, r = all_pair_scores(load_scorer(folder, num_labels=heads), examples, batch_size)
        return aggregate(c.T, how, lam=lam), aggregate(r.T, how, lam=lam)
    scores = [_member_pair_scores(p, examples, batch_size) for p in paths]
    s_c = aggregate(torch.stack([c for c, _ in scores]), how, lam=lam)
    s_r = aggregate(torch.stack([r for _, r in scores]), how, lam=lam)
    return s_c, s_r
