"""Flow-matching (SD3-style) pipelines in the online methods and `preftune sample`: Flow-GRPO's SDE
step is the Gaussian written out by hand, its recomputed ratio is 1, it keeps the marginals of data
whose velocity is known exactly; the flow solvers converge to the exact ODE endpoint at their order;
every online method and `preftune sample` run on a tiny SD3 pipeline folder, and what cannot run is
refused with the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402

from preftune.cli import main  # noqa: E402
from preftune.diffusion.flow_policy import FlowSDEPolicy, make_policy  # noqa: E402
from preftune.diffusion.policy import DDIMPolicy, sample_trajectory, trajectory_log_probs  # noqa: E402
from preftune.diffusion.sampling import solve, solver_scheduler  # noqa: E402
from preftune.diffusion.seam import pack_conditioning  # noqa: E402
from preftune.diffusion.tiny import save_tiny_sd3_pipeline, tiny_sd3_components  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = 0.3, 0.5  # data x_0 ~ N(MU, S²) per element


class GaussianVelocity:
    """The exact rectified-flow velocity of N(MU, S²) data: x_σ = m + s_σ z with m = (1 − σ) MU,
    s_σ² = (1 − σ)² S² + σ², so v = dx/dσ = −MU + (ds_σ/dσ)(x − m)/s_σ; called as a UNet."""

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> SimpleNamespace:
        sigma = (t.double() / 1000).reshape(-1, *[1] * (x.dim() - 1))
        var = (1 - sigma) ** 2 * S * S + sigma * sigma
        slope = ((sigma - 1) * S * S + sigma) / var.sqrt()
        return SimpleNamespace(sample=(-MU + slope * (x - (1 - sigma) * MU) / var.sqrt()).to(x.dtype))


@pytest.fixture(scope="module")
def sd3() -> dict:
    return tiny_sd3_components(seed=0)


def _cond(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pack_conditioning(torch.randn(n, 6, 32, generator=g), torch.randn(n, 32, generator=g))


def test_flow_sde_step_is_flow_grpos_gaussian_by_hand(sd3: dict) -> None:
    """Each stored log-prob is log N(x_{k+1}; μ, s²I) summed over elements (torch.distributions), with
    μ = x(1 + σ_t² dt/(2σ)) + v(1 + σ_t²(1 − σ)/(2σ)) dt, s = σ_t √(−dt), σ_t = 0.7 √(σ/(1 − σ))
    (1 − σ_1 at σ = 1), dt = σ' − σ on diffusers' shifted grid — Flow-GRPO's `sde_step_with_logprob`."""
    model, scheduler = sd3["transformer"].eval(), sd3["scheduler"]
    policy = FlowSDEPolicy(scheduler, 3)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = _cond(2)
    traj = sample_trajectory(model, policy, cond, noise, torch.Generator().manual_seed(2))
    grid = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    grid.set_timesteps(3)
    sigmas = grid.sigmas.double().tolist()
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 4
    for k in range(3):
        x, nxt = traj.latents[k], traj.latents[k + 1]
        sigma, dt = sigmas[k], sigmas[k + 1] - sigmas[k]
        with torch.no_grad():
            v = model(hidden_states=x, timestep=torch.full((2,), sigma * 1000), encoder_hidden_states=cond[:, :-1],
                      pooled_projections=cond[:, -1]).sample.double()  # fmt: skip
        std_t = 0.7 * math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma)))
        mean = (
            x.double() * (1 + std_t**2 / (2 * sigma) * dt)
            + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        )
        by_hand = (
            torch.distributions.Normal(mean, std_t * math.sqrt(-dt)).log_prob(nxt.double()).sum(dim=(1, 2, 3))
        )
        torch.testing.assert_close(traj.logps[:, k], by_hand, rtol=1e-6, atol=1e-3)
    assert traj.timesteps.tolist() == pytest.approx([s * 1000 for s in sigmas[:3]])


def test_on_policy_ratio_is_one_and_make_policy_picks_by_scheduler(sd3: dict) -> None:
    """Recomputed under the sampling weights, exp((log π_θ − log π_old)/d) = 1 to 1e-5 at every step."""
    model = sd3["transformer"].eval()
    policy = make_policy(sd3["scheduler"], 4)
    assert isinstance(policy, FlowSDEPolicy)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    traj = sample_trajectory(model, policy, _cond(3), noise, torch.Generator().manual_seed(4))
    with torch.no_grad():
        again = trajectory_log_probs(model, policy, traj)
    ratio = torch.exp((again - traj.logps) / traj.elements)
    assert float((ratio - 1).abs().max()) <= 1e-5
    assert torch.isfinite(traj.logps).all() and traj.logps.shape == (3, 4)
    from diffusers import DDPMScheduler

    assert isinstance(make_policy(DDPMScheduler(), 4), DDIMPolicy)
    with pytest.raises(Exception, match="noise_level = 0"):
        FlowSDEPolicy(sd3["scheduler"], 4, noise_level=0.0)


def test_flow_sde_keeps_the_marginals_of_gaussian_data(sd3: dict) -> None:
    """With the exact velocity of N(0.3, 0.5²) data, 200 SDE steps from N(0, 1) end at mean 0.3 and
    std 0.5 (16000 elements: s.e. of the mean 0.004; Euler–Maruyama bias ≈ 1 % here); the same noise
    without the score correction (x + v dt + noise) ends far off — the test can tell them apart."""
    policy = FlowSDEPolicy(sd3["scheduler"], 200)
    x1 = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = torch.zeros(4000, 1, 1)
    final = sample_trajectory(GaussianVelocity(), policy, cond, x1, torch.Generator().manual_seed(1)).final
    assert abs(float(final.mean()) - MU) < 4 * S / math.sqrt(final.numel())
    assert abs(float(final.std()) - S) < 0.015

    class NoCorrection(FlowSDEPolicy):
        def mean_std(self, v: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
            return x + v * (self.sigmas[k + 1] - self.sigmas[k]), self.step_std(k)

    wrong = sample_trajectory(
        GaussianVelocity(), NoCorrection(sd3["scheduler"], 200), cond, x1, torch.Generator().manual_seed(1)
    ).final
    assert abs(float(wrong.std()) - S) > 0.1


def _rms_errors(name: str, scheduler: object, steps: tuple[int, ...]) -> list[float]:
    x1 = torch.randn(1000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + S * x1  # the flow map of Gaussian data: z = x_1 is kept, x_0 = MU + S z
    cond = torch.zeros(1000, 1, 1)
    return [
        float(
            (solve(GaussianVelocity(), solver_scheduler(name, scheduler), cond, x1, n) - exact)
            .pow(2)
            .mean()
            .sqrt()
        )
        for n in steps
    ]


def test_flow_solvers_converge_to_the_exact_ode_endpoint(sd3: dict) -> None:
    """RMS error against the exact x_0 of Gaussian data (measured: euler 7.1e-2 / 3.6e-2 at 20 / 40
    steps, order 1; heun 9.8e-3 / 1.5e-3 at 10 / 20; dpm++ 4.9e-3 and unipc 2.1e-3 at 40, where
    diffusers' flow grid starts at σ = 1 − 1/3000 rather than 1)."""
    scheduler = sd3["scheduler"]
    e20, e40 = _rms_errors("flow-euler", scheduler, (20, 40))
    assert 1.8 < e20 / e40 < 2.2  # first order
    h10, h20 = _rms_errors("flow-heun", scheduler, (10, 20))
    assert h10 / h20 > 3.5 and h20 < e40  # second order (≥ 2^1.8), far below Euler
    for name in ("dpm++", "unipc"):
        errs = _rms_errors(name, scheduler, (10, 20, 40))
        assert errs[0] > errs[1] > errs[2] and errs[2] < 6e-3, (name, errs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd3online")
    save_tiny_sd3_pipeline(root / "pipe")
    (root / "p.jsonl").write_text("".join(json.dumps({"prompt": f"shape {i}"}) + "\n" for i in range(2)))
    (root / "r.py").write_text("def bright(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    return root


def test_flow_euler_solve_is_the_sd3_pipelines_sampler(folder: Path) -> None:
    """`solve` with flow-euler on the packed conditioning gives StableDiffusion3Pipeline's latents."""
    from preftune.diffusion.denoiser import load_pipeline, training_scheduler
    from preftune.diffusion.encode import caption_encoder

    reader = load_pipeline(folder / "pipe")
    reader.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = caption_encoder(folder / "pipe")(["shape 0", "shape 1"])
    flow = solver_scheduler("flow-euler", training_scheduler(folder / "pipe"))
    ours = solve(reader.transformer, flow, cond, noise, 3)
    with torch.no_grad():
        theirs = reader(["shape 0", "shape 1"], num_inference_steps=3, height=16, width=16, guidance_scale=1.0,
                        latents=noise, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _sample(root: Path, out: str, *extra: str) -> list[str]:
    return ["sample", "--model", str(root / "pipe"), "--prompts", str(root / "p.jsonl"), "--out", str(root / out),
            "--steps", "3", "--reward", f"{root}/r.py:bright", *extra]  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--solver", "flow-heun"],
        ["--solver", "unipc"],
        ["--dts", "4"],
        ["--reno", "--reno-iterations", "2"],
    ],
)
def test_sample_runs_on_an_sd3_folder(folder: Path, extra: list[str]) -> None:
    out = f"s{len(list(folder.iterdir()))}"
    assert main(_sample(folder, out, *extra)) == 0
    rows = [json.loads(x) for x in (folder / out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all((folder / out / r["image"]).is_file() for r in rows)
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows)


@pytest.mark.parametrize(
    ("solver", "expected"),
    [
        ("ddim", "--solver ddim does not integrate a flow-matching pipeline"),
        ("time-shift", "built on the ᾱ_t of a variance-preserving schedule"),
        ("usf", "usf needs scheduler.calibrate(model_fn, samples, steps)"),
        ("nosuch", "--solver 'nosuch' is unknown"),
    ],
)
def test_solvers_that_cannot_integrate_a_flow_are_refused_with_the_fix(folder, capsys, solver, expected):
    assert main(_sample(folder, f"bad-{solver}", "--solver", solver)) == 2
    err = capsys.readouterr().err
    assert expected in err and "pass --solver with one of: flow-euler, flow-heun, dpm++, unipc" in err, err
    assert "Traceback" not in err


def test_flow_solver_on_a_unet_pipeline_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from preftune.diffusion.tiny import save_tiny_pipeline

    save_tiny_pipeline(tmp_path / "pipe")
    (tmp_path / "p.txt").write_text("red square top left\n")
    argv = ["sample", "--model", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "p.txt"), "--out",
            str(tmp_path / "o"), "--solver", "flow-heun"]  # fmt: skip
    assert main(argv) == 2
    assert "pass --solver with one of: ddim, dpm++, unipc, deis, time-shift" in capsys.readouterr().err
    assert main([*argv[:-1], "dpm++", "--steps", "2"]) == 0


@pytest.mark.parametrize("method", ["awm", "ddpo", "dpok", "d3po", "spo"])
def test_online_methods_train_an_sd3_folder(folder: Path, method: str) -> None:
    """One step from the CLI; final/ is an SD3 pipeline whose transformer moved; config.yaml records
    the flow policy's noise level (Flow-GRPO's 0.7) for the SDE-sampled methods."""
    extra = {"dpok": ["--critic-warmup", "1"], "spo": ["--critic-warmup", "1", "--skip-steps", "0",
                                                       "--threshold", "0"]}.get(method, [])  # fmt: skip
    out = folder / f"o-{method}"
    argv = ["train", method, "--model", str(folder / "pipe"), "--prompts", str(folder / "p.jsonl"), "--reward",
            f"{folder}/r.py:bright", "--out", str(out), "--max-steps", "1", "--batch-size", "2",
            "--num-generations", "2", "--lr", "1e-3", "--sample-steps", "2", "--heldout", "1", "--progress",
            "false", "--report", "false", *extra]  # fmt: skip
    assert main(argv) == 0
    start = SD3Transformer2DModel.from_pretrained(str(folder / "pipe"), subfolder="transformer").state_dict()
    trained = SD3Transformer2DModel.from_pretrained(str(out / "final"), subfolder="transformer").state_dict()
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and math.isfinite(summary["eval"]["reward"])
    assert ("noise_level: 0.7" in (out / "config.yaml").read_text()) == (method != "awm")


def test_step_preference_loss_noises_a_flow_pair_on_the_flow_path(sd3: dict) -> None:
    """SPO's critic objective on a flow scheduler sees x_t = (1 − σ) x_0 + σ ε with t = σ·T."""
    from preftune.diffusion.critics import step_preference_loss
    from preftune.diffusion.seam import draw_timesteps

    seen = {}

    def critic(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        seen.update(x=x, t=t)
        return x.flatten(1).mean(dim=1)

    w, lose = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    step_preference_loss(
        critic, w, lose, torch.zeros(2, 3, 32), sd3["scheduler"], torch.Generator().manual_seed(0)
    )
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    t = draw_timesteps(sd3["scheduler"], 2, g)
    sigma = (t / 1000).reshape(2, 1, 1, 1)
    torch.testing.assert_close(seen["t"], t.repeat(2))
    torch.testing.assert_close(
        seen["x"], torch.cat([(1 - sigma) * w + sigma * eps, (1 - sigma) * lose + sigma * eps])
    )


def test_solve_is_the_ddim_loop_on_a_unet() -> None:
    """On an ε UNet, `solve` with the ddim solver gives `generated.ddim_sample`'s latents exactly (the
    same loop diffusers' pipelines run), so the other solvers differ only by their scheduler."""
    from diffusers import DDPMScheduler

    from preftune.diffusion.generated import ddim_sample
    from preftune.diffusion.tiny import tiny_components

    parts = tiny_components(seed=0)
    scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    cond = torch.randn(
        2, 8, parts["unet"].config.cross_attention_dim, generator=torch.Generator().manual_seed(0)
    )
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = solve(parts["unet"].eval(), solver_scheduler("ddim", scheduler), cond, noise, 4)
    assert torch.equal(ours, ddim_sample(parts["unet"], scheduler.config, cond, noise, 4))
