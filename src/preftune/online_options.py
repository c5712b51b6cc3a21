"""An online run's loss and estimator settings: TRL GRPOConfig's names, and which hyper-parameter goes
to the policy terms and which to the advantage estimator.

    TRL name (GRPOConfig)   becomes
    --beta B                the objective gains the term `kl:B` (k3 to the reference in the loss, as
                            TRL's β); 0 = no KL term and no reference model (TRL's default)
    --epsilon E             ppo_clip's eps_low, and eps_high unless --epsilon_high is given
    --epsilon_high E        ppo_clip's eps_high (DAPO's clip-higher uses 0.28)
    --loss_type T           the aggregation of every term: grpo → seq_mean_token_mean,
                            dapo → token_mean, dr_grpo → seq_mean_token_sum_norm
    --scale_rewards S       the grpo estimator's `scale`: group | batch | none (true = group, false = none)

The same names in both tools need no translation: num_generations, num_iterations, temperature,
top_p, top_k, max_completion_length (config fields). A key that an estimator declares (grpo's
`scale`, `eps`; remax's `clip`; reinforce_pp's `gamma`; bnpo's `max_weight`) goes to the estimator;
every other key to the objective's terms (`preftune.config.resolve_objective` checks them).
This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from preftune.errors import ConfigError

# TRL's GRPO loss_type → preftune's aggregation (preftune.losses.policy_losses.AGGREGATIONS)
LOSS_TYPES: dict[str, str] = {
    "grpo": "seq_mean_token_mean",
    "dapo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
}
# TRL loss types that have no exact counterpart here, with what to use instead
NOT_HERE: dict[str, str] = {
    "bnpo": "TRL's bnpo divides by the tokens of each local batch (per process and accumulation step); "
    "the exact global token mean is --loss_type dapo, and the BNPO estimator is --method bnpo",
    "cispo": "not available; use --loss_type dapo",
    "sapo": "not available; use --loss_type dapo",
}
SCALES = {"group": "group", "batch": "batch", "none": "none", "true": "group", "false": "none"}
TRL_KEYS = ("beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards")
# The gae estimator's options and the config fields the PPO family reads them from (`rl.ppo.token_credit`):
# one value each, the field's; the same names as hyper-parameters are checked against the fields
# (`method_checks.check_gae_options`), never given to the estimator.
GAE_FIELDS = {"gamma": "gamma", "lam": "lam", "pooling": "macro_pooling"}


@dataclass
class OnlineOptions:
    """An online run's resolved parts: the estimator and its hyper-parameters, the objective text and
    the flat hyper-parameters for its terms (preset defaults apply with `setdefault`)."""

    estimator: str
    estimator_hparams: dict[str, Any]
    objective: str
    term_hparams: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    greedy_baseline: bool = False


def _number(key: str, value: Any, low: float, low_open: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number == number or number < low or (low_open and number == low):
        bound = f"> {low:g}" if low_open else f"≥ {low:g}"
        raise ConfigError(f"'{key}' = {value!r} must be a number {bound} (TRL's GRPOConfig.{key})")
    return number


def _term_names(objective: str) -> list[str]:
    return [part.split(":")[0].strip() for part in objective.split(",") if part.strip()]


def _trl(values: dict[str, Any], objective: str) -> str:
    """Translate TRL's keys in `values` (in place) and return the objective with --beta's KL term."""
    terms = _term_names(objective)
    if "loss_type" in values:
        kind = str(values.pop("loss_type")).strip()
        if kind in NOT_HERE:
            raise ConfigError(f"loss_type '{kind}': {NOT_HERE[kind]}")
        if kind not in LOSS_TYPES:
            known = ", ".join(LOSS_TYPES)
            raise ConfigError(f"loss_type '{kind}' is not a GRPO loss type here (known: {known})")
        if "aggregation" in values:
            raise ConfigError("'loss_type' (TRL's name) and 'aggregation' both given; keep one")
        values["aggregation"] = LOSS_TYPES[kind]
    mirror = "epsilon" in values and "epsilon_high" not in values and "eps_high" not in values
    for key, target in (("epsilon", "eps_low"), ("epsilon_high", "eps_high")):
        if key in values:
            if "ppo_clip" not in terms:
                raise ConfigError(f"'{key}' is the clip range of ppo_clip; objective '{objective}' has none")
            if target in values:
                raise ConfigError(f"'{key}' (TRL's name) and '{target}' both given; keep one")
            values[target] = _number(key, values.pop(key), 0.0)
    if mirror:
        values["eps_high"] = values["eps_low"]  # TRL: epsilon_high defaults to epsilon
    if "beta" in values:
        beta = _number("beta", values.pop("beta"), 0.0)
        if beta > 0:
            if "kl" in terms:
                raise ConfigError(
                    f"'beta' = {beta:g} and a kl term in objective '{objective}' both weigh the KL; keep one"
                )
            objective = f"{objective},kl:{beta:g}"
    return objective


def resolve_online(
    method: str, estimator: str | None, objective: str | None, hparams: Mapping[str, Any]
) -> OnlineOptions:
    """The parts of online `method` with the overrides `estimator`, `objective` and the flat
    `hparams` (TRL's names translated, see the module table); the keys the chosen estimator declares
    go to it, checked (`EstimatorSpec.validate`)."""
    from preftune.online_methods import expand
    from preftune.rl import get_estimator

    est, text, defaults, greedy = expand(method, estimator, objective)
    spec = get_estimator(est)
    estimator_keys = spec.hparams if est != "gae" else {}
    values = dict(hparams)
    if est == "gae":  # γ, λ and the pooling are config fields (GAE_FIELDS)
        values = {k: v for k, v in values.items() if k not in GAE_FIELDS}
    text = _trl(values, text)
    est_hparams: dict[str, Any] = {}
    if "scale_rewards" in values:
        scale = str(values.pop("scale_rewards")).strip().lower()
        if scale not in SCALES:
            raise ConfigError(
                f"scale_rewards = {scale!r}: use group, batch or none (true = group, false = none)"
            )
        if "scale" not in estimator_keys:
            raise ConfigError(f"scale_rewards is the grpo estimator's scaling; estimator '{est}' has none")
        est_hparams["scale"] = SCALES[scale]
    for key in list(values):
        if key in estimator_keys:
            if key in est_hparams:
                raise ConfigError(f"'scale_rewards' (TRL's name) and '{key}' both given; keep one")
            est_hparams[key] = values.pop(key)
    chosen = spec.validate(est_hparams) if est != "gae" else {}
    return OnlineOptions(est, chosen, text, values, defaults, greedy)


def recorded_hparams(
    method: str, estimator: str | None, objective: str | None, hparams: Mapping[str, Any]
) -> dict[str, Any]:
    """What a run's config.yaml records of an online run's hyper-parameters besides its terms'
    (written as TERM.KEY): the estimator's, resolved, and TRL's `beta`, which adds the kl term."""
    online = resolve_online(method, estimator, objective, hparams)
    extra = dict(online.estimator_hparams)
    if "beta" in hparams:
        extra["beta"] = hparams["beta"]
    return extra
