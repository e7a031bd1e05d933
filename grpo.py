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

import time
from dataclasses import dataclass, fields, replace

import torch

from rewards import combine_rewards
from rollout import concat_groups, gathered_weights, generate, token_logprobs
from sft import clip_and_step

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


# --- the RL step ------------------------------------------------------------------------------
# DeepSeekMath Algorithm 1's inner loop: sample G outputs per prompt, score them, then mu passes
# of policy updates over minibatches with pi_old fixed. Distributed details stay in train.py: the
# step only receives `world` and an `all_reduce(float) -> float` for the global counts.
@dataclass
class GRPOConfig:
    """Settings of the RL loop; the loss itself is `LossConfig` (preset + per-field overrides)."""
    steps: int = 80                 # RL steps (one rollout batch each)
    prompts_per_step: int = 32      # P: prompts per step, global over ranks (DeepSeekMath: 1024)
    group_size: int = 8             # G: samples per prompt (DeepSeekMath: 64; R1 report: 16)
    max_new_tokens: int = 80        # generation budget per sample (the toy's worked answers: ~45)
    temperature: float = 1.0        # sampling temperature; logprobs are of the tempered policy
    top_p: float = 1.0              # nucleus sampling (1 = off; GRPO samples the full policy)
    mu: int = 1                     # policy passes over each rollout batch (DeepSeekMath's mu)
    minibatches: int = 1            # optimizer steps per pass; 1 with mu=1 is strictly on-policy
    micro_batch: int = 128          # sequences per forward/backward (memory knob only)
    lr: float = 1e-4                # AdamW learning rate (constant after warm-up); on the toy 3e-4
                                    # and above wrecked the arithmetic faster than RL could help it
    warmup: int = 3                 # linear warm-up steps
    weight_decay: float = 0.0       # AdamW decoupled weight decay
    max_grad_norm: float = 1.0      # global gradient-norm clip
    loss: str = "grpo"              # LossConfig preset: grpo | dr_grpo | dapo
    max_refill: int = 2             # dynamic sampling: extra rollout rounds to replace flat groups


def sequence_logprobs(model, input_ids, kv_start, temperature: float, micro_batch: int):
    """Per-token logprobs (N, L) of `input_ids` under `model`, micro-batched; grad flows if enabled."""
    outs = []
    for i in range(0, input_ids.shape[0], micro_batch):
        ids, st = input_ids[i:i + micro_batch], kv_start[i:i + micro_batch]   # (n, L), (n,)
        outs.append(token_logprobs(model(ids, kv_start=st), ids, temperature))  # (n, L)
    return torch.cat(outs)                                                     # (N, L)


def score_rollout(texts: list[str], samples: list[dict], G: int, weights: dict) -> tuple[torch.Tensor, dict]:
    """Rewards (P, G) and per-component means for completions in prompt-major order."""
    totals, comps = [], {}
    for i, text in enumerate(texts):
        s = samples[i // G]
        r, parts = combine_rewards(text, s["prompt"], s, weights)
        totals.append(r)
        for k, v in parts.items():
            comps.setdefault(k, []).append(v)
    return torch.tensor(totals).view(-1, G), {k: sum(v) / len(v) for k, v in comps.items()}


def rl_step(policy, ref, tok, draw_prompts, cfg: GRPOConfig, lcfg: LossConfig, weights: dict,
            optimizer, lr: float, seed: int, world: int = 1, all_reduce=None, scorer=None) -> dict:
    """One GRPO step (DeepSeekMath Algorithm 1, inner loop) on this rank's share of prompts.

    draw_prompts(n) -> this rank's next n sample dicts. Sampling, scoring and advantages are local
    (whole groups live on one rank); `policy_update` then sums token and sequence counts over ranks
    with `all_reduce`, so the update equals the single-process update on the same global batch.
    scorer(texts, samples, G) -> (rewards (P, G), {component: mean}) replaces the rule rewards
    (`score_rollout` with `weights`), e.g. for R1 stage 4's reward-model reward on general prompts;
    its components must have the same names on every rank (they are averaged over ranks).
    """
    t0 = time.perf_counter()
    batch, info = collect(policy, ref, tok, draw_prompts, cfg.prompts_per_step // world, cfg, lcfg,
                          weights, seed, scorer)
    gen_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    stats = policy_update(policy, batch, cfg, lcfg, optimizer, lr, world, all_reduce)
    stats.update(info, lr=lr, gen_time=gen_time, train_time=time.perf_counter() - t1)
    if all_reduce is not None:  # average every stat over ranks; token counts are summed
        stats = {k: (all_reduce(v) if k == "gen_tokens" else all_reduce(v) / world) for k, v in stats.items()}
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


def collect(policy, ref, tok, draw_prompts, n_prompts: int, cfg: GRPOConfig, lcfg: LossConfig,
            weights: dict, seed: int, scorer=None) -> tuple[Batch, dict]:
    """Sample G completions for each of `n_prompts` prompts (this rank's P / world), score them, and compute advantages (and the
    old/ref logprobs the loss holds fixed). Returns the Batch and rollout statistics."""
    G, P = cfg.group_size, n_prompts
    samples = draw_prompts(P)
    roll, rewards, comps = _sample_and_score(policy, tok, samples, cfg, lcfg, weights, seed, scorer)
    n_drawn = P
    if lcfg.dynamic_sampling:  # DAPO section 3.2: replace groups whose rewards are all equal
        for rnd in range(cfg.max_refill):
            keep = informative_groups(rewards)                                   # (P,)
            if bool(keep.all()):
                break
            extra = draw_prompts(int((~keep).sum()))
            n_drawn += len(extra)
            r2, rew2, _ = _sample_and_score(policy, tok, extra, cfg, lcfg, weights, seed + 7919 * (rnd + 1),
                                            scorer)
            kept = keep.nonzero().flatten().tolist()
            roll = concat_groups([(roll, kept), (r2, list(range(len(extra))))], G, tok.pad_id)
            rewards = torch.cat([rewards[kept], rew2])                            # (P, G)
    adv = group_advantages(rewards, lcfg.adv_scale).flatten()                   # (P*G,)
    ids, start = roll.input_ids, roll.kv_start                                   # (N, L), (N,)
    old = roll.old_logprobs                                                      # (N, L)
    if cfg.mu > 1 or cfg.minibatches > 1 or ids.device.type != "cpu":
        # Off-policy passes, or bf16 on GPU: take pi_old from the trainer's own forward so the
        # first ratio is 1 (exactly on GPU; on CPU to float32 rounding, ~1e-6, because no-grad
        # matmuls run on oneDNN and the update's on MKL, see kernels/linear.py). On CPU in fp32
        # the sampler's logprobs already match it to 1e-4: tests/test_rollout.py checks that.
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
        "informative_groups": float(informative_groups(rewards).float().mean()),
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
    for g in optimizer.param_groups:
        g["lr"] = lr
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


def _sample_and_score(policy, tok, samples, cfg, lcfg, weights, seed, scorer=None):
    prompts = [tok.encode(s["prompt"]) for s in samples]
    with gathered_weights(policy):
        roll = generate(policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        num_samples=cfg.group_size, eos_token_id=tok.eos_ids, seed=seed,
                        pad_token_id=tok.pad_id)
    texts = [tok.decode([t for t in toks if t not in tok.eos_ids]) for toks in roll.tokens]
    if scorer is None:
        rewards, comps = score_rollout(texts, samples, cfg.group_size, weights)   # (P, G)
    else:
        rewards, comps = scorer(texts, samples, cfg.group_size)                   # (P, G)
    if lcfg.overlong_buffer_frac > 0:  # DAPO §3.4: soft penalty near the generation budget
        buf = max(1, int(lcfg.overlong_buffer_frac * cfg.max_new_tokens))
        pen = overlong_penalty(roll.lengths.float(), cfg.max_new_tokens, buf, lcfg.overlong_penalty)
        rewards = rewards + pen.view_as(rewards)
        comps["overlong"] = float(pen.mean())
    return roll, rewards, comps
