"""The implicit reward model: a causal LM and a frozen reference, scored by their log-likelihood ratio.

Yuan et al. 2024, "Free Process Rewards without Process Labels" (arXiv 2412.01981), §3:

    r_θ(y) = β · log π_θ(y) / π_ref(y) = β · Σ_t log π_θ(y_t | x, y_<t) / π_ref(y_t | x, y_<t)

(the outcome reward's parameterisation), and Proposition 3.1: the partial sum

    q_θ^t = Σ_{i ≤ t} β · log π_θ(y_i | y_<i) / π_ref(y_i | y_<i) = β · log E_{π_ref(y | y_≤t)} e^{r_θ(y)/β}

is the exact Q value of the outcome reward at token t, so the process reward of token t is
r_θ^t = q_θ^t − q_θ^{t−1} = β · log π_θ(y_t | y_<t) / π_ref(y_t | y_<t), and that of step k (tokens
up to e_k) the sum over its tokens, q_θ^{e_k} − q_θ^{e_{k−1}}. The model trained as an outcome RM is
therefore also a PRM (§3). π_ref is a frozen copy of the starting model; the paper's training
objectives, all on r_θ (§3, "the reward can be optimized regardless of the loss"):

    DPO  −log σ(r_θ(y_w) − r_θ(y_l))                 on pairs (Rafailov et al. 2023, eq. 7): `bt` here
    CE   −[l log σ(r_θ(y)) + (1 − l) log(1 − σ(r_θ(y)))]   on outcome labels l ∈ {0, 1}

and, beyond the paper, prm_bce on the partial sums σ(q_θ^{e_k}) against step labels (Math-Shepherd
meaning: the prefix can still be right). The per-sequence sums are DPO's: `sequence_logps` on
prompt-shared packed rows, so a prompt is computed once for all its responses, by both models.

A trained folder (OUT/final) is the policy (`AutoModelForCausalLM.from_pretrained`), its tokenizer,
`implicit.json` (β, the loss, the step separator, the default aggregation, where the reference came
from and its fingerprint) and `reference/`, a copy of π_ref, so the folder is self-contained.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from preftune.errors import ConfigError

IMPLICIT_FILE = "implicit.json"
REFERENCE_DIR = "reference"
STEP_VALUES = ("q", "delta")


def implicit_ce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per response −[l log σ(r) + (1 − l) log(1 − σ(r))], r = r_θ(y) (Yuan et al. 2024, §3, the CE
    instantiation of the implicit PRM's outcome objective; l the response's outcome label)."""
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores), reduction="none")


class ImplicitRM:
    """r_θ(y) = β · log π_θ(y)/π_ref(y) of `policy` against the frozen `reference` (module doc).

    Every method takes prompts [P] (token ids) and branches [P][K_p] (response token ids), flat
    outputs in the order prompt 0 branch 0, prompt 0 branch 1, …; differentiable in the policy only.
    """

    def __init__(self, policy: Any, reference: Any, beta: float) -> None:
        if not beta > 0:
            raise ConfigError(f"implicit reward model: beta is {beta}; give β > 0 (e.g. --beta 0.05)")
        self.policy, self.reference, self.beta = policy, reference, float(beta)

    def token_rewards(self, prompts: list[list[int]], branches: list[list[list[int]]]) -> list[torch.Tensor]:
        """Per response, [T_n] β · (log π_θ(y_t | ·) − log π_ref(y_t | ·)): Proposition 3.1's r_θ^t."""
        from preftune.models.logprobs import sequence_logps

        _, pol = sequence_logps(self.policy, prompts, branches, token_logps=True)  # type: ignore[misc]
        with torch.no_grad():
            _, ref = sequence_logps(self.reference, prompts, branches, token_logps=True)  # type: ignore[misc]
        out: list[torch.Tensor] = []
        for p_rows, r_rows, bs in zip(pol, ref, branches):
            for k, b in enumerate(bs):
                out.append(self.beta * (p_rows[k, : len(b)] - r_rows[k, : len(b)].to(p_rows)))
        return out

    def scores(self, prompts: list[list[int]], branches: list[list[list[int]]]) -> torch.Tensor:
        """[N] r_θ(y) = β · (Σ_t log π_θ − Σ_t log π_ref), the summed per-sequence log-probs of DPO."""
        from preftune.models.logprobs import sequence_logps

        pol = sequence_logps(self.policy, prompts, branches)
        with torch.no_grad():
            ref = sequence_logps(self.reference, prompts, branches)
        if not pol:
            return torch.zeros(0)
        return self.beta * (torch.cat(list(pol)) - torch.cat(list(ref)).to(pol[0]))  # type: ignore[arg-type]

    def step_values(self, prompts: list[list[int]], branches: list[list[list[int]]],
                    ends: list[list[list[int]]], how: str = "q") -> torch.Tensor:  # fmt: skip
        """Flat [total steps] values at step ends (`ends[p][k]`: token indices in branch k's response):
        `q` the partial sum q_θ^{e_k} (Proposition 3.1's Q value of the prefix), `delta` the step's
        own process reward q_θ^{e_k} − q_θ^{e_{k−1}} (q^{e_{−1}} = 0). The deltas of a response whose
        last end is its last token sum to r_θ(y)."""
        if how not in STEP_VALUES:
            raise ConfigError(f"unknown implicit step value '{how}' (known: {', '.join(STEP_VALUES)})")
        rewards = self.token_rewards(prompts, branches)
        flat_ends = [e for es in ends for e in es]
        if len(flat_ends) != len(rewards):
            raise ConfigError(f"step_values: step ends for {len(flat_ends)} responses, {len(rewards)} given")
        out: list[torch.Tensor] = []
        for r, e in zip(rewards, flat_ends):
            if e and (max(e) >= len(r) or min(e) < 0):
                raise ConfigError("step_values: a step end lies outside its response")
            q = r.cumsum(0)[torch.tensor(e, dtype=torch.long, device=r.device)]
            out.append(q if how == "q" else torch.diff(q, prepend=q.new_zeros(1)))
        return torch.cat(out) if out else torch.zeros(0)


def own_ends(tokenizer: Any, steps: Sequence[str], separator: str, ends: list[int]) -> list[int]:
    """Each step's value is read at the last token of its own text, before its separator: after the
    answer line a model expects EOS, not the separator, so the separator's log-ratio there is noise
    the training never saw. `ends` are the separator ends of `encode_steps`."""
    if not separator:
        return list(ends)
    sep = len(tokenizer(separator, add_special_tokens=False)["input_ids"])
    out = []
    for step, end in zip(steps, ends):
        own = len(tokenizer(step, add_special_tokens=False)["input_ids"])
        whole = len(tokenizer(step + separator, add_special_tokens=False)["input_ids"])
        out.append(end - sep if own + sep == whole and own > 0 else end)
    return out


def is_implicit(folder: str | Path) -> bool:
    return (Path(folder) / IMPLICIT_FILE).is_file()


def holds_steps(path: str | None) -> bool:
    """The first record of a JSONL file has a `steps` list (step data / ProcessBench rows)."""
    if not path or not Path(path).is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    from preftune.reward.data_check import looks_like_steps

                    return looks_like_steps(json.loads(line))
                except (ValueError, AttributeError):
                    return False
    return False


def read_settings(folder: str | Path) -> dict[str, Any]:
    """implicit.json of a folder: beta, loss, separator, aggregation, step_value, reference info."""
    path = Path(folder) / IMPLICIT_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: no {IMPLICIT_FILE} — not an implicit reward model folder")
    settings = json.loads(path.read_text(encoding="utf-8"))
    for key in ("beta", "loss"):
        if key not in settings:
            raise ConfigError(f"{path}: field '{key}' is missing; the folder was not written by preftune")
    return {"separator": "\n", "aggregation": "outcome", "step_value": "q", **settings}


def write_folder(final: Path, reference: str | Path, settings: dict[str, Any]) -> None:
    """Complete OUT/final of a trained implicit RM (the policy and tokenizer already there): copy the
    reference into final/reference and write implicit.json naming it, its source and fingerprint."""
    from preftune.models.load import load_causal_lm
    from preftune.models.reference import model_fingerprint

    source = Path(reference)
    ref = load_causal_lm(str(reference))
    target = final / REFERENCE_DIR
    if target.exists():
        shutil.rmtree(target)
    ref.save_pretrained(target)
    info = {**settings, "reference": REFERENCE_DIR,
            "reference_source": str(source.resolve()) if source.exists() else str(reference),
            "reference_fingerprint": model_fingerprint(ref)}  # fmt: skip
    (final / IMPLICIT_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def load_implicit(folder: str | Path, *, dtype: str = "float32") -> tuple[ImplicitRM, dict[str, Any]]:
    """(the `ImplicitRM` of a folder, its settings): the policy from the folder, π_ref from
    folder/reference (checked against the recorded fingerprint); both in eval mode."""
    from preftune.models.load import load_causal_lm
    from preftune.models.reference import model_fingerprint

    settings = read_settings(folder)
    ref_path = Path(folder) / str(settings.get("reference", REFERENCE_DIR))
    if not (ref_path / "config.json").is_file():
        raise ConfigError(
            f"{folder}: its reference model {ref_path} is missing — copy the folder whole (the policy "
            f"and reference/ together); it was made from {settings.get('reference_source', '?')}"
        )
    policy, ref = load_causal_lm(str(folder), dtype=dtype), load_causal_lm(str(ref_path), dtype=dtype)
    want = settings.get("reference_fingerprint")
    if dtype == "float32" and want and model_fingerprint(ref) != want:
        raise ConfigError(f"{ref_path}: its weights differ from the reference the model was trained against")
    for m in (policy, ref):
        m.eval()
        m.requires_grad_(False)
    return ImplicitRM(policy, ref, float(settings["beta"])), settings
