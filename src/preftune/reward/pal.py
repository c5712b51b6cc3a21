"""PAL: personalised reward models from K preference prototypes (Chen et al. 2024, "PAL: Pluralistic
Alignment Framework for Learning from Heterogeneous Preferences").

Each user u has mixture weights w_u = softmax(W_u) over K prototypes; their ideal point is the mixture
of the prototypes, and a response scores by how close it lies to the ideal point in a learned
preference space (the ideal-point model of Coombs 1950):

    PAL-A   a_u     = Σ_k w_uk p_k                 p_k ∈ R^d learned prototype points   (§3, Model A)
    PAL-B   a_u(x)  = Σ_k w_uk g_k(e_x)            g_k learned maps of the prompt         (§3, Model B)
    item    f(e_y)                                  a learned map of the response embedding
    score   s_u(x, y) = τ · cos(f(e_y), a_u)   (`cosine`, τ = exp(learned log-scale) ≤ 100)
            s_u(x, y) = −‖f(e_y) − a_u‖         (`distance`)
    loss    −log σ(s_u(x, y_c) − s_u(x, y_r))   Bradley–Terry on the user's own comparisons

e_x, e_y are fixed embeddings of the prompt and the response (e.g. a frozen trunk's last hidden state,
`embed_texts`; the paper's "fixed LLM" setting). A user seen in training has their own W_u; a new user
is fitted from a few comparisons with everything but their W_u frozen (`fit_new_user`, §3.3:
few-shot localisation). K = 1 is a single Bradley–Terry model shared by everyone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from preftune.errors import ConfigError, DataError


class PALModel(torch.nn.Module):
    """PAL-A (`variant="a"`) or PAL-B (`variant="b"`) over embeddings of dimension `dim`."""

    def __init__(self, dim: int, *, users: int, k: int = 2, pref_dim: int = 16, variant: str = "b",
                 score: str = "cosine", seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if variant not in ("a", "b") or score not in ("cosine", "distance"):
            raise ConfigError(
                f"PAL: variant {variant!r} must be 'a' or 'b', score {score!r} 'cosine' or 'distance'"
            )
        if k < 1 or users < 1:
            raise ConfigError(f"PAL: need k ≥ 1 prototypes and ≥ 1 user, got k={k}, users={users}")
        g = torch.Generator().manual_seed(seed)
        self.variant, self.score_kind, self.k = variant, score, k
        self.item = torch.nn.Linear(dim, pref_dim)
        if variant == "a":
            self.prototypes = torch.nn.Parameter(torch.randn(k, pref_dim, generator=g) / math.sqrt(pref_dim))
        else:
            self.prompt_maps = torch.nn.ModuleList(torch.nn.Linear(dim, pref_dim) for _ in range(k))
        self.user_logits = torch.nn.Parameter(torch.randn(users, k, generator=g))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def mixtures(self, users: torch.Tensor) -> torch.Tensor:
        """w_u = softmax(W_u) [N, K]."""
        return torch.softmax(self.user_logits[users], dim=-1)

    def ideal_points(self, users: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """a_u [N, d] (PAL-A) or a_u(x) [N, d] (PAL-B)."""
        w = self.mixtures(users)
        if self.variant == "a":
            return w @ self.prototypes
        protos = torch.stack([g(prompts) for g in self.prompt_maps], dim=1)  # [N, K, d]
        return (w.unsqueeze(-1) * protos).sum(1)

    def forward(self, users: torch.Tensor, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """s_u(x, y) [N] for user ids [N], prompt and response embeddings [N, dim]."""
        a = self.ideal_points(users, prompts)
        f = self.item(responses)
        if self.score_kind == "distance":
            return -torch.linalg.vector_norm(f - a, dim=-1)
        return self.log_scale.exp().clamp(max=100.0) * F.cosine_similarity(f, a, dim=-1)

    def add_users(self, n: int, seed: int = 0) -> torch.Tensor:
        """Append `n` new users (fresh W rows); returns their ids."""
        g = torch.Generator().manual_seed(seed)
        first = self.user_logits.shape[0]
        new = torch.randn(n, self.k, generator=g).to(self.user_logits)
        self.user_logits = torch.nn.Parameter(torch.cat([self.user_logits.detach(), new]))
        return torch.arange(first, first + n)


@dataclass
class Comparisons:
    """Pairwise comparisons as embeddings: user ids [N], prompt [N, dim], chosen and rejected [N, dim]."""

    users: torch.Tensor
    prompts: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def take(self, index: torch.Tensor) -> Comparisons:
        return Comparisons(self.users[index], self.prompts[index], self.chosen[index], self.rejected[index])


def pal_loss(model: PALModel, data: Comparisons) -> torch.Tensor:
    """Mean Bradley–Terry loss −log σ(s_u(x, y_c) − s_u(x, y_r)) over the comparisons."""
    return -F.logsigmoid(
        model(data.users, data.prompts, data.chosen) - model(data.users, data.prompts, data.rejected)
    ).mean()


@torch.no_grad()
def pal_accuracy(model: PALModel, data: Comparisons) -> float:
    """Fraction of comparisons with s_u(x, y_c) > s_u(x, y_r)."""
    gap = model(data.users, data.prompts, data.chosen) - model(data.users, data.prompts, data.rejected)
    return float((gap > 0).double().mean())


def fit_pal(model: PALModel, data: Comparisons, *, steps: int = 300, lr: float = 0.05, batch_size: int = 256,
            seed: int = 0, only_users: bool = False) -> list[float]:  # fmt: skip
    """Adam on the Bradley–Terry loss (seeded mini-batches); `only_users` trains the mixture logits W
    alone (the rest frozen), as for new users. Returns the loss per step."""
    params = [model.user_logits] if only_users else list(model.parameters())
    frozen = [p for p in model.parameters() if all(p is not q for q in params)]
    before = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for _ in range(steps):
            idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=g)
            loss = pal_loss(model, data.take(idx))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p, flag in zip(frozen, before):
            p.requires_grad_(flag)
    return losses


def fit_new_user(model: PALModel, data: Comparisons, *, steps: int = 200, lr: float = 0.1,
                 seed: int = 0) -> int:  # fmt: skip
    """Add one user and fit only their mixture logits W_u on `data` (its `users` are ignored); every
    other user's W_u and all prototypes stay as they were. Returns the new user's id."""
    (uid,) = model.add_users(1, seed=seed).tolist()
    rows = Comparisons(torch.full_like(data.users, uid), data.prompts, data.chosen, data.rejected)
    keep = model.user_logits.detach()[:uid].clone()
    fit_pal(model, rows, steps=steps, lr=lr, seed=seed, only_users=True)
    with torch.no_grad():  # Adam moves only the rows with a gradient; make the others exact anyway
        model.user_logits[:uid] = keep
    return int(uid)


def user_ids(records: Sequence[dict[str, Any]], path: str = "<records>",
             known: dict[str, int] | None = None) -> tuple[torch.Tensor, dict[str, int]]:  # fmt: skip
    """Integer ids of the records' optional `user` column (text or integer; absent = the shared user
    "") and the name → id table (extended from `known`)."""
    table = dict(known or {})
    ids = []
    for row, rec in enumerate(records, start=1):
        user = rec.get("user", "")
        if isinstance(user, bool) or not isinstance(user, (str, int)):
            raise DataError(f"is {user!r}, expected a user name or number", path=path, row=row, field="user",
                            fix="give each comparison's rater as text or an integer, or leave the column out")  # fmt: skip
        ids.append(table.setdefault(str(user), len(table)))
    return torch.tensor(ids, dtype=torch.long), table


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
                batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Frozen embeddings (e_x, e_y) [N, hidden] float32: a causal LM's (or reward model's) trunk's final
    hidden state at the last prompt token and at the last token of prompt + response (EOS appended,
    as training data is formatted), one padded row per pair."""
    from preftune.models.logprobs import trunk_hidden_states
    from preftune.models.packing import build_padded
    from preftune.tasks.sft import encode

    lm = getattr(model, "module", model)
    backbone = getattr(lm, lm.base_model_prefix)
    device = next(lm.parameters()).device
    e_x, e_y = [], []
    for start in range(0, len(prompts), batch_size):
        pairs = [
            encode(tokenizer, p, r)
            for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])
        ]
        batch = build_padded([p for p, _ in pairs], [[r] for _, r in pairs])
        hidden = trunk_hidden_states(backbone, lm.config, lm.dtype, batch)
        rows = torch.arange(len(pairs), device=device)
        e_x.append(hidden[rows, torch.tensor([len(p) - 1 for p, _ in pairs], device=device)].float())
        e_y.append(hidden[rows, torch.tensor([len(p) + len(r) - 1 for p, r in pairs], device=device)].float())
    return torch.cat(e_x).cpu(), torch.cat(e_y).cpu()


def pal_comparisons(source: str | list[dict[str, Any]], model: Any, tokenizer: Any,
                    known: dict[str, int] | None = None) -> tuple[Comparisons, dict[str, int]]:  # fmt: skip
    """Pairwise records (`prompt`, `chosen`, `rejected`, optional `user`) of a file or list as
    `Comparisons` embedded by the frozen `model` (`embed_texts`), and the user table."""
    from preftune.data.sources import read_source

    data = read_source(source)
    if data.problems:
        p = data.problems[0]
        raise DataError(p.message, path=p.path or data.path, row=p.row, field=p.field, fix=p.fix)
    records = [rec for _, rec in data.rows if rec is not None]
    for row, rec in data.rows:
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance((rec or {}).get(key), str):
                raise DataError("is missing or not text", path=data.path, row=row, field=key,
                                fix="PAL reads text pairs: prompt, chosen, rejected (and an optional user)")  # fmt: skip
    users, table = user_ids(records, data.path, known)
    prompts = [r["prompt"] for r in records]
    e_x, e_c = embed_texts(model, tokenizer, prompts, [r["chosen"] for r in records])
    _, e_r = embed_texts(model, tokenizer, prompts, [r["rejected"] for r in records])
    return Comparisons(users, e_x, e_c, e_r), table


def synthetic_groups(
    n: int, users: int, *, seed: int, dim: int = 8, prompt_dependent: bool = True
) -> Comparisons:
    """A test bed: `n` comparisons by `users` raters in two groups (even / odd ids) with opposite tastes,
    on Gaussian embeddings. Prompt-dependent (PAL-B's case): group 0 prefers the response more aligned
    with R·e_x, group 1 with −R·e_x (R a fixed rotation). Otherwise (PAL-A's case): group 0 prefers the
    response nearer a fixed point v, group 1 nearer −v. A single shared model can do no better than
    chance on the prompt-dependent set."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(123)))[0]
    v = torch.randn(dim, generator=torch.Generator().manual_seed(7))
    u = torch.randint(users, (n,), generator=g)
    sign = (1 - 2 * (u % 2)).float()[:, None]
    x, y1, y2 = (torch.randn(n, dim, generator=g) for _ in range(3))
    if prompt_dependent:
        ideal = sign * (x @ rot.T)
        first = (ideal * y1).sum(-1) > (ideal * y2).sum(-1)
    else:
        first = ((y1 - sign * v) ** 2).sum(-1) < ((y2 - sign * v) ** 2).sum(-1)
    keep = first[:, None]
    return Comparisons(u, x, torch.where(keep, y1, y2), torch.where(keep, y2, y1))
