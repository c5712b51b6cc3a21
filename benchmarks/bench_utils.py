"""Helpers shared by the benchmarks: the model, tokenizer and data both sides train on, child
processes with their own peak RSS, per-step timestamps and the machine's matmul peak.

Everything is built locally (no download). The tokenizer is word-level over a 32k vocabulary
("w4" … "w31999" plus 4 specials) with whitespace splitting, so text built from those words
tokenizes to exactly one token per word in any pipeline — prompt alone, response alone, or
prompt + response concatenated — which is what lets the two sides be compared token for token.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# PREFTUNE_BENCH_RESULTS redirects every results file (the smoke tests point it at a temp folder).
RESULTS_DIR = Path(os.environ.get("PREFTUNE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-architecture model built from a config (no download).

    These defaults give ~45M parameters: 32k vocab × 512 hidden for the input embedding and the
    (untied) LM head, so the LM head's cost per scored token is as real as in a production model.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 1376
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class Shape:
    """Synthetic preference data: token lengths drawn uniformly from [lo, hi] (inclusive).

    Response lengths count the words only; both pipelines append one EOS token to each response.
    """

    name: str
    prompt: tuple[int, int]
    response: tuple[int, int]

    def scaled(self, factor: float) -> Shape:
        """The same shape with every length multiplied by `factor` (quick mode)."""

        def sc(r: tuple[int, int]) -> tuple[int, int]:
            return (max(1, round(r[0] * factor)), max(1, round(r[1] * factor)))

        return Shape(self.name, sc(self.prompt), sc(self.response))


MODELS = {
    "45m": ModelSpec(),
    # ~19.5M: the default of the full benchmark, sized so 3 repetitions fit a shared 2-core machine.
    "20m": ModelSpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=688),
    # ~8.3M, for --quick and the scaling sweeps; still the real 32k-vocab LM head.
    "quick": ModelSpec(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=344),
    # ~1M, for the smoke tests only (seconds): every benchmark's code path, no meaningful timing.
    "tiny": ModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64),
}

PROMPT_HEAVY = Shape("prompt_heavy", (480, 544), (64, 128))
BALANCED = Shape("balanced", (48, 80), (224, 288))


def build_word_tokenizer(vocab_size: int = 32000) -> Any:
    """A fast word-level tokenizer: ids 0-3 are <pad> <s> </s> <unk>, id i ≥ 4 is the word f"w{i}"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=1 << 20,
    )


def save_model(spec: ModelSpec, out_dir: Path, *, seed: int = 0) -> Path:
    """Build a randomly initialised LlamaForCausalLM (float32) and save it with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    build_word_tokenizer(spec.vocab_size).save_pretrained(out_dir)
    return out_dir


def param_counts(spec: ModelSpec) -> dict[str, int]:
    """Parameter counts from the config: total, and N = total minus the input embedding (a lookup).

    N is the count in the 6N / 2N FLOP-per-token rule (Kaplan et al. 2020, §2.1).
    """
    h, v, f, n_layers = spec.hidden_size, spec.vocab_size, spec.intermediate_size, spec.num_layers
    kv = h * spec.num_kv_heads // spec.num_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q,o + k,v + MLP + 2 RMSNorm
    embed = v * h
    head = 0 if spec.tie_word_embeddings else v * h
    total = embed + n_layers * per_layer + h + head
    return {"total": total, "non_embedding": total - embed + (embed if spec.tie_word_embeddings else 0)}


def synth_pairs(shape: Shape, n: int, *, seed: int, vocab_size: int = 32000) -> list[dict[str, Any]]:
    """`n` text pairs {prompt, chosen, rejected}; responses start with a space so prompt + response
    is the same text whether a pipeline concatenates or tokenizes separately. Token counts
    (words, before EOS) are stored under `_lengths` for the token-level check."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(len(SPECIALS), vocab_size)}" for _ in range(k))

    rows = []
    for _ in range(n):
        p, c, r = rng.randint(*shape.prompt), rng.randint(*shape.response), rng.randint(*shape.response)
        rows.append(
            {"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r), "_lengths": [p, c, r]}
        )
    return rows


def ranked_rows(n: int, k: int, prompt: int, response: int, seed: int) -> list[dict[str, Any]]:
    """n ranked examples: a prompt of `prompt` words, k responses of `response` words, scores k..1."""
    rng = random.Random(seed)

    def words(m: int) -> str:
        return " ".join(f"w{rng.randrange(4, 32000)}" for _ in range(m))

    return [
        {
            "prompt": words(prompt),
            "responses": [" " + words(response) for _ in range(k)],
            "scores": [float(k - j) for j in range(k)],
        }
        for _ in range(n)
    ]


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write rows without the private `_lengths` field."""
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}) + "\n")
    return path


def preftune_config(
    *, model: str, data: str, out: str | Path, steps: int, batch: int, **overrides: Any
) -> Any:
    """The preftune `TrainConfig` every benchmark shares: DPO, float32, one micro-batch per step,
    constant lr 1e-5 with no warm-up, foreach AdamW, seed 0, no checkpoints, no progress bar;
    `overrides` win."""
    from preftune.config import TrainConfig

    settings: dict[str, Any] = {
        "method": "dpo",
        "model": model,
        "data": data,
        "out": str(out),
        "dtype": "float32",
        "max_steps": steps,
        "batch_size": batch,
        "micro_batch_size": batch,
        "lr": 1e-5,
        "scheduler": "constant",
        "warmup_steps": 0,
        "warmup_ratio": 0.0,
        "seed": 0,
        "save_every": 0,
        "progress": False,
        # The unfused multi-tensor AdamW: the implementation the TRL side runs (optim="adamw_torch"),
        # so both sides pay the same optimizer step (preftune's own default is the fused kernel).
        "optimizer_args": {"foreach": True},
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def install_step_clock() -> list[tuple[float, float]]:
    """Record (wall `perf_counter`, process CPU `process_time`) after every optimizer step of any
    torch optimizer in this process.

    The same global hook serves both sides, so step time is measured identically: the interval
    between consecutive steps' ends covers data collation, forward, backward, clipping and the
    update, and nothing before the first step (loading, tokenization) is in any interval. CPU time
    (all threads) is kept because on a shared machine it is far less sensitive to other load than
    wall time.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[tuple[float, float]] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append((time.perf_counter(), time.process_time())))
    return stamps


def rss_mb() -> float:
    """Current resident set size of this process in MiB (from /proc, Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every benchmark child process: offline, no tokenizer threads, and passive
    OpenMP waiting (`OMP_WAIT_POLICY=PASSIVE`, unless the caller's environment sets a policy).

    With the default active policy, an OpenMP thread that finishes its share of a parallel region
    spins for its siblings; on a machine other processes also use, a spinning thread holds a core
    the straggler needs, and two-thread step times turn bimodal (several-fold apart). Passive
    waiting sleeps instead, which costs a few microseconds per region on an idle machine.
    """
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    env.update(extra)
    return env


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages, recorded beside every timing (a shared machine)."""
    return [round(x, 2) for x in os.getloadavg()]


def run_child(argv: list[str], *, timeout: float = 1800.0) -> dict[str, Any]:
    """Run `python argv...` in a fresh process that prints one JSON object as its last stdout line;
    return that object plus `peak_rss_mb` (the child's ru_maxrss, read with wait4 for that pid
    only, so no other process counts) and `wall_s`."""
    import tempfile

    env = child_env()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=err, env=env)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"child {argv} timed out after {timeout}s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {argv} failed (exit {proc.returncode}); stderr tail:\n{stderr[-4000:]}")
    res = json.loads(lines[-1])
    res["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    res["wall_s"] = wall
    return res


def peak_rss_self_mb() -> float:
    """ru_maxrss of this process (KiB on Linux) in MiB: the high-water mark since it started."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(*, n: int = 1024, seconds: float = 3.0) -> float:
    """Best achieved float32 FLOP/s (wall clock) of `torch.mm` on n×n matrices: `matmul_peak`'s first."""
    return matmul_peak(n=n, seconds=seconds)[0]


def matmul_peak(*, n: int = 1024, seconds: float = 3.0) -> tuple[float, float]:
    """Best achieved float32 `torch.mm` rate on n×n matrices (2n³ per product) over ~`seconds`, as
    (FLOP per wall second, FLOP per process CPU second, all threads).

    The best of several short timed bursts, so a moment of contention on a shared machine lowers
    it less than a single average would. The CPU-time rate is what the cores do while they run this
    process: other load takes cores away (wall) but barely changes it, so it is the denominator of
    a utilisation that a shared machine does not distort.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best, best_cpu, end = 0.0, 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(4):
            torch.mm(a, b)
        t1, c1 = time.perf_counter(), time.process_time()
        best = max(best, 4 * 2 * n**3 / (t1 - t0))
        if c1 > c0:
            best_cpu = max(best_cpu, 4 * 2 * n**3 / (c1 - c0))
    return best, best_cpu


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def steps_rate(stamps: list[list[float]], *, skip: int = 1) -> tuple[float, float, int]:
    """Mean (wall s/step, CPU s/step) over the steps after the first `skip`, and how many were timed."""
    ts = stamps[skip - 1 :] if skip > 0 else stamps
    if len(ts) < 2:
        raise ValueError(f"need at least {skip + 1} optimizer steps to time, got {len(stamps)}")
    n = len(ts) - 1
    return (ts[-1][0] - ts[0][0]) / n, (ts[-1][1] - ts[0][1]) / n, n


def machine_info() -> dict[str, Any]:
    import platform

    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": load_average(),
        "omp_wait_policy": child_env()["OMP_WAIT_POLICY"],
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def save_results(name: str, data: dict[str, Any], table_md: str, *, quick: bool = False) -> tuple[Path, Path]:
    """Write benchmarks/results/NAME.json and NAME.md; a quick run writes into benchmarks/results/tmp/
    (git-ignored), so it never rewrites a tracked result file."""
    folder = RESULTS_DIR / "tmp" if quick else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    jp, mp = folder / f"{name}.json", folder / f"{name}.md"
    jp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    mp.write_text(table_md.rstrip() + "\n")
    return jp, mp


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats to 3 significant digits."""

    def fmt(x: Any) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
