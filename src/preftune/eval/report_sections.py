"""What a run report plots: its sections (id, title, how to read it, panels of logged metrics) and
the logged keys that are not metrics, not plotted, or not smoothed."""

from __future__ import annotations

from preftune.eval.plots import CHOSEN, NEUTRAL, REJECTED, SECOND, Curve, Panel

Section = tuple[str, str, str, tuple[Panel, ...]]


def _section(sid: str, title: str, about: str, *panels: Panel) -> Section:
    return sid, title, about, panels


# (id, title, how to read it, panels). The ids are stable: tests and links rely on them.
SECTIONS: tuple[Section, ...] = (
    _section(
        "loss",
        "Loss",
        "The training objective (lower is better). Eval points use the same loss on "
        "held-out pairs; a widening gap between the lines is over-fitting.",
        Panel("Loss", "loss (the objective's units)", (Curve("loss", "loss", NEUTRAL),)),
    ),
    _section(
        "rewards",
        "Implicit rewards and margin",
        "Implicit reward r̂(y) = β·(log π_θ(y) − log π_ref(y)) of chosen and rejected responses, and "
        "the margin β·h = r̂(chosen) − r̂(rejected). Training should open the margin; both rewards "
        "falling together means the policy lowers every response, not just the rejected ones. Unpaired "
        "methods (KTO) log one implicit reward over all their completions instead.",
        Panel(
            "Implicit rewards",
            "β · log-ratio (nats)",
            (
                Curve("rewards/chosen", "chosen", CHOSEN),
                Curve("rewards/rejected", "rejected", REJECTED),
                Curve("rewards/implicit", "all completions (unpaired)", SECOND, optional=True),
            ),
            hline=0.0,
        ),
        Panel("Reward margin", "β · h (nats)", (Curve("rewards/margin", "margin", NEUTRAL),), hline=0.0),
    ),
    _section(
        "reward_accuracy",
        "Reward accuracy",
        "Fraction of pairs whose implicit reward ranks chosen above rejected (h > 0). 0.5 is chance.",
        Panel(
            "Reward accuracy",
            "fraction of pairs",
            (Curve("rewards/accuracy", "reward accuracy"),),
            hline=0.5,
            ylim=(-0.02, 1.02),
        ),
    ),
    _section(
        "logps",
        "Chosen and rejected log-probabilities",
        "Mean per-token log π_θ of chosen and rejected responses. A falling chosen curve while the "
        "margin grows is the over-optimisation signature (Rashidinejad & Tian 2024; Shi et al. 2024): "
        "the policy wins the margin by pushing everything down.",
        Panel(
            "Per-token log-probability",
            "log π_θ(y) / |y| (nats per token)",
            (
                Curve("logps/chosen_per_token", "chosen", CHOSEN),
                Curve("logps/rejected_per_token", "rejected", REJECTED),
            ),
        ),
    ),
    _section(
        "ranking",
        "Policy ranking accuracy",
        "Fraction of pairs where the policy itself gives chosen the higher log-probability, "
        "log π_θ(y_w) > log π_θ(y_l) (Chen et al. 2024). It often stays far below reward accuracy.",
        Panel(
            "Policy ranking accuracy",
            "fraction of pairs",
            (Curve("policy_rank_accuracy", "ranking accuracy", NEUTRAL),),
            hline=0.5,
            ylim=(-0.02, 1.02),
        ),
    ),
    _section(
        "optimisation",
        "Gradient norm and learning rate",
        "Global gradient norm before clipping (log scale: spikes stand out) and the scheduled learning rate.",
        Panel(
            "Gradient norm", "‖g‖₂ (before clipping)", (Curve("grad_norm", "grad norm", NEUTRAL),), log_y=True
        ),
        Panel("Learning rate", "learning rate", (Curve("lr", "lr", SECOND, smooth=False),)),
    ),
    _section(
        "throughput",
        "Throughput",
        "Training speed per optimizer step, measured by the trainer.",
        Panel("Tokens per second", "tokens / s", (Curve("tokens_per_s", "tokens/s", NEUTRAL),)),
        Panel(
            "Images per second", "images / s", (Curve("images_per_s", "images/s", NEUTRAL, optional=True),)
        ),
        Panel(
            "Examples per second", "examples (pairs) / s", (Curve("examples_per_s", "examples/s", SECOND),)
        ),
    ),
)
# Online methods (grpo, rloo, ...): what their steps log about the policy's own samples.
ONLINE_SECTIONS = (
    _section(
        "online_reward",
        "Reward and accuracy of the samples",
        "Mean reward of each step's completions, sampled from the policy being trained at the sampling "
        "temperature, and with a 0/1 verifier the fraction that is right. Rising curves are the policy "
        "learning from its rewards; each point is one batch of prompts, so expect noise. Eval points "
        "(--eval-data): the mean reward of greedy answers to the held-out prompts.",
        Panel("Sample reward", "mean reward per completion", (Curve("reward", "reward", NEUTRAL),)),
        Panel(
            "Sample accuracy",
            "fraction with reward 1",
            (Curve("accuracy", "accuracy", CHOSEN, optional=True),),
            ylim=(-0.02, 1.02),
        ),
    ),
    _section(
        "online_kl",
        "KL to the reference and importance ratio",
        "k3 estimate of KL(π_θ ‖ π_ref), token mean per completion (logged when the objective has a kl "
        "term), and the mean ratio π_θ/π_old to the sampling policy: 1 on a fresh batch, away from 1 on "
        "a batch re-used by num_iterations > 1.",
        Panel("KL to the reference", "k3 (nats per token)", (Curve("kl", "KL", REJECTED, optional=True),)),
        Panel("Importance ratio", "π_θ / π_old", (Curve("ratio", "ratio", SECOND),), hline=1.0),
    ),
    _section(
        "zero_signal",
        "Zero-signal fraction",
        "Fraction of prompts whose completions all got the same reward: their advantages are 0 and they "
        "teach nothing. Near 1 the batch is too easy (all right) or too hard (all wrong).",
        Panel(
            "Zero-signal fraction",
            "fraction of prompts",
            (Curve("zero_signal_fraction", "zero-signal", NEUTRAL),),
            ylim=(-0.02, 1.02),
        ),
    ),
    _section(
        "online_time",
        "Completion length and time per step",
        "Mean completion length in tokens, and the seconds of a step spent sampling (rollout: "
        "generation, reward and advantages) and training (forward, backward, optimizer step).",
        Panel("Completion length", "tokens", (Curve("completion_length", "length", NEUTRAL),)),
        Panel(
            "Time per step",
            "seconds",
            (Curve("rollout_s", "rollout", SECOND), Curve("train_s", "train", CHOSEN)),
        ),
    ),
)
# Sections of one kind of run that the other kind never logs: not reported as missing there.
OFFLINE_ONLY = {"rewards", "reward_accuracy", "logps", "ranking"}
ONLINE_ONLY = {sid for sid, _, _, _ in ONLINE_SECTIONS}
SECTIONS = SECTIONS[:1] + ONLINE_SECTIONS + SECTIONS[1:]
NOT_METRICS = {"step", "split", "phase", "epoch", "time", "timestamp", "elapsed_s", "wall_time"}
# Logged, shown in the final table, but not worth a plot: a 0/1 flag and per-step counts.
NOT_PLOTTED = {"skipped", "tokens", "images", "examples"}
INSTEAD_OF = {"tokens_per_s": "images_per_s"}  # not missing where the run logged the other (an image run)
NOT_SMOOTHED = {"lr", "skipped"}  # schedules and flags: an average would misstate them
MAX_OTHER_PANELS = 12
