"""The memory floor of a full float32 DPO training process: what its resident set holds before any
step's transient (activations, the LM head's chunks, freed blocks the allocator keeps), next to TRL's
measured peak — how low "peak RSS ≤ 0.5× TRL's" can go at all.

    .bench-venv/bin/python benchmarks/memory_floor.py --model-size 20m 45m

Each size runs in a fresh child (the benchmark children's environment): the imports of a preftune DPO
child (`preftune.train.api`), the tokenizer and the model loaded as preftune loads it, every weight
read once (the reference fingerprint reads them all), a float32 gradient per weight written, and
fused AdamW's two moments after one step — VmRSS after each stage. The floor is the last. Against
a `dpo_vs_trl.py` result (`--against`, default the latest per size), the table gives the floor as a
fraction of TRL best's peak per shape, and the room a 0.5× budget leaves for a step's transients
(negative: the budget is below the floor). Results: benchmarks/results/memory_floor.{json,md}
(`--smoke`: a tiny model, results in results/tmp/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

# the dpo_vs_trl.py result each size's floor is set against (docs/performance.md, §0 "Latest")
AGAINST = {"20m": "dpo_vs_trl_20m_finite_grads", "45m": "dpo_vs_trl_45m"}
STAGES = ("imports", "tokenizer_and_model", "weights_read", "gradients", "adamw_moments")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(size: str) -> dict[str, Any]:
    """VmRSS (MiB) after each stage, in this (fresh) process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = bu.save_model(bu.MODELS[size], Path(tmp) / "model")
        import torch

        from preftune.train.api import train  # noqa: F401  (a DPO child's imports)

        out: dict[str, Any] = {"imports": _rss_mib()}
        from transformers import AutoTokenizer

        from preftune.models.load import load_causal_lm

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_causal_lm(path)
        out["tokenizer_and_model"] = _rss_mib()
        with torch.no_grad():
            out["checksum"] = float(sum(float(p.sum()) for p in model.parameters()))
        out["weights_read"] = _rss_mib()
        for p in model.parameters():
            p.grad = torch.empty_like(p).fill_(0.0)  # written: resident, as after a backward
        out["gradients"] = _rss_mib()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
        optimizer.step()  # held until read: its moments are the floor's largest part
        out["adamw_moments"] = _rss_mib()
        out["moment_elements"] = sum(
            v.numel() for state in optimizer.state.values() for k, v in state.items() if k != "step"
        )
        out["params"] = sum(p.numel() for p in model.parameters())
        out["vocab"] = len(tokenizer)
    return out


def _trl_peaks(name: str) -> dict[str, dict[str, float]]:
    """Per shape: TRL best's and preftune's median peak RSS (MiB) in results/NAME.json."""
    data = json.loads((bu.RESULTS_DIR / f"{name}.json").read_text())
    return {
        shape: {side: float(r["median"][side]["peak_rss_mb"]) for side in ("trl", "preftune")}
        for shape, r in data["shapes"].items()
    }


def _row(size: str, stages: dict[str, Any], against: str | None) -> list[Any]:
    floor = stages["adamw_moments"]
    row = [size, f"{stages['params'] / 1e6:.1f}M", *(round(stages[s]) for s in STAGES)]
    if not against:
        return [*row, "—", "—"]
    peaks = _trl_peaks(against)
    shares = ", ".join(f"{s} {floor / p['trl']:.3f}× ({p['trl']:.0f})" for s, p in peaks.items())
    room = ", ".join(
        f"{s} {0.5 * p['trl'] - floor:+.0f} (preftune uses {p['preftune'] - floor:.0f})"
        for s, p in peaks.items()
    )
    return [*row, shares, room]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-size", nargs="+", default=["20m", "45m"], choices=sorted(bu.MODELS))
    ap.add_argument("--against", nargs="*", help="a dpo_vs_trl.py result name per size (default: AGAINST)")
    ap.add_argument("--smoke", action="store_true", help="the tiny model, no comparison, results in tmp/")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child)))
        return 0
    sizes = ["tiny"] if a.smoke else a.model_size
    against = a.against or [None if a.smoke else AGAINST.get(s) for s in sizes]
    measured, rows = {}, []
    for size, name in zip(sizes, against, strict=True):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", size], env=bu.child_env(), capture_output=True, text=True
        )
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        measured[size] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "against": name}
        rows.append(_row(size, measured[size], name))
    header = [
        "model",
        "params",
        *(f"{s} MiB" for s in STAGES),
        "floor ÷ TRL best peak (MiB)",
        "0.5× room MiB",
    ]
    table = bu.md_table(header, rows)
    command = "python benchmarks/memory_floor.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = {"command": command, "machine": bu.machine_info(), "sizes": measured}
    bu.save_results("memory_floor", data, f"{command}\n\n{table}", quick=a.smoke)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
