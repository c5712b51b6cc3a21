"""SePPO and PSO: pairs whose loser the model generates during training.

Loss identities on constructed statistics (hand-derived values), the generated loser equals the
diffusers pipeline's own DDIM sample, SePPO's reference is a drawn snapshot whose pool survives a
checkpoint, and both methods run as `preftune train seppo|pso --model PIPELINE_FOLDER`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from preftune import losses
from preftune.diffusion import DenoisingStats, pair_batch
from preftune.types import Example

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(mse_policy: list[float], mse_ref: list[float], grad: bool = False):  # type: ignore[no-untyped-def]
    """Rows [winners..., losers...] of hand-made mse values (float64 so that hand values are exact)."""
    policy = torch.tensor(mse_policy, dtype=torch.float64, requires_grad=grad)
    return policy, pair_batch(
        DenoisingStats(mse=policy), DenoisingStats(mse=torch.tensor(mse_ref, dtype=torch.float64))
    )


def test_seppo_flipper_sign_rule_on_constructed_statistics() -> None:
    """Pair A: the policy fits the anchor better (Δ_w = 0.4 − 0.5 < 0) → s = +1, the reference sample is
    a loser: logit −β/2 (Δ_w − Δ_ref) = −5 (−0.1 − 0.1) = 1.0. Pair B: the reference fits the anchor
    better (Δ_w = +0.1) → s = −1, flipped: v1 (`aaf="v1"`, the default) counts the reference
    sample as a winner, −5 (0.1 + (−0.05)) = −0.25; v2's SFT drops its term, logit −5 · 0.1 = −0.5.
    Pair C: a tie (Δ_w = 0, as at the first step) → s = +1: logit −5 (0 − 0.2) = 1.0. β = 10."""
    _, batch = _batch([0.4, 0.5, 0.3, 0.6, 0.45, 0.7], [0.5, 0.4, 0.3, 0.5, 0.5, 0.5])
    out = losses.get("seppo")(batch, beta=10.0)
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.25)), math.log1p(math.exp(-1.0))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.metrics["seppo/flipped"].tolist() == [0.0, 1.0, 0.0]  # the AAF rate's per-pair terms
    v2 = losses.get("seppo")(batch, beta=10.0, aaf="v2")
    assert v2.losses.tolist() == pytest.approx(
        [expected[0], math.log1p(math.exp(0.5)), expected[2]], abs=1e-6
    )
    no_aaf = losses.get("seppo")(batch, beta=10.0, aaf="off")  # the paper's "w/o AAF"
    no_flip = math.log1p(math.exp(0.75))  # pair B as a loser: logit −5 (0.1 − (−0.05)) = −0.75
    assert no_aaf.losses[1].item() == pytest.approx(no_flip, abs=1e-6)
    assert no_aaf.metrics["seppo/flipped"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("aaf", ["v1", "v2"])
def test_seppo_flip_decides_which_way_the_reference_sample_moves(aaf: str) -> None:
    """With s = +1 the loss rises as the reference sample's mse falls (pushed away, as a loser); with
    s = −1 v1 pulls it in (as a winner) and v2's SFT leaves it alone (no gradient). The
    winner is pulled in either way."""
    policy, batch = _batch([0.4, 0.5, 0.6, 0.45], [0.5, 0.4, 0.5, 0.5], grad=True)
    losses.get("seppo")(batch, beta=10.0, aaf=aaf).losses.sum().backward()
    assert policy.grad is not None
    g = policy.grad.tolist()  # d loss / d mse: rows [w_A, w_B, ref_A, ref_B]
    assert g[0] > 0 and g[1] > 0  # a lower winner mse always lowers the loss
    assert g[2] < 0  # pair A (s = +1): a higher mse on the reference sample lowers the loss
    assert g[3] == 0 if aaf == "v2" else g[3] > 0  # pair B (s = −1): a winner (v1) or dropped (v2)


def test_seppo_without_flips_is_diffusion_dpo_and_with_flips_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    better = ref.clone()
    better[:8] -= 0.01 * torch.rand(8, generator=g, dtype=torch.float64)  # every anchor: Δ_w < 0
    better[8:] += 0.01 * torch.randn(8, generator=g, dtype=torch.float64)
    batch = pair_batch(DenoisingStats(mse=better), DenoisingStats(mse=ref))
    seppo = losses.get("seppo")(batch, beta=5000.0).losses
    dpo = losses.get("dpo")(batch, beta=5000.0).losses
    assert torch.allclose(seppo, dpo, atol=1e-6)
    worse = better.clone()
    worse[0] = ref[0] + 0.01  # pair 0's anchor now fits worse than the reference: flipped
    batch = pair_batch(DenoisingStats(mse=worse), DenoisingStats(mse=ref))
    d_w, d_l = float(worse[0] - ref[0]), float(worse[8] - ref[8])
    for aaf, logit in (("v2", -2500.0 * d_w), ("v1", -2500.0 * (d_w + d_l))):
        flipped = losses.get("seppo")(batch, beta=5000.0, aaf=aaf).losses
        assert float(flipped[0]) == pytest.approx(math.log1p(math.exp(-logit)), rel=1e-5)
        assert torch.allclose(flipped[1:], dpo[1:], atol=1e-6)


def test_pso_is_diffusion_dpo_with_the_reference_image_as_loser() -> None:
    """−log σ(−β/2 · d), d = (mse_θ^w − mse_ref^w) − (mse_θ^l − mse_ref^l), l = the reference image; the
    registered dpo gives the same per-pair values; β → 0 gives log 2 whatever the statistics."""
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(12, generator=g) + 0.2
    policy = ref + 1e-4 * torch.randn(12, generator=g)
    batch = pair_batch(DenoisingStats(mse=policy), DenoisingStats(mse=ref))
    d = (policy[:6] - ref[:6]) - (policy[6:] - ref[6:])
    official = -torch.nn.functional.logsigmoid(-0.5 * 5000.0 * d)
    pso = losses.get("pso")(batch, beta=5000.0).losses
    assert torch.allclose(pso, official, atol=2e-4)  # float32 rounding of ρ at β = 5000 (seam notes)
    assert torch.equal(pso, losses.get("dpo")(batch, beta=5000.0).losses)
    tiny = losses.get("pso")(batch, beta=1e-9).losses
    assert torch.allclose(tiny, torch.full_like(tiny, math.log(2.0)), atol=1e-6)


# --- the generated loser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preftune.diffusion.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("gen") / "pipe")


def _examples(pipe: Path, n: int) -> list[Example]:
    from preftune.diffusion.encode import load_encoders
    from preftune.diffusion.tiny import encode_prompts

    _, tokenizer, text_encoder = load_encoders(pipe)
    texts = encode_prompts(tokenizer, text_encoder, [f"a red square {i}" for i in range(n)])
    g = torch.Generator().manual_seed(0)
    return [
        Example([], [[0], [0]], meta={"latents": [torch.randn(4, 8, 8, generator=g)] * 2, "text": [texts[i]]})
        for i in range(n)
    ]


def test_generated_loser_is_the_pipelines_ddim_sample(pipe: Path) -> None:
    """pso: branch 0 stays the data's image; branch 1 is the image StableDiffusionPipeline (DDIM,
    guidance 1) returns from the same initial noise, prompt embedding and number of steps, as 8-bit
    pixels encoded the way the data's images are (without a VAE: the pipeline's latents)."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from preftune.diffusion.denoiser import load_denoiser
    from preftune.diffusion.encode import load_vae, vae_latents
    from preftune.diffusion.generated import GeneratedLoserPhase
    from preftune.diffusion.phase import noise_seed

    examples = _examples(pipe, 3)
    phase = GeneratedLoserPhase(0, examples, 2, 2, 7, method="pso", sample_steps=3, vae=load_vae(pipe))
    phase.attach(load_denoiser(pipe))
    raw = GeneratedLoserPhase(0, examples, 2, 2, 7, method="pso", sample_steps=3)
    raw.attach(phase.policy)
    batch, raw_batch = phase.batch(1), raw.batch(1)
    sd = StableDiffusionPipeline.from_pretrained(
        str(pipe), safety_checker=None, requires_safety_checker=False
    )
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    for j, e in enumerate(batch):
        assert any(torch.equal(e.meta["latents"][0], x.meta["latents"][0]) for x in examples)  # type: ignore[index]
        g = torch.Generator().manual_seed(noise_seed(7, 0, 1, j, "loser"))
        noise = torch.randn(4, 8, 8, generator=g)[None]
        call = {"prompt_embeds": e.meta["text"][0][None], "num_inference_steps": 3, "guidance_scale": 1.0}  # type: ignore[index]
        latent = sd(**call, latents=noise, output_type="latent").images
        assert torch.allclose(raw_batch[j].meta["latents"][1], latent[0], atol=1e-5)  # type: ignore[index]
        pixels = np.round(sd(**call, latents=noise, output_type="np").images * 255.0) / 127.5 - 1.0
        want = vae_latents(sd.vae, torch.from_numpy(pixels).permute(0, 3, 1, 2).float())
        assert torch.allclose(e.meta["latents"][1], want[0], atol=1e-4)  # type: ignore[index]
        assert not torch.allclose(e.meta["latents"][1], latent[0], atol=1e-2)  # type: ignore[index]
    assert torch.equal(phase.batch(1)[0].meta["latents"][1], batch[0].meta["latents"][1])  # type: ignore[index]


def test_seppo_reference_is_a_drawn_snapshot_and_the_pool_is_checkpointed(pipe: Path) -> None:
    from preftune.diffusion.denoiser import load_denoiser
    from preftune.diffusion.generated import GeneratedLoserPhase
    from preftune.models.reference import ModelReference

    policy = load_denoiser(pipe)
    reference = ModelReference(copy.deepcopy(policy))
    phase = GeneratedLoserPhase(
        0, _examples(pipe, 2), 9, 2, 0, method="seppo", sample_steps=2, snapshot_every=2
    )
    phase.attach(policy)
    phase.attach_reference(reference)
    name, param = next(iter(policy.named_parameters()))
    for step in range(6):
        phase.batch(step)
        with torch.no_grad():
            param.add_(1.0)  # a "training step": every snapshot differs in this parameter
        assert [s for s, _ in phase.snapshots] == list(range(0, step + 1, 2))
        drawn = int(phase.metrics["seppo/reference_step"])
        snapshot = dict(phase.snapshots)[drawn]
        assert torch.equal(reference.model.state_dict()[name], snapshot[name])
    restored = GeneratedLoserPhase(0, _examples(pipe, 2), 9, 2, 0, method="seppo", snapshot_every=2)
    restored.load_state_dict(phase.state_dict())
    assert [s for s, _ in restored.snapshots] == [0, 2, 4]
    assert all(torch.equal(a[1][name], b[1][name]) for a, b in zip(phase.snapshots, restored.snapshots))
    assert (
        float(restored.snapshots[2][1][name].flatten()[0] - restored.snapshots[0][1][name].flatten()[0])
        == 4.0
    )


def test_train_seppo_and_pso_from_the_command_line(pipe: Path, tmp_path: Path) -> None:
    from preftune.cli import main
    from preftune.diffusion.tiny import write_image_pairs

    data = write_image_pairs(tmp_path / "data", pairs=4)
    common = ["--model", str(pipe), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    for method in ("seppo", "pso"):
        assert main(["train", method, "--out", str(tmp_path / method), *common]) == 0
        rows = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if r.get("split") == "train"]
        assert len(train_rows) == 2 and all(math.isfinite(r["loss"]) for r in train_rows)
        assert (tmp_path / method / "final" / "model_index.json").is_file()
    seppo_rows = [json.loads(x) for x in (tmp_path / "seppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["seppo/snapshots"] for r in seppo_rows if r.get("split") == "train"] == [1.0, 1.0]
    assert [r["seppo/flipped"] for r in seppo_rows if r.get("split") == "train"][0] == 0.0  # θ = θ_ref: ties


def test_seppo_refuses_lora_and_flow_pipelines_are_refused(
    pipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from preftune.cli import main
    from preftune.diffusion.tiny import write_image_pairs

    data = write_image_pairs(tmp_path / "data", pairs=2)
    code = main(["train", "seppo", "--model", str(pipe), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--lora", "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    assert code != 0 and "seppo loads previous checkpoints" in capsys.readouterr().err
    from preftune.diffusion.tiny import save_tiny_sd3_pipeline

    flow = save_tiny_sd3_pipeline(tmp_path / "sd3")
    code = main(["train", "pso", "--model", str(flow), "--data", str(data), "--out", str(tmp_path / "f"),
                 "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    assert code != 0 and "flow-matching pipeline" in capsys.readouterr().err


def test_seppo_resumes_exactly_with_its_snapshot_pool(pipe: Path, tmp_path: Path) -> None:
    """Snapshots every step: 2 steps, then --resume to 4, equals 4 steps at once (the pool and so each
    step's drawn reference and its samples come back from the checkpoint)."""
    from safetensors.torch import load_file

    from preftune.config import TrainConfig
    from preftune.diffusion.tiny import write_image_pairs
    from preftune.train.api import train

    data = write_image_pairs(tmp_path / "data", pairs=4)

    def run(out: str, steps: int, **kw: object) -> Path:
        return train(
            TrainConfig(
                method="seppo", model=str(pipe), data=str(data), out=str(tmp_path / out), batch_size=2,
                max_steps=steps, lr=1e-3, scheduler="constant", warmup_ratio=0.0, progress=False,
                cache_dir=str(tmp_path / "cache"), hparams={"ref_every": 1, "sample_steps": 2},
                save_every=2, **kw,  # type: ignore[arg-type]
            )
        ).out_dir  # fmt: skip

    whole = run("whole", 4)
    run("parts", 2)
    parts = run("parts", 4, resume="latest")
    a = load_file(str(whole / "checkpoints" / "step-4" / "model.safetensors"))
    b = load_file(str(parts / "checkpoints" / "step-4" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pool = load_file(str(parts / "checkpoints" / "step-4" / "sampler.safetensors"))
    assert pool["steps"].tolist() == [0, 1, 2, 3]
