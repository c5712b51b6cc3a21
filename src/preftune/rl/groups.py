"""Per-prompt (group) statistics of a flat batch of samples: the arithmetic every estimator shares.

A batch is `rewards` [N] (one scalar per sampled completion) and `groups` [N] (each sample's prompt
index). Groups may have different sizes and their indices need not be contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.errors import ConfigError


@dataclass(frozen=True)
class Groups:
    """`index` [N] maps each sample to 0..P-1 (P distinct prompts, in order of first index value);
    `ids` [P] are the original prompt indices; `count` [P] float samples per prompt."""

    index: torch.Tensor
    ids: torch.Tensor
    count: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """[P] per-group sums of a per-sample tensor [N]."""
        return x.new_zeros(self.size).index_add(0, self.index, x)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """[P] per-group means of [N]."""
        return self.sum(x) / self.count.to(x.dtype)

    def std(self, x: torch.Tensor) -> torch.Tensor:
        """[P] per-group unbiased standard deviation (divides by G − 1); 0 for a group of one."""
        centred = x - self.mean(x)[self.index]
        dof = (self.count.to(x.dtype) - 1).clamp(min=1)
        return (self.sum(centred * centred) / dof).sqrt()

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """[P] max − min of each group (0 exactly when all its values are equal)."""
        big = torch.full((self.size,), float("-inf"), dtype=x.dtype, device=x.device)
        small = torch.full((self.size,), float("inf"), dtype=x.dtype, device=x.device)
        high = big.scatter_reduce(0, self.index, x, reduce="amax")
        low = small.scatter_reduce(0, self.index, x, reduce="amin")
        return high - low


def make_groups(groups: torch.Tensor, n: int, where: str) -> Groups:
    """Check `groups` (1-D integer tensor of length n) and compact its values to 0..P-1."""
    if not isinstance(groups, torch.Tensor) or groups.dim() != 1 or groups.numel() != n:
        shape = tuple(groups.shape) if isinstance(groups, torch.Tensor) else type(groups).__name__
        raise ConfigError(
            f"{where}: groups must be a 1-D tensor with one prompt index per sample ({n}), got {shape}"
        )
    if groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ConfigError(f"{where}: groups must hold integer prompt indices, got dtype {groups.dtype}")
    ids, index = torch.unique(groups, return_inverse=True)
    count = torch.bincount(index, minlength=int(ids.numel()))
    return Groups(index=index, ids=ids, count=count)


def check_rewards(rewards: torch.Tensor, where: str, *, columns: bool = False) -> torch.Tensor:
    """`rewards` as a floating tensor; ConfigError unless 1-D (or 2-D with `columns`) and finite."""
    if not isinstance(rewards, torch.Tensor):
        raise ConfigError(f"{where}: rewards must be a tensor, got {type(rewards).__name__}")
    ok_dims = (1, 2) if columns else (1,)
    if rewards.dim() not in ok_dims or rewards.numel() == 0:
        raise ConfigError(
            f"{where}: rewards must be a non-empty 1-D tensor (one reward per sample), "
            f"got shape {tuple(rewards.shape)}"
        )
    if not rewards.dtype.is_floating_point:
        rewards = rewards.double()
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        first = int(bad.reshape(rewards.shape[0], -1).any(dim=1).nonzero()[0])
        row = rewards.reshape(rewards.shape[0], -1)[first].tolist()
        value = row[0] if len(row) == 1 else row
        raise ConfigError(f"{where}: reward of sample {first} is {value}; rewards must be finite")
    return rewards


def zero_signal_fraction(rewards: torch.Tensor, groups: Groups) -> float:
    """Fraction of groups whose rewards are all equal: their group-relative advantages are 0, so
    they give no gradient (DAPO's dynamic sampling drops them, Yu et al. 2025 §3.2)."""
    columns = rewards[:, None] if rewards.dim() == 1 else rewards
    flat = torch.stack([groups.spread(c) == 0 for c in columns.unbind(dim=1)]).all(dim=0)
    return float(flat.float().mean())


def zero_advantage_fraction(advantages: torch.Tensor, groups: Groups) -> float:
    """Fraction of groups whose advantages are all 0: the zero-signal fraction of an estimator whose
    baseline is not the group's own rewards (ReMax: a group whose samples all score as its greedy
    response gives no gradient, and a group of equal rewards unlike the greedy one does)."""
    rows = advantages.reshape(advantages.shape[0], -1).abs().amax(dim=1)
    return float((groups.sum(rows) == 0).float().mean())
