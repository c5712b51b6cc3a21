"""Trainer pieces without a model: data-kind adaptation, batch assembly, metrics, data order,
checkpoint atomicity and pruning, the reference cache table."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from preftune.errors import ConfigError, TrainingError
from preftune.models.refcache import ReferenceStore
from preftune.models.reference import Blocks, load_cached, sequence_key
from preftune.train import checkpoint as ckpt
from preftune.train.batches import adapt_examples, build_batch, token_count
from preftune.train.loop import batch_indices
from preftune.train.metrics import MetricSums, preference_metrics
from preftune.types import Example, SequenceStats


def pair(p: list[int], w: list[int], l_: list[int], row: int = 1) -> Example:
    return Example(prompt_ids=p, response_ids=[w, l_], kind="pairwise", source_row=row)


def test_pairs_become_unpaired_with_mismatched_from_another_prompt() -> None:
    data = [pair([1], [5, 6], [7], 1), pair([2], [8], [9, 9, 9], 2)]
    out = adapt_examples(data, "unpaired", mismatched=True)
    assert [(e.label, e.response_ids[0]) for e in out] == [
        (1.0, [5, 6]),
        (0.0, [7]),
        (1.0, [8]),
        (0.0, [9, 9, 9]),
    ]
    # branch 1 is the completion of the next example whose prompt differs
    assert [e.response_ids[1] for e in out] == [[8], [8], [5, 6], [5, 6]]
    assert all(e.prompt_ids != o.prompt_ids for e, o in zip(out, [out[2], out[2], out[0], out[0]]))


def test_kind_mismatch_errors_name_the_row_and_fix() -> None:
    ranked = Example(
        prompt_ids=[1], response_ids=[[2], [3], [4]], kind="ranked", scores=[3, 2, 1], source_row=7
    )
    with pytest.raises(ConfigError, match="row 7 .*ranked_pairs"):
        adapt_examples([ranked], "pairwise")
    with pytest.raises(ConfigError, match="row 3 is unpaired"):
        adapt_examples([Example([1], [[2]], kind="unpaired", label=1.0, source_row=3)], "pairwise")


def test_build_batch_ragged_lists_and_token_grid() -> None:
    data = [
        Example([1], [[2, 3], [4]], kind="ranked", scores=[2.0, 1.0]),
        Example([1], [[5], [6], [7, 8, 9]], kind="ranked", scores=[3.0, 2.0, 1.0]),
    ]
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0], requires_grad=True)
    tok = torch.arange(15, dtype=torch.float32).view(5, 3)
    b = build_batch(data, SequenceStats(logps, torch.tensor([2, 1, 1, 1, 3]), tok), None)
    assert b.policy_logps.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert b.mask.tolist() == [[True, True, False], [True, True, True]]
    assert b.scores.tolist() == [[2.0, 1.0, 0.0], [3.0, 2.0, 1.0]]
    assert b.policy_token_logps[1, 2].tolist() == [12.0, 13.0, 14.0]
    b.policy_logps.sum().backward()  # the grid keeps the graph to the flat statistics
    assert logps.grad.tolist() == [1.0] * 5


def test_token_count_is_chosen_tokens_of_desirable_examples() -> None:
    data = [pair([1], [2, 3, 4], [5]), pair([1], [6], [7, 7])]
    assert token_count(None, data) == 4.0  # sft counts branch 0: 3 + 1
    unpaired = adapt_examples(data, "unpaired")
    assert token_count(None, unpaired) == 4.0  # undesirable completions do not count


def test_preference_metrics_hand_values() -> None:
    # chosen per-token: -2/2 = -1, -1/1 = -1 ; rejected: -3/1, -0.5/1
    stats = SequenceStats(torch.tensor([-2.0, -3.0, -1.0, -0.5]), torch.tensor([2, 1, 1, 1]))
    b = build_batch([pair([1], [2, 3], [4]), pair([1], [5], [6])], stats, None)
    sums = MetricSums()
    preference_metrics(b, sums, unpaired=False)
    m = sums.result()
    assert m["logps/chosen_per_token"] == -1.0 and m["logps/rejected_per_token"] == -1.75
    assert (
        m["logps/chosen"] == -1.5 and m["logps/rejected"] == -1.75
    )  # sums, TRL's meaning: -2, -1 / -3, -0.5
    assert m["policy_rank_accuracy"] == 0.5  # -2 > -3 yes, -1 > -0.5 no


def test_metric_sums_merge_is_a_global_mean() -> None:
    a, b = MetricSums(), MetricSums()
    a.add("x", torch.tensor([1.0, 2.0]))
    b.add("x", torch.tensor([6.0]), torch.tensor([True]))
    a.add_total("loss", 0.25)
    b.add_total("loss", 0.5)
    a.merge(b.state())
    assert a.result() == {"loss": 0.75, "x": 3.0}


def test_batch_indices_cover_each_epoch_once_and_are_seeded() -> None:
    first_epoch = [i for s in range(3) for i in batch_indices(10, 4, seed=1, phase=0, step=s)]
    assert sorted(first_epoch) == list(range(10))  # 4 + 4 + 2
    assert batch_indices(10, 4, seed=1, phase=0, step=1) == batch_indices(10, 4, seed=1, phase=0, step=1)
    assert batch_indices(10, 4, seed=1, phase=0, step=3) != batch_indices(10, 4, seed=2, phase=0, step=3)


def _save(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, keep: int = 2) -> Path:
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ckpt.save_checkpoint(
        root,
        step,
        model=model,
        optimizer=opt,
        scheduler=sched,
        trainer_state={"phase": 0, "step_in_phase": step},
        loss_state={"bco": {"delta": torch.tensor(0.5)}},
        keep_last=keep,
    )


def test_checkpoint_roundtrip_prune_and_partial(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step, model, opt)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-2", "step-3"]
    (root / ".tmp-step-4-123").mkdir()  # a run killed while writing
    assert ckpt.find_resume(tmp_path, "latest").name == "step-3"
    ckpt.remove_partial(root)
    assert not (root / ".tmp-step-4-123").exists()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    expected_rng = torch.rand(3)
    with torch.no_grad():
        model.weight.add_(1.0)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    state, loss_state, extra = ckpt.load_checkpoint(
        root / "step-3", model=model, optimizer=opt2, scheduler=sched2
    )
    assert state["step"] == 3 and state["step_in_phase"] == 3 and extra == {}
    assert float(loss_state["bco"]["delta"]) == 0.5
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_rng)  # RNG restored to the state at save time


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    """A run resumed from step-3 past a newer step-9 (damaged, or newer than `--resume PATH`) with
    keep_last=1: each new checkpoint stays (the step-9 left by the earlier run is not counted), the
    older one goes; re-saving step 9 replaces that folder, and a file in its place."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    root = tmp_path / "checkpoints"
    for step in (3, 9):
        _save(root, step, model, opt, keep=2)
    (root / "step-9" / "model.safetensors").write_bytes(b"damaged")
    _save(root, 4, model, opt, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-4", "step-9"]
    _save(root, 5, model, opt, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-5", "step-9"]
    _save(root, 9, model, opt, keep=1)  # the damaged step-9 is replaced by a complete one
    assert [p.name for p in root.iterdir()] == ["step-9"]
    assert ckpt.find_resume(tmp_path, "latest") == root / "step-9"
    shutil.rmtree(root / "step-9")
    (root / "step-9").write_text("not a checkpoint")
    _save(root, 9, model, opt, keep=1)
    assert [p.name for p in root.iterdir()] == ["step-9"] and (root / "step-9" / "checksums.json").is_file()


def test_resume_errors(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no checkpoint"):
        ckpt.find_resume(tmp_path, "latest")
    with pytest.raises(TrainingError, match="not a checkpoint folder"):
        ckpt.find_resume(tmp_path, str(tmp_path))


def test_reference_cache_roundtrip_with_token_logps(tmp_path: Path) -> None:
    ex = [Example([1, 2], [[3, 4], [5]])]
    blocks = Blocks()
    blocks.add(ex, 4)
    store = ReferenceStore(tmp_path, "fp")
    store.append([(sequence_key([1, 2], [3, 4]), (-1.5, 2, torch.tensor([-1.0, -0.5])))])
    store.append([(sequence_key([1, 2], [5]), (-2.0, 1, None))])
    ref = load_cached(tmp_path, "fp", blocks, token_logps=False, log=print)
    assert ref.missing_groups(ex) == []
    tokens = load_cached(tmp_path, "fp", blocks, token_logps=True, log=print)
    assert tokens.missing_groups(ex) == [0]  # per-token values of [5] were never stored
    st = ref.stats(ex)
    assert st.logps.tolist() == [-1.5, -2.0] and st.lengths.tolist() == [2, 1]
    assert sequence_key([1, 2], [3]) != sequence_key([1], [2, 3])  # the prompt boundary is in the key


def test_metrics_jsonl_has_no_nan(tmp_path: Path) -> None:
    from preftune.train.logging import MetricsLogger

    log = MetricsLogger(tmp_path, sinks=[], run_name="r", config={})
    log.log({"step": 1, "split": "train", "loss": math.nan, "lr": 0.1})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1,
        "split": "train",
        "loss": None,
        "lr": 0.1,
    }


def test_missing_sink_is_a_config_error() -> None:
    import importlib.util

    from preftune.train.logging import check_sinks

    for name in ("tensorboard", "wandb", "mlflow"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ConfigError, match=f"pip install 'preftune\\[{name}\\]'"):
                check_sinks([name])


def test_gradient_buckets_round_trip() -> None:
    """Bucketed all-reduce puts every gradient back in place (a 1-process gloo group: SUM = identity),
    across dtype changes and buckets smaller than one tensor; missing gradients become zeros."""
    import socket

    import torch.distributed as dist

    from preftune.train.distributed import World, all_reduce_grads

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        params = [
            torch.nn.Parameter(torch.zeros(n, dtype=d))
            for n, d in ((5, torch.float32), (3, torch.float32), (4, torch.float64), (2, torch.float32))
        ]
        expected = [torch.arange(p.numel(), dtype=p.dtype) + 10 * i for i, p in enumerate(params)]
        for p, g in zip(params[:3], expected):
            p.grad = g.clone()
        all_reduce_grads(params, World(rank=0, size=2), bucket_bytes=24)  # size=2 forces the collective path
        for p, g in zip(params[:3], expected):
            assert torch.equal(p.grad, g)
        assert torch.equal(params[3].grad, torch.zeros(2))
    finally:
        dist.destroy_process_group()


def test_optimizers_take_their_fused_kernel_unless_told_otherwise() -> None:
    from preftune.config import TrainConfig
    from preftune.train.optim import build_optimizer

    def build(name: str, **args: object) -> torch.optim.Optimizer:
        config = TrainConfig(method="dpo", model="m", data="d", out="o", optimizer=name, optimizer_args=args)
        return build_optimizer([torch.nn.Parameter(torch.randn(4, 3))], config)

    assert build("adamw").defaults["fused"] is True
    assert build("adamw", foreach=True).defaults["fused"] in (None, False)  # the user's choice stands
    assert build("adamw", fused=False).defaults["fused"] is False
    assert "fused" not in build("rmsprop").defaults  # no fused kernel: built as before
    # fused and the default path give the same update up to float rounding
    torch.manual_seed(0)
    grad = torch.randn(4, 3)
    updated = []
    for args in ({}, {"foreach": True}):
        opt = build("adamw", **args)
        (p,) = opt.param_groups[0]["params"]
        start = p.detach().clone()
        p.grad = grad.clone()
        opt.step()
        updated.append(p.detach() - start)
    torch.testing.assert_close(updated[0], updated[1], atol=1e-7, rtol=1e-5)


def test_deterministic_algorithms_sets_torch_flags_without_loading_inductor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The public torch function imports `torch._inductor.config` (~70 MiB); ours must not, and must set
    the same eager flags (deterministic, warn-only) — and Inductor's flag when Inductor is loaded."""
    import sys
    import types

    from preftune.train.api import deterministic_algorithms

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)  # restored after
    monkeypatch.delitem(sys.modules, "torch._inductor.config", raising=False)
    try:
        torch._C._set_deterministic_algorithms(False)
        deterministic_algorithms()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert "torch._inductor.config" not in sys.modules
        assert torch.utils.deterministic.fill_uninitialized_memory is False  # no NaN fill of torch.empty
        loaded = types.SimpleNamespace(deterministic=False)  # Inductor already imported by someone else
        monkeypatch.setitem(sys.modules, "torch._inductor.config", loaded)
        deterministic_algorithms()
        assert loaded.deterministic is True
    finally:
        torch._C._set_deterministic_algorithms(before[0], warn_only=before[1])
