"""PPO's critic and credit assignment: a value head on the policy trunk, token rewards, GAE.

    attach_value_head(model)                      a scalar head V(s_t) = w·h_t + b on the final hidden state
    credit = TokenCredit(reference, kl_coef=0.05, gamma=1.0, lam=0.95)
    result = credit(model, prompt_ids, rollouts, rewards, seed)   # advantages, values, returns [N, T]

The RLHF PPO recipe (Ouyang et al. 2022 §3.5 / Stiennon et al. 2020, as TRL's PPOTrainer implements
it): each response token gets the reward −β·(log π_θ − log π_ref) (k1, the KL penalty), its last token
also the sequence reward r(x, y); GAE(γ, λ) over these rewards with the value head's V_t gives the
advantages, whitened over the batch's tokens, and the returns Â + V, the value targets. MA-RLHF
(Chai et al. 2025) runs the same GAE over macro actions; RTO (Zhong et al. 2024) adds a DPO model's
token rewards; a PRM's step values (`prm:steps:PATH`) sit on the tokens that end the steps (Wang et
al. 2024, Math-Shepherd §3.4, step-by-step PPO). The value head lives on the policy (one trunk, one optimizer): checkpoints store it
with the weights, OUT/final/ keeps it in `value_head.safetensors` beside the plain causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.errors import ConfigError
from preftune.rl.estimators import _whiten
from preftune.rl.gae import gae_returns, macro_segments, place_rewards
from preftune.rl.groups import make_groups, zero_signal_fraction
from preftune.rl.rollout import Rollouts
from preftune.types import Example

VALUE_HEAD = "preftune_value_head"  # the submodule's name on the policy (and its checkpoint keys' prefix)
VALUE_HEAD_FILE = "value_head.safetensors"


def attach_value_head(model: Any) -> torch.nn.Module:
    """Add PPO's value head to `model` (a *ForCausalLM): a zero-initialised Linear(hidden, 1) on the
    final hidden state, so V = 0 before training. Its parameters join `model.parameters()`."""
    hidden = model.get_output_embeddings().weight.shape[1]
    device = next(model.parameters()).device
    head = torch.nn.Linear(hidden, 1, device=device, dtype=torch.float32)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model.add_module(VALUE_HEAD, head)
    return head


def value_head(model: Any) -> torch.nn.Module | None:
    """The value head attached to `model`, if any."""
    head = getattr(model, VALUE_HEAD, None)
    return head if isinstance(head, torch.nn.Module) else None


def save_without_value_head(model: Any, save: Any, folder: Path) -> None:
    """Run `save()` (which writes `folder`) with the value head taken off `model`, so the folder is a
    plain causal LM; then write the head to folder/value_head.safetensors."""
    from safetensors.torch import save_file

    head = value_head(model)
    if head is None:
        save()
        return
    delattr(model, VALUE_HEAD)
    try:
        save()
    finally:
        model.add_module(VALUE_HEAD, head)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(folder / VALUE_HEAD_FILE))


def rto_token_rewards(
    dpo_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *, scale: float, clip: float
) -> torch.Tensor:
    """RTO's token rewards (Zhong et al. 2024, §4 practical RTO): clip(s·(log π_dpo − log π_ref), ±c)
    per response token, a DPO model's implicit token reward. Unclipped (c = inf) they sum over a
    response to s·log(π_dpo(y)/π_ref(y)), DPO's implicit reward with β = s. The clip c follows the
    authors' implementation (not stated in the paper's text)."""
    r = (scale * (dpo_logps.float() - ref_logps.float())).clamp(-clip, clip)
    return torch.where(mask.bool(), r, torch.zeros_like(r))


@dataclass
class Credit:
    """A step's PPO credit: `advantages` [N, T] (whitened), `meta` per-token tensors the policy step
    reads (`values`, `returns`), `metrics` for the log."""

    advantages: torch.Tensor
    meta: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TokenCredit:
    """PPO / MA-PPO / RTO credit assignment for a step's rollouts (see the module docstring).

    reference: the frozen initial policy (π_ref of the KL penalty and of RTO's log-ratio).
    macro:     None (token-level PPO) or MA-RLHF's termination `fixed` | `randomized` | `ppl`.
    dpo:       RTO's DPO model π_dpo (None: plain PPO).
    """

    reference: Any
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    macro: str | None = None
    macro_n: int = 5
    pooling: str = "equal"
    dpo: Any = None
    dpo_scale: float = 0.05
    dpo_clip: float = 0.05
    whiten: bool = True

    def to(self, device: Any) -> TokenCredit:
        for model in (self.reference, self.dpo):
            if model is not None:
                model.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self,
        model: Any,
        prompt_ids: list[list[int]],
        out: Rollouts,
        rewards: torch.Tensor,
        seed: int | None,
        step_rewards: torch.Tensor | None = None,
    ) -> Credit:
        """Values, token rewards, GAE advantages and returns of rollouts `out` (rows grouped by prompt).

        `step_rewards` [N, T]: process rewards on the tokens that end each step (a PRM with aggregation
        `steps`, Math-Shepherd's step-by-step PPO); `rewards` holds their row sums too, which move from
        the last token to those tokens (the undiscounted return is unchanged)."""
        n = out.mask.shape[0] // len(prompt_ids)
        examples = [Example(p, c, kind="group") for p, c in zip(prompt_ids, out.grouped(n))]
        mask = out.mask
        policy = self._stats(model, examples, out, n, value=True)
        ref = self._stats(self.reference, examples, out, n)
        kl = torch.where(mask, policy.token_logps - ref.token_logps, torch.zeros_like(policy.token_logps))
        token_rewards = -self.kl_coef * kl
        if self.dpo is not None:
            dpo = self._stats(self.dpo, examples, out, n)
            token_rewards = token_rewards + rto_token_rewards(
                dpo.token_logps, ref.token_logps, mask, scale=self.dpo_scale, clip=self.dpo_clip
            )
        non_score = float(token_rewards.sum(dim=1).mean())
        sequence = rewards.to(torch.float32)
        if step_rewards is not None:
            placed = torch.where(mask, _width(step_rewards, mask.shape[1]), torch.zeros_like(kl))
            token_rewards = token_rewards + placed
            sequence = sequence - placed.sum(dim=1)
        segments = None
        if self.macro is not None:
            gen = torch.Generator().manual_seed(seed or 0)
            segments = macro_segments(
                mask, self.macro, self.macro_n, ref_logps=ref.token_logps, generator=gen
            )
        per_token = place_rewards(sequence, token_rewards, mask)
        values = policy.values
        adv, returns = gae_returns(
            per_token, values, mask, gamma=self.gamma, lam=self.lam, segments=segments, pooling=self.pooling
        )
        whitened = _whiten(adv, mask) if self.whiten else adv
        lengths = mask.sum(dim=1).clamp(min=1)
        metrics = {
            "zero_signal_fraction": zero_signal_fraction(
                rewards, make_groups(out.prompt_index, len(rewards), "ppo")
            ),
            "kl": float((kl.sum(dim=1) / lengths).mean()),
            "non_score_reward": non_score,
            "value": float(values[mask].mean()),
            "returns": float(returns[mask].mean()),
        }
        if segments is not None:
            metrics["macro_length"] = float(mask.sum() / (segments.amax(dim=1) + 1).sum())
        return Credit(whitened, {"values": values, "returns": returns}, metrics)

    def _stats(self, model: Any, examples: list[Example], out: Rollouts, n: int, value: bool = False) -> Any:
        """Per-token log-probs (and the value head's values) of the rollouts, [N, T] like `out.mask`."""
        from preftune.models.logprobs import example_stats

        head = value_head(model) if value else None
        if value and head is None:
            raise ConfigError("PPO needs the policy's value head (rl.ppo.attach_value_head)")
        was_training = model.training
        model.eval()
        try:
            stats = example_stats(
                model, examples, token_logps=True, temperature=out.temperature,
                min_logits=out.grouped_min_logits(n), value_head=head,
            )  # fmt: skip
        finally:
            model.train(was_training)
        width = out.mask.shape[1]
        assert stats.token_logps is not None
        stats.token_logps = _width(stats.token_logps, width)
        if stats.values is not None:
            stats.values = _width(stats.values, width)
        return stats


def _width(x: torch.Tensor, width: int) -> torch.Tensor:
    x = x.detach().float().cpu()
    return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x[:, :width]


def _frozen(model: Any) -> Any:
    model.eval()
    model.requires_grad_(False)
    return model


def token_credit(config: Any, estimator: str) -> TokenCredit | None:
    """The PPO family's credit of `config` (estimator gae), else None: the frozen initial policy as
    π_ref (`model`), RTO's DPO model (`dpo_model`), the macro actions (the method's, or `macro`)."""
    if estimator != "gae":
        return None
    from preftune.models.load import load_causal_lm
    from preftune.online_methods import PRESETS

    reference = _frozen(load_causal_lm(config.model, dtype=config.dtype))
    dpo = _frozen(load_causal_lm(config.dpo_model, dtype=config.dtype)) if config.dpo_model else None
    preset = PRESETS.get(config.method)
    return TokenCredit(
        reference, kl_coef=config.kl_coef if config.kl_coef is not None else preset.kl_coef if preset else 0.05,
        gamma=config.gamma, lam=config.lam,
        macro=config.macro or (preset.macro if preset else None), macro_n=config.macro_n,
        pooling=config.macro_pooling, dpo=dpo, dpo_scale=config.dpo_scale, dpo_clip=config.dpo_clip,
    )  # fmt: skip
