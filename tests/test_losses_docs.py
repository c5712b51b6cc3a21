"""docs/methods.md is generated from the registry; the `preftune losses` command lists it."""

from __future__ import annotations

from pathlib import Path

from preftune import losses
from preftune.cli import main
from preftune.losses import catalogue
from preftune.losses.docs import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_methods_md_is_the_generated_text():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/methods.md is stale: run `python -m preftune.losses.docs > docs/methods.md`"
    )


def test_every_method_and_hparam_is_documented():
    text = render()
    for name, spec in losses.REGISTRY.items():
        assert f"## `{name}`" in text
        for key in spec.hparams:
            assert f"| `{key}` |" in text


def test_losses_cli_lists_every_method(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in losses.REGISTRY:
        assert name in out
    assert "epsilon=0.1" in out  # cdpo's hyper-parameters with defaults
    assert "not verified" not in out and "Eq." not in out  # notes stay on the method's page
    assert main(["losses", "ipo"]) == 0
    assert "token_mean" in capsys.readouterr().out
    assert main(["losses", "dpoo"]) == 2
    assert "did you mean 'dpo'" in capsys.readouterr().err


def test_losses_table_fits_80_columns_and_compact_view(capsys, monkeypatch):
    """At 80 columns no hyper-parameter name is cut inside; --compact gives one plain line per
    method (name, data kind, reference, every hyper-parameter with its default)."""
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "desensitise_reference=true" in out and "divergence=reverse_kl" in out
    assert main(["losses", "--compact"]) == 0
    lines = capsys.readouterr().out.splitlines()
    others = len(catalogue.entries())  # online RL, distillation, reward models, online diffusion RL
    assert len(lines) == len(losses.REGISTRY) + 2 + others and max(len(line) for line in lines) <= 80
    cdpo = next(line for line in lines if line.startswith("cdpo "))
    assert cdpo.split() == ["cdpo", "pairwise", "yes", "beta=0.1,", "epsilon=0.1"]


def test_a_literal_bar_in_a_formula_renders_as_a_bar(capsys, monkeypatch):
    """SimPO's β·logp/|y| was printed as β·logp//y/: table cells escape `|` instead of replacing it."""
    assert "β·logp/\\|y\\|" in render()
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["losses", "simpo"]) == 0
    out = capsys.readouterr().out
    assert "β·logp/|y|" in out and "//y/" not in out


def test_trl_loss_type_table_names_registered_methods():
    """docs/methods.md maps every TRL 1.16 DPO loss_type to a registered method."""
    from preftune.losses.docs import TRL_LOSS_TYPES

    text = render()
    assert "## TRL loss_type → preftune method" in text
    trl_1_16 = (
        "sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot aot_unpaired apo_zero apo_down"
    )
    mapped = {trl: ours for trl, ours, _ in TRL_LOSS_TYPES}
    for loss_type in trl_1_16.split() + ["discopop", "sft", "sigmoid_norm"]:
        assert loss_type in mapped, loss_type
    for _, ours, _ in TRL_LOSS_TYPES:
        assert ours in losses.REGISTRY, ours
        assert f"[`{ours}`](#{ours})" in text
