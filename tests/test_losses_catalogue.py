"""`preftune losses` lists every method `preftune train` takes — online RL presets, distillation,
reward models and online diffusion RL next to the offline losses — and `preftune losses NAME` explains
any of them (a user who types `preftune losses grpo` was told "unknown loss 'grpo' — did you mean
'rpo'?")."""

from __future__ import annotations

import pytest

from preftune import diffusion_methods, losses
from preftune.cli import main
from preftune.losses import catalogue
from preftune.method_checks import DISTILL_METHODS, is_distill
from preftune.online_methods import PRESETS, is_online


def test_the_catalogue_is_every_method_train_dispatches_on():
    by_family: dict[str, set[str]] = {}
    for entry in catalogue.entries():
        by_family.setdefault(entry.family, set()).add(entry.name)
        assert entry.paper and entry.summary, entry
        assert entry.name not in losses.REGISTRY, entry.name  # one name, one method
    assert by_family["online"] == set(PRESETS) and all(map(is_online, by_family["online"]))
    assert by_family["distillation"] == set(DISTILL_METHODS) and all(
        map(is_distill, by_family["distillation"])
    )
    assert by_family["reward_model"] == {"rm", "prm"}
    assert by_family["diffusion_rl"] == set(diffusion_methods.METHODS)
    assert set(by_family) == set(catalogue.FAMILIES)


def test_listing_shows_every_family_with_its_command(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for entry in catalogue.entries():
        assert f" {entry.name} " in out, entry.name
    for _label, title, run, _doc in catalogue.FAMILIES.values():
        assert title in out and run in out
    assert "builder best_worst → dpo" in out  # what online_dpo expands to
    assert "estimator positive_only, objective ppo_clip:1, sampler gvm" in out


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "grpo",
            ["online RL", "--estimator", "GRPO: group-relative reward", "ppo_clip", "eps_high", "--prompts"]
            + ["estimator option", "--scale", "group|batch|none", "--eps", "0.0001"],
        ),
        ("remax", ["--clip", "clip the advantage to [−clip, clip]"]),
        ("reinforce_pp", ["--gamma", "discount of the per-token return"]),
        ("rto", ["PPO option", "--kl-coef  ", "0.01", "--lam", "0.95", "--dpo-clip"]),
        ("reinforce_ada", ["--sampler-args key", "per_round", "balance|pos"]),
        ("dno", ["builder dno", "--margin", "--cut-rejected", "Direct Preference Optimization"]),
        ("ppo", ["estimator gae", "--kl-coef", "0.05", "value"]),
        ("adpa", ["distillation", "--teacher", "log π_dpo(a|s_t) − log π_ref(a|s_t)", "rejected"]),
        ("rm", ["train rm --model", "bt_margin", "Touvron et al. 2023"]),
        ("prm", ["train prm --model", "prm_bce", "pav_mse"]),
        ("ddpo", ["online diffusion RL", "PIPELINE_FOLDER", "--clip-range", "0.0001", "--adv-clip"]),
        ("awm", ["--weighting", "ghuber", "--kl-weight", "0.002"]),
    ],
)
def test_one_method_in_detail(name, expected, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["losses", name]) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, (name, text)
    assert "dpo_norm" not in out  # a method's page, not the whole list


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_an_online_methods_page_lists_every_option_of_its_parts(name, capsys, monkeypatch):
    """`preftune losses NAME` lists the options of the preset's estimator (the PPO family's fields for
    gae, which its credit reads instead) and of its sampler, each with its default, as it lists the
    loss terms' hyper-parameters."""
    from preftune.config_fields import ppo_only_fields
    from preftune.online_methods import preset_sampler
    from preftune.rl import ESTIMATORS, SAMPLERS

    monkeypatch.setenv("COLUMNS", "300")
    assert main(["losses", name]) == 0
    out = capsys.readouterr().out
    preset = PRESETS[name]
    keys = list(ESTIMATORS[preset.estimator].hparams) if preset.estimator else []
    flags = [f"--{k.replace('_', '-')} " for k in (ppo_only_fields() if preset.estimator == "gae" else keys)]
    sampler_keys = [f" {k} " for k in SAMPLERS[preset.sampler].hparams]
    for text in flags + sampler_keys:
        assert text in out, (name, text)
    for key, value in preset_sampler(name, None, None)[1].items():
        assert f" {key} " in out and f" {value} " in out, (name, key)


def test_an_unknown_name_is_matched_against_every_family(capsys):
    assert main(["losses", "grpoo"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'grpo'" in err and "ddpo" in err and "dpo_norm" in err
    assert main(["losses", "aligndistill"]) == 2
    assert "did you mean 'aligndistil'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # a mistyped online preset without --data: the name, not "'data' is required"
        (["train", "grpp", "--model", "m", "--prompts", "p.jsonl", "--out", "o"], "unknown method 'grpp' — did you mean 'grpo'?"),
        (["train", "dpo:1,sfft:0.1", "--model", "m", "--data", "d.jsonl", "--out", "o"], "unknown method 'sfft' — did you mean 'sft'?"),
        (["sweep", "--methods", "dpo,grpp", "--model", "m", "--data", "d.jsonl", "--out", "o"], "unknown method 'grpp' — did you mean 'grpo'?"),
        (["sweep", "--methods", "dpo,adpa", "--model", "m", "--data", "d.jsonl", "--out", "o"], "sweep: 'adpa' (distillation) cannot be swept yet"),
        (["sweep", "--methods", "rm", "--model", "m", "--data", "d.jsonl", "--out", "o"], "sweep: 'rm' (reward model) cannot be swept yet"),
    ],
)  # fmt: skip
def test_an_unknown_method_is_matched_against_every_family(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "unknown method" in message:  # the list names every family's methods, not only the losses
        assert all(name in err for name in ("grpo", "adpa", "ddpo", "dpo"))
