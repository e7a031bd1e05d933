"""GRPO: group-relative advantages, the clipped policy loss with a per-token KL, and the RL loop.

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

import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterator

import torch

from optim import clip_and_step, set_lr, warmup_lr
from rollout import completion_text, concat_groups, derive_seed, gathered_weights, generate, token_logprobs

ADV_SCALES = ("std", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")

# --- loss configuration and presets ------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    """The loss's settings. Its defaults are the "grpo" preset; `loss_preset` starts from another."""
    # "std": (r - mean) / (std + eps), DeepSeekMath §4.1.2; "none": r - mean, Dr. GRPO.
    adv_scale: str = field(default="std", metadata={"help": "advantage scaling: std (GRPO) | none (Dr. GRPO)"})
    # Clip range of the ratio: [1 - clip_low, 1 + clip_high]. PPO's 0.2 (Schulman et al. 2017);
    # DAPO §3.1 raises clip_high to 0.28 so low-probability tokens can grow (clip-higher).
    clip_low: float = field(default=0.2, metadata={"help": "the ratio is clipped below at 1 - clip_low"})
    clip_high: float = field(default=0.2, metadata={"help": "the ratio is clipped above at 1 + clip_high"})
    # beta of DeepSeekMath eq. 3; 0.04 is DeepSeekMath §4.2's value. 0 removes the KL term.
    kl_coef: float = field(default=0.04, metadata={"help": "beta of the KL term to the reference policy "
                                                           "(0: none)"})
    # "k1" | "k2" | "k3" (Schulman's blog); DeepSeekMath eq. 4 is k3.
    kl_estimator: str = field(default="k3", metadata={"help": "KL estimator: k1 | k2 | k3 (DeepSeekMath eq. 4)"})
    # How token losses become one number; see `aggregate`. GRPO: seq_mean_token_mean.
    agg: str = field(default="seq_mean_token_mean",
                     metadata={"help": "token_mean (DAPO) | seq_mean_token_mean (GRPO) | "
                                       "seq_mean_token_sum_norm (Dr. GRPO)"})
    # DAPO §3.2: drop (and refill) groups whose rewards are all equal; see `informative_groups`.
    dynamic_sampling: bool = field(default=False, metadata={"help": "DAPO: replace groups whose rewards "
                                                                    "are all equal"})
    # DAPO §3.4 soft overlong punishment: buffer as a fraction of the generation budget
    # (max_new_tokens), so one preset fits any budget. DAPO: L_cache / L_max = 4096 / 20480 = 0.2.
    # 0 = off. The RL step passes buffer = int(overlong_buffer_frac * max_new_tokens) tokens.
    overlong_buffer_frac: float = field(default=0.0, metadata={"help": "DAPO soft overlong penalty over the "
                                                                       "last fraction of max_new_tokens (0: off)"})
    # The largest penalty, reached at max_new_tokens; DAPO uses 1 (the scale of its +-1 reward).
    overlong_penalty: float = field(default=1.0, metadata={"help": "the overlong penalty at max_new_tokens"})

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


# --- the RL loop ------------------------------------------------------------------------------
# DeepSeekMath Algorithm 1: each step samples G outputs per prompt from the current policy, scores
# them with a reward function, and takes mu passes of policy updates over minibatches with pi_old
# fixed. Distributed details stay with the caller: a step only receives `world` and an
# `all_reduce(float) -> float` for the global counts.

# A reward function: (completions, samples) -> (rewards, components). samples[i] is the task's
# sample dict for completions[i] (its prompt, gold answer, ...); rewards[i] is a float; components
# maps a name to the values to log for it (any number of them; their mean is logged as
# "reward/<name>", averaged over ranks, so every rank must return the same names).
RewardFn = Callable[[list[str], list[dict]], tuple[list[float], dict[str, list[float]]]]


@dataclass
class GRPOConfig:
    """Settings of the RL loop; the loss itself is `LossConfig` (preset + per-field overrides)."""
    steps: int = field(default=80, metadata={"help": "optimizer steps (RL: one rollout batch each)"})
    token_budget: int = field(default=0, metadata={"help": "RL: also stop once this many completion tokens "
                                                           "have been sampled, refills included (0: off); "
                                                           "budget-matched ablations"})
    # DeepSeekMath: 1024
    prompts_per_step: int = field(default=32, metadata={"help": "P: prompts per RL step (global, over ranks)"})
    # DeepSeekMath: 64; the R1 report: 16
    group_size: int = field(default=8, metadata={"help": "G: samples per prompt (the group)"})
    # the toy's worked answers: up to 83 tokens (3-digit operands, English steps)
    max_new_tokens: int = field(default=128, metadata={"help": "generation budget per sample (tokens)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; logprobs are the "
                                                              "tempered policy's"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1: off, the full policy)"})
    mu: int = field(default=1, metadata={"help": "policy passes over each rollout batch (DeepSeekMath's mu)"})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass (1 with mu 1: on-policy)"})
    micro_batch: int = field(default=128, metadata={"help": "sequences per forward/backward (memory only)"})
    # on the toy, 3e-4 and above wrecked the arithmetic faster than RL could help it
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (RL: constant after warm-up)"})
    warmup: int = field(default=3, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient L2 norm to this"})
    loss: str = field(default="grpo", metadata={"help": "loss preset: grpo | dr_grpo | dapo (LOSS_PRESETS)"})
    max_refill: int = field(default=2, metadata={"help": "dynamic sampling: extra rollout rounds to replace "
                                                         "groups with equal rewards"})

    def __post_init__(self):
        small = [f"{n}={getattr(self, n)}" for n in ("prompts_per_step", "group_size", "max_new_tokens", "mu",
                                                      "minibatches", "micro_batch") if getattr(self, n) < 1]
        small += [f"{n}={getattr(self, n)}" for n in ("steps", "warmup", "max_refill", "lr", "token_budget")
                  if getattr(self, n) < 0]
        if small:
            raise ValueError(f"GRPOConfig: {', '.join(small)}; counts must be at least 1 (steps, warmup, "
                             "max_refill, lr and token_budget at least 0)")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not self.max_grad_norm > 0:
            raise ValueError(f"GRPOConfig: need temperature >= 0, 0 < top_p <= 1 and max_grad_norm > 0, got "
                             f"{self.temperature}, {self.top_p}, {self.max_grad_norm}")


def sequence_logprobs(model, input_ids, kv_start, temperature: float, micro_batch: int):
    """Per-token logprobs (N, L) of `input_ids` under `model`, micro-batched; grad flows if enabled."""
    outs = []
    for i in range(0, input_ids.shape[0], micro_batch):
        ids, st = input_ids[i:i + micro_batch], kv_start[i:i + micro_batch]   # (n, L), (n,)
        outs.append(token_logprobs(model(ids, kv_start=st), ids, temperature))  # (n, L)
    return torch.cat(outs)                                                     # (N, L)


def train_rl(policy, ref, tok, draw_prompts: Callable[[int], list[dict]], reward_fn: RewardFn,
             cfg: GRPOConfig, lcfg: LossConfig, optimizer, *, start: int = 0, seed: int = 0, rank: int = 0,
             world: int = 1, all_reduce=None) -> Iterator[dict]:
    """GRPO (DeepSeekMath Algorithm 1) from step `start` to `cfg.steps`: yields each step's stats.

    policy: the model trained; ref: the frozen reference policy (None without a KL term). tok:
    encode/decode/eos_ids/pad_id. draw_prompts(n) -> this rank's next n sample dicts. reward_fn:
    see `RewardFn`. The learning rate warms up linearly, then stays constant. Each step's rollout
    seed is a function of (seed, step, rank), so a run resumed at `start` samples what the
    uninterrupted run did. The caller logs, evaluates and checkpoints between steps (runtime.fit).
    """
    for step in range(start, cfg.steps):
        row = rl_step(policy, ref, tok, draw_prompts, reward_fn, cfg, lcfg, optimizer,
                      lr=warmup_lr(step, cfg.lr, cfg.warmup), seed=derive_seed(seed, "rollout", step, rank),
                      world=world, all_reduce=all_reduce)
        row["gen_tok_per_s"] = row["gen_tokens"] / max(row["gen_time"], 1e-9)
        # completion tokens trained on per second (each of the mu passes counts)
        row["train_tok_per_s"] = row["gen_tokens"] * cfg.mu / max(row["train_time"], 1e-9)
        yield row


def rl_step(policy, ref, tok, draw_prompts, reward_fn: RewardFn, cfg: GRPOConfig, lcfg: LossConfig,
            optimizer, lr: float, seed: int, world: int = 1, all_reduce=None) -> dict:
    """One GRPO step (DeepSeekMath Algorithm 1, inner loop) on this rank's share of prompts.

    Sampling, scoring and advantages are local (whole groups live on one rank); `policy_update`
    then sums token and sequence counts over ranks with `all_reduce`, so the update equals the
    single-process update on the same global batch.
    """
    t0 = time.perf_counter()
    batch, info = collect(policy, ref, tok, draw_prompts, cfg.prompts_per_step // world, reward_fn, cfg, lcfg,
                          seed)
    gen_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    stats = policy_update(policy, batch, cfg, lcfg, optimizer, lr, world, all_reduce)
    stats.update(info, lr=lr, gen_time=gen_time, train_time=time.perf_counter() - t1)
    if all_reduce is not None:  # average every stat over ranks; token counts are summed
        stats = {k: (all_reduce(v) if k in ("gen_tokens", "sampled_tokens") else all_reduce(v) / world)
                 for k, v in stats.items()}
    return stats


@dataclass
class Batch:
    """What a policy update consumes: N sequences (prompt + completion) with their fixed targets."""
    input_ids: torch.Tensor             # (N, L) long, left-padded prompt then completion
    kv_start: torch.Tensor              # (N,) first real token of each row
    mask: torch.Tensor                  # (N, L) 1 on completion tokens
    old_logprobs: torch.Tensor          # (N, L) log pi_old of each token (0 off the mask)
    ref_logprobs: torch.Tensor | None   # (N, L) log pi_ref, None without a KL term
    advantages: torch.Tensor            # (N,)


def collect(policy, ref, tok, draw_prompts, n_prompts: int, reward_fn: RewardFn, cfg: GRPOConfig,
            lcfg: LossConfig, seed: int) -> tuple[Batch, dict]:
    """Sample G completions for each of `n_prompts` prompts (this rank's P / world), score them with
    `reward_fn`, compute advantages and the old/ref logprobs the loss holds fixed. Returns the Batch
    and rollout statistics."""
    G, P = cfg.group_size, n_prompts
    samples = draw_prompts(P)
    roll, rewards, comps = _sample_and_score(policy, tok, samples, reward_fn, cfg, lcfg, seed)
    n_drawn, sampled = P, float(roll.lengths.sum())  # every sampled token, discarded groups' too
    if lcfg.dynamic_sampling:  # DAPO section 3.2: replace groups whose rewards are all equal
        for rnd in range(cfg.max_refill):
            keep = informative_groups(rewards)                                   # (P,)
            if bool(keep.all()):
                break
            extra = draw_prompts(int((~keep).sum()))
            n_drawn += len(extra)
            r2, rew2, _ = _sample_and_score(policy, tok, extra, reward_fn, cfg, lcfg,
                                            derive_seed(seed, "refill", rnd))
            sampled += float(r2.lengths.sum())
            kept = keep.nonzero().flatten().tolist()
            roll = concat_groups([(roll, kept), (r2, list(range(len(extra))))], G, tok.pad_id)
            rewards = torch.cat([rewards[kept], rew2])                            # (P, G)
    adv = group_advantages(rewards, lcfg.adv_scale).flatten()                   # (P*G,)
    ids, start = roll.input_ids, roll.kv_start                                   # (N, L), (N,)
    old = roll.old_logprobs                                                      # (N, L)
    if cfg.mu > 1 or cfg.minibatches > 1 or ids.device.type != "cpu":
        # Off-policy passes, or bf16 on GPU: take pi_old from the trainer's own forward, so the
        # first pass starts at ratio 1. On CPU in fp32 the sampler's logprobs match it to 1e-4
        # (float32 rounding: its decode loop's matmuls run on oneDNN, kernels/cpu_decode.py), which
        # tests/test_rollout.py checks, so they are used as they are.
        with torch.no_grad():
            old = sequence_logprobs(policy, ids, start, cfg.temperature, cfg.micro_batch)
    ref_lp = None
    if lcfg.kl_coef > 0:
        with torch.no_grad():
            ref_lp = sequence_logprobs(ref, ids, start, cfg.temperature, cfg.micro_batch)  # (N, L)
    lengths = roll.lengths.float()
    info = {
        "reward": float(rewards.mean()), **{f"reward/{k}": v for k, v in comps.items()},
        "response_length": float(lengths.mean()), "gen_tokens": float(lengths.sum()),
        "sampled_tokens": sampled, "informative_groups": float(informative_groups(rewards).float().mean()),
        "prompts_drawn": float(n_drawn),
        "finish_eos": sum(r == "eos" for r in roll.finish_reasons) / len(roll.finish_reasons),
    }
    return Batch(ids, start, roll.completion_mask.float(), old, ref_lp, adv), info


def policy_update(policy, b: Batch, cfg: GRPOConfig, lcfg: LossConfig, optimizer, lr: float,
                  world: int = 1, all_reduce=None) -> dict:
    """mu passes over the batch in `minibatches` optimizer steps, each accumulated over
    micro-batches of `micro_batch` sequences. Loss shares use the minibatch's global token and
    sequence counts, so neither the micro-batch size nor the number of ranks changes the update."""
    N = b.input_ids.shape[0]
    mb = -(-N // cfg.minibatches)
    acc, n_tok, grad_norm = {}, 0.0, 0.0
    set_lr(optimizer, lr)
    for _ in range(cfg.mu):
        for lo in range(0, N, mb):
            hi = min(lo + mb, N)
            tot_tok = _sum(float(b.mask[lo:hi].sum()), all_reduce)
            tot_seq = _sum(float(hi - lo), all_reduce)
            for i in range(lo, hi, cfg.micro_batch):
                j = min(i + cfg.micro_batch, hi)
                ids = b.input_ids[i:j]                                              # (n, L)
                lp = token_logprobs(policy(ids, kv_start=b.kv_start[i:j]), ids, cfg.temperature)  # (n, L)
                loss, st = grpo_loss(lp, b.old_logprobs[i:j], None if b.ref_logprobs is None else b.ref_logprobs[i:j],
                                     b.advantages[i:j], b.mask[i:j], clip_low=lcfg.clip_low,
                                     clip_high=lcfg.clip_high, kl_coef=lcfg.kl_coef,
                                     kl_estimator=lcfg.kl_estimator, agg=lcfg.agg, max_len=cfg.max_new_tokens,
                                     total_tokens=tot_tok, total_seqs=tot_seq)
                (loss * world).backward()  # FSDP averages gradients over ranks; the shares must sum
                n_tok += st["num_tokens"]
                for k, v in st.items():  # shares add up; means are weighted by their token counts
                    acc[k] = acc.get(k, 0.0) + (v if k in _SHARES else v * st["num_tokens"])
            grad_norm = clip_and_step(policy, optimizer, cfg.max_grad_norm)
    steps = cfg.mu * cfg.minibatches
    out = {k: (v / steps if k in _SHARES else v / max(n_tok, 1.0))
           for k, v in acc.items() if k not in ("num_tokens", "num_seqs")}
    out["grad_norm"] = grad_norm
    return out


_SHARES = ("loss", "pg_loss", "kl_loss")  # grpo_loss stats that are sums of micro-batch shares


def _sum(x: float, all_reduce) -> float:
    return all_reduce(x) if all_reduce is not None else x


def _sample_and_score(policy, tok, samples, reward_fn: RewardFn, cfg: GRPOConfig, lcfg: LossConfig, seed: int):
    """G completions of each sample's prompt, their rewards (P, G) and the mean of each component."""
    G = cfg.group_size
    prompts = [tok.encode(s["prompt"]) for s in samples]
    with gathered_weights(policy):
        roll = generate(policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        num_samples=G, eos_token_id=tok.eos_ids, seed=seed, pad_token_id=tok.pad_id)
    texts = [completion_text(tok, toks) for toks in roll.tokens]
    values, parts = reward_fn(texts, [samples[i // G] for i in range(len(texts))])
    rewards = torch.tensor(values, dtype=torch.float32).view(-1, G)               # (P, G)
    comps = {k: sum(v) / len(v) for k, v in parts.items() if len(v)}
    if lcfg.overlong_buffer_frac > 0:  # DAPO §3.4: soft penalty near the generation budget
        buf = max(1, int(lcfg.overlong_buffer_frac * cfg.max_new_tokens))
        pen = overlong_penalty(roll.lengths.float(), cfg.max_new_tokens, buf, lcfg.overlong_penalty)
        rewards = rewards + pen.view_as(rewards)
        comps["overlong"] = float(pen.mean())
    return roll, rewards, comps
