"""What an online method does not read is refused or said, not silently dropped: the PPO family's
fields (`--lam`, `--gamma`, `--kl-coef`, `--macro-n`, `--dpo-scale`, ...) on another online method, and
the preference columns of a pairs file given as `--prompts` (a notice: the file is a fine prompt
source). Every field stays accepted where it is read (a contract over `ppo_only_fields`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from preftune.cli import build_parser
from preftune.config import config_to_dict, load_config, validate
from preftune.config_fields import ppo_only_fields
from preftune.errors import ConfigError
from preftune.train.commands import overrides_from_args
from test_train_fixtures import tiny_model, write_jsonl

ONLINE = {"method": "grpo", "model": "m", "prompts": "p.jsonl", "reward": "arithmetic", "out": "o"}
# a value other than the default for each PPO-only field
GIVEN: dict[str, Any] = {
    "kl_coef": 0.1, "value_lr": 1e-3, "gamma": 0.9, "lam": 0.5, "macro": "ppl", "macro_n": 3,
    "macro_pooling": "unit", "dpo_model": "d", "dpo_scale": 0.1, "dpo_clip": 0.1,
}  # fmt: skip
# a config that reads the fields of each part of the PPO family
READERS: dict[str, dict[str, Any]] = {
    "ppo": {"method": "ppo"},
    "macro": {"method": "ppo", "macro": "randomized"},
    "macro_fixed": {"method": "ma_ppo"},
    "rto": {"method": "rto", "dpo_model": "d"},
}


def config(**values: Any) -> Any:
    return load_config(None, {**ONLINE, **values})


def test_every_ppo_only_field_is_covered() -> None:
    assert set(GIVEN) == set(ppo_only_fields()) and set(READERS) == set(ppo_only_fields().values())


@pytest.mark.parametrize("name", sorted(GIVEN))
def test_a_ppo_field_is_taken_where_read_and_refused_elsewhere(name: str) -> None:
    """Each field passes on a method that reads it, and on grpo, rloo, remax (estimators without a
    γ of their own), online_dpo and raft (builders) it is refused, naming its flag and its readers."""
    reader = dict(READERS[ppo_only_fields()[name]])
    reader.setdefault(name, GIVEN[name])
    assert validate(config(**reader))
    flag = f"--{name.replace('_', '-')}"
    for method in ("grpo", "rloo", "remax", "online_dpo", "raft"):
        with pytest.raises(
            ConfigError, match=f"^{flag}: read only by .*'{method}' .*would ignore it: remove it"
        ):
            validate(config(method=method, **{name: GIVEN[name]}))


def test_the_error_names_every_ignored_flag_and_who_reads_it() -> None:
    with pytest.raises(ConfigError) as err:
        validate(config(method="grpo", lam=0.9, gamma=0.5, macro_n=3))
    assert str(err.value) == (
        "--gamma, --lam: read only by the PPO family (ppo, ma_ppo, rto; any method with --estimator gae); "
        "--macro-n: read only by MA-RLHF's fixed macro actions (ma_ppo, or --macro fixed with the PPO "
        "family) — method 'grpo' (estimator grpo) would ignore them: remove them"
    )
    # within the PPO family: MA-RLHF's and RTO's options need macro actions and a DPO model
    with pytest.raises(ConfigError, match="^--macro-n: read only by MA-RLHF's fixed macro actions"):
        validate(config(method="ma_ppo", macro="ppl", macro_n=3))
    with pytest.raises(
        ConfigError, match=r"^--dpo-clip: read only by RTO's DPO token rewards .* 'ppo' would"
    ):
        validate(config(method="ppo", dpo_clip=0.1))
    with pytest.raises(ConfigError, match="method 'rto' needs dpo_model"):  # the missing model first
        validate(config(method="rto", dpo_scale=0.1))
    # grpo with the PPO family's estimator reads them
    assert validate(config(method="grpo", estimator="gae", lam=0.5, kl_coef=0.1))


def test_gamma_goes_to_the_gamma_the_method_reads() -> None:
    """`--gamma` is REINFORCE++'s discount with reinforce_pp (its estimator's γ) and SimPO's margin with
    online_dpo --objective simpo (its builder's term): routed there, not refused, not ignored."""
    for values in ({"method": "reinforce_pp"}, {"method": "grpo", "estimator": "reinforce_pp_baseline"}):
        c = config(**values, gamma=0.9)
        recorded = config_to_dict(c, validate(c))
        assert c.gamma == 1.0 and recorded["hparams"]["gamma"] == 0.9
    c = config(method="online_dpo", objective="simpo", gamma=0.9)
    assert validate(c)[0][2]["gamma"] == 0.9 and c.gamma == 1.0
    args = build_parser().parse_args(["train", "reinforce_pp", *"--model m --prompts p.jsonl --reward arithmetic --out o --gamma 0.8".split()])  # fmt: skip
    c = load_config(None, overrides_from_args(args))
    assert config_to_dict(c, validate(c))["hparams"]["gamma"] == 0.8
    ppo = config(method="ppo", gamma=0.9)
    validate(ppo)
    assert ppo.gamma == 0.9 and "gamma" not in ppo.hparams  # the PPO family's discount is the field


def test_a_clip_range_given_twice_differently_is_refused() -> None:
    """`--ppo_clip.eps_high 0.3 --eps-high 0.2`: the dotted flag used to win silently."""
    argv = "train grpo --model m --prompts p.jsonl --reward arithmetic --out o --ppo_clip.eps_high".split()
    for value, refused in (("0.3", True), ("0.2", False)):
        args = build_parser().parse_args([*argv, value, "--eps-high", "0.2"])
        c = load_config(None, overrides_from_args(args))
        if not refused:
            assert validate(c)[0][2]["eps_high"] == 0.2
            continue
        with pytest.raises(
            ConfigError, match=r"^--eps-high 0.2 and --ppo_clip.eps_high 0.3 both set ppo_clip's"
        ):
            validate(c)


def test_a_pairs_file_as_prompts_trains_with_a_notice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A preference-pairs file is read for its prompts; a notice says that its chosen / rejected are
    not trained on and what trains on them. A prompt file with other columns (a reward's `answer`, a
    `label`) gets none."""
    from preftune.data.formatting import load_tokenizer
    from preftune.rl.phase import online_phase

    tokenizer = load_tokenizer(str(tiny_model(tmp_path / "model")))
    pair = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair, {**pair, "rejected": "5"}, {"prompt": "2+2=", "chosen": "4", "rejected": "3"}])  # fmt: skip
    plain = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+2=", "answer": 3, "label": 1}, {"prompt": "2+2=", "answer": 4, "label": 0}])  # fmt: skip
    for source, said in ((pairs, True), (plain, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="preftune"):
            phase = online_phase(config(prompts=str(source), batch_size=2), tokenizer)
        notes = [r.getMessage() for r in caplog.records if "not trained on" in r.getMessage()]
        assert len(phase.prompts) == (3 if said else 2)
        if not said:
            assert notes == []
            continue
        assert notes == [
            f"{pairs}: grpo reads each row's 'prompt' and samples its own responses; the columns chosen, "
            "rejected are not trained on (they reach the reward only as keyword arguments) — preference "
            f"data trains the offline methods: preftune train dpo --data {pairs}; its 3 rows hold 2 "
            "distinct prompts (one on k rows is drawn k times an epoch)"
        ]


def test_gae_options_are_the_config_fields_and_a_hyper_parameter_that_differs_is_refused() -> None:
    """GAE's γ, λ and pooling are `--gamma`, `--lam`, `--macro-pooling` (what the PPO family reads).
    As hyper-parameters (`--pooling unit`, YAML `hparams: {lam: 0.5}`) they went to the gae estimator,
    were written to config.yaml as its values, and were ignored by the trainer."""
    argv = "train ppo --model m --prompts p.jsonl --reward arithmetic --out o --pooling unit".split()
    c = load_config(None, overrides_from_args(build_parser().parse_args(argv)))
    with pytest.raises(ConfigError) as err:
        validate(c)
    assert str(err.value) == (
        "hyper-parameter 'pooling' = 'unit': GAE's pooling is the field macro_pooling (--macro-pooling, now "
        "'equal'), which method 'ppo' reads — the hyper-parameter would be ignored: give --macro-pooling "
        "unit instead (in YAML: macro_pooling: unit)"
    )
    for method, extra in (("ppo", {}), ("grpo", {"estimator": "gae"})):
        with pytest.raises(ConfigError, match=r"^hyper-parameter 'lam' = 0.5: .*give --lam 0.5 instead"):
            validate(config(method=method, hparams={"lam": 0.5}, **extra))
        with pytest.raises(ConfigError, match=r"^hyper-parameter 'gamma' = 0.9: .*give --gamma 0.9"):
            validate(config(method=method, hparams={"gamma": 0.9}, **extra))
    # the field is the one value: recorded once, as the field; a config.yaml of an earlier version
    # (which wrote the estimator's defaults beside the fields) loads back unchanged
    c = config(method="ppo", lam=0.5)
    recorded = config_to_dict(c, validate(c))
    assert recorded["lam"] == 0.5 and not {"gamma", "lam", "pooling"} & set(recorded["hparams"])
    old = config(method="ppo", hparams={"gamma": 1.0, "lam": 0.95, "pooling": "equal"})
    assert not {"gamma", "lam", "pooling"} & set(config_to_dict(old, validate(old))["hparams"])


@pytest.mark.parametrize("method", ["raft", "copg", "online_dpo", "dno", "xpo"])
def test_a_builder_method_refuses_an_estimator(method: str) -> None:
    """A builder turns samples into offline examples; no estimator is used (`--estimator` was ignored,
    and `--estimator gae` attached a value head that nothing trained)."""
    for estimator in ("rloo", "gae"):
        with pytest.raises(ConfigError) as err:
            validate(config(method=method, estimator=estimator))
        said = str(err.value)
        assert said.startswith(f"--estimator {estimator}: method '{method}' is a builder method"), said
        assert "so no advantage estimator is used; remove --estimator" in said
