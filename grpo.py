"""GRPO: group-relative advantages, the clipped policy loss with a per-token KL, and the RL step.

Papers:
- DeepSeekMath (Shao et al. 2024), §4.1 GRPO: eq. 3 is the objective (clipped surrogate averaged
  over each output's tokens, then over the G outputs of a prompt, minus beta * KL), eq. 4 the KL
  estimator, §4.1.2 outcome supervision (advantage = group-normalised reward for every token).
- DeepSeek-R1 report (Guo et al. 2025), §2.2.1: the same GRPO objective, used for R1-Zero and R1.
- DAPO (Yu et al. 2025): clip-higher (separate eps_low / eps_high), token-level loss
  (`token_mean`), no KL, dynamic sampling (drop groups whose rewards are all equal), and soft
  overlong punishment (eq. 13).
- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"): no
  std scaling of advantages and no 1/|o_i| length normalisation; the sum of token losses is
  divided by a constant (the generation budget), as in their code (sail-sg/understand-r1-zero).
- KL estimators k1, k2, k3: Schulman, "Approximating KL Divergence",
  http://joschu.net/blog/kl-approx.html

Shapes: P prompts, G outputs per prompt (the group), N sequences in this micro-batch (any subset
of the P*G, in any order), T padded completion length. `mask` is 1 on completion tokens.

Departures and choices:
- The KL is a per-token term in the loss, as in DeepSeekMath eq. 3, not a per-token penalty folded
  into the reward as in PPO-RLHF (InstructGPT). Like every implementation, it is evaluated at tokens
  sampled from pi_old rather than pi_theta (the two coincide on the first pass over a batch).
- Advantage std is the sample std (Bessel-corrected, torch's default and what TRL uses; DeepSeekMath
  does not say which). eps=1e-4 is added to the std (TRL's value), and a group whose rewards are all
  equal gets exactly 0, so nothing is NaN, also for G=1.
- Clipping has separate low/high ranges (DAPO); with clip_low == clip_high it is DeepSeekMath's.
  No dual-clip (Ye et al. 2020) and no clamp on the KL's log-ratio.
- Micro-batch and data-parallel invariance: pass the whole minibatch's `total_tokens` and
  `total_seqs`, and each call returns its *share*; the shares (and their gradients) sum to the
  full-minibatch loss. DeepSeekMath averages per prompt group; averaging over all sequences of a
  minibatch is the same thing when every group is complete.
- k1 and k2 are offered for ablations; DeepSeekMath uses k3.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

ADV_SCALES = ("std", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")

# --- loss configuration and presets ------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    # "std": (r - mean) / (std + eps), DeepSeekMath §4.1.2; "none": r - mean, Dr. GRPO.
    adv_scale: str = "std"
    # Clip range of the ratio: [1 - clip_low, 1 + clip_high]. PPO's 0.2 (Schulman et al. 2017);
    # DAPO §3.1 raises clip_high to 0.28 so low-probability tokens can grow (clip-higher).
    clip_low: float = 0.2
    clip_high: float = 0.2
    # beta of DeepSeekMath eq. 3; 0.04 is DeepSeekMath §4.2's value. 0 removes the KL term.
    kl_coef: float = 0.04
    # "k1" | "k2" | "k3" (Schulman's blog); DeepSeekMath eq. 4 is k3.
    kl_estimator: str = "k3"
    # How token losses become one number; see `aggregate`. GRPO: seq_mean_token_mean.
    agg: str = "seq_mean_token_mean"
    # DAPO §3.2: drop (and refill) groups whose rewards are all equal; see `informative_groups`.
    dynamic_sampling: bool = False
    # DAPO §3.4 soft overlong punishment: buffer as a fraction of the generation budget
    # (max_new_tokens), so one preset fits any budget. DAPO: L_cache / L_max = 4096 / 20480 = 0.2.
    # 0 = off. The RL step passes buffer = int(overlong_buffer_frac * max_new_tokens) tokens.
    overlong_buffer_frac: float = 0.0
    # The largest penalty, reached at max_new_tokens; DAPO uses 1 (the scale of its +-1 reward).
    overlong_penalty: float = 1.0

    def __post_init__(self):
        for name, value, choices in (("adv_scale", self.adv_scale, ADV_SCALES),
                                     ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
                                     ("agg", self.agg, AGGS)):
            if value not in choices:
                raise ValueError(f"LossConfig: {name}={value!r}; choose one of {', '.join(choices)}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"LossConfig: need 0 <= clip_low < 1 and clip_high >= 0, "
                             f"got clip_low={self.clip_low}, clip_high={self.clip_high}")
        if self.kl_coef < 0 or self.overlong_penalty < 0 or not 0 <= self.overlong_buffer_frac < 1:
            raise ValueError("LossConfig: need kl_coef >= 0, overlong_penalty >= 0 and "
                             f"0 <= overlong_buffer_frac < 1, got {self}")


LOSS_PRESETS: dict[str, LossConfig] = {
    # DeepSeekMath §4.1 / DeepSeek-R1 §2.2.1: std-scaled advantages, per-sequence token means,
    # k3 KL in the loss with beta 0.04, clip 0.2.
    "grpo": LossConfig(),
    # Dr. GRPO: unscaled advantages, token sums over a constant (pass max_len = max_new_tokens).
    # No KL: the paper's recipe runs with --beta 0 (sail-sg/understand-r1-zero, examples/*.sh).
    # Clip stays PPO's 0.2.
    "dr_grpo": LossConfig(adv_scale="none", kl_coef=0.0, agg="seq_mean_token_sum_norm"),
    # DAPO: clip-higher 0.2 / 0.28, token-level mean, dynamic sampling, overlong shaping, and no
    # KL (DAPO argues a long-CoT policy must move far from its initial model, so the KL only holds
    # it back).
    "dapo": LossConfig(clip_high=0.28, kl_coef=0.0, agg="token_mean", dynamic_sampling=True,
                       overlong_buffer_frac=4096 / 20480),
}


def loss_preset(name: str, **overrides) -> LossConfig:
    """A preset with some fields replaced, e.g. loss_preset("grpo", kl_coef=0.0)."""
    if name not in LOSS_PRESETS:
        raise ValueError(f"unknown loss preset {name!r}; choose one of {', '.join(LOSS_PRESETS)}")
    valid = [f.name for f in fields(LossConfig)]
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise ValueError(f"unknown LossConfig field(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return replace(LOSS_PRESETS[name], **overrides)


# --- rewards to advantages ---------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """Outcome-supervision advantages (DeepSeekMath §4.1.2): each reward relative to its group.

    rewards (P, G) -> (P, G). "std" divides by the sample std + eps; "none" (Dr. GRPO) does not.
    A group whose rewards are all equal carries no signal and gets exactly 0 (also for G = 1).
    """
    if rewards.dim() != 2 or scale not in ADV_SCALES:
        raise ValueError(f"group_advantages: need rewards (P, G) and scale in {ADV_SCALES}, "
                         f"got shape {tuple(rewards.shape)} and scale={scale!r}")
    if not torch.isfinite(rewards).all():
        raise ValueError("group_advantages: rewards contain NaN or inf; check the reward functions")
    r = rewards if rewards.is_floating_point() else rewards.float()  # (P, G)
    adv = r - r.mean(dim=1, keepdim=True)  # (P, G)
    if scale == "std" and r.shape[1] > 1:  # for G = 1 the sample std is undefined; adv is 0 anyway
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # (P, G), sample std (correction=1)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # (P, 1), all equal: mean may round, so force 0
    return adv.masked_fill(flat, 0.0)  # (P, G)


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


# --- the loss ----------------------------------------------------------------------------------


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) at tokens sampled from the policy.
    (N, T) -> (N, T).

    With Schulman's r = pi_ref / pi_theta: k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r
    (DeepSeekMath eq. 4; unbiased and always >= 0).
    """
    log_r = ref_logprobs - logprobs  # (N, T)
    if estimator == "k1":
        return -log_r  # (N, T)
    if estimator == "k2":
        return 0.5 * log_r ** 2  # (N, T)
    if estimator == "k3":
        return torch.exp(log_r) - log_r - 1.0  # (N, T)
    raise ValueError(f"unknown kl_estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def aggregate(x: torch.Tensor, mask: torch.Tensor, agg: str, max_len: int | None = None,
              total_tokens=None, total_seqs=None) -> torch.Tensor:
    """Per-token values x (N, T), float mask (N, T) -> scalar.

    token_mean (DAPO):                 sum of all tokens / number of tokens
    seq_mean_token_mean (GRPO eq. 3):  mean over sequences of each sequence's token mean
    seq_mean_token_sum_norm (Dr. GRPO): sum of all tokens / (number of sequences * max_len)

    total_tokens / total_seqs, when given, replace the local counts in the denominators (each agg
    reads only the one it needs), so the value returned is this micro-batch's share of the whole
    minibatch's and the shares sum to it. A sequence with no tokens counts, with 0 loss.
    """
    if agg == "token_mean":
        n_tok = total_tokens if total_tokens is not None else mask.sum().clamp(min=1)  # ()
        return (x * mask).sum() / n_tok  # ()
    n_seq = total_seqs if total_seqs is not None else max(x.shape[0], 1)
    if agg == "seq_mean_token_mean":
        seq_mean = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (N,)
        return seq_mean.sum() / n_seq  # ()
    if agg == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError("agg='seq_mean_token_sum_norm' needs max_len: the generation budget "
                             "(max_new_tokens)")
        return (x * mask).sum() / (n_seq * max_len)  # ()
    raise ValueError(f"unknown agg {agg!r}; choose one of {', '.join(AGGS)}")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2,
              clip_high: float = 0.2, kl_coef: float = 0.04, kl_estimator: str = "k3",
              agg: str = "seq_mean_token_mean", max_len: int | None = None,
              total_tokens=None, total_seqs=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The negative of DeepSeekMath's GRPO objective (eq. 3), with DAPO's separate clip ranges.

    logprobs (N, T): log pi_theta of the sampled tokens, the only input the gradient flows to.
    old_logprobs (N, T): log pi_old (the policy that sampled); ref_logprobs (N, T) or None: log
    pi_ref, None allowed only with kl_coef == 0. advantages (N,); mask (N, T), 1 on completion
    tokens. Values at masked-out positions are ignored (they may be anything, even inf).

    Micro-batches and ranks: pass total_tokens (mask tokens in the whole minibatch, over all
    micro-batches and ranks) and total_seqs (its sequences); then the returned losses *sum* to the
    full-minibatch loss, and so do their gradients. Data-parallel wrappers that average gradients
    over W ranks (DDP, FSDP) then give 1/W of it: multiply the loss by W, or keep it in the lr.

    Returns (loss, stats). stats are Python floats: loss, pg_loss and kl_loss are this call's
    shares (they sum over micro-batches, loss = pg_loss + kl_loss); every other stat is a mean or
    extreme over this micro-batch's tokens only (weight by num_tokens to combine). `kl` is logged
    whenever ref_logprobs is given, even with kl_coef == 0.
    """
    if ref_logprobs is None and kl_coef > 0:
        raise ValueError(f"grpo_loss: kl_coef={kl_coef} needs ref_logprobs; pass them or set kl_coef=0")
    shapes_ok = (logprobs.dim() == 2 and old_logprobs.shape == logprobs.shape == mask.shape
                 and advantages.shape == logprobs.shape[:1])
    if not shapes_ok:
        raise ValueError("grpo_loss: need logprobs, old_logprobs, mask (N, T) and advantages (N,), "
                         f"got {tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(advantages.shape)}")
    m = mask.bool()  # (N, T)
    mf = m.to(logprobs.dtype)  # (N, T)
    adv = advantages.detach().to(logprobs.dtype)[:, None]  # (N, 1), same advantage for every token
    log_ratio = (logprobs - old_logprobs.detach()).masked_fill(~m, 0.0)  # (N, T), 0 on padding
    ratio = torch.exp(log_ratio)  # (N, T), pi_theta / pi_old
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (N, T)
    pg = -torch.minimum(ratio * adv, clipped * adv)  # (N, T), pessimistic bound, negated
    pg_loss = aggregate(pg, mf, agg, max_len, total_tokens, total_seqs)  # ()

    kl = None
    if ref_logprobs is not None:
        ref = ref_logprobs.detach().masked_fill(~m, 0.0)  # (N, T)
        kl = kl_per_token(logprobs.masked_fill(~m, 0.0), ref, kl_estimator)  # (N, T)
    kl_loss = pg_loss.new_zeros(())  # ()
    if kl_coef > 0:
        kl_loss = kl_coef * aggregate(kl, mf, agg, max_len, total_tokens, total_seqs)  # ()
    loss = pg_loss + kl_loss  # ()

    with torch.no_grad():
        n_tok = mf.sum().clamp(min=1)  # ()

        def tok_mean(x):  # (N, T) -> (), mean over this micro-batch's tokens
            return (x * mf).sum() / n_tok

        low = (ratio < 1.0 - clip_low) & (adv < 0) & m  # (N, T), lower clip active
        high = (ratio > 1.0 + clip_high) & (adv > 0) & m  # (N, T), upper clip active
        r_flat = torch.cat([ratio.flatten(), ratio.new_ones(1)])  # (N*T + 1,), 1 if no tokens
        m_flat = torch.cat([m.flatten(), ~m.any().reshape(1)])  # (N*T + 1,), no device sync
        ratio_min = torch.where(m_flat, r_flat, torch.inf).min()  # ()
        ratio_max = torch.where(m_flat, r_flat, -torch.inf).max()  # ()
        n_seq = max(adv.shape[0], 1)
        adv_mean = adv.sum() / n_seq  # ()
        adv_std = (((adv - adv_mean) ** 2).sum() / n_seq).sqrt()  # (), population std: N=1 is fine
        stats = {
            "loss": loss, "pg_loss": pg_loss, "kl_loss": kl_loss,
            "kl": tok_mean(kl) if kl is not None else loss.new_zeros(()),
            "clip_frac_low": tok_mean(low), "clip_frac_high": tok_mean(high),
            "clip_frac": tok_mean(low | high),
            "ratio_mean": tok_mean(ratio), "ratio_min": ratio_min, "ratio_max": ratio_max,
            "entropy_proxy": tok_mean(-logprobs.masked_fill(~m, 0.0)),  # NLL of sampled tokens
            "adv_mean": adv_mean, "adv_std": adv_std,
            "adv_zero_frac": (adv == 0).to(adv.dtype).sum() / n_seq,  # seqs with no policy gradient
            "num_tokens": mf.sum(), "num_seqs": loss.new_tensor(float(m.shape[0])),
        }
        values = torch.stack([v.detach().to(torch.float64) for v in stats.values()]).tolist()
    return loss, dict(zip(stats, values))  # one device sync for all stats


# --- the RL step -------------------------------------------------------------------------------
# The RL step (rollout -> rewards -> advantages -> mu passes over minibatches) goes below.
