"""Reward functions: the arithmetic verifier, a user's `module:function` (TRL signature, dataset
columns as keyword lists), weighted sums, and clear errors for bad specs and bad return values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from preftune.errors import ConfigError
from preftune.reward import load_reward
from preftune.tasks.arithmetic import Problem, solution

USER_MODULE = """
def brevity(prompts, completions, **kwargs):
    return [-len(c) / 10 for c in completions]

def matches(prompts, completions, answer, **kwargs):
    return [1.0 if a in c else None for c, a in zip(completions, answer)]

def wrong_length(prompts, completions, **kwargs):
    return [0.0]

def not_finite(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def crashes(prompts, completions, **kwargs):
    raise KeyError("answer")
"""


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield path
    sys.modules.pop("my_rewards", None)


def test_arithmetic_verifier() -> None:
    p = Problem(347, "+", 586)
    right = solution(p)
    wrong = right.replace("answer: 933", "answer: 932")
    r = load_reward("arithmetic")
    torch.testing.assert_close(
        r([p.prompt, p.prompt], [right, wrong]), torch.tensor([1.0, 0.0], dtype=torch.float64)
    )
    steps = load_reward("arithmetic_steps")([p.prompt, p.prompt], [right, wrong])
    # 3 step lines + the answer line; the wrong response errs on line 3 (the answer): 3/4
    torch.testing.assert_close(steps, torch.tensor([1.0, 0.75], dtype=torch.float64))


def test_user_function_and_weighted_sum(user_module: Path) -> None:
    prompts = ["1+1=\n", "2+2=\n"]
    completions = ["answer: 2", "answer: 5xx"]
    r = load_reward("arithmetic:1,my_rewards:brevity:0.5")
    got = r(prompts, completions)
    expected = torch.tensor([1.0 - 0.5 * 0.9, 0.0 - 0.5 * 1.1], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert r.last_values["arithmetic"] == [1.0, 0.0]
    # dataset columns arrive as keyword lists; None = not applicable, adds 0
    r2 = load_reward([("my_rewards:matches", 2.0), "arithmetic"])
    got = r2(prompts, completions, answer=["2", "4"])
    torch.testing.assert_close(got, torch.tensor([3.0, 0.0], dtype=torch.float64))
    # a file path works without PYTHONPATH, and so does a callable
    by_file = load_reward(f"{user_module}:brevity")
    torch.testing.assert_close(by_file(prompts, completions), torch.tensor([-0.9, -1.1], dtype=torch.float64))
    torch.testing.assert_close(
        load_reward(lambda p, c, **k: [1.0] * len(c))(prompts, completions),
        torch.ones(2, dtype=torch.float64),
    )


def test_bad_specs_and_values(user_module: Path) -> None:
    p, c = ["1+1=\n"], ["answer: 2"]
    cases = {
        "arithmetc": "unknown reward 'arithmetc' (built-in: arithmetic, arithmetic_steps",
        "no_such_mod:fn": "cannot import module 'no_such_mod'",
        "my_rewards:nothing": "module 'my_rewards' has no function 'nothing' (callables: brevity, crashes",
        "arithmetic,arithmetic": "'arithmetic' appears twice",
        "arithmetic:0": "weight of 'arithmetic' must be finite and non-zero",
        "arithmetic,": "empty term",
        f"{user_module.parent}": f"reward model folder {user_module.parent}: no config.json",
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_reward(spec)
    with pytest.raises(
        ConfigError, match="reward 'my_rewards:wrong_length' returned 1 values for 2 completions"
    ):
        load_reward("my_rewards:wrong_length")(p * 2, c * 2)
    with pytest.raises(ConfigError, match="returned nan for completion 0; rewards must be finite numbers"):
        load_reward("my_rewards:not_finite")(p, c)
    with pytest.raises(ConfigError, match="reward 'my_rewards:crashes' raised KeyError: 'answer'"):
        load_reward("my_rewards:crashes")(p, c)
    with pytest.raises(ConfigError, match="column 'answer' has 2 values for 1 completions"):
        load_reward("arithmetic")(p, c, answer=["2", "3"])


def test_what_trl_accepts_from_a_reward_function_and_what_it_names(tmp_path: Path) -> None:
    """A numpy array or a list of bools (TRL converts both with torch.tensor) is a reward; a string is
    named as one (it was read as 5 values); a function called `nan` in a file is not a weight."""
    path = tmp_path / "rewards_np.py"
    path.write_text(
        "import numpy as np\n"
        "def arr(prompts, completions, **kw):\n    return np.array([0.5] * len(completions), dtype=np.float32)\n"
        "def flags(prompts, completions, **kw):\n    return [c.endswith('2') for c in completions]\n"
        "def text(prompts, completions, **kw):\n    return 'hello'\n"
        "def nan(prompts, completions, **kw):\n    return [2.0] * len(completions)\n"
    )
    p, c = ["1+1=\n"] * 2, ["answer: 2", "answer: 3"]
    assert load_reward(f"{path}:arr")(p, c).tolist() == [0.5, 0.5]
    assert load_reward(f"{path}:flags")(p, c).tolist() == [1.0, 0.0]
    with pytest.raises(
        ConfigError, match=r"returned str 'hello' for 2 completions; return a list of 2 floats"
    ):
        load_reward(f"{path}:text")(p, c)
    assert load_reward(f"{path}:nan")(p, c).tolist() == [2.0, 2.0]
    assert load_reward(f"{path}:nan:0.5")(p, c).tolist() == [1.0, 1.0]
