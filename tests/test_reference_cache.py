"""The reference log-prob cache: checksummed append-only shards, damaged ones set aside and recomputed,
a lost cache recomputed on --resume to the very same floats, shared caches never clobbered, stale temp
files removed, and only the examples a run uses computed (per batch with LoRA, with progress lines)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import preftune.models.refcache as refcache
import preftune.models.reference as reference
import preftune.train.run as train_run
from preftune.config import TrainConfig
from preftune.models.refcache import ReferenceStore, ShardDamaged, _host, decode, encode
from preftune.models.reference import sequence_key
from preftune.train.api import train
from preftune.train.loop import batch_indices
from preftune.train.refsetup import epoch_order
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refcache")
    return {
        "root": root,
        "model": tiny_model(root / "model"),
        "data": write_jsonl(root / "pairs.jsonl", pair_rows(8)),
        "other": write_jsonl(root / "other.jsonl", pair_rows(8, seed=5)),
        "large": write_jsonl(root / "large.jsonl", pair_rows(120, seed=7)),
    }


def config(env: dict[str, Path], out: str, cache: str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        method="dpo", model=str(env["model"]), data=str(env["data"]), out=str(env["root"] / out),
        max_steps=6, batch_size=4, lr=3e-3, progress=False, cache_dir=str(env["root"] / cache),
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def weights(env: dict[str, Path], out: str, lora: bool = False) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    return load_file(str(env["root"] / out / "final" / name))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def shards(env: dict[str, Path], cache: str) -> list[Path]:
    return sorted((env["root"] / cache / "reference").glob("*/*.pref"))


class Forwards:
    """Counts the examples that go through reference forwards."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.examples = 0
        real = reference._model_stats

        def counting(model: Any, examples: Any, *a: Any) -> Any:
            self.examples += len(examples)
            return real(model, examples, *a)

        monkeypatch.setattr(reference, "_model_stats", counting)


def test_shard_roundtrip_and_every_damage_is_detected() -> None:
    key = sequence_key([1, 2], [3])
    raw = encode("fp", [(key, (-1.25, 2, torch.tensor([-1.0, -0.25]))), (b"k" * 16, (-3.0, 1, None))])
    (k0, (logp, n, tok)), (k1, (_, _, none)) = decode(raw, "fp")
    assert (k0, logp, n, tok.tolist(), k1, none) == (key, -1.25, 2, [-1.0, -0.25], b"k" * 16, None)
    body = raw.index(key)  # the body starts with the keys; the log-probs follow
    flipped = bytearray(raw)
    flipped[body + 32 + 3] ^= 0x40  # the exponent byte of the first log-prob
    with pytest.raises(ShardDamaged, match="checksum mismatch"):
        decode(bytes(flipped), "fp")
    with pytest.raises(ShardDamaged, match="truncated"):
        decode(raw[:-3], "fp")
    with pytest.raises(ShardDamaged, match="bad magic"):
        decode(b"\0" * len(raw), "fp")
    with pytest.raises(ShardDamaged, match="another reference model"):
        decode(raw, "other")


def test_a_flipped_byte_is_named_set_aside_and_recomputed(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    train(config(env, "clean", "c-flip"))
    first = shards(env, "c-flip")[0]
    raw = bytearray(first.read_bytes())
    raw[-1] ^= 0x01  # inside the tensor data, not the header
    first.write_bytes(bytes(raw))
    capsys.readouterr()
    train(config(env, "after-flip", "c-flip"))
    out = capsys.readouterr().out
    assert f"reference cache: {first} is damaged (checksum mismatch); moved to " in out
    assert (first.parent / "damaged" / first.name).read_bytes() == bytes(raw)
    assert "reference: computing log-probs of " in out  # its entries, recomputed
    assert_same(weights(env, "clean"), weights(env, "after-flip"))  # the same floats as the clean run


def stop_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    real, calls = train_run.objective_on_batch, {"n": 0}

    def stopping(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == steps + 1:
            raise RuntimeError(f"stopped in step {steps + 1}")
        return real(*a, **kw)

    monkeypatch.setattr(train_run, "objective_on_batch", stopping)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_the_cache_is_deleted_is_exact(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], lora: bool
) -> None:
    """8 examples, batch 4: 6 steps are 3 epochs. Stopped in step 4 (epoch 2, every entry cached), the
    cache deleted: the resumed run recomputes the entries it still needs from the initial model (LoRA:
    the policy's base, batch by batch), in the same groups, and ends bit-identical."""
    tag = "lora" if lora else "full"
    extra: dict[str, Any] = {"lora": True, "lr": 1e-2} if lora else {}
    train(config(env, f"whole-{tag}", f"c-whole-{tag}", **extra))
    stop_after(monkeypatch, 3)
    stopped = config(env, f"stopped-{tag}", f"c-del-{tag}", save_every=1, **extra)
    with pytest.raises(RuntimeError, match="step 4"):
        train(stopped)
    monkeypatch.undo()
    shutil.rmtree(env["root"] / f"c-del-{tag}")
    capsys.readouterr()
    train(TrainConfig(**{**stopped.__dict__, "resume": "latest"}))
    out = capsys.readouterr().out
    assert "reference: computing log-probs" in out or "computed batch by batch" in out
    assert_same(weights(env, f"whole-{tag}", lora), weights(env, f"stopped-{tag}", lora))


def test_resume_with_the_cache_intact_computes_nothing(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stop_after(monkeypatch, 2)
    stopped = config(env, "stopped-intact", "c-intact", save_every=1)
    with pytest.raises(RuntimeError, match="step 3"):
        train(stopped)
    monkeypatch.undo()
    forwards = Forwards(monkeypatch)
    capsys.readouterr()
    train(TrainConfig(**{**stopped.__dict__, "resume": "latest"}))
    assert "reference: resumed from the cache" in capsys.readouterr().out
    assert forwards.examples == 0


def test_two_runs_on_other_data_keep_each_others_entries(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    train(config(env, "data-a", "c-shared", max_steps=2))
    train(config(env, "data-b", "c-shared", max_steps=2, data=str(env["other"])))
    forwards = Forwards(monkeypatch)
    capsys.readouterr()
    train(config(env, "data-a2", "c-shared", max_steps=2))
    train(config(env, "data-b2", "c-shared", max_steps=2, data=str(env["other"])))
    assert capsys.readouterr().out.count("reference pass skipped") == 2
    assert forwards.examples == 0
    assert len(shards(env, "c-shared")) == 4  # 2 batches each, one shard per batch; none rewritten


@pytest.mark.parametrize("lora", [False, True])
def test_a_short_run_computes_only_its_batches(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], lora: bool
) -> None:
    """120 examples, 3 steps of 4: 12 examples go through the reference (each with its two responses,
    in one forward per batch), with a progress line per batch; a second run computes none."""
    tag = "lora" if lora else "full"
    extra: dict[str, Any] = {"lora": True} if lora else {}
    forwards = Forwards(monkeypatch)
    train(config(env, f"short-{tag}", f"c-short-{tag}", data=str(env["large"]), max_steps=3, **extra))
    out = capsys.readouterr().out
    assert forwards.examples == 12
    if lora:
        assert re.search(r"reference: 0 of (\d+) sequences in the cache", out)
        assert "computed batch by batch as training reaches them" in out
    else:  # 24 responses, fewer distinct ones (the data repeats some answers)
        found = re.search(r"reference: computing log-probs of (\d+) of (\d+) sequences", out)
        assert found and found[1] == found[2] and 12 < int(found[1]) <= 24
        lines = [x.split(",")[0] for x in out.splitlines() if " batches (" in x]
        assert lines == [f"reference: {i}/3 batches ({100 * i // 3}%)" for i in (1, 2, 3)]
    train(config(env, f"short2-{tag}", f"c-short-{tag}", data=str(env["large"]), max_steps=3, **extra))
    assert forwards.examples == 12  # nothing more
    assert "reference pass skipped" in capsys.readouterr().out


def test_values_computed_per_batch_equal_values_read_from_the_cache(env: dict[str, Path]) -> None:
    """LoRA: the first run computes reference log-probs batch by batch, the second reads them all."""
    extra: dict[str, Any] = {"lora": True, "lr": 1e-2}
    train(config(env, "lazy", "c-lazy", **extra))
    train(config(env, "read", "c-lazy", **extra))
    assert_same(weights(env, "lazy", True), weights(env, "read", True))
    timing = ("tokens_per_s", "examples_per_s")
    records = [
        [
            {k: v for k, v in json.loads(x).items() if k not in timing}
            for x in (env["root"] / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("lazy", "read")
    ]
    assert records[0] == records[1] and len(records[0]) == 6


@pytest.mark.parametrize("grouped", [False, True])
def test_groups_are_the_first_epochs_batches(grouped: bool) -> None:
    data: Any = [SimpleNamespace(prompt_ids=[1, i // 2]) for i in range(10)]  # pairs of equal prompts
    config: Any = SimpleNamespace(seed=3, group_by_prompt=grouped)
    order = epoch_order(data, config, phase=1, epoch=0)
    groups = [i // 2 for i in range(10)] if grouped else None
    assert [order[i : i + 4] for i in (0, 4, 8)] == [
        batch_indices(10, 4, seed=3, phase=1, step=s, groups=groups) for s in range(3)
    ]


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    folder = tmp_path / "reference" / "fp"
    folder.mkdir(parents=True)
    host = _host()
    stale = folder / f".00000000000000000001-{host}-{pid}-0.pref.tmp"
    live = folder / f".00000000000000000002-{host}-{os.getpid()}-0.pref.tmp"
    other_host = folder / f".00000000000000000003-elsewhere-{pid}-0.pref.tmp"
    old_layout = tmp_path / "reference" / f".fp.safetensors.{pid}.tmp"
    for p in (stale, live, other_host, old_layout):
        p.write_bytes(b"partial")
    ReferenceStore(tmp_path / "reference", "fp").load()
    assert not stale.exists() and not old_layout.exists()
    assert live.exists() and other_host.exists()  # a running writer; a writer on another host


def test_concurrent_writers_keep_both(tmp_path: Path) -> None:
    """Two runs open the same cache before either writes (the old single-file layout kept the last
    writer's table only): both entries survive, and the first value of a sequence stays."""
    a, b = ReferenceStore(tmp_path, "fp"), ReferenceStore(tmp_path, "fp")
    assert a.load() == b.load() == {}
    a.append([(b"a" * 16, (-1.0, 1, None)), (b"s" * 16, (-5.0, 2, None))])
    b.append([(b"b" * 16, (-2.0, 1, None)), (b"s" * 16, (-6.0, 2, torch.tensor([-3.0, -3.0])))])
    table = ReferenceStore(tmp_path, "fp").load()
    assert {k: v[:2] for k, v in table.items()} == {
        b"a" * 16: (-1.0, 1),
        b"b" * 16: (-2.0, 1),
        b"s" * 16: (-5.0, 2),
    }
    assert table[b"s" * 16][2].tolist() == [-3.0, -3.0]  # per-token values added, the log-prob kept


def test_many_shards_are_merged_into_one_with_the_same_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refcache, "COMPACT_AT", 3)
    store = ReferenceStore(tmp_path, "fp")
    for i in range(4):
        store.append([(bytes([i]) * 16, (-float(i), 1, None))])
    store.append([(bytes([0]) * 16, (-9.0, 1, torch.tensor([-9.0])))])  # a later value: tokens only
    with refcache._lock(store.folder, exclusive=False):  # a reader holds the folder: no compaction
        ReferenceStore(tmp_path, "fp").load(compact=True)
    assert len(store.shards()) == 5
    before = ReferenceStore(tmp_path, "fp").load(compact=True)
    assert len(store.shards()) == 1 and store.shards()[0].name.endswith("-m.pref")
    after = ReferenceStore(tmp_path, "fp").load()
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in before.items()}
    assert before[bytes([0]) * 16][:2] == (-0.0, 1) and after[bytes([0]) * 16][2].tolist() == [-9.0]
    store.append([(b"n" * 16, (-1.5, 2, None))])  # a shard written after the merge sorts after it
    assert ReferenceStore(tmp_path, "fp").load()[b"n" * 16][0] == -1.5


def test_reading_never_changes_the_cache_folder(tmp_path: Path) -> None:
    """`preftune sweep` tells a run that reused the cache from one that computed by its files."""
    store = ReferenceStore(tmp_path, "fp")
    store.append([(b"a" * 16, (-1.0, 1, None))])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in store.folder.iterdir())
    ReferenceStore(tmp_path, "fp").load(compact=True)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in store.folder.iterdir()) == before


def test_a_large_held_out_set_computed_on_demand_shows_progress(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """LoRA computes per batch; the first evaluation needs the 120 held-out examples = 30 batches of 4,
    plus the second training batch when it holds one of their sequences first (the data repeat
    answers): N in 30..31 batches, a line per ceil(N / 20) of them."""
    train(config(env, "lazy-eval", "c-lazy-eval", lora=True, max_steps=1, eval_data=str(env["large"])))
    lines = [x.split(",")[0] for x in capsys.readouterr().out.splitlines() if " batches (" in x]
    n = int(lines[-1].split("/")[1].split()[0])
    assert n in (30, 31)
    done = [*range(2, n, 2), n]
    assert lines == [f"reference: {i}/{n} batches ({100 * i // n}%)" for i in done]
