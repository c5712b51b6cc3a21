"""Training the implicit reward model (`preftune.reward.implicit`): `--head implicit` of `train rm` / `train prm`.

    preftune train rm --model ./trunk --data prefs.jsonl --out runs/irm --head implicit --beta 0.05
    preftune train rm --model ./trunk --data labels.jsonl --out runs/irm-ce --head implicit --loss ce
    preftune train prm --model ./trunk --data steps.jsonl --out runs/iprm --head implicit --beta 0.05

The trained model is the causal LM itself (no scalar head): r_θ(y) = β · log π_θ(y)/π_ref(y) against a
frozen copy of `--model` (Yuan et al. 2024, §3). Outcome losses (`train rm`): the pairwise losses of
`preftune.reward.losses` on (r_θ(y_c), r_θ(y_r)) — `bt` is the paper's DPO instantiation — or `ce`
(the paper's CE instantiation) on outcome labels: unpaired rows' `label`, or a pair's chosen (1) and
rejected (0) response. Step labels (`train prm`): prm_bce on σ(q_θ) at each step's end. The loop, run
folder, checkpoints and exact resume are `preftune.reward.scorer_loop`'s; OUT/final is written by
`preftune.reward.implicit.write_folder`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import torch

from preftune.config import TrainConfig
from preftune.errors import ConfigError
from preftune.reward.implicit import ImplicitRM, implicit_ce, own_ends, write_folder
from preftune.reward.losses import RMLoss, parse_rm_loss
from preftune.reward.prm import prompt_runs
from preftune.reward.scorer_loop import (
    ScorerTask,
    check_config,
    claim,
    optimizer_step,
    pair_step,
    run_scorer,
)
from preftune.types import Example

DEFAULT_BETA = 0.05


def settings_of(config: TrainConfig, kind: str) -> dict[str, Any]:
    """beta, loss (and for a PRM separator / aggregation) of `--head implicit`; refuses anything else."""
    hp = dict(config.hparams)
    allowed = {"head", "beta", "loss", "aggregation", "step_value"} | (
        {"separator"} if kind == "prm" else set()
    )
    others = sorted(set(hp) - allowed)
    if others:
        raise ConfigError(
            f"preftune train {kind} --head implicit takes --beta, --loss, --aggregation, --step-value"
            f"{', --separator' if kind == 'prm' else ''}, not {', '.join(others)}"
        )
    try:
        beta = float(hp.get("beta", DEFAULT_BETA))
    except (TypeError, ValueError):
        raise ConfigError(f"--beta {hp.get('beta')!r}: give a number > 0 (e.g. 0.05)") from None
    if not beta > 0:
        raise ConfigError(f"--beta {beta}: the implicit reward's β must be > 0 (e.g. 0.05)")
    loss = str(hp.get("loss", "bt" if kind == "rm" else "prm_bce"))
    if kind == "prm" and loss != "prm_bce":
        raise ConfigError(f"preftune train prm --head implicit trains with --loss prm_bce, not {loss}")
    if kind == "rm" and loss == "regression":
        raise ConfigError(
            "preftune train rm --head implicit trains on pairs (--loss bt, ...) or on labelled responses "
            "(--loss ce), not --loss regression: a regression reward model fits a scalar head to "
            "ratings — drop --head implicit to train one"
        )
    if kind == "rm" and loss != "ce":
        parse_rm_loss(loss)  # a pairwise loss spec; refuses unknown names
    from preftune.reward.implicit import STEP_VALUES
    from preftune.reward.prm import AGGREGATIONS

    aggregation = str(hp.get("aggregation", "outcome" if kind == "rm" else "min"))
    if aggregation not in ("outcome", *AGGREGATIONS):
        raise ConfigError(f"--aggregation {aggregation}: use outcome or one of {', '.join(AGGREGATIONS)}")
    step_value = str(hp.get("step_value", "q"))
    if step_value not in STEP_VALUES:
        raise ConfigError(f"--step-value {step_value}: use one of {', '.join(STEP_VALUES)}")
    return {"head": "implicit", "beta": beta, "loss": loss, "separator": str(hp.get("separator", "\n")),
            "aggregation": aggregation, "step_value": step_value}  # fmt: skip


def _grouped(examples: list[Example]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompts, branches) with runs of equal prompts merged into one packed row's branches."""
    prompts: list[list[int]] = []
    branches: list[list[list[int]]] = []
    for e in examples:
        if prompts and prompts[-1] == e.prompt_ids:
            branches[-1].extend(e.response_ids)
        else:
            prompts.append(e.prompt_ids)
            branches.append(list(e.response_ids))
    return prompts, branches


def example_scores(irm: ImplicitRM, examples: list[Example]) -> torch.Tensor:
    """r_θ of every response of `examples`, flat in example order (a pair: chosen, rejected)."""
    return irm.scores(*_grouped(examples))


def _losses(
    irm: ImplicitRM, part: list[Example], loss_fn: RMLoss | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-example losses, correct [per example], margin): pairs (s_c > s_r, s_c − s_r) or, for ce,
    responses ((s > 0) = label, s)."""
    from preftune.reward.training import pair_margins

    s = example_scores(irm, part)
    if loss_fn is None:  # ce on outcome labels
        labels = torch.tensor([float(e.label or 0.0) for e in part], device=s.device)
        return implicit_ce(s, labels), ((s > 0) == (labels > 0.5)).float(), s
    s_c, s_r = s[0::2], s[1::2]
    return loss_fn(s_c, s_r, pair_margins(part)), (s_c > s_r).float(), s_c - s_r


def _rm_step(irm: ImplicitRM, params: list[torch.nn.Parameter], opt: Any, sched: Any, batch: list[Example],
             loss_fn: RMLoss | None, config: TrainConfig) -> dict[str, float]:  # fmt: skip
    """One optimizer step (`pair_step`) of the implicit reward model."""
    return pair_step(batch, lambda part: _losses(irm, part, loss_fn), params, opt, sched, config)


@torch.no_grad()
def implicit_pair_scores(
    irm: ImplicitRM, examples: list[Example], batch_size: int = 8
) -> tuple[torch.Tensor, ...]:
    """(r_θ(chosen) [P], r_θ(rejected) [P]) of pairs, policy in eval mode."""
    was = irm.policy.training
    irm.policy.eval()
    parts = [
        example_scores(irm, examples[i : i + batch_size]).cpu() for i in range(0, len(examples), batch_size)
    ]
    irm.policy.train(was)
    s = torch.cat(parts) if parts else torch.zeros(0)
    return s[0::2], s[1::2]


def evaluate_implicit_pairs(
    irm: ImplicitRM, examples: list[Example], loss: str, batch_size: int
) -> dict[str, float]:
    """`preftune.reward.training.pair_metrics` of r_θ on held-out pairs (a ce model: with the bt loss)."""
    from preftune.reward.training import pair_metrics

    s_c, s_r = implicit_pair_scores(irm, examples, batch_size)
    return pair_metrics(s_c, s_r, examples, parse_rm_loss("bt" if loss == "ce" else loss))


def load_models(config: TrainConfig) -> tuple[Any, Any]:
    """(policy in train mode, frozen reference in eval mode), both loaded from `config.model`."""
    from preftune.models.load import load_causal_lm

    policy = load_causal_lm(config.model, dtype=config.dtype)
    reference = load_causal_lm(config.model, dtype=config.dtype)
    reference.eval()
    reference.requires_grad_(False)
    policy.train()
    return policy, reference


def _read(source: str, config: TrainConfig, tokenizer: Any, split: str | None, loss: str) -> list[Example]:
    """Pairs (pairwise losses), or unpaired examples for ce (pairs split: chosen 1, rejected 0)."""
    from preftune.reward.training import rm_examples
    from preftune.train.setup import load_examples

    if loss != "ce":
        return rm_examples(source, config, tokenizer, split)
    unpaired = cast(Any, SimpleNamespace(kind="unpaired", needs_mismatched=False))
    return load_examples(source, config, unpaired, tokenizer, split=split, kind=config.kind)


def train_implicit_rm(config: TrainConfig, log: Any = print) -> Any:
    """`preftune train rm --head implicit`: the outcome implicit RM (module doc). Returns the RunResult."""
    settings = settings_of(config, "rm")
    check_config(config)
    loss = settings["loss"]
    loss_fn = None if loss == "ce" else parse_rm_loss(loss)
    with claim(config):  # a failed run puts the folder back as it was (RunLock.undo)
        policy, reference = load_models(config)
        irm = ImplicitRM(policy, reference, settings["beta"])

        def load(tokenizer: Any) -> ScorerTask:
            from preftune.reward.training import check_margins

            examples = _read(config.data, config, tokenizer, config.split, loss)
            if loss_fn is not None:
                check_margins(examples, loss_fn, config.data)
            held = rm_held_out(config, tokenizer)
            size = config.eval_batch_size or 8
            return ScorerTask(
                f"preftune train rm (implicit, β {settings['beta']:g}, {loss}): {len(examples)} "
                + ("responses" if loss == "ce" else "pairs"),
                examples,
                lambda model, params, opt, sched, batch: _rm_step(
                    irm, params, opt, sched, batch, loss_fn, config
                ),
                shown="accuracy",
                evaluate=(lambda model: evaluate_implicit_pairs(irm, held, loss, size)) if held else None,
                sorted_batches=loss == "ce",  # a pair's two halves adjacent: one packed row
                model=policy,
                complete=lambda final: write_folder(final, config.model, settings),
            )

        return run_scorer(config, load, log, f"rm (implicit, {loss})")


def rm_held_out(config: TrainConfig, tokenizer: Any) -> list[Example]:
    from preftune.reward.training import rm_examples

    return rm_examples(config.eval_data, config, tokenizer, config.eval_split) if config.eval_data else []


def encode_items(tokenizer: Any, items: list[Any], separator: str) -> list[Any]:
    """`encode_steps` of PRM items with each step's value read at its own last token (`own_ends`)."""
    from preftune.reward.prm_data import EncodedItem, encode_steps

    out = []
    for it in items:
        enc = encode_steps(tokenizer, it.prompt, it.steps, separator)
        out.append(
            EncodedItem(enc.prompt_ids, enc.response_ids, own_ends(tokenizer, it.steps, separator, enc.ends))
        )
    return out


def encoded_values(irm: ImplicitRM, encoded: list[Any], how: str = "q") -> list[torch.Tensor]:
    """Step values [K_i] of encoded items (runs of equal prompts share a packed row); differentiable."""
    flat = irm.step_values(*prompt_runs(encoded), how)
    return list(flat.split([len(it.ends) for it in encoded]))


@torch.no_grad()
def item_step_values(irm: ImplicitRM, tokenizer: Any, items: list[Any], separator: str = "\n",
                     how: str = "q", batch_items: int = 16) -> list[list[float]]:  # fmt: skip
    """Per PRM item, its step values under the implicit RM (policy in eval mode)."""
    was = irm.policy.training
    irm.policy.eval()
    out: list[list[float]] = []
    for start in range(0, len(items), batch_items):
        enc = encode_items(tokenizer, items[start : start + batch_items], separator)
        out += [v.tolist() for v in encoded_values(irm, enc, how)]
    irm.policy.train(was)
    return out


def _prm_step(irm: ImplicitRM, params: list[torch.nn.Parameter], opt: Any, sched: Any, batch: list[Any],
              config: TrainConfig) -> dict[str, float]:  # fmt: skip
    """prm_bce on σ(q_θ) at each step end: Σ over labelled steps / steps in the optimizer step."""
    from preftune.reward.prm import prm_bce

    micro = config.micro_batch_size or config.batch_size
    n_steps = sum(len(it.labels) for it, _ in batch)
    total = correct = 0.0
    for start in range(0, len(batch), micro):
        part = batch[start : start + micro]
        q = torch.cat(encoded_values(irm, [e for _, e in part], "q"))
        labels = torch.tensor([v for it, _ in part for v in it.labels], device=q.device)
        losses = prm_bce(q, labels)
        (losses.sum() / n_steps).backward()
        total += float(losses.detach().sum())
        correct += float(((q.detach() > 0) == (labels > 0.5)).sum())
    norm, lr = optimizer_step(params, opt, sched, config)
    return {"loss": total / n_steps, "step_accuracy": correct / n_steps, "grad_norm": norm, "lr": lr,
            "steps": float(n_steps)}  # fmt: skip


def train_implicit_prm(config: TrainConfig, log: Any = print) -> Any:
    """`preftune train prm --head implicit`: prm_bce on the implicit partial sums q_θ at step ends."""
    from preftune.reward.prm_training import prm_items

    settings = settings_of(config, "prm")
    check_config(config)
    sep = settings["separator"]
    with claim(config):  # a failed run puts the folder back as it was (RunLock.undo)
        policy, reference = load_models(config)
        irm = ImplicitRM(policy, reference, settings["beta"])

        def load(tokenizer: Any) -> ScorerTask:
            items = prm_items(config.data, config.split, "prm_bce")
            data = list(zip(items, encode_items(tokenizer, items, sep)))
            evaluate = None
            if config.eval_data:
                from preftune.reward.processbench import evaluate_values, first_errors

                held = prm_items(config.eval_data, config.eval_split, "prm_bce")
                labels = first_errors(held, config.eval_data)

                def evaluate(model: Any) -> dict[str, float]:
                    return evaluate_values(item_step_values(irm, tokenizer, held, sep), labels)

            return ScorerTask(
                f"preftune train prm (implicit, β {settings['beta']:g}, prm_bce): {len(items)} solutions",
                data,
                lambda model, params, opt, sched, batch: _prm_step(irm, params, opt, sched, batch, config),
                evaluate=evaluate,
                sorted_batches=True,
                model=policy,
                complete=lambda final: write_folder(final, config.model, settings),
            )

        return run_scorer(config, load, log, "prm (implicit, prm_bce)")
