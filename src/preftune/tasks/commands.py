"""`preftune quickstart`: the built-in end-to-end demo (see preftune.tasks.quickstart)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this package's subcommands to `preftune`."""
    p = sub.add_parser(
        "quickstart",
        help="built-in demo: SFT a tiny model on arithmetic, then improve it with preference training",
        description="Train a tiny Llama on step-by-step arithmetic (SFT), sample answers, label them with "
        "the verifier, build preference pairs, train METHOD on them and report held-out accuracy before "
        "and after. Writes OUT/summary.json and OUT/report.html. A few minutes on a laptop CPU. "
        "--task diffusion does the same for a tiny text-to-image pipeline pretrained on coloured squares "
        "(held-out reward before and after; about ten minutes).",
    )
    p.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    p.add_argument(
        "--task",
        choices=("arithmetic", "diffusion"),
        default="arithmetic",
        help="arithmetic (a tiny Llama, default) or diffusion (a tiny text-to-image pipeline trained from "
        "scratch on coloured squares at named places; pairs ranked by a computable reward; Diffusion-DPO)",
    )
    p.add_argument(
        "--method",
        default="dpo",
        help="loss or objective, e.g. dpo, ipo, 'dpo:1,sft:0.2'; or an online method (grpo, rloo, remax, ...): "
        "the verifier's reward on the model's own samples instead of pairs. --task diffusion: an offline "
        "loss on the image pairs (dpo, the default: Diffusion-DPO; hinge, ipo, mapo, diff_kto, ...)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of problems, SFT and sampling (default 0)")
    p.add_argument(
        "--level", type=int, default=None, help="arithmetic difficulty 1-5 (default 2; arithmetic only)"
    )
    p.add_argument(
        "--sft-steps", type=int, default=None, help="most SFT optimizer steps (default 500; arithmetic only)"
    )
    p.add_argument(
        "--sft-target",
        type=float,
        default=None,
        help="stop SFT once greedy accuracy on 100 check prompts reaches this (default 0.5; 0: never stop "
        "early; arithmetic only)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training optimizer steps (default 100; online methods 200; --task diffusion 150)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="training learning rate (default 3e-5; online methods 2.5e-5; --task diffusion 5e-5)",
    )
    p.add_argument(
        "--beta", type=float, default=None, help="β of DPO-family methods (--task diffusion: 5000)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.set_defaults(func=_quickstart)


def _quickstart(args: argparse.Namespace) -> int:
    from preftune.train.logging import quiet_libraries

    quiet_libraries()  # per-file "Loading weights" bars would drown the stage lines
    if args.task == "diffusion":
        return _diffusion_quickstart(args)
    from dataclasses import replace

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from preftune.errors import ConfigError
    from preftune.online_methods import is_online
    from preftune.tasks.quickstart import QuickstartConfig, run_quickstart

    cfg = QuickstartConfig()
    online = is_online(args.method)
    changes = {
        "level": args.level,
        "online_steps" if online else "max_steps": args.steps,
        "online_lr" if online else "lr": args.lr,
        "beta": args.beta,
        "threads": args.threads,
    }
    cfg = replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    if args.sft_steps is not None:
        cfg.sft = replace(cfg.sft, steps=args.sft_steps)
    if args.sft_target is not None:
        if not 0 <= args.sft_target <= 1:
            raise ConfigError(
                f"--sft-target {args.sft_target}: an accuracy in [0, 1] (0: run every SFT step)"
            )
        cfg.sft = replace(cfg.sft, target_accuracy=args.sft_target or None)
    console = Console()
    bar = Progress(
        TextColumn("[bold]sft"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("loss {task.fields[loss]}"),
        console=console,
        transient=True,
    )
    task_id = bar.add_task("sft", total=cfg.sft.steps, loss="-")

    def on_sft_step(step: int, loss: float) -> None:
        if step == 1:
            bar.start()
        bar.update(task_id, completed=step, loss=f"{loss:.3f}")

    def log(message: str) -> None:
        bar.stop()  # the SFT may stop before its last step (accuracy target): the next line ends the bar
        console.print(message, soft_wrap=True)  # a long line stays one line in a log file

    try:
        summary = run_quickstart(
            args.out,
            method=args.method,
            seed=args.seed,
            config=cfg,
            log=log,
            on_sft_step=on_sft_step,
        )
    finally:
        bar.stop()
    console.print(
        f"[bold green]done[/]: held-out accuracy {summary['accuracy_before']:.1%} → "
        f"{summary['accuracy_after']:.1%} (greedy) in {summary['seconds']:.0f}s. "
        f"Open {args.out}/report.html",
        soft_wrap=True,
    )
    return 0


def _diffusion_quickstart(args: argparse.Namespace) -> int:
    """`quickstart --task diffusion`: --method, --seed, --steps, --lr, --beta, --threads apply."""
    from dataclasses import replace

    from preftune.errors import ConfigError
    from preftune.tasks.diffusion_quickstart import (
        DiffusionQuickstartConfig,
        check_diffusion_method,
        run_diffusion_quickstart,
    )

    arithmetic_only = [f for f, v in (("--level", args.level), ("--sft-steps", args.sft_steps),
                                      ("--sft-target", args.sft_target)) if v is not None]  # fmt: skip
    if arithmetic_only:
        raise ConfigError(
            f"quickstart --task diffusion: {', '.join(arithmetic_only)} belong to the arithmetic task — remove them"
        )
    check_diffusion_method(args.method)  # before the minutes of pretraining
    cfg = DiffusionQuickstartConfig()
    changes = {"max_steps": args.steps, "lr": args.lr, "beta": args.beta, "threads": args.threads}
    cfg = replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    summary = run_diffusion_quickstart(args.out, method=args.method, seed=args.seed, config=cfg)
    print(
        f"done: held-out reward {summary['reward_before']:.3f} → {summary['reward_after']:.3f} "
        f"(+{summary['gain_in_se']:.1f} standard errors) in {summary['seconds']:.0f}s. Open {args.out}/report.html"
    )
    return 0
