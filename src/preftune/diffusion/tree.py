"""DTS / DTS*: Diffusion Tree Sampling and Search (Jain et al. NeurIPS 2025, arXiv 2506.20701)
(Python API).

The reverse chain x_K → … → x_0 is a tree whose root is the initial noise and whose edges are draws of
the base sampler p_θ(x_{k+1} | x_k). Each iteration walks down from the root, adds one new child
where a node has fewer than `branching` children, completes it to a final sample with the base
sampler (a rollout), scores r(x_0), and backs the value up with the soft Bellman equation

    V(x) = (1/λ) log E_{x' ~ p_θ(·|x)} exp(λ V(x')),   V(x_0) = r(x_0),

estimated by the mean over the node's children (they are p_θ draws). Walking down:

- DTS (`mode="sample"`) picks a child with probability ∝ exp(λ V̂(child)); the final sample is one
  more such walk to a leaf and that leaf's completed sample. As the tree grows this samples the
  tilted distribution p_θ(x_0) exp(λ r(x_0)) / Z (the paper's asymptotic exactness).
- DTS* (`mode="search"`) picks by UCT, V̂ + c √(log N_parent / N_child), and returns the best final
  sample found (search for the reward's maximum, not sampling).

`step(x, k) → x'` is one stochastic step of the base sampler from depth k (k = 0 at the root; a
chain has `num_steps` steps); `policy_step(unet, policy, cond)` builds it from the DDIM policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from preftune.errors import ConfigError

if TYPE_CHECKING:
    from preftune.diffusion.policy import StochasticPolicy

__all__ = ["TreeResult", "policy_step", "tree_sample"]

Step = Callable[[torch.Tensor, int], torch.Tensor]
Reward = Callable[[torch.Tensor], torch.Tensor]
MODES = ("sample", "search")


@dataclass
class _Node:
    x: torch.Tensor
    depth: int
    parent: _Node | None = None
    children: list[_Node] = field(default_factory=list)
    value: float = 0.0
    visits: int = 0
    final: torch.Tensor | None = None


@dataclass
class TreeResult:
    """The returned final sample [1, …] and its reward, the best sample seen, and every rollout's
    reward in order (one per iteration)."""

    sample: torch.Tensor
    reward: float
    best: torch.Tensor
    best_reward: float
    rewards: list[float]
    root: Any = None

    def draw(self, lam: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Another DTS walk down the finished tree (a fresh sample of the tree's distribution)."""
        return _descend(self.root, lam, generator).final  # type: ignore[return-value]


def _soft_value(values: list[float], lam: float) -> float:
    """(1/λ) log mean exp(λ v) computed stably."""
    top = max(values)
    return top + math.log(sum(math.exp(lam * (v - top)) for v in values) / len(values)) / lam


def _boltzmann(node: _Node, lam: float, generator: torch.Generator | None) -> _Node:
    logits = torch.tensor([lam * c.value for c in node.children], dtype=torch.float64)
    return node.children[int(torch.multinomial(logits.softmax(0), 1, generator=generator))]


def _uct(node: _Node, exploration: float) -> _Node:
    log_n = math.log(max(node.visits, 1))
    return max(node.children, key=lambda c: c.value + exploration * math.sqrt(log_n / max(c.visits, 1)))


def _descend(node: _Node, lam: float, generator: torch.Generator | None) -> _Node:
    while node.children:
        node = _boltzmann(node, lam, generator)
    return node


def _rollout(step: Step, x: torch.Tensor, depth: int, num_steps: int) -> torch.Tensor:
    for k in range(depth, num_steps):
        x = step(x, k)
    return x


def tree_sample(
    step: Step,
    reward: Reward,
    root: torch.Tensor,
    num_steps: int,
    *,
    iterations: int = 64,
    lam: float = 1.0,
    branching: int = 4,
    mode: str = "sample",
    exploration: float = 1.0,
    generator: torch.Generator | None = None,
) -> TreeResult:
    """Grow the tree from `root` [1, …] for `iterations` rollouts (module docstring) and return the
    DTS sample (`mode="sample"`) or the DTS* best sample (`mode="search"`)."""
    if mode not in MODES:
        raise ConfigError(f"tree mode '{mode}' is unknown; valid: {', '.join(MODES)}")
    if iterations < 1 or branching < 1 or lam <= 0:
        raise ConfigError("tree_sample needs iterations >= 1, branching >= 1 and lam > 0")
    top = _Node(root, 0)
    best, best_r, seen = root, -math.inf, []
    for _ in range(iterations):
        node = top
        while node.depth < num_steps and len(node.children) >= branching:
            node = _boltzmann(node, lam, generator) if mode == "sample" else _uct(node, exploration)
        if node.depth < num_steps:
            child = _Node(step(node.x, node.depth), node.depth + 1, node)
            node.children.append(child)
            node = child
        final = _rollout(step, node.x, node.depth, num_steps)
        r = float(reward(final).reshape(-1)[0])
        seen.append(r)
        if r > best_r:
            best, best_r = final, r
        node.final, node.value, node.visits = final, r, node.visits + 1
        up = node.parent
        while up is not None:
            up.value, up.visits = _soft_value([c.value for c in up.children], lam), up.visits + 1
            up = up.parent
    if mode == "search":
        return TreeResult(best, best_r, best, best_r, seen, top)
    leaf = _descend(top, lam, generator)
    assert leaf.final is not None
    return TreeResult(leaf.final, float(reward(leaf.final).reshape(-1)[0]), best, best_r, seen, top)


def policy_step(
    unet: Any, policy: StochasticPolicy, cond: torch.Tensor, generator: torch.Generator | None = None
) -> Step:
    """One DDIM-policy step x_k → x_{k+1} ~ N(μ_θ, σ_k² I) under `cond` [1, L, D], as a tree `step`."""

    @torch.no_grad()
    def step(x: torch.Tensor, k: int) -> torch.Tensor:
        mean, std = policy.mean_std(policy.predict(unet, x, k, cond), x, k)
        return mean + std * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)

    return step
