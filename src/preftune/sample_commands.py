"""`preftune sample`: images of a diffusers pipeline folder, optionally steered by a reward (ReNO, DTS).

    preftune sample --model PIPELINE_FOLDER --prompts prompts.jsonl --out samples/ --reward shapes
    preftune sample --model PIPELINE_FOLDER --prompts prompts.jsonl --out reno/ --reward shapes --reno
    preftune sample --model PIPELINE_FOLDER --prompts prompts.jsonl --out dts/ --reward shapes --dts 32
    preftune sample --model SD3_PIPELINE_FOLDER --prompts prompts.jsonl --out heun/ --solver flow-heun

Writes OUT/images/NNNNN.png and OUT/samples.jsonl (prompt, seed, image, reward, how). See
docs/diffusion.md, "Inference-time alignment".
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `preftune sample`."""
    p = sub.add_parser(
        "sample",
        help="sample images from a diffusers pipeline folder (optionally ReNO / DTS steered by a reward)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a diffusers pipeline folder (model_index.json)")
    p.add_argument("--prompts", required=True, help="prompts: JSONL/JSON/CSV/Parquet with 'prompt', or .txt")
    p.add_argument("--out", required=True, help="output folder: images/ and samples.jsonl")
    p.add_argument("--per-prompt", type=int, default=1, help="images per prompt, seeds seed.. (default 1)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--seed", type=int, default=0, help="first noise seed (default 0)")
    p.add_argument(
        "--solver",
        default=None,
        help="ODE solver of plain sampling: ddim (default on ε/v pipelines), dpm++, unipc, deis, time-shift; "
        "on flow-matching pipelines (SD3-style) flow-euler (default), flow-heun, dpm++, unipc",
    )
    p.add_argument(
        "--reward",
        default=None,
        help="image reward: a built-in (shapes) or module:function(images, prompts) -> N floats; "
        "scores every image (a 'reward' column) and steers --reno / --dts",
    )
    p.add_argument(
        "--reno",
        action="store_true",
        help="ReNO (Eyring et al. 2024): optimise the initial noise of the one-step x̂_0 generator for the "
        "reward (SGD lr 5, Nesterov 0.9, gradient clip 0.1; the reward must be differentiable)",
    )
    p.add_argument(
        "--reno-iterations",
        type=int,
        default=None,
        help="ReNO iterations (default 50, the paper's; with --reno)",
    )
    p.add_argument(
        "--dts",
        type=int,
        default=0,
        metavar="N",
        help="DTS (Jain et al. 2025): grow a tree over the DDIM η=1 chain with N rollouts, soft values "
        "from the reward",
    )
    p.add_argument(
        "--dts-mode",
        default=None,
        help="sample: DTS, a draw from p·exp(λ r) (default); search: DTS*, the best rollout (with --dts)",
    )
    p.add_argument(
        "--lam", type=float, default=None, help="DTS λ of the tilt exp(λ r) (default 1; with --dts)"
    )
    p.add_argument(
        "--branching", type=int, default=None, help="DTS children per node (default 4; with --dts)"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from preftune.diffusion.sample_run import SampleOptions, run_sample
    from preftune.errors import ConfigError
    from preftune.train.logging import quiet_libraries

    quiet_libraries()
    tree = {"--lam": args.lam, "--branching": args.branching, "--dts-mode": args.dts_mode}
    stray = [flag for flag, value in tree.items() if value is not None]
    if stray and args.dts <= 0:
        raise ConfigError(
            f"{', '.join(stray)} set DTS's tree search: add --dts N (rollouts, N ≥ 1) or drop them"
        )
    if args.reno_iterations is not None and not args.reno:
        raise ConfigError("--reno-iterations sets ReNO's noise optimisation: add --reno or drop it")
    options = SampleOptions(
        per_prompt=args.per_prompt, steps=args.steps, seed=args.seed, reward=args.reward, reno=args.reno,
        reno_iterations=50 if args.reno_iterations is None else args.reno_iterations, dts=args.dts, dts_mode=args.dts_mode or "sample",
        lam=1.0 if args.lam is None else args.lam, branching=4 if args.branching is None else args.branching,
        solver=args.solver,
    )  # fmt: skip
    run_sample(args.model, args.prompts, args.out, options)
    return 0
