"""Generate docs/methods.md from the registry: `python -m preftune.losses.docs > docs/methods.md`.

The page is never edited by hand; tests/test_losses_docs.py fails when it is stale.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from preftune.losses.registry import REGISTRY, WPO_NAME, HParam, LossSpec

HEADER = """# Methods

Every registered loss of `preftune.losses`, generated from the registry by
`python -m preftune.losses.docs > docs/methods.md` — do not edit by hand.
Notation (docs/algorithms.md): ρ = logp_θ − logp_ref, h = ρ_w − ρ_l, ℓ = logp_θ/|y|.
Losses are per example; the trainer divides their sum by the global example count
(`reduction: example`) or the global token count (`reduction: token`).
Combine terms with an objective such as `dpo:1.0,sft:0.2`. Every pairwise method also takes
`wpo_weighting` (WPO: each pair's loss weighted by the policy's length-normalised probabilities of
its two responses, detached; Zhou et al. 2024, without the paper's weight alignment).
"""


def default_text(hp: HParam) -> str:
    """A hyper-parameter's default as the docs and `train METHOD --help` write it (`value_text`)."""
    return value_text(hp.default)


def value_text(value: Any) -> str:
    """A hyper-parameter's value as the docs write it: `0.1`, `true`, `(1, 2)`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" for v in value) + ")" if value else "()"
    return f"{value:g}" if isinstance(value, float) else str(value)


def hparam_summary(spec: LossSpec) -> str:
    """`beta=0.1, epsilon=0.1` — names and defaults, for tables (without the options every loss of a
    kind takes, such as `wpo_weighting`: the header says so)."""
    return ", ".join(f"{k}={default_text(hp)}" for k, hp in spec.hparams.items() if k != WPO_NAME) or "—"


def cell(text: str) -> str:
    """`text` for a Markdown table cell: a literal `|` (as in |y|) escaped, not turned into another sign."""
    return text.replace("|", "\\|")


def short_paper(spec: LossSpec) -> str:
    """The paper's authors and year (the text before the first comma), for narrow tables."""
    return spec.paper.split(",")[0]


def needs(spec: LossSpec) -> list[str]:
    out = ["reference model" if spec.needs_reference else "no reference"]
    if spec.needs_token_logps:
        out.append("per-token log-probs")
    if spec.needs_mismatched:
        out.append("a mismatched completion per example")
    if spec.stateful:
        out.append("running state (checkpointed)")
    return out


def method_section(spec: LossSpec) -> str:
    doc = inspect.cleandoc(spec.fn.__doc__ or "")
    lines = [
        f"## `{spec.name}`",
        "",
        f"- **data**: {spec.kind}; **needs**: {', '.join(needs(spec))}; **reduction**: {spec.reduction}",
        f"- **paper**: {spec.paper}",
        f"- **equation**: {spec.equation}",
        "",
    ]
    if spec.hparams:
        lines += ["| hyper-parameter | default | valid | meaning |", "|---|---|---|---|"]
        for key, hp in spec.hparams.items():
            lines.append(f"| `{key}` | {default_text(hp)} | {cell(hp.range_text())} | {cell(hp.doc)} |")
        lines.append("")
    lines += [doc, ""]
    return "\n".join(lines)


def transforms_section() -> str:
    """The data transforms (not losses) that build training data for some methods."""
    from preftune.data import transforms

    parts = [
        "## Data transforms",
        "",
        "Not losses: functions of `preftune.data.transforms` that turn raw records into new records "
        "(feed the result to `prepare_examples`).",
        "",
    ]
    for fn in (transforms.reward_augmented_pairs, transforms.curry_stages, transforms.step_dpo_pairs):
        parts += [f"### `{fn.__name__}`", "", inspect.cleandoc(fn.__doc__ or ""), ""]
    return "\n".join(parts)


# TRL 1.16 option → (preftune method, how its parameters map). Checked against TRL 1.16's
# trl/trainer/dpo_trainer.py and dpo_config.py, and trl/experimental/{cpo,orpo}; tests check that
# every method named here is registered.
TRL_LOSS_TYPES: list[tuple[str, str, str]] = [
    ("sigmoid", "dpo", ""),
    ("hinge", "hinge", ""),
    ("ipo", "ipo", "token_mean=true (TRL's per-token normalisation)"),
    ("exo_pair", "exo_pair", "label_smoothing → epsilon"),
    ("nca_pair", "nca_pair", ""),
    ("robust", "rdpo", "label_smoothing → epsilon"),
    ("bco_pair", "bco", "running_delta=false (TRL keeps no running δ)"),
    ("sppo_hard", "sppo_hard", ""),
    ("aot", "aot", "label_smoothing → epsilon; sorted per micro-batch"),
    ("aot_unpaired", "aot_unpaired", "label_smoothing → epsilon; sorted per micro-batch"),
    ("apo_zero", "apo_zero", ""),
    ("apo_down", "apo_down", ""),
    ("discopop", "discopop", "discopop_tau → tau"),
    ("sft", "sft", "a term: loss_type [sigmoid, sft] with loss_weights [1, λ] is `dpo:1,sft:λ`"),
    ("sigmoid_norm", "dpo_norm", ""),
    (
        "f_divergence_type",
        "fdpo",
        "divergence: forward_kl, js_divergence → js, alpha_divergence → alpha with "
        "α = 1 − f_alpha_divergence_coef",
    ),
    ("ld_alpha", "ld_dpo", "ld_alpha → alpha (reference desensitised too, as TRL 1.16)"),
    ("use_weighting", "dpo", "wpo_weighting=true on any pairwise method (without WPO's weight alignment)"),
    (
        "CPO: sigmoid, cpo_alpha",
        "cpo",
        "cpo_alpha (TRL's NLL is a batch token mean: `cpo:1,sft:A`, cpo_alpha=0)",
    ),
    ("CPO: simpo, simpo_gamma", "simpo", "simpo_gamma → gamma (with cpo_alpha=0)"),
    ("CPO: alphapo, alpha", "alphapo", "alpha, simpo_gamma → gamma"),
    ("ORPO", "orpo", "beta → odds_ratio_weight"),
    ("KTO: kto", "kto", "z₀ over the global batch"),
]


def trl_section() -> str:
    """The table "TRL loss_type → preftune method"."""
    rows = ["## TRL loss_type → preftune method", ""]
    rows.append("TRL 1.16's DPO `loss_type` values and options, and its CPO, ORPO and KTO trainers:")
    rows += ["", "| TRL | preftune | parameters |", "|---|---|---|"]
    for trl, ours, note in TRL_LOSS_TYPES:
        rows.append(f"| `{trl}` | [`{ours}`](#{ours}) | {cell(note) or '—'} |")
    return "\n".join(rows) + "\n"


def render() -> str:
    """The whole docs/methods.md text."""
    specs = [REGISTRY[name] for name in sorted(REGISTRY)]
    table = ["| method | data | reference | hyper-parameters | paper |", "|---|---|---|---|---|"]
    for spec in specs:
        table.append(
            f"| [`{spec.name}`](#{spec.name}) | {spec.kind} | {'yes' if spec.needs_reference else 'no'} "
            f"| {cell(hparam_summary(spec))} | {cell(spec.paper)} |"
        )
    body = "\n".join(method_section(s) for s in specs)
    head = f"{HEADER}\n" + "\n".join(table) + "\n\n" + trl_section() + "\n"
    return head + body + "\n" + transforms_section().rstrip() + "\n"


def main() -> int:
    import preftune.losses  # noqa: F401  (registers every loss)

    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
