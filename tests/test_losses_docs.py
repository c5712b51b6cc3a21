"""docs/methods.md is generated from the registry; the `preftune losses` command lists it."""

from __future__ import annotations

from pathlib import Path

from preftune import losses
from preftune.cli import main
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
    assert "beta=0.1, epsilon=0.1" in out  # cdpo's hyper-parameters with defaults
    assert main(["losses", "ipo"]) == 0
    assert "token_mean" in capsys.readouterr().out
    assert main(["losses", "dpoo"]) == 2
    assert "did you mean 'dpo'" in capsys.readouterr().err
