"""A verifiable arithmetic task: multi-digit +, −, × written out column by column.

Prompt and response are plain text (one character = one token with `build_tokenizer`):

    prompt:   "347+586=\\n"
    response: "7+6+0=13 r3\\n4+8+1=13 r33\\n3+5+1=9 r933\\nanswer: 933"

Each step handles one column, right to left, and always has the same shape
`TOP OP BOTTOM CARRYOP CARRY=VALUE rRUNNING`:

- addition      `a+b+c=v`     c = carry in (0 or 1), v = a+b+c; the next carry is v // 10.
- subtraction   `a-b-c=v`     c = borrow in; when a−b−c < 0 the top digit is written as a+10 (a
                 borrow, the next step's c is 1), so v is always a digit. Results are never negative:
                 the larger number is written first.
- multiplication `a*d+c=v`    one multiplicand digit a times the multiplier digit d, plus the carry c
                 (v // 10 of the step before). With a multi-digit multiplier each digit's partial
                 product is written out this way, followed by the line `p=PARTIAL`, and the partials
                 are then summed with addition steps.

`rRUNNING` is the result so far: the previous running result with this step's digit prepended (the
whole value on the last step of a number, which absorbs the final carry). Leading zeros of a
subtraction result are kept in the running result and dropped in the answer. The last line is
`answer: N`. Because every line is determined by the problem, the verifier compares each line with the
reference and reports the first line that differs, and which part of it is wrong.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from preftune.data.char_tokenizer import build_char_tokenizer
from preftune.errors import ConfigError, DataError

ALPHABET = "0123456789+-*=:\n answerp"
"""Every character the task writes; the tokenizer has these plus <pad>, <s>, </s>, <unk>."""

OPS = ("+", "-", "*")


@dataclass(frozen=True)
class Level:
    """Difficulty: operand digit counts, each drawn uniformly from its (low, high) range."""

    add_digits: tuple[int, int]
    mul_digits: tuple[int, int]
    multiplier_digits: tuple[int, int] = (1, 1)


LEVELS: dict[int, Level] = {
    1: Level(add_digits=(1, 2), mul_digits=(1, 2)),
    2: Level(add_digits=(2, 3), mul_digits=(2, 2)),
    3: Level(add_digits=(3, 4), mul_digits=(2, 3)),
    4: Level(add_digits=(4, 5), mul_digits=(3, 4), multiplier_digits=(1, 2)),
    5: Level(add_digits=(5, 7), mul_digits=(3, 5), multiplier_digits=(2, 3)),
}


@dataclass(frozen=True)
class Problem:
    """One exercise `a OP b`; for subtraction a ≥ b, so the result is never negative."""

    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b if self.op == "-" else self.a * self.b

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}=\n"


@dataclass(frozen=True)
class Verdict:
    """What the verifier found in one response.

    correct:          the final `answer:` line states the right number.
    steps_correct:    every step line (all lines before the answer) equals the reference.
    first_error:      0-based index of the first line that differs from the reference (the answer
                      line is index `num_steps`), None when the response is entirely right.
    reason:           which part of that line is wrong, e.g. "carry: expected 1, got 0".
    expected, got:    the reference line and the response's line at `first_error` ("" when missing).
    num_steps:        number of step lines in the reference (the answer line not counted).
    """

    correct: bool
    steps_correct: bool
    first_error: int | None
    reason: str
    expected: str
    got: str
    num_steps: int

    @property
    def fully_correct(self) -> bool:
        return self.correct and self.first_error is None


_STEP = re.compile(r"^(\d+)([+\-*])(\d+)([+\-])(\d+)=(\d+) r(\d+)$")
_STEP_FIELDS = ("top digit", "operator", "bottom digit", "carry operator", "carry", "value", "running result")
_PROMPT = re.compile(r"^(\d+)([+\-*])(\d+)=\n?$")


def _add_steps(x: int, y: int) -> list[str]:
    """Column addition of x + y, one line per column of the longer number."""
    xs, ys = str(x)[::-1], str(y)[::-1]
    lines, carry, running = [], 0, ""
    n = max(len(xs), len(ys))
    for i in range(n):
        a = int(xs[i]) if i < len(xs) else 0
        b = int(ys[i]) if i < len(ys) else 0
        v = a + b + carry
        running = (str(v) if i == n - 1 else str(v % 10)) + running
        lines.append(f"{a}+{b}+{carry}={v} r{running}")
        carry = v // 10
    return lines


def _sub_steps(x: int, y: int) -> list[str]:
    """Column subtraction of x − y (x ≥ y), borrowing by writing the top digit plus 10."""
    xs, ys = str(x)[::-1], str(y)[::-1]
    lines, borrow, running = [], 0, ""
    for i in range(len(xs)):
        a = int(xs[i])
        b = int(ys[i]) if i < len(ys) else 0
        top = a + 10 if a - b - borrow < 0 else a
        v = top - b - borrow
        running = str(v) + running
        lines.append(f"{top}-{b}-{borrow}={v} r{running}")
        borrow = 1 if top > a else 0
    return lines


def _mul_digit_steps(x: int, d: int) -> list[str]:
    """x × d for one digit d, column by column with the carry added."""
    xs = str(x)[::-1]
    lines, carry, running = [], 0, ""
    for i, ch in enumerate(xs):
        v = int(ch) * d + carry
        running = (str(v) if i == len(xs) - 1 else str(v % 10)) + running
        lines.append(f"{ch}*{d}+{carry}={v} r{running}")
        carry = v // 10
    return lines


def solution_steps(problem: Problem) -> list[str]:
    """The reference step lines of `problem` (without the final `answer:` line)."""
    a, op, b = problem.a, problem.op, problem.b
    if op == "+":
        return _add_steps(a, b)
    if op == "-":
        return _sub_steps(a, b)
    digits = str(b)[::-1]
    if len(digits) == 1:
        return _mul_digit_steps(a, b)
    lines: list[str] = []
    total = 0
    for j, d in enumerate(digits):
        lines += _mul_digit_steps(a, int(d))
        partial = a * int(d) * 10**j
        lines.append(f"p={partial}")
        if j > 0:
            lines += _add_steps(total, partial)
        total += partial
    return lines


def solution(problem: Problem) -> str:
    """The full reference response: step lines, then `answer: N` (no EOS; tokenization adds it)."""
    return "\n".join([*solution_steps(problem), f"answer: {problem.answer}"])


def parse_prompt(prompt: str) -> Problem:
    """Read `A OP B=` back into a Problem; DataError when the prompt is not one of this task's."""
    m = _PROMPT.match(prompt.strip(" ") if prompt else "")
    if not m:
        raise DataError(
            f"not an arithmetic prompt: {prompt[:60]!r}{'…' if prompt and len(prompt) > 60 else ''}",
            field="prompt",
            fix="prompts look like '347+586=\\n' (see preftune.tasks.arithmetic)",
        )
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    if op == "-" and b > a:
        raise DataError(
            f"subtraction with a negative result: {prompt!r}",
            field="prompt",
            fix="write the larger number first",
        )
    return Problem(a, op, b)


def _line_reason(expected: str, got: str) -> str:
    """Name the first field of a step line that differs (carry, value, running result, ...)."""
    if not got:
        return "missing line"
    me, mg = _STEP.match(expected), _STEP.match(got)
    if me and mg:
        for name, e, g in zip(_STEP_FIELDS, me.groups(), mg.groups()):
            if e != g:
                return f"{name}: expected {e}, got {g}"
    if expected.startswith("answer:"):
        return f"answer: expected {expected[8:]!r}, got {got!r}"
    return f"malformed or wrong line: expected {expected!r}, got {got!r}"


def verify(prompt: str, response: str) -> Verdict:
    """Check a response line by line against the reference solution of `prompt`.

    The response may end with text after the answer line (it is ignored); EOS should already be
    stripped (decode with skip_special_tokens=True).
    """
    problem = parse_prompt(prompt)
    ref = solution_steps(problem)
    ref_lines = [*ref, f"answer: {problem.answer}"]
    lines = response.strip("\n").split("\n") if response.strip() else []
    lines = [ln.rstrip() for ln in lines]
    answer_line = next((ln for ln in lines if ln.startswith("answer:")), None)
    stated = answer_line[len("answer:") :].strip() if answer_line is not None else ""
    correct = stated.isdigit() and int(stated) == problem.answer
    first_error: int | None = None
    for i, expected in enumerate(ref_lines):
        got = lines[i] if i < len(lines) else ""
        if got != expected:
            first_error = i
            break
    steps_correct = first_error is None or first_error >= len(ref)
    if first_error is None:
        return Verdict(correct, True, None, "", "", "", len(ref))
    got = lines[first_error] if first_error < len(lines) else ""
    return Verdict(
        correct,
        steps_correct,
        first_error,
        _line_reason(ref_lines[first_error], got),
        ref_lines[first_error],
        got,
        len(ref),
    )


def sample_problem(rng: random.Random, level: Level, ops: str) -> Problem:
    """Draw one problem: an op from `ops`, then digit counts and digits from the level's ranges."""
    op = rng.choice(ops)

    def number(lo: int, hi: int) -> int:
        n = rng.randint(lo, hi)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)

    if op == "*":
        return Problem(number(*level.mul_digits), "*", number(*level.multiplier_digits))
    a, b = number(*level.add_digits), number(*level.add_digits)
    if op == "-" and b > a:
        a, b = b, a
    return Problem(a, op, b)


@dataclass(frozen=True)
class ArithmeticTask:
    """The task object: problems, reference answers, verifier, reward and tokenizer in one place.

    level: key of LEVELS (1 easiest); ops: which of "+-*" to draw from.
    """

    level: int = 2
    ops: str = "+-*"

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ConfigError(f"unknown arithmetic level {self.level}; choose one of {sorted(LEVELS)}")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ConfigError(f"ops={self.ops!r}: use a non-empty subset of '+-*'")

    def problems(self, n: int, *, seed: int, exclude: set[str] | None = None) -> list[Problem]:
        """`n` distinct problems drawn with `seed` (same seed, same list); prompts in `exclude` are
        skipped, which keeps held-out prompts out of training data."""
        rng = random.Random(f"arithmetic:{self.level}:{self.ops}:{seed}")
        seen = set(exclude or ())
        out: list[Problem] = []
        for _ in range(100 * n + 1000):
            if len(out) == n:
                break
            p = sample_problem(rng, LEVELS[self.level], self.ops)
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
        if len(out) < n:
            raise ConfigError(
                f"level {self.level} with ops {self.ops!r} has fewer than {n} distinct "
                "problems; lower the count or raise the level"
            )
        return out

    def prompt(self, problem: Problem) -> str:
        return problem.prompt

    def solution(self, problem: Problem) -> str:
        return solution(problem)

    def verify(self, prompt: str, response: str) -> Verdict:
        return verify(prompt, response)

    def reward(self, prompt: str, response: str) -> float:
        """1.0 when the stated final answer is right, else 0.0 (the steps are not required)."""
        return 1.0 if verify(prompt, response).correct else 0.0

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """A character-level tokenizer over ALPHABET (no chat template: prompts are raw text)."""
        return build_char_tokenizer(ALPHABET, model_max_length=512)

    def save_tokenizer(self, out_dir: str | Path) -> Path:
        path = Path(out_dir)
        self.build_tokenizer().save_pretrained(path)
        return path
