"""The arithmetic task: reference solutions checked by hand, the verifier's first-error reports, the
seeded problem stream and the tokenizer round trip through a saved folder."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from preftune.errors import ConfigError, DataError
from preftune.tasks.arithmetic import ALPHABET, LEVELS, ArithmeticTask, Problem, solution, verify


def test_addition_with_carries_hand_checked() -> None:
    # 347 + 586: 7+6=13 (write 3, carry 1); 4+8+1=13 (write 3, carry 1); 3+5+1=9 → 933.
    assert solution(Problem(347, "+", 586)) == "7+6+0=13 r3\n4+8+1=13 r33\n3+5+1=9 r933\nanswer: 933"
    # Final carry ends up in the last running result: 95 + 17 = 112.
    assert solution(Problem(95, "+", 17)) == "5+7+0=12 r2\n9+1+1=11 r112\nanswer: 112"


def test_subtraction_with_borrows_hand_checked() -> None:
    # 532 − 187: 2<7 borrow → 12−7=5; 3−8−1<0 borrow → 13−8−1=4; 5−1−1=3 → 345.
    assert solution(Problem(532, "-", 187)) == "12-7-0=5 r5\n13-8-1=4 r45\n5-1-1=3 r345\nanswer: 345"
    # Leading zeros stay in the running result, not in the answer.
    assert solution(Problem(100, "-", 99)).endswith("1-0-1=0 r001\nanswer: 1")


def test_multiplication_hand_checked() -> None:
    # 347 × 6: 7·6=42 (carry 4); 4·6+4=28 (carry 2); 3·6+2=20 → 2082.
    assert solution(Problem(347, "*", 6)) == "7*6+0=42 r2\n4*6+4=28 r82\n3*6+2=20 r2082\nanswer: 2082"
    # Two-digit multiplier: partials 47·6 = 282 and 47·3·10 = 1410, summed to 1692.
    text = solution(Problem(47, "*", 36))
    assert "p=282\n" in text and "p=1410\n" in text
    assert text.endswith("0+1+0=1 r1692\nanswer: 1692")


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_reference_solution_verifies_and_answers_match(level: int) -> None:
    task = ArithmeticTask(level=level)
    for p in task.problems(200, seed=level):
        v = task.verify(p.prompt, task.solution(p))
        assert v.fully_correct and v.steps_correct, (p, v)
        assert task.reward(p.prompt, task.solution(p)) == 1.0
        assert int(task.solution(p).rsplit("answer: ", 1)[1]) == eval(f"{p.a}{p.op}{p.b}")  # noqa: S307
        assert set(p.prompt + task.solution(p)) <= set(ALPHABET)


def test_wrong_carry_is_reported_at_the_step_where_it_happens() -> None:
    # The carry out of step 0 (7+6=13) is dropped in step 1: step 1 is the first wrong step, and
    # every later line inherits the error.
    bad = "7+6+0=13 r3\n4+8+0=12 r23\n3+5+1=9 r923\nanswer: 923"
    v = verify("347+586=\n", bad)
    assert (v.correct, v.steps_correct, v.first_error) == (False, False, 1)
    assert v.reason == "carry: expected 1, got 0"
    assert (v.expected, v.got) == ("4+8+1=13 r33", "4+8+0=12 r23")
    assert ArithmeticTask().reward("347+586=\n", bad) == 0.0


def test_wrong_borrow_value_and_answer_line() -> None:
    v = verify("532-187=\n", "12-7-0=5 r5\n3-8-0=5 r55\n5-1-0=4 r455\nanswer: 455")
    assert v.first_error == 1 and v.reason == "top digit: expected 13, got 3"
    v = verify("347+586=\n", "7+6+0=13 r3\n4+8+1=14 r43\n3+5+1=9 r943\nanswer: 943")
    assert v.first_error == 1 and v.reason == "value: expected 13, got 14"
    # Right steps, wrong final line: the error is the answer line (index = number of steps).
    v = verify("347+586=\n", "7+6+0=13 r3\n4+8+1=13 r33\n3+5+1=9 r933\nanswer: 93")
    assert (v.correct, v.steps_correct, v.first_error, v.num_steps) == (False, True, 3, 3)


def test_right_answer_with_a_wrong_step_still_earns_the_reward_but_is_not_fully_correct() -> None:
    v = verify("347+586=\n", "7+6+0=13 r3\n4+8+1=13 r34\n3+5+1=9 r933\nanswer: 933")
    assert v.correct and not v.steps_correct and not v.fully_correct
    assert v.first_error == 1 and v.reason == "running result: expected 33, got 34"


def test_truncated_and_empty_responses() -> None:
    v = verify("347+586=\n", "7+6+0=13 r3\n")
    assert (v.correct, v.first_error, v.reason) == (False, 1, "missing line")
    assert verify("347+586=\n", "").first_error == 0


def test_bad_prompt_and_config_errors() -> None:
    with pytest.raises(DataError, match="not an arithmetic prompt"):
        verify("hello\n", "answer: 1")
    with pytest.raises(DataError, match="negative"):
        verify("3-5=\n", "answer: 2")
    with pytest.raises(ConfigError):
        ArithmeticTask(level=99)
    with pytest.raises(ConfigError):
        ArithmeticTask(ops="/")


def test_problems_are_seeded_distinct_and_respect_exclude() -> None:
    task = ArithmeticTask(level=2, ops="+-")
    a, b, c = task.problems(50, seed=3), task.problems(50, seed=3), task.problems(50, seed=4)
    assert a == b and a != c
    assert len({p.prompt for p in a}) == 50
    held = {p.prompt for p in a[:10]}
    assert not held & {p.prompt for p in task.problems(300, seed=3, exclude=held)}
    lo, hi = LEVELS[2].add_digits
    assert all(lo <= len(str(max(p.a, p.b))) <= hi and p.op in "+-" for p in a)
    assert all(p.a >= p.b for p in a if p.op == "-")


def test_tokenizer_round_trip_through_a_saved_folder(tmp_path) -> None:
    task = ArithmeticTask()
    task.save_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "47*36=\n" + solution(Problem(47, "*", 36))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 4 + len(set(ALPHABET))
