"""Held-out evaluation of a reward model (`preftune eval RUN`): pairwise accuracy, calibration with its
reliability bins, and the best-of-n curve against a gold reward (`preftune.reward.best_of_n`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from preftune.config import TrainConfig


def reliability(gaps: torch.Tensor, bins: int = 10) -> list[dict[str, float]]:
    """The reliability diagram of p = σ(s_c − s_r): `bins` equal-width bins of the confidence
    c = max(p, 1 − p) ∈ [0.5, 1]; per bin its bounds, pair count, accuracy (the fraction whose more
    likely side is the chosen one) and mean confidence (empty bins have count 0 and NaN means)."""
    p = torch.sigmoid(gaps.double())
    conf = torch.maximum(p, 1 - p)
    right = (p > 0.5).double()
    index = ((conf - 0.5) * 2 * bins).floor().clamp(0, bins - 1).long()
    out = []
    for b in range(bins):
        member = index == b
        n = int(member.sum())
        acc = float(right[member].mean()) if n else float("nan")
        mean_conf = float(conf[member].mean()) if n else float("nan")
        out.append({"low": 0.5 + b / (2 * bins), "high": 0.5 + (b + 1) / (2 * bins), "pairs": float(n),
                    "accuracy": acc, "confidence": mean_conf})  # fmt: skip
    return out


def calibration(gaps: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """Calibration of the Bradley–Terry probability p = σ(s_c − s_r) that the chosen response wins.

    ece:   expected calibration error (Guo et al. 2017, eq. 3): Σ_b (n_b / n) |acc_b − conf_b| over
           the `reliability` bins of the confidence max(p, 1 − p) ∈ [0.5, 1]; acc_b the fraction of the
           bin's pairs whose more likely side is the chosen one.
    brier: (1/n) Σ (1 − p)², the Brier score of p against the label "chosen wins" (Brier 1950).
    """
    if gaps.numel() == 0:
        return {"ece": 0.0, "brier": 0.0}
    n = gaps.numel()
    ece = sum(
        b["pairs"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability(gaps, bins) if b["pairs"]
    )
    p = torch.sigmoid(gaps.double())
    return {"ece": float(ece), "brier": float(((1 - p) ** 2).mean())}


def evaluate_rm_run(
    run: Path,
    config: TrainConfig,
    data: str,
    batch_size: int = 8,
    *,
    bins: list[dict[str, float]] | None = None,
) -> dict[str, float]:
    """RUN/final of a `preftune train rm` run on the pairs of `data`: loss (the run's), pairwise
    accuracy, mean gap, ece, brier; the reliability bins are appended to `bins` when given."""
    from preftune.data.formatting import load_tokenizer
    from preftune.reward.ensemble_run import ensemble_pair_scores, is_ensemble, read_manifest
    from preftune.reward.losses import parse_rm_loss
    from preftune.reward.scoring import load_scorer
    from preftune.reward.training import all_pair_scores, pair_metrics, rm_examples

    final = run / "final"
    from preftune.reward.implicit import is_implicit

    if is_implicit(final):  # r_θ = β log π_θ/π_ref on the held-out pairs
        return _implicit_metrics(final, data, config, batch_size, bins)
    if str(config.hparams.get("loss", "bt")) == "regression":  # rating data: mse and ordering accuracy
        from preftune.reward.rated import evaluate_rated, rated_examples

        rated = rated_examples(data, config, load_tokenizer(str(final)), None)
        return {"responses": float(len(rated)), **evaluate_rated(load_scorer(final), rated, batch_size)}
    ensemble = is_ensemble(final)
    tokenizer: Any = load_tokenizer(str(read_manifest(final)[0][0] if ensemble else final))
    examples = rm_examples(data, config, tokenizer, None)
    if ensemble:  # the aggregated score of the members (ensemble.json)
        s_c, s_r = ensemble_pair_scores(final, examples, batch_size)
    else:
        s_c, s_r = all_pair_scores(load_scorer(final, dtype=config.dtype), examples, batch_size)
    loss = str(config.hparams.get("loss", "bt"))
    loss_fn = parse_rm_loss("bt" if loss == "ce" else loss)  # implicit members trained with CE: bt's loss
    gaps: list[torch.Tensor] = []
    metrics = pair_metrics(s_c, s_r, examples, loss_fn, gaps)
    if bins is not None:
        bins += reliability(torch.cat(gaps) if gaps else torch.zeros(0))
    return {"pairs": float(len(examples)), **metrics}


def _implicit_metrics(final: Path, data: str, config: TrainConfig, batch_size: int,
                      bins: list[dict[str, float]] | None) -> dict[str, float]:  # fmt: skip
    """`evaluate_rm_run` of an implicit RM folder (`preftune.reward.implicit`)."""
    from preftune.data.formatting import load_tokenizer
    from preftune.reward.implicit import load_implicit
    from preftune.reward.implicit_training import implicit_pair_scores
    from preftune.reward.losses import parse_rm_loss
    from preftune.reward.training import pair_metrics, rm_examples

    irm, settings = load_implicit(final)
    examples = rm_examples(data, config, load_tokenizer(str(final)), None)
    s_c, s_r = implicit_pair_scores(irm, examples, batch_size)
    loss = str(settings["loss"])
    gaps: list[torch.Tensor] = []
    metrics = pair_metrics(s_c, s_r, examples, parse_rm_loss("bt" if loss == "ce" else loss), gaps)
    if bins is not None:
        bins += reliability(torch.cat(gaps) if gaps else torch.zeros(0))
    return {"pairs": float(len(examples)), **metrics}


def rm_eval_payload(run: Path, config: TrainConfig, args: Any) -> dict[str, Any]:
    """What `preftune eval RUN` writes for a reward-model run: metrics, reliability bins and, with
    `--best-of-n N`, the best-of-n curve of the run's RM on samples of `--policy` (default: the run's
    starting model) for the prompts of `--prompts`, judged by `--gold`."""
    from preftune.errors import ConfigError

    bins: list[dict[str, float]] = []
    metrics = evaluate_rm_run(run, config, args.data, args.batch_size, bins=bins)
    out: dict[str, Any] = {"run": str(run), "data": args.data, "method": "rm", "metrics": metrics,
                           "reliability": bins}  # fmt: skip
    if args.best_of_n:
        if not args.prompts:
            raise ConfigError(
                "--best-of-n needs --prompts FILE (rows with 'prompt' and the gold reward's columns)"
            )
        from preftune.reward.best_of_n import sample_and_score
        from preftune.reward.registry import load_reward_model

        out["best_of_n"] = sample_and_score(
            load_reward_model(run / "final"), args.policy or config.model, args.prompts, args.gold, args.best_of_n,
            temperature=1.0 if args.temperature is None else args.temperature,
            max_new_tokens=args.max_new_tokens or 128, seed=args.seed,
        )  # fmt: skip
        bon = out["best_of_n"]
        if bon["unfinished"] > 0.5:  # the gold reward judges cut-off answers: the curve says little
            print(
                f"note: {bon['unfinished']:.0%} of the samples reached --max-new-tokens {bon['max_new_tokens']} "
                "before their end of sequence and were judged cut off — raise --max-new-tokens"
            )
    return out
