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
- The 2025-26 options (each a LossConfig field and a flag; formulas in `grpo_loss`):
  GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one length-normalised ratio per
  sequence. CISPO (MiniMax-M1 report, MiniMax 2025): a truncated, stopped-gradient IS weight on
  log pi, so no token's gradient is dropped. Two-sided clip (INTELLECT-2 report, Prime Intellect
  2025). Truncated / masked importance sampling between the sampler (mu) and the trainer's pi_old
  (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training";
  verl's rollout_is): token and sequence forms. DAPO §3.4 overlong filtering (mask_truncated).
  The advantage variants (RLOO, batch std, GDPO) are advantages.py's.

Shapes: P prompts, G outputs per prompt (the group), N sequences in this micro-batch (any subset
of the P*G, in any order), T padded completion length. `mask` is 1 on completion tokens.

Precision: whatever the model's dtype (bf16 with --dtype bfloat16, the default on CUDA), the loss
is float32: `token_logprobs` upcasts the logits before log_softmax, so logprobs, ratios, the KL,
advantages and the loss are float32; only the gradient flowing back into the model is bf16
(tests/test_bf16.py).

Departures and choices:
- The KL is a per-token term in the loss, as in DeepSeekMath eq. 3, not a per-token penalty folded
  into the reward as in PPO-RLHF (InstructGPT). Like every implementation, it is evaluated at tokens
  sampled from pi_old rather than pi_theta (the two coincide on the first pass over a batch).
- Advantages (group, RLOO, batch-scaled, GDPO) and DAPO's reward shaping live in advantages.py,
  with their own departures.
- Clipping has separate low/high ranges (DAPO); with clip_low == clip_high it is DeepSeekMath's.
  No clamp on the KL's log-ratio. `delta` (INTELLECT-2) caps the ratio where A < 0, which is what
  dual-clip (Ye et al. 2020; verl's clip_ratio_c) does.
- Importance correction: MIS gives a token weight 0 but keeps it in the token count (as TRL does),
  so the global count is known before the forward; only an upper cap, no lower one (TRL and verl
  offer both).
- On-policy steps (mu = 1, one minibatch) take pi_old from the update's own forward, detached:
  the ratio is exactly 1, and the sampler's logprobs serve as mu, so the mismatch is measured and
  can be corrected rather than folded into the ratio.
- The policy's token entropy is computed from the update's logits (no extra forward), logged only.
- Micro-batch and data-parallel invariance: pass the whole minibatch's `total_tokens` and
  `total_seqs`, and each call returns its *share*; the shares (and their gradients) sum to the
  full-minibatch loss. DeepSeekMath averages per prompt group; averaging over all sequences of a
  minibatch is the same thing when every group is complete.
- k1 and k2 are offered for ablations; DeepSeekMath uses k3.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterator

import torch

from advantages import ADV_BASELINES, ADV_SCALES, informative_groups, overlong_penalty, step_advantages
from optim import clip_and_step, set_lr, warmup_lr
from rollout import (completion_text, concat_groups, derive_seed, gathered_weights, generate, token_entropy,
                     token_logprobs)

REWARD_NORMS = ("sum", "per_component")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
POLICY_LOSSES = ("clip", "gspo", "cispo")
IS_CORRECTIONS = ("none", "token_tis", "token_mis", "seq_tis", "seq_mis")

# --- loss configuration and presets ------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    """The loss's settings. Its defaults are the "grpo" preset; `loss_preset` starts from another."""
    # "std": (r - mean) / (std + eps), DeepSeekMath §4.1.2; "none": r - mean, Dr. GRPO; "batch":
    # (r - mean) / (std of the whole batch + eps), Lite PPO / TRL's scale_rewards="batch".
    adv_scale: str = field(default="std", metadata={"help": "advantage scaling: std (GRPO, per group) | none "
                                                            "(Dr. GRPO) | batch (std of the whole batch)"})
    # "mean": the group mean; "rloo": the mean of the other G-1 samples (Ahmadian et al. 2024).
    adv_baseline: str = field(default="mean", metadata={"help": "advantage baseline: mean (GRPO) | rloo "
                                                                "(leave-one-out mean of the other G-1)"})
    # "sum": normalise the weighted sum of the rewards; "per_component": GDPO, normalise each reward
    # within its group, sum them weighted, then normalise over the batch.
    reward_norm: str = field(default="sum", metadata={"help": "sum (normalise the summed reward) | "
                                                              "per_component (GDPO: each reward, then the sum)"})
    # The policy term; formulas in `grpo_loss`.
    policy_loss: str = field(default="clip", metadata={"help": "clip (PPO/GRPO token ratio) | gspo (one ratio "
                                                               "per sequence) | cispo (MiniMax-M1)"})
    # MiniMax-M1 caps the IS weight from above only and gives no value; 5 is ScaleRL's (Khatri et
    # al. 2025, "The Art of Scaling RL Compute"), the value TRL's docs recommend.
    cispo_cap: float = field(default=5.0, metadata={"help": "cispo: the stopped-gradient weight is "
                                                            "min(ratio, cispo_cap)"})
    # INTELLECT-2 uses delta = 4; 0 = off. Must exceed 1 + clip_high.
    delta: float = field(default=0.0, metadata={"help": "two-sided clip (INTELLECT-2): cap the unclipped "
                                                        "ratio at delta (0: off)"})
    # Sampler (mu) vs trainer (pi_old) mismatch; w = pi_old / mu. Formulas in `importance_weights`.
    is_correction: str = field(default="none", metadata={"help": "sampler/trainer importance correction: none | "
                                                                 "token_tis | token_mis | seq_tis | seq_mis"})
    is_cap: float = field(default=2.0, metadata={"help": "the cap C of is_correction: tis uses min(w, C), mis "
                                                         "drops w > C"})
    # DAPO §3.4 overlong filtering: a completion cut off at max_new_tokens gets no loss.
    mask_truncated: bool = field(default=False, metadata={"help": "DAPO overlong filtering: no loss on "
                                                                  "completions cut at max_new_tokens"})
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
        for name, choices in (("adv_scale", ADV_SCALES), ("adv_baseline", ADV_BASELINES),
                              ("reward_norm", REWARD_NORMS), ("kl_estimator", KL_ESTIMATORS), ("agg", AGGS),
                              ("policy_loss", POLICY_LOSSES), ("is_correction", IS_CORRECTIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"LossConfig: {name}={getattr(self, name)!r}; choose one of {', '.join(choices)}")
        _check_caps(self.policy_loss, self.cispo_cap, self.delta, self.clip_high, self.is_cap)
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"LossConfig: need 0 <= clip_low < 1 and clip_high >= 0, "
                             f"got clip_low={self.clip_low}, clip_high={self.clip_high}")
        if self.kl_coef < 0 or self.overlong_penalty < 0 or not 0 <= self.overlong_buffer_frac < 1:
            raise ValueError("LossConfig: need kl_coef >= 0, overlong_penalty >= 0 and "
                             f"0 <= overlong_buffer_frac < 1, got {self}")


def _check_caps(policy_loss: str, cispo_cap: float, delta: float, clip_high: float, is_cap: float) -> None:
    if not cispo_cap > 0 or not is_cap > 0:
        raise ValueError(f"LossConfig: need cispo_cap > 0 and is_cap > 0, got {cispo_cap}, {is_cap}")
    if delta and (delta <= 1 + clip_high or policy_loss == "cispo"):
        raise ValueError(f"LossConfig: delta={delta} must be 0 (off) or exceed 1 + clip_high = {1 + clip_high}, "
                         "and cispo has no clip for it to act on")


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
    # GSPO: sequence-level ratios clipped at 3e-4 / 4e-4 (the paper's ranges for its eq. 5), no KL;
    # one term per sequence averaged over the group, i.e. seq_mean_token_mean of a per-sequence term.
    "gspo": LossConfig(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, kl_coef=0.0),
    # MiniMax-M1: CISPO with a token-level mean (its objective divides by the total token count),
    # no KL.
    "cispo": LossConfig(policy_loss="cispo", kl_coef=0.0, agg="token_mean"),
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


def importance_weights(old_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: str, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampler/trainer correction: mu = the sampler's probability of each token, pi_old = the
    trainer's; the loss's samples come from mu, its ratio is taken against pi_old. (N, T) each, mask
    bool -> (weight (N, T) detached, log w (N, T) the mode uses). With log w_t = log pi_old - log mu:

    token_tis: min(w_t, C)              truncated IS per token (Yao et al. 2025; verl rollout_is)
    token_mis: 1[w_t <= C]              masked IS: the token's policy term is dropped
    seq_tis:   min(W, C), W = prod_t w_t over the sequence's tokens, on each of them
    seq_mis:   1[W <= C]
    none:      1
    """
    log_w = (old_logprobs - behavior_logprobs).detach().masked_fill(~mask, 0.0)  # (N, T)
    if mode.startswith("seq_"):
        log_w = log_w.sum(dim=1, keepdim=True).expand_as(log_w)  # (N, T), log W on every token
    log_cap = math.log(cap)
    if mode.endswith("_tis"):
        return torch.exp(log_w.clamp(max=log_cap)), log_w  # compared in log space: W may overflow
    if mode.endswith("_mis"):
        return (log_w <= log_cap).to(old_logprobs.dtype), log_w
    if mode == "none":
        return torch.ones_like(log_w), log_w
    raise ValueError(f"unknown is_correction {mode!r}; choose one of {', '.join(IS_CORRECTIONS)}")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2,
              clip_high: float = 0.2, kl_coef: float = 0.04, kl_estimator: str = "k3",
              agg: str = "seq_mean_token_mean", max_len: int | None = None, policy_loss: str = "clip",
              cispo_cap: float = 5.0, delta: float = 0.0, behavior_logprobs: torch.Tensor | None = None,
              is_correction: str = "none", is_cap: float = 2.0, truncated: torch.Tensor | None = None,
              total_tokens=None, total_seqs=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The negative of DeepSeekMath's GRPO objective (eq. 3), with DAPO's separate clip ranges and
    the 2025-26 variants. Per token t of sequence i, r_t = pi_theta / pi_old, A = A_i, sg = stop-grad:

    clip  (DeepSeekMath eq. 3, DAPO §3.1):  -min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A)
    gspo  (GSPO eq. 5; TRL importance_sampling_level="sequence"): the same with r_t replaced by
          s_i = exp(mean over i's tokens of log r_t), the same value (and gradient path) on each token
    cispo (MiniMax-M1, CISPO):  -sg(min(r_t, cispo_cap)) A log pi_theta(o_t)
    delta > 0 (INTELLECT-2, two-sided clip): the unclipped r (or s_i) is min(r, delta)
    is_correction (see `importance_weights`): the policy term times w, from behavior_logprobs (mu)
    truncated (N,) bool (DAPO §3.4 overlong filtering): those rows get no loss (their tokens leave
    the mask; the sequence still counts in the sequence denominators)
    then + kl_coef * KL per token, and `aggregate`.

    logprobs (N, T): log pi_theta of the sampled tokens, the only input the gradient flows to.
    old_logprobs (N, T): log pi_old (the trainer's view of the policy that sampled); ref_logprobs
    (N, T) or None: log pi_ref, None allowed only with kl_coef == 0; behavior_logprobs (N, T) or None:
    the sampler's log mu, needed by is_correction. advantages (N,); mask (N, T), 1 on completion
    tokens. Values at masked-out positions are ignored (they may be anything, even inf).

    Micro-batches and ranks: pass total_tokens (mask tokens in the whole minibatch, over all
    micro-batches and ranks, truncated rows excluded) and total_seqs (its sequences); then the
    returned losses *sum* to the full-minibatch loss, and so do their gradients. Data-parallel
    wrappers that average gradients over W ranks (DDP, FSDP) then give 1/W of it: multiply the loss
    by W, or keep it in the lr.

    Returns (loss, stats). stats are Python floats: loss, pg_loss and kl_loss are this call's
    shares (they sum over micro-batches, loss = pg_loss + kl_loss); every other stat is a mean or
    extreme over this micro-batch's tokens only (weight by num_tokens to combine). `kl` is logged
    whenever ref_logprobs is given, even with kl_coef == 0. is_* are the sampler/trainer mismatch:
    mean |log w_t|, max w_t, and the share of tokens whose weight (per is_correction) exceeds is_cap.
    """
    if ref_logprobs is None and kl_coef > 0:
        raise ValueError(f"grpo_loss: kl_coef={kl_coef} needs ref_logprobs; pass them or set kl_coef=0")
    if is_correction != "none" and behavior_logprobs is None:
        raise ValueError(f"grpo_loss: is_correction={is_correction!r} needs behavior_logprobs (the sampler's)")
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy_loss {policy_loss!r}; choose one of {', '.join(POLICY_LOSSES)}")
    _check_caps(policy_loss, cispo_cap, delta, clip_high, is_cap)
    shapes_ok = (logprobs.dim() == 2 and old_logprobs.shape == logprobs.shape == mask.shape
                 and advantages.shape == logprobs.shape[:1]
                 and (behavior_logprobs is None or behavior_logprobs.shape == logprobs.shape)
                 and (truncated is None or truncated.shape == advantages.shape))
    if not shapes_ok:
        raise ValueError("grpo_loss: need logprobs, old_logprobs, mask (N, T) and advantages (N,) (and "
                         f"behavior_logprobs (N, T), truncated (N,) if given), got {tuple(logprobs.shape)}, "
                         f"{tuple(old_logprobs.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(advantages.shape)}")
    m = effective_mask(mask, truncated).bool()  # (N, T)
    mf = m.to(logprobs.dtype)  # (N, T)
    adv = advantages.detach().to(logprobs.dtype)[:, None]  # (N, 1), same advantage for every token
    log_ratio = (logprobs - old_logprobs.detach()).masked_fill(~m, 0.0)  # (N, T), 0 on padding
    if policy_loss == "gspo":
        seq_log_ratio = log_ratio.sum(dim=1, keepdim=True) / mf.sum(dim=1, keepdim=True).clamp(min=1)  # (N, 1)
        ratio = torch.exp(seq_log_ratio).expand_as(log_ratio)  # (N, T), s_i on each of its tokens
    else:
        ratio = torch.exp(log_ratio)  # (N, T), pi_theta / pi_old
    zero = torch.zeros_like(m)  # (N, T) bool
    if policy_loss == "cispo":
        weight = ratio.detach().clamp(max=cispo_cap)  # (N, T), sg(min(r, cap))
        pg = -weight * adv * logprobs.masked_fill(~m, 0.0)  # (N, T)
        low, high, capped = zero, (ratio > cispo_cap) & m, zero  # (N, T) each
    else:
        clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (N, T)
        unclipped = ratio.clamp(max=delta) if delta else ratio  # (N, T), two-sided clip
        pg = -torch.minimum(unclipped * adv, clipped * adv)  # (N, T), pessimistic bound, negated
        low = (ratio < 1.0 - clip_low) & (adv < 0) & m  # (N, T), lower clip active
        high = (ratio > 1.0 + clip_high) & (adv > 0) & m  # (N, T), upper clip active
        capped = (ratio > delta) & (adv < 0) & m if delta else zero  # (N, T), delta active
    behavior = behavior_logprobs if behavior_logprobs is not None else old_logprobs
    is_w, log_w = importance_weights(old_logprobs, behavior, m, is_correction, is_cap)  # (N, T) each
    if is_correction != "none":
        pg = pg * is_w  # (N, T)
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

        def tok_max(x, sign=1.0):  # (N, T) -> (), the max (sign -1: the min), 1 if there are no tokens
            flat = torch.cat([x.flatten() * sign, x.new_full((1,), sign)])  # (N*T + 1,)
            keep = torch.cat([m.flatten(), ~m.any().reshape(1)])  # (N*T + 1,), no device sync
            return torch.where(keep, flat, -torch.inf).max() * sign  # ()

        token_log_w = (old_logprobs - behavior).masked_fill(~m, 0.0)  # (N, T), per token whatever the mode
        n_seq = max(adv.shape[0], 1)
        adv_mean = adv.sum() / n_seq  # ()
        adv_std = (((adv - adv_mean) ** 2).sum() / n_seq).sqrt()  # (), population std: N=1 is fine
        stats = {
            "loss": loss, "pg_loss": pg_loss, "kl_loss": kl_loss,
            "kl": tok_mean(kl) if kl is not None else loss.new_zeros(()),
            "clip_frac_low": tok_mean(low), "clip_frac_high": tok_mean(high),
            "clip_frac_delta": tok_mean(capped), "clip_frac": tok_mean(low | high | capped),
            "ratio_mean": tok_mean(ratio), "ratio_min": tok_max(ratio, -1.0), "ratio_max": tok_max(ratio),
            "entropy_proxy": tok_mean(-logprobs.masked_fill(~m, 0.0)),  # NLL of sampled tokens
            "is_logw_abs_mean": tok_mean(token_log_w.abs()), "is_w_max": tok_max(token_log_w.exp()),
            "is_capped_frac": tok_mean(log_w > math.log(is_cap)),
            "adv_mean": adv_mean, "adv_std": adv_std,
            "adv_zero_frac": (adv == 0).to(adv.dtype).sum() / n_seq,  # seqs with no policy gradient
            "num_tokens": mf.sum(), "num_seqs": loss.new_tensor(float(m.shape[0])),
        }
        values = torch.stack([v.detach().to(torch.float64) for v in stats.values()]).tolist()
    return loss, dict(zip(stats, values))  # one device sync for all stats


def effective_mask(mask: torch.Tensor, truncated: torch.Tensor | None) -> torch.Tensor:
    """mask (N, T) without the rows of `truncated` (N,) bool (DAPO's overlong filtering), if given."""
    return mask if truncated is None else mask * (~truncated.bool())[:, None].to(mask.dtype)  # (N, T)


# The grpo_loss keywords that are LossConfig fields of the same name.
LOSS_ARGS = ("clip_low", "clip_high", "kl_coef", "kl_estimator", "agg", "policy_loss", "cispo_cap", "delta",
             "is_correction", "is_cap")


# --- the RL loop ------------------------------------------------------------------------------
# DeepSeekMath Algorithm 1: each step samples G outputs per prompt from the current policy, scores
# them with a reward function, and takes mu passes of policy updates over minibatches with pi_old
# fixed. Distributed details stay with the caller: a step only receives `world` and an
# `all_reduce(float) -> float` for the global counts.

# A reward function: (completions, samples) -> (rewards, components). samples[i] is the task's
# sample dict for completions[i] (its prompt, gold answer, ...); rewards[i] is a float; components
# maps a name to the values to log for it (any number of them, None where a component does not
# apply; the mean over the others is logged as "reward/<name>", NaN if none, averaged over ranks,
# so every rank must return the same names). An optional `weights` attribute ({name: weight},
# rewards.RewardSum has one) lets reward_norm="per_component" normalise the components (GDPO).
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
    loss: str = field(default="grpo", metadata={"help": "loss preset: grpo | dr_grpo | dapo | gspo | cispo "
                                                        "(LOSS_PRESETS)"})
    max_refill: int = field(default=2, metadata={"help": "dynamic sampling: extra rollout rounds to replace "
                                                         "groups with equal rewards"})
    # For benchmarks: every sample costs max_new_tokens decode steps whatever the model does.
    ignore_eos: bool = field(default=False, metadata={"help": "sample past end-of-sequence: every completion "
                                                              "runs to max_new_tokens (benchmarking)"})

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
             world: int = 1, all_reduce=None, prompt_index: list[int] | None = None) -> Iterator[dict]:
    """GRPO (DeepSeekMath Algorithm 1) from step `start` to `cfg.steps`: yields each step's stats.

    policy: the model trained; ref: the frozen reference policy (None without a KL term). tok:
    encode/decode/eos_ids/pad_id. draw_prompts(n) -> this rank's next n sample dicts. reward_fn:
    see `RewardFn`. The learning rate warms up linearly, then stays constant. Each prompt's rollout
    seed is a function of (seed, step, its index in the step's global batch: `prompt_index`, this
    rank's indices, default its contiguous share rank * n ... rank * n + n - 1), so a run resumed at
    `start` samples what the uninterrupted run did, and W ranks sample what one process does.
    The caller logs, evaluates and checkpoints between steps (runtime.fit).
    """
    n = cfg.prompts_per_step // world
    index = prompt_index if prompt_index is not None else range(rank * n, rank * n + n)
    for step in range(start, cfg.steps):
        seeds = [derive_seed(seed, "rollout", step, i) for i in index]
        row = rl_step(policy, ref, tok, draw_prompts, reward_fn, cfg, lcfg, optimizer,
                      lr=warmup_lr(step, cfg.lr, cfg.warmup), seed=seeds, world=world, all_reduce=all_reduce)
        row["gen_tok_per_s"] = row["gen_tokens"] / max(row["gen_time"], 1e-9)
        # completion tokens trained on per second (each of the mu passes counts)
        row["train_tok_per_s"] = row["gen_tokens"] * cfg.mu / max(row["train_time"], 1e-9)
        yield row


def rl_step(policy, ref, tok, draw_prompts, reward_fn: RewardFn, cfg: GRPOConfig, lcfg: LossConfig,
            optimizer, lr: float, seed: int | list[int], world: int = 1, all_reduce=None) -> dict:
    """One GRPO step (DeepSeekMath Algorithm 1, inner loop) on this rank's share of prompts.

    Sampling, scoring and advantages are local (whole groups live on one rank); `policy_update`
    then sums token and sequence counts over ranks with `all_reduce`, so the update equals the
    single-process update on the same global batch.
    """
    t0 = time.perf_counter()
    batch, info = collect(policy, ref, tok, draw_prompts, cfg.prompts_per_step // world, reward_fn, cfg, lcfg,
                          seed, all_reduce)
    gen_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    stats = policy_update(policy, batch, cfg, lcfg, optimizer, lr, world, all_reduce)
    stats.update(info, lr=lr, gen_time=gen_time, train_time=time.perf_counter() - t1)
    if all_reduce is not None:  # average every stat over ranks; token and prompt counts are summed
        summed = ("gen_tokens", "prompts_drawn", "sampled_tokens")
        stats = {k: (all_reduce(v) if k in summed else all_reduce(v) / world)
                 for k, v in stats.items()}
    return stats


@dataclass
class Batch:
    """What a policy update consumes: N sequences (prompt + completion) with their fixed targets."""
    input_ids: torch.Tensor             # (N, L) long, left-padded prompt then completion
    kv_start: torch.Tensor              # (N,) first real token of each row
    mask: torch.Tensor                  # (N, L) 1 on completion tokens
    old_logprobs: torch.Tensor | None   # (N, L) log pi_old of each token (0 off the mask); None: on-policy,
                                        # taken from the update's own forward (one pass, one minibatch)
    ref_logprobs: torch.Tensor | None   # (N, L) log pi_ref, None without a KL term
    advantages: torch.Tensor            # (N,)
    behavior_logprobs: torch.Tensor | None = None  # (N, L) the sampler's log mu, for is_correction
    truncated: torch.Tensor | None = None          # (N,) bool, cut at max_new_tokens (mask_truncated)


def collect(policy, ref, tok, draw_prompts, n_prompts: int, reward_fn: RewardFn, cfg: GRPOConfig,
            lcfg: LossConfig, seed: int | list[int], all_reduce=None) -> tuple[Batch, dict]:
    """Sample G completions for each of `n_prompts` prompts (this rank's P / world), score them with
    `reward_fn`, compute advantages and the old/ref logprobs the loss holds fixed. Returns the Batch
    and rollout statistics. `all_reduce` (sum over ranks) makes the batch std global (adv_scale
    "batch", reward_norm "per_component")."""
    G, P = cfg.group_size, n_prompts
    samples = draw_prompts(P)
    roll, rewards, comps, parts = _sample_and_score(policy, tok, samples, reward_fn, cfg, lcfg, seed)
    n_drawn, sampled = P, float(roll.lengths.sum())  # every sampled token, discarded groups' too
    if lcfg.dynamic_sampling:  # DAPO section 3.2: replace groups whose rewards are all equal
        for rnd in range(cfg.max_refill):
            keep = informative_groups(rewards)                                   # (P,)
            if bool(keep.all()):
                break
            extra = draw_prompts(int((~keep).sum()))
            n_drawn += len(extra)
            r2, rew2, _, parts2 = _sample_and_score(policy, tok, extra, reward_fn, cfg, lcfg,
                                                    derive_seed(seed, "refill", rnd))
            sampled += float(r2.lengths.sum())
            kept = keep.nonzero().flatten().tolist()
            roll = concat_groups([(roll, kept), (r2, list(range(len(extra))))], G, tok.pad_id)
            rewards = torch.cat([rewards[kept], rew2])                            # (P, G)
            parts = {k: torch.cat([v[kept], parts2[k]]) for k, v in parts.items()}  # (P, G) each
    adv = step_advantages(rewards, parts, getattr(reward_fn, "weights", None), lcfg.adv_scale, lcfg.adv_baseline,
                          lcfg.reward_norm, all_reduce).flatten()                # (P*G,)
    ids, start = roll.input_ids, roll.kv_start                                   # (N, L), (N,)
    old = None  # on-policy: policy_update takes pi_old from its own forward, before the one step
    if cfg.mu > 1 or cfg.minibatches > 1:
        # Off-policy passes: pi_old is the trainer's forward before any step, so the first pass
        # starts at ratio 1. It is not the sampler's (roll.old_logprobs): those differ by float
        # rounding on CPU (~1e-6, oneDNN decode matmuls, kernels/cpu_decode.py) and by far more with
        # bf16 decode on a GPU; is_correction weighs that gap (sampler = behavior_logprobs).
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
    truncated = torch.tensor([r == "length" for r in roll.finish_reasons], device=ids.device)  # (N,)
    return Batch(ids, start, roll.completion_mask.float(), old, ref_lp, adv, roll.old_logprobs,
                 truncated if lcfg.mask_truncated else None), info


def policy_update(policy, b: Batch, cfg: GRPOConfig, lcfg: LossConfig, optimizer, lr: float,
                  world: int = 1, all_reduce=None) -> dict:
    """mu passes over the batch in `minibatches` optimizer steps, each accumulated over
    micro-batches of `micro_batch` sequences. Loss shares use the minibatch's global token and
    sequence counts, so neither the micro-batch size nor the number of ranks changes the update.
    b.old_logprobs None (one pass, one minibatch): pi_old is the forward's own logprobs, detached,
    since no step has changed the policy yet. Also logs `entropy`, the policy's mean token entropy
    on the completions (rollout.token_entropy)."""
    if b.old_logprobs is None and (cfg.mu > 1 or cfg.minibatches > 1):
        raise ValueError("policy_update: old_logprobs=None (on-policy) needs mu == 1 and minibatches == 1")
    N = b.input_ids.shape[0]
    mb = -(-N // cfg.minibatches)
    mask = effective_mask(b.mask, b.truncated)                                    # (N, L)
    acc, n_tok, grad_norm = {}, 0.0, 0.0
    set_lr(optimizer, lr)
    for _ in range(cfg.mu):
        for lo in range(0, N, mb):
            hi = min(lo + mb, N)
            tot_tok = _sum(float(mask[lo:hi].sum()), all_reduce)
            tot_seq = _sum(float(hi - lo), all_reduce)
            for i in range(lo, hi, cfg.micro_batch):
                j = min(i + cfg.micro_batch, hi)
                ids = b.input_ids[i:j]                                              # (n, L)
                logits = policy(ids, kv_start=b.kv_start[i:j])                      # (n, L, V)
                lp = token_logprobs(logits, ids, cfg.temperature)                   # (n, L)
                rows = {k: (None if v is None else v[i:j]) for k, v in
                        (("old", b.old_logprobs), ("ref", b.ref_logprobs), ("behavior", b.behavior_logprobs),
                         ("truncated", b.truncated))}
                old = rows["old"] if rows["old"] is not None else lp.detach()
                loss, st = grpo_loss(lp, old, rows["ref"], b.advantages[i:j], b.mask[i:j],
                                     **{k: getattr(lcfg, k) for k in LOSS_ARGS}, max_len=cfg.max_new_tokens,
                                     behavior_logprobs=rows["behavior"], truncated=rows["truncated"],
                                     total_tokens=tot_tok, total_seqs=tot_seq)
                (loss * world).backward()  # FSDP averages gradients over ranks; the shares must sum
                ent = token_entropy(logits.detach(), mask[i:j], cfg.temperature)      # (n, L)
                st["entropy"] = float(ent.sum()) / max(st["num_tokens"], 1.0)
                n_tok += st["num_tokens"]
                for k, v in st.items():  # shares add up; extremes are extremes; means are token-weighted
                    if k in _EXTREMES:
                        acc[k] = _EXTREMES[k](acc.get(k, v), v)
                    else:
                        acc[k] = acc.get(k, 0.0) + (v if k in _SHARES else v * st["num_tokens"])
            grad_norm = clip_and_step(policy, optimizer, cfg.max_grad_norm)
    steps = cfg.mu * cfg.minibatches
    out = {k: (v / steps if k in _SHARES else v if k in _EXTREMES else v / max(n_tok, 1.0))
           for k, v in acc.items() if k not in ("num_tokens", "num_seqs")}
    out["grad_norm"] = grad_norm
    return out


_SHARES = ("loss", "pg_loss", "kl_loss")  # grpo_loss stats that are sums of micro-batch shares
_EXTREMES = {"ratio_max": max, "ratio_min": min, "is_w_max": max}  # over every micro-batch


def _sum(x: float, all_reduce) -> float:
    return all_reduce(x) if all_reduce is not None else x


def _sample_and_score(policy, tok, samples, reward_fn: RewardFn, cfg: GRPOConfig, lcfg: LossConfig,
                      seed: int | list[int]):
    """G completions of each sample's prompt; their rewards (P, G); the mean of each component over
    the samples it applies to (NaN if none); each component's values (P, G), NaN where it does not apply."""
    G = cfg.group_size
    prompts = [tok.encode(s["prompt"]) for s in samples]
    with gathered_weights(policy):
        roll = generate(policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        num_samples=G, eos_token_id=None if cfg.ignore_eos else tok.eos_ids, seed=seed,
                        pad_token_id=tok.pad_id)
    texts = [completion_text(tok, toks) for toks in roll.tokens]
    values, named = reward_fn(texts, [samples[i // G] for i in range(len(texts))])
    rewards = torch.tensor(values, dtype=torch.float32).view(-1, G)               # (P, G)
    comps, parts = {}, {}
    for k, v in named.items():
        applied = [x for x in v if x is not None]
        comps[k] = sum(applied) / len(applied) if applied else math.nan
        if len(v) == len(texts):  # a component of every sample (routed_reward's are of some)
            parts[k] = torch.tensor([math.nan if x is None else float(x) for x in v]).view(-1, G)  # (P, G)
    if lcfg.overlong_buffer_frac > 0:  # DAPO §3.4: soft penalty near the generation budget
        buf = max(1, int(lcfg.overlong_buffer_frac * cfg.max_new_tokens))
        pen = overlong_penalty(roll.lengths.float(), cfg.max_new_tokens, buf, lcfg.overlong_penalty)
        rewards = rewards + pen.view_as(rewards)
        comps["overlong"] = float(pen.mean())
        parts["overlong"] = pen.view_as(rewards)                                  # (P, G)
    return roll, rewards, comps, parts
