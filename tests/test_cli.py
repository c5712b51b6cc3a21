"""The command line: a light `preftune --help`, TRL's flag names as aliases with TRL's meaning,
boolean switches, "did you mean" suggestions and `--chat-template`. No model is built here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.cli import DEFERRED, build_parser
from preftune.config import did_you_mean, load_config, resolve_objective, validate
from preftune.errors import ConfigError, DataError
from preftune.train.commands import overrides_from_args

SRC = str(Path(__file__).resolve().parents[1] / "src")


def parse(*argv: str) -> dict[str, object]:
    args = build_parser(["train", *argv]).parse_args(["train", *argv])
    return overrides_from_args(args)


def test_top_level_help_imports_no_torch() -> None:
    code = (
        "import sys, preftune.cli as c; c.build_parser(); c.build_parser(['--help']); "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC}, check=True
    )
    assert out.stdout.strip() == "[]"


def test_top_level_help_promises_only_what_exists(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["--help"]).parse_args(["--help"])
    text = capsys.readouterr().out.lower()
    assert "losses" in text  # the deferred command is listed
    from preftune import diffusion_methods, losses
    from preftune.online_methods import PRESETS

    # every method the description names by its registered name is one `preftune train` takes
    named = ["grpo", "rloo", "ppo", "ddpo", "dpok", "spo", "awm"]
    for name in named:
        assert f"{name}," in text or f"{name})" in text, name
        assert name in PRESETS or name in diffusion_methods.METHODS or name in losses.REGISTRY, name
    for family in ("reward models", "online rl", "distillation", "diffusion"):
        assert family in text, family


def test_deferred_command_help_line_is_the_real_one() -> None:
    import argparse

    for name, (module, help_text) in DEFERRED.items():
        parser = build_parser([name])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        real = {a.dest: a.help for a in sub._choices_actions}
        assert real[name] == help_text, module


def test_trl_flags_mean_what_they_mean_in_trl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    values = parse(
        *"--model_name_or_path m --dataset_name d --output_dir o --learning_rate 5e-7".split(),
        *"--per_device_train_batch_size 4 --gradient_accumulation_steps 3 --num_train_epochs 2".split(),
        *"--max_length 512 --logging_steps 5 --save_steps 50 --eval_steps 25".split(),
        *"--loss_type robust --label_smoothing 0.2 --bf16 --use_peft --lora_r 16".split(),
    )
    c = load_config(None, values)
    assert (c.model, c.data, c.out, c.lr, c.epochs, c.max_length) == ("m", "d", "o", 5e-7, 2.0, 512)
    # TRL: effective batch = per-device × accumulation × processes; a forward pass holds per-device
    assert (c.batch_size, c.micro_batch_size) == (4 * 3 * 2, 4)
    assert (c.log_every, c.save_every, c.eval_every) == (5, 50, 25)
    assert (c.method, c.mixed_precision, c.lora, c.lora_r) == ("rdpo", "bf16", True, 16)
    [(spec, _, hp)] = resolve_objective(c)
    assert (spec.name, hp["epsilon"]) == ("rdpo", 0.2)  # label_smoothing: the flip probability ε


def test_trl_batch_flags_default_like_trl() -> None:
    c = load_config(None, {"gradient_accumulation_steps": "2"})  # TRL's per-device default is 8
    assert (c.batch_size, c.micro_batch_size) == (16, 8)
    c = load_config(None, {"per_device_train_batch_size": "2"})
    assert (c.batch_size, c.micro_batch_size) == (2, 2)


def test_rpo_alpha_adds_the_nll_term_and_orpo_beta_is_lambda() -> None:
    c = load_config(None, parse("--rpo_alpha", "0.5"))
    assert c.method == "dpo,sft:0.5"  # TRL: loss + α · NLL(chosen), averaged over the chosen tokens
    assert [(s.name, w) for s, w, _ in resolve_objective(c)] == [("dpo", 1.0), ("sft", 0.5)]
    with pytest.raises(ConfigError, match="already has one"):
        load_config(None, {"method": "dpo:1,sft:0.1", "rpo_alpha": 1.0})
    c = load_config(None, parse("orpo", "--beta", "0.25"))
    [(spec, _, hp)] = resolve_objective(c)
    assert (spec.name, hp["odds_ratio_weight"]) == ("orpo", 0.25)  # TRL's ORPO β is λ
    c = load_config(None, parse("--loss_type", "sigmoid,sft", "--loss_weights", "1,0.2"))
    assert c.method == "dpo:1,sft:0.2"


def test_trl_names_work_in_yaml_and_conflicts_are_errors(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("model_name_or_path: m\ndataset_name: d\noutput_dir: o\nlearning_rate: 1e-5\nbf16: true\n")
    c = load_config(y, {"lr": "2e-5"})  # the command line still wins over YAML, whatever the names
    assert (c.model, c.lr, c.mixed_precision) == ("m", 2e-5, "bf16")
    with pytest.raises(ConfigError, match="'learning_rate' \\(TRL's name\\) and 'lr' both given"):
        load_config(None, parse("--lr", "1e-5", "--learning_rate", "2e-5"))
    with pytest.raises(ConfigError, match="'per_device_train_batch_size.*and 'batch_size' both given"):
        load_config(None, {"batch_size": 8, "per_device_train_batch_size": 2})


def test_label_smoothing_on_a_method_without_epsilon_says_which_methods_have_it() -> None:
    c = load_config(None, {**dict.fromkeys(("model", "data", "out"), "x"), "label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="label_smoothing is ε of rdpo, TRL's 'robust', and of cdpo"):
        validate(c)


def test_trl_names_are_listed_in_train_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    text = capsys.readouterr().out
    for flag in (
        "--model_name_or_path",
        "--dataset_name",
        "--output_dir",
        "--learning_rate",
        "--per_device_train_batch_size",
        "--gradient_accumulation_steps",
        "--num_train_epochs",
        "--max_length",
        "--max_completion_length",
        "--logging_steps",
        "--save_steps",
        "--eval_steps",
        "--loss_type",
        "--label_smoothing",
        "--rpo_alpha",
        "--bf16",
        "--use_peft",
        "--lora_r",
        "--chat-template",
    ):
        assert flag in text, flag
    assert "ORPO β = λ" in text


def test_a_bare_boolean_flag_is_a_switch() -> None:
    v = parse("--fsdp", "--bf16", "--use_peft", "--no-progress", "--add-eos", "false", "--token-mean")
    c = load_config(None, v)
    assert (c.fsdp, c.mixed_precision, c.lora, c.progress, c.add_eos) == (True, "bf16", True, False, False)
    assert c.hparams == {"token_mean": "true"}
    assert load_config(None, parse("--fsdp", "false", "--bf16", "false")).fsdp is False


def test_did_you_mean_never_points_at_another_meaning() -> None:
    options = ["max_steps", "save_every", "apo_alpha", "learning_rate", "save_steps", "batch_size"]
    assert did_you_mean("save_steps", ["max_steps", "apo_alpha"]) == ""
    assert did_you_mean("rpo_alpha", ["max_steps", "apo_alpha"]) == ""
    assert did_you_mean("load_steps", options) == ""
    assert did_you_mean("save_stepz", options) == "; did you mean 'save_steps'?"
    assert did_you_mean("lerning_rate", options) == "; did you mean 'learning_rate'?"
    assert did_you_mean("batchsize", options) == "; did you mean 'batch_size'?"


def test_chat_template_is_a_train_flag_and_a_yaml_key(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("chat_template: t.jinja\n")
    assert load_config(y).chat_template == "t.jinja"
    assert load_config(None, parse("--chat-template", "my.jinja")).chat_template == "my.jinja"


def test_train_formats_data_with_the_chat_template_file(tmp_path: Path) -> None:
    from preftune.data.char_tokenizer import CHAT_TEMPLATE, build_char_tokenizer
    from preftune.train.loop import Objective
    from preftune.train.setup import load_examples

    tok = build_char_tokenizer()  # no template of its own
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE, encoding="utf-8")
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}]
    values = {
        "model": str(tmp_path / "no-model"),
        "data": "d",
        "out": "o",
        "cache_dir": str(tmp_path / "cache"),
    }
    config = load_config(None, {**values, **parse("--chat-template", str(template))})
    objective = Objective(validate(config), "pairwise")
    (ex,) = load_examples(rows, config, objective, tok, split=None)
    assert tok.decode(ex.prompt_ids) == "<|user|>\nhi\n<|assistant|>\n"
    with pytest.raises(DataError, match="--chat-template FILE"):  # without it: the advice is the flag
        load_examples(rows, load_config(None, values), objective, tok, split=None)


def test_kto_on_pairwise_data_says_once_that_it_splits_the_pairs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from preftune.data.char_tokenizer import build_char_tokenizer
    from preftune.train.loop import Objective
    from preftune.train.setup import load_examples

    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(3)]
    values = {
        "model": str(tmp_path / "none"),
        "data": "d",
        "out": "o",
        "method": "kto",
        "cache_dir": str(tmp_path),
    }
    config = load_config(None, values)
    objective = Objective(validate(config), "unpaired")
    with caplog.at_level("WARNING", logger="preftune"):
        examples = load_examples(rows, config, objective, build_char_tokenizer(), split=None)
    assert [e.label for e in examples] == [1.0, 0.0] * 3
    said = [r.getMessage() for r in caplog.records if "split in two" in r.getMessage()]
    assert said == [
        "<curriculum stage>: the loss trains on unpaired examples, so each of the 3 pairs is split in "
        "two: its chosen response a desirable example (label 1), its rejected one an undesirable "
        "example (label 0) — 6 examples"
    ]


def test_data_prepare_prints_its_summary_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import json

    from preftune.cli import main
    from preftune.data.char_tokenizer import build_char_tokenizer

    build_char_tokenizer().save_pretrained(tmp_path / "tok")
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1+2=", "chosen": "", "rejected": "4"},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["data", "prepare", str(data), "--tokenizer", str(tmp_path / "tok"), "--on-invalid", "drop"]
    for _ in range(2):  # a cache miss, then a hit
        assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 0
        captured = capsys.readouterr()
        both = captured.out + captured.err + "".join(r.getMessage() for r in caplog.records)
        caplog.clear()
        assert both.count("2 rows, kind pairwise → 1 examples") == 1
        assert both.count("dropped 1 row (chosen: empty text: 1)") == 1


def test_config_yaml_records_every_resolved_hyper_parameter(tmp_path: Path) -> None:
    import yaml

    from preftune.config import save_config

    base = {"model": "m", "data": "d", "out": "o"}
    for values, recorded in (
        (
            {"method": "rpo", "beta": 0.2},
            {"beta": 0.2, "sft_weight": 0.005, "sft_form": "paper", "wpo_weighting": False},
        ),
        ({"method": "dpo"}, {"beta": 0.1, "wpo_weighting": False}),  # every option, WPO's too
        # several terms: TERM.KEY, every term's every option
        ({"method": "dpo:1,sft:0.2"}, {"dpo.beta": 0.1, "dpo.wpo_weighting": False}),
        (
            {"method": "simpo:1,sft:0.5"},
            {"simpo.beta": 2.0, "simpo.gamma": 1.0, "simpo.wpo_weighting": False},
        ),
        ({"method": "modpo"}, {"beta": 0.1, "weights": [], "wpo_weighting": False}),  # a tuple: a list
    ):
        config = load_config(None, {**base, **values})
        objective = validate(config)
        save_config(config, tmp_path / "config.yaml", objective)
        assert yaml.safe_load((tmp_path / "config.yaml").read_text())["hparams"] == recorded
        again = validate(load_config(tmp_path / "config.yaml"))  # loads back to the same objective
        assert [(s.name, w, hp) for s, w, hp in again] == [(s.name, w, hp) for s, w, hp in objective]


def test_sweep_takes_trl_names_too() -> None:
    argv = ["sweep", "--methods", "dpo,ipo", "--out", "o", "--learning_rate", "2e-6", "--use_peft"]
    values = overrides_from_args(build_parser(argv).parse_args(argv))
    c = load_config(None, values)
    assert (c.lr, c.lora, c.hparams) == (2e-6, True, {})


def test_trl_tr_dpo_switches_and_report_to_none() -> None:
    c = load_config(None, parse("--sync_ref_model", "--ref_model_mixup_alpha", "0.5", "--report_to", "none"))
    assert (c.ref_sync_every, c.ref_sync_alpha, c.report_to) == (512, 0.5, [])  # TRL's default τ = 512
    c = load_config(None, parse("--sync_ref_model", "true", "--ref_model_sync_steps", "16"))
    assert c.ref_sync_every == 16
    with pytest.raises(ConfigError, match="ref_model_sync_steps takes effect with sync_ref_model"):
        load_config(None, parse("--ref_model_sync_steps", "16"))


def test_sweep_help_lists_the_loss_flags_not_train_rm_options(capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep compares preference losses and online methods; reward models are not swept, so their
    options (`--ensemble`, `--aggregate`, ...) appear in `train --help` only."""
    from preftune.cli import main

    for command, listed in (("train", True), ("sweep", False)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--beta" in text and ("reward models: METHOD rm | prm" in text) == listed
        assert ("--ensemble M" in text) == listed


def _help(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    from preftune.cli import main

    with pytest.raises(SystemExit):
        main(["train", *argv, "--help"])
    return capsys.readouterr().out


def test_train_method_help_adds_the_methods_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    """`train METHOD --help` is `train --help` followed by METHOD's parts: its terms' hyper-parameters
    as flags with their defaults; an online preset's estimator, sampler (and the preset's own values)
    and terms. `train --help` stays the generic help."""
    generic = _help(capsys=capsys)
    assert "hyper-parameters (a term" not in generic and "dpo's hyper-parameters" not in generic
    for argv in (("dpo",), ("--method", "dpo")):
        text = _help(*argv, capsys=capsys)
        assert text.startswith(generic.rstrip("\n")) and "dpo's hyper-parameters:" in text[len(generic) :]
        assert "--beta V, --dpo.beta V" in " ".join(text.split())
        assert "(valid: (0, inf); default: 0.1)" in " ".join(text.split())
    grpo = " ".join(_help("grpo", capsys=capsys).split())
    for piece in ("advantage estimator grpo:", "--scale V", "default: group", "prompt sampler uniform:",
                  "ppo_clip's hyper-parameters:", "--eps-high V, --eps_high V, --ppo_clip.eps_high V",
                  "online methods alone read", "--num-generations"):  # fmt: skip
        assert piece in grpo, piece
    dapo = " ".join(_help("dapo", capsys=capsys).split())
    assert "default: 0.28 in this method" in dapo  # the preset's ε_high, not the term's 0.2
    assert "--sampler-args '{\"max_draws\": V}'" in dapo and "prompt sampler dapo_filter:" in dapo
    both = " ".join(_help("dpo:1,sft:0.2", capsys=capsys).split())
    assert (
        "dpo's hyper-parameters (a term of weight 1)" in both
        and "sft's hyper-parameters (a term of weight 0.2)" in both
    )
    assert "unknown method 'dpoo' — did you mean 'dpo'?" in " ".join(_help("dpoo", capsys=capsys).split())
    ddpo = " ".join(_help("ddpo", capsys=capsys).split())
    assert "online diffusion RL ddpo: its options:" in ddpo and "--adv-clip V, --adv_clip V" in ddpo


def test_every_flag_a_method_help_lists_is_taken_by_that_method() -> None:
    """Contract over every offline loss, online preset and distillation term: each hyper-parameter
    flag `train METHOD --help` lists, given its default, parses and reaches the method's parts."""
    from preftune import losses
    from preftune.method_checks import DISTILL_METHODS
    from preftune.online_methods import PRESETS
    from preftune.rl.builders import builder_settings
    from preftune.train.method_help import method_parts

    parser = build_parser(["train"])
    base = "--model m --data d --out o --prompts p --reward arithmetic --teacher t".split()
    for method in [*losses.REGISTRY, *PRESETS, *DISTILL_METHODS]:
        parts = method_parts(method)
        assert parts and not parts[0].title.startswith("METHOD"), method
        for option in (o for part in parts for o in part.options if o.takes_value):
            value = re.search(r"default: (.*?)(?: in this method)?\)$", option.help).group(1)  # type: ignore[union-attr]
            if value in ("None", "()"):
                continue
            value = value.strip("()").replace(" ", "")  # a list of numbers, (1, 2), is written 1,2
            for flag in option.flags:
                args = parser.parse_args(["train", method, *base, flag, value])
                config = load_config(None, overrides_from_args(args))
                resolve_objective(config)
                if method in PRESETS:
                    builder_settings(config)
