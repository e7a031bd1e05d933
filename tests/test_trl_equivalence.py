"""grpo_loss against TRL's own GRPOTrainer._compute_loss (TRL 1.16), when trl is installed.

trl is not a dependency (CI skips this file); `pip install trl` runs it. TRL's method is called
unbound on a stand-in for the trainer that holds only the settings it reads, with the policy's
logprobs handed over in place of a model forward. Float64 throughout: the two must agree to rounding.
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from grpo import grpo_loss
from test_grpo_loss import MAX_LEN, random_batch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

# (name, TRL settings, grpo_loss settings): the pairs the README's table says are the same loss.
CASES = [
    ("grpo", dict(loss_type="grpo"), dict(agg="seq_mean_token_mean")),
    ("dr_grpo", dict(loss_type="dr_grpo"), dict(agg="seq_mean_token_sum_norm")),
    ("dapo", dict(loss_type="dapo", epsilon_high=0.28), dict(agg="token_mean", clip_high=0.28)),
    ("gspo", dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.05, epsilon_high=0.05),
     dict(agg="seq_mean_token_mean", policy_loss="gspo", clip_low=0.05, clip_high=0.05)),
    ("cispo", dict(loss_type="cispo", epsilon_high=1.3), dict(agg="token_mean", policy_loss="cispo", cispo_cap=1.3)),
    ("delta", dict(loss_type="grpo", delta=1.5), dict(agg="seq_mean_token_mean", delta=1.5)),
]


class _Accelerator:
    num_processes, sync_gradients = 1, True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(logprobs, old, ref, adv, mask, beta, loss_type, epsilon_low=0.2, epsilon_high=0.2,
             importance_sampling_level="token", delta=None):
    """TRL's _compute_loss on our inputs: one process, no accumulation, no vLLM, no entropy bonus."""
    lp = logprobs.clone().requires_grad_(True)
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level, beta=beta, loss_type=loss_type,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN, accelerator=_Accelerator(), _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None))
    T = logprobs.shape[1]
    inputs = {"prompt_ids": torch.zeros(len(adv), 1, dtype=torch.long), "prompt_mask": torch.ones(len(adv), 1),
              "completion_ids": torch.zeros(len(adv), T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.detach(), lp.grad


@pytest.mark.parametrize("name,trl_kw,ours_kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_trl_equivalence(name, trl_kw, ours_kw, beta):
    logprobs, old, ref, adv, mask = random_batch(seed=4)
    mask[2, 0] = 1  # TRL divides by each sequence's length unclamped in one log line; no empty rows here
    theirs, their_grad = trl_loss(logprobs, old, ref, adv, mask, beta, **trl_kw)
    lp = logprobs.clone().requires_grad_(True)
    ours, _ = grpo_loss(lp, old, ref, adv, mask, kl_coef=beta, max_len=MAX_LEN, **ours_kw)
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp.grad, their_grad, rtol=1e-12, atol=1e-12)
