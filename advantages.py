"""Rewards to advantages: how GRPO and its variants turn a group's rewards into a training signal.

Papers:
- DeepSeekMath (Shao et al. 2024), §4.1.2 outcome supervision: each output's advantage is its
  reward normalised within its group, (r - mean) / std, the same for every token.
- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): no std scaling.
- RLOO (Ahmadian et al. 2024, "Back to Basics"): the baseline of each sample is the mean of the
  other G-1 samples of its group.
- Lite PPO (Liu et al. 2025, "Part I: Tricks or Traps? A Deep Dive into RL for LLM Reasoning"):
  group mean, batch std (TRL's scale_rewards="batch").
- GDPO (Liu et al. 2026, "Group reward-Decoupled Normalization Policy Optimization"): normalise each
  reward within its group, sum, then normalise over the batch (TRL's
  multi_objective_aggregation="normalize_then_sum").
- DAPO (Yu et al. 2025): dynamic sampling's filter (§3.2) and the soft overlong penalty (eq. 13).

Shapes: P prompts, G outputs per prompt (the group), K reward components, N = P * G.

Departures and choices:
- The std is the sample std (Bessel-corrected, torch's default and what TRL uses; DeepSeekMath
  does not say which). eps=1e-4 is added to the std (TRL's value), and a group whose rewards are all
  equal gets exactly 0, so nothing is NaN, also for G=1.
- GDPO: the batch mean of the summed advantages is 0 already and is not subtracted (see
  `decoupled_advantages`). A reward that does not apply to a sample (None) is left out of its
  group's mean and std and adds 0 to that sample's sum, as in TRL.
"""
from __future__ import annotations

import math

import torch

ADV_SCALES = ("std", "none", "batch")
ADV_BASELINES = ("mean", "rloo")


def group_advantages(rewards: torch.Tensor, scale: str = "std", baseline: str = "mean", eps: float = 1e-4,
                     batch_std: float | None = None) -> torch.Tensor:
    """Outcome-supervision advantages (DeepSeekMath §4.1.2): each reward relative to its group.

    rewards (P, G) -> (P, G). A_i = (r_i - b_i) / s.
    baseline "mean": b_i = mean_j r_j (DeepSeekMath); "rloo": b_i = mean_{j != i} r_j (Ahmadian et al.
      2024), which is G / (G - 1) * (r_i - mean_j r_j).
    scale "std": s = sample std of the group + eps (DeepSeekMath); "none": s = 1 (Dr. GRPO); "batch":
      s = sample std of every reward in the batch + eps (Lite PPO, TRL's scale_rewards="batch");
      `batch_std` replaces that std (the RL loop passes the std over all ranks' rewards).
    A group whose rewards are all equal carries no signal and gets exactly 0 (also for G = 1).
    """
    if rewards.dim() != 2 or scale not in ADV_SCALES or baseline not in ADV_BASELINES:
        raise ValueError(f"group_advantages: need rewards (P, G), scale in {ADV_SCALES} and baseline in "
                         f"{ADV_BASELINES}, got shape {tuple(rewards.shape)}, {scale!r}, {baseline!r}")
    if not torch.isfinite(rewards).all():
        raise ValueError("group_advantages: rewards contain NaN or inf; check the reward functions")
    r = rewards if rewards.is_floating_point() else rewards.float()  # (P, G)
    G = r.shape[1]
    adv = r - r.mean(dim=1, keepdim=True)  # (P, G)
    if baseline == "rloo" and G > 1:
        adv = adv * (G / (G - 1))  # r_i - (sum_j r_j - r_i) / (G - 1)
    if scale == "std" and G > 1:  # for G = 1 the sample std is undefined; adv is 0 anyway
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # (P, G), sample std (correction=1)
    elif scale == "batch":
        std = batch_std if batch_std is not None else (float(r.std()) if r.numel() > 1 else 0.0)
        adv = adv / (std + eps)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # (P, 1), all equal: mean may round, so force 0
    return adv.masked_fill(flat, 0.0)  # (P, G)


def decoupled_advantages(components: torch.Tensor, weights: torch.Tensor, scale: str = "std",
                         baseline: str = "mean", eps: float = 1e-4, batch_std=None) -> torch.Tensor:
    """GDPO (Liu et al. 2026, "Group reward-Decoupled Normalization Policy Optimization"): each reward
    normalised within its group, then summed with its weight, then divided by the batch's std.

    components (P, G, K) raw reward values, NaN where a reward does not apply; weights (K,) -> (P, G).
    A = S / (std over the batch of S + eps), S = sum_k w_k * group_advantages(r_k, scale, baseline).
    GDPO also subtracts the batch mean of S; every group's S sums to 0, so that mean is 0 already
    and is not subtracted (it would move groups whose rewards all tie off exactly 0).
    `batch_std(S) -> float` replaces the local std (the RL loop passes the std over all ranks).
    """
    if components.dim() != 3 or weights.shape != components.shape[2:]:
        raise ValueError(f"decoupled_advantages: need components (P, G, K) and weights (K,), got "
                         f"{tuple(components.shape)} and {tuple(weights.shape)}")
    parts = [_applicable_group_advantages(components[:, :, k], scale, baseline, eps)
             for k in range(components.shape[2])]
    summed = (torch.stack(parts, dim=2) * weights.to(parts[0].dtype)).sum(dim=2)  # (P, G)
    std = batch_std(summed) if batch_std is not None else (float(summed.std()) if summed.numel() > 1 else 0.0)
    return summed / (std + eps)  # (P, G); tied groups are 0 in every part, so 0 here


def _applicable_group_advantages(r: torch.Tensor, scale: str, baseline: str, eps: float) -> torch.Tensor:
    """`group_advantages` of r (P, G) over each group's applicable samples; NaN marks a sample the
    reward does not apply to: it is left out of its group's mean and std and gets advantage 0 (TRL's
    normalize_then_sum does the same). scale "std" or "none"."""
    ok = ~torch.isnan(r)                                                    # (P, G)
    if bool(ok.all()):
        return group_advantages(r, scale, baseline, eps)
    x = r.nan_to_num(0.0)                                                   # (P, G)
    n = ok.sum(dim=1, keepdim=True).to(x.dtype)                             # (P, 1) applicable samples
    centred = (x - x.sum(dim=1, keepdim=True) / n.clamp(min=1)) * ok        # (P, G), 0 where not applicable
    adv = centred * (n / (n - 1).clamp(min=1)) if baseline == "rloo" else centred  # leave-one-out mean
    if scale == "std":
        adv = adv / ((centred ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt().add(eps)
    hi = torch.where(ok, x, -torch.inf).amax(dim=1, keepdim=True)           # (P, 1)
    lo = torch.where(ok, x, torch.inf).amin(dim=1, keepdim=True)
    return adv.masked_fill((hi <= lo) | (n <= 1), 0.0)                      # (P, G), ties and singletons: 0


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: rewards (P, G) -> (P,) bool, True where not all rewards are
    equal. The other groups have zero advantage and so no policy gradient (only KL, if any)."""
    return (rewards != rewards[:, :1]).any(dim=1)  # (P,)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int,
                     penalty: float = 1.0) -> torch.Tensor:
    """DAPO eq. 13, soft overlong punishment, added to the task reward. lengths (N,) -> (N,) float.

    0 up to max_len - buffer tokens, then falls linearly to -penalty at max_len, and stays at
    -penalty beyond it. max_len is DAPO's L_max (the generation budget), buffer its L_cache.
    buffer = 0 turns the punishment off (all zeros).
    """
    if not 0 <= buffer <= max_len:
        raise ValueError(f"overlong_penalty: need 0 <= buffer <= max_len, got buffer={buffer}, "
                         f"max_len={max_len}; DAPO's buffer is 1/5 of the budget")
    lengths = lengths.float()  # (N,)
    if buffer == 0:
        return torch.zeros_like(lengths)  # (N,)
    frac = ((max_len - buffer) - lengths) / buffer  # (N,), > 0 before the buffer, -1 at max_len
    return frac.clamp(-1.0, 0.0) * penalty  # (N,)


def step_advantages(rewards: torch.Tensor, parts: dict[str, torch.Tensor], weights: dict[str, float] | None,
                    scale: str = "std", baseline: str = "mean", reward_norm: str = "sum",
                    all_reduce=None) -> torch.Tensor:
    """An RL step's advantages: rewards (P, G) -> (P, G). reward_norm "sum": `group_advantages` of the
    summed reward; "per_component": GDPO's `decoupled_advantages` of the components `parts` ({name:
    (P, G)}), weighted by `weights` (the reward function's; the overlong penalty weighs 1). The
    batch std is over every rank's rewards when `all_reduce` (a float sum over ranks) is given."""
    def batch_std(x: torch.Tensor) -> float:  # sample std of x over every rank's batch
        n, s1, s2 = (float(v) for v in (x.numel(), x.double().sum(), x.double().pow(2).sum()))
        if all_reduce is not None:
            n, s1, s2 = all_reduce(n), all_reduce(s1), all_reduce(s2)
        return math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1)) if n > 1 else 0.0

    if reward_norm == "per_component":
        if weights is None:
            raise ValueError("reward_norm='per_component' needs a reward function with weighted components "
                             "(rewards.RewardSum); this one has no .weights")
        missing = sorted(k for k, v in weights.items() if v and k not in parts)
        if missing:
            raise ValueError(f"reward_norm='per_component': the reward function gave no value per sample for {missing}")
        names = sorted(k for k in parts if k == "overlong" or weights.get(k))  # the same order on every rank
        w = torch.tensor([1.0 if k == "overlong" else float(weights.get(k, 0.0)) for k in names])
        comps = torch.stack([parts[k] for k in names], dim=2)                     # (P, G, K)
        per_group = "none" if scale == "batch" else scale  # the sum's batch std does the scaling
        return decoupled_advantages(comps, w, per_group, baseline, batch_std=batch_std)
    return group_advantages(rewards, scale, baseline, batch_std=batch_std(rewards) if scale == "batch" else None)
