"""TrainConfig: YAML + CLI precedence, validation before any model loads, loss hyper-parameter routing,
and the learning-rate schedule (hand-derived values). No model is built here."""

from __future__ import annotations

from pathlib import Path

import pytest

from preftune.cli import build_parser
from preftune.config import TrainConfig, load_config, validate
from preftune.errors import ConfigError
from preftune.train.commands import overrides_from_args
from preftune.train.optim import lr_factor

BASE = {"model": "m", "data": "d.jsonl", "out": "o"}


def cfg(**kw: object) -> TrainConfig:
    return load_config(None, {**BASE, **kw})


def test_yaml_then_cli_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("method: ipo\nmodel: m\ndata: d\nout: o\nlr: 1e-5\nbeta: 0.3\nbatch_size: 16\n")
    args = build_parser().parse_args(["train", "--config", str(y), "--lr", "2e-5", "--beta", "0.5"])
    c = load_config(args.config, overrides_from_args(args))
    assert (c.method, c.lr, c.batch_size) == ("ipo", 2e-5, 16)  # YAML kept, CLI wins
    assert c.hparams == {"beta": "0.5"}
    [(spec, weight, hp)] = validate(c)
    assert (spec.name, weight, hp["beta"]) == ("ipo", 1.0, 0.5)  # coerced by the loss spec


def test_positional_method_and_any_key_on_the_command_line() -> None:
    args = build_parser().parse_args(
        [
            "train",
            "dpo:1.0,sft:0.2",
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            "--max-steps",
            "3",
            "--sft.weight_not_a_key",
            "1",
            "--no-progress",
            "--resume",
        ]
    )
    values = overrides_from_args(args)
    assert values["method"] == "dpo:1.0,sft:0.2"
    assert values["max_steps"] == "3" and values["progress"] is False and values["resume"] == "latest"
    c = load_config(None, values)
    assert c.max_steps == 3
    with pytest.raises(ConfigError, match="sft"):
        validate(c)  # the sft term has no such hyper-parameter


def test_help_lists_fields_and_loss_hparams(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--max-steps", "--micro-batch-size", "--ref-sync-every", "--beta", "--gamma", "--resume"):
        assert flag in text
    assert "Peak learning rate" in text  # the field's help string


def test_objective_routes_flat_and_dotted_hparams() -> None:
    terms = validate(cfg(method="dpo:1.0,sft:0.2", hparams={"beta": 0.25}))
    assert [(s.name, w) for s, w, _ in terms] == [("dpo", 1.0), ("sft", 0.2)]
    assert terms[0][2] == {"beta": 0.25, "wpo_weighting": False} and terms[1][2] == {}
    terms = validate(cfg(method="cdpo", hparams={"cdpo.beta": 0.4}))
    assert terms[0][2]["beta"] == 0.4


def _parsed(*argv: str) -> TrainConfig:
    args = build_parser().parse_args(["train", *argv, *"--model m --data d.jsonl --out o".split()])
    return load_config(None, overrides_from_args(args))


def test_one_terms_value_given_twice_differently_is_refused_naming_both() -> None:
    """`--dpo.beta 0.2 --beta 0.1` set one value twice (the dotted one won silently): refused naming
    both flags, for one term, a weighted sum and ORPO's β (TRL's name of odds_ratio_weight); the same
    value twice is fine, and so is a flat key beside a TERM.KEY of another name, or beside a TERM.KEY
    of a term it shares with others (`--beta 0.2 --ipo.beta 0.3` on dpo:1,ipo:1: ipo's own β)."""
    for method in ("dpo", "dpo:1,sft:0.2"):
        with pytest.raises(ConfigError) as err:
            validate(_parsed(method, "--dpo.beta", "0.2", "--beta", "0.1"))
        assert str(err.value).startswith("--beta 0.1 and --dpo.beta 0.2 both set dpo's beta — give one")
        assert validate(_parsed(method, "--dpo.beta", "0.2", "--beta", "0.2"))[0][2]["beta"] == 0.2
    with pytest.raises(
        ConfigError, match="^--beta 0.2 and --odds-ratio-weight 0.3 both set orpo's odds_ratio"
    ):
        validate(cfg(method="orpo", hparams={"beta": 0.2, "odds_ratio_weight": 0.3}))
    terms = validate(cfg(method="dpo:1,ipo:1", hparams={"beta": 0.2, "ipo.token_mean": False}))
    assert terms[0][2]["beta"] == terms[1][2]["beta"] == 0.2 and terms[1][2]["token_mean"] is False
    # a flat key two terms share, and TERM.KEY for one of them: that term's own value, the other the flat
    terms = validate(cfg(method="dpo:1,ipo:1", hparams={"beta": 0.2, "ipo.beta": 0.3}))
    assert terms[0][2]["beta"] == 0.2 and terms[1][2]["beta"] == 0.3


def test_gamma_reaches_simpo_and_alphapo_not_the_unused_discount(tmp_path: Path) -> None:
    """`gamma` is both a config field (the PPO family's discount) and SimPO's / AlphaPO's margin γ:
    given to an offline method with a γ term — flag, YAML key or Python override — it sets that γ;
    to an offline method without one it is refused, not silently dropped; PPO keeps its discount."""
    for method in ("simpo", "alphapo"):
        c = cfg(method=method, gamma=0.3)
        assert validate(c)[0][2]["gamma"] == 0.3 and c.gamma == 1.0
    args = build_parser().parse_args(
        ["train", "simpo", *"--model m --data d.jsonl --out o --gamma 1.6".split()]
    )
    assert (
        validate(load_config(None, overrides_from_args(args)))[0][2]["gamma"] == 1.6
    )  # SimPO's γ may exceed 1
    example = Path(__file__).parent.parent / "examples" / "simpo.yaml"  # `gamma: 0.5` in the file
    assert validate(load_config(example, BASE))[0][2]["gamma"] == 0.5
    assert validate(cfg(method="simpo", hparams={"simpo.gamma": 0.7}))[0][2]["gamma"] == 0.7
    with pytest.raises(ConfigError, match="no term of 'dpo' has a γ"):
        validate(cfg(gamma=0.3))
    ppo = load_config(
        None,
        {
            "method": "ppo",
            "model": "m",
            "prompts": "p.jsonl",
            "reward": "arithmetic",
            "out": "o",
            "gamma": 0.9,
        },
    )
    assert ppo.gamma == 0.9 and "gamma" not in ppo.hparams


@pytest.mark.parametrize("method", ["dpo", "dpo:1.0,sft:0.2"])
def test_config_yaml_records_every_option_and_resumes_alike(tmp_path: Path, method: str) -> None:
    """OUT/config.yaml holds every hyper-parameter of every term, defaults included (dpo's
    wpo_weighting was left out); it loads back, and a resume from the command line (which gives
    none) or from a config.yaml written before (without wpo_weighting) sees no change."""
    from preftune.train.runfolder import config_changes, save_config_atomic

    given = cfg(method=method)
    save_config_atomic(given, tmp_path / "config.yaml")
    recorded = load_config(tmp_path / "config.yaml")
    key = "" if method == "dpo" else "dpo."
    assert recorded.hparams == {f"{key}beta": 0.1, f"{key}wpo_weighting": False}
    older = cfg(method=method, hparams={f"{key}beta": 0.1})
    assert config_changes(recorded, given) == [] and config_changes(older, recorded) == []
    changed = cfg(method=method, hparams={"wpo_weighting": True})
    assert config_changes(recorded, changed) == [("dpo.wpo_weighting", False, True)]


@pytest.mark.parametrize(
    "values",
    [
        {"temperature": 0.5}, {"num_generations": 4, "top_k": 5}, {"kl_coef": 0.1}, {"value_lr": 1e-3},
        {"sampler_args": {"pool": 2}}, {"lam": 0.5}, {"macro_n": 3}, {"dpo_scale": 0.3}, {"prompts": "p.jsonl"},
    ],
)  # fmt: skip
def test_online_fields_on_an_offline_method_are_refused_not_ignored(values: dict[str, object]) -> None:
    """Every field only online methods read, given to dpo (or a distillation method), names itself."""
    flags = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(values))
    for method in ("dpo", "dckd"):
        extra = {"teacher": "t"} if method == "dckd" else {}
        with pytest.raises(ConfigError, match=f"^{flags}: for the online methods .* not '{method}'"):
            validate(cfg(method=method, **extra, **values))
    with pytest.raises(ConfigError, match=r"the preference pairs are --data"):
        validate(load_config(None, {"method": "dpo", "model": "m", "out": "o", "prompts": "p.jsonl"}))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"betta": 0.1}, "did you mean 'beta'"),
        ({"lerning_rate": 1}, "unknown option 'lerning_rate'"),
        ({"max_step": 3}, "did you mean 'max_steps'"),
        ({"lr": -1}, "'lr' = -1.0 must be >"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"scheduler": "cosin"}, "did you mean 'cosine'"),
        ({"beta": -0.1}, "beta"),
        ({"batch_size": "eight"}, "not an integer"),
        ({"method": "dpoo"}, "did you mean 'dpo'"),
        ({"reference": "none"}, "needs a reference"),
        ({"reference": "adapter"}, "needs lora=true"),
        ({"ref_sync_every": 4, "reference": "cache"}, "reference='model'"),
        ({"method": "simpo", "ref_model": "x"}, "reference-free"),
        ({"optimizer": "adamm"}, "did you mean 'adam"),
        ({"report_to": ["tensorbord"]}, "did you mean 'tensorboard'"),
        ({"eval_every": 5}, "needs eval_data"),
        ({"apo_alpha": 0.3}, "rounds"),
        ({"model": ""}, "'model' is required"),
    ],
)
def test_validation_errors(values: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(cfg(**values))


def test_tr_dpo_resolves_to_model_reference() -> None:
    from preftune.config import reference_strategy

    c = cfg(ref_sync_every=4)
    validate(c)
    assert reference_strategy(c, True) == "model"
    assert reference_strategy(cfg(), True) == "cache"
    assert reference_strategy(cfg(method="simpo"), False) == "none"


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    y = tmp_path / "bad.yaml"
    y.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(y)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_lr_schedule_hand_values() -> None:
    # warmup 2 of 10 steps: (s+1)/2 during warmup, then p = (s − 2)/8.
    lin = [lr_factor(s, total=10, warmup=2, kind="linear") for s in range(10)]
    assert lin[:3] == [0.5, 1.0, 1.0]
    assert lin[6] == pytest.approx(0.5)  # p = 4/8
    cos = lr_factor(6, total=10, warmup=2, kind="cosine")
    assert cos == pytest.approx(0.5)  # (1 + cos(π/2)) / 2
    assert lr_factor(10, total=10, warmup=2, kind="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(9, total=10, warmup=0, kind="constant") == 1.0


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parent.parent.glob("examples/*.yaml")), ids=lambda p: p.name
)
def test_example_configs_validate(path: Path) -> None:
    c = load_config(path, BASE)
    terms = validate(c)
    assert terms and c.method.split(":")[0] == terms[0][0].name


def test_docs_config_table_is_generated_from_the_dataclass() -> None:
    from preftune.config_fields import reference_markdown

    docs = (Path(__file__).parent.parent / "docs" / "training.md").read_text(encoding="utf-8")
    table = docs.split("<!-- config-table:start -->\n")[1].split("\n<!-- config-table:end -->")[0]
    assert table == reference_markdown(), (
        "regenerate the table: python -c 'from preftune.config_fields import reference_markdown; print(reference_markdown())'"
    )
