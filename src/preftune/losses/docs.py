"""Generate docs/methods.md from the registry: `python -m preftune.losses.docs > docs/methods.md`.

The page is never edited by hand; tests/test_losses_docs.py fails when it is stale.
"""

from __future__ import annotations

import inspect
import sys

from preftune.losses.registry import REGISTRY, HParam, LossSpec

HEADER = """# Methods

Every registered loss of `preftune.losses`, generated from the registry by
`python -m preftune.losses.docs > docs/methods.md` — do not edit by hand.
Notation (docs/algorithms.md): ρ = logp_θ − logp_ref, h = ρ_w − ρ_l, ℓ = logp_θ/|y|.
Losses are per example; the trainer divides their sum by the global example count
(`reduction: example`) or the global token count (`reduction: token`).
Combine terms with an objective such as `dpo:1.0,sft:0.2`.
"""


def _default(hp: HParam) -> str:
    value = hp.default
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" for v in value) + ")" if value else "()"
    return f"{value:g}" if isinstance(value, float) else str(value)


def hparam_summary(spec: LossSpec) -> str:
    """`beta=0.1, epsilon=0.1` — names and defaults, for tables."""
    return ", ".join(f"{k}={_default(hp)}" for k, hp in spec.hparams.items()) or "—"


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
            lines.append(f"| `{key}` | {_default(hp)} | {cell(hp.range_text())} | {cell(hp.doc)} |")
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
    return f"{HEADER}\n" + "\n".join(table) + "\n\n" + body + "\n" + transforms_section().rstrip() + "\n"


def main() -> int:
    import preftune.losses  # noqa: F401  (registers every loss)

    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
