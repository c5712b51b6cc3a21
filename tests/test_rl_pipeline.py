"""The online pieces compose: rollouts → rewards → advantages → policy loss on the trainer's
recomputed log-probs. On-policy, PPO-clip's ratio is exactly 1 and its gradient equals REINFORCE's."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune import rl
from preftune.models.logprobs import sequence_logps
from preftune.reward import load_reward

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 6, 7], [9, 10, 11, 12], [20, 21]]
N = 4


def even_tokens(prompts: list[str], completions: list[str], **kwargs: object) -> list[float]:
    """A toy reward: the fraction of even token ids in the completion."""
    return [sum(int(t) % 2 == 0 for t in c.split()) / max(len(c.split()), 1) for c in completions]


def grads(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_on_policy_ppo_clip_gradient_equals_reinforce() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    engine = rl.RolloutEngine(model, 3)
    out = engine.generate(PROMPTS, N, rl.Sampling(max_new_tokens=6, temperature=0.8, top_k=20, seed=0))
    texts = [" ".join(map(str, ids)) for ids in out.completions()]
    rewards = load_reward(even_tokens)([" ".join(map(str, PROMPTS[i])) for i in out.prompt_index], texts)
    est = rl.estimate("grpo", rewards, out.prompt_index)
    assert est.advantages.abs().sum() > 0

    def policy_batch() -> rl.PolicyBatch:
        _, tokens = sequence_logps(
            model,
            PROMPTS,
            out.grouped(N),
            token_logps=True,
            temperature=out.temperature,
            min_logits=out.grouped_min_logits(N),
        )
        logp = out.align(tokens)
        return rl.PolicyBatch(logp, out.mask, est.advantages.float(), old_token_logps=out.logps, max_len=6)

    ratio_terms = [(s, w, s.validate({})) for s, w in rl.parse_policy_objective("ppo_clip")]
    batch = policy_batch()
    ratio = torch.exp(batch.policy_token_logps.detach() - out.logps)[out.mask]
    assert float((ratio - 1).abs().max()) <= 1e-5
    loss, _ = rl.policy_objective(batch, ratio_terms, rl.global_denominators(ratio_terms, [batch]))
    g_ppo = grads(model, loss)
    pg_terms = [(s, w, s.validate({})) for s, w in rl.parse_policy_objective("pg")]
    batch = policy_batch()
    loss, _ = rl.policy_objective(batch, pg_terms, rl.global_denominators(pg_terms, [batch]))
    g_pg = grads(model, loss)
    assert float(g_pg.abs().max()) > 1e-4
    torch.testing.assert_close(g_ppo, g_pg, rtol=1e-4, atol=1e-6)
