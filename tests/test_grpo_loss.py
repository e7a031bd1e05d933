"""grpo.py's loss half against a slow reference written with Python loops, plus its small pieces.

Everything runs in float64 on CPU and takes a few seconds.
"""
import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advantages import decoupled_advantages, group_advantages, informative_groups, overlong_penalty, step_advantages
from grpo import AGGS, IS_CORRECTIONS, KL_ESTIMATORS, LOSS_PRESETS, LossConfig, grpo_loss, loss_preset

MAX_LEN = 12  # the "generation budget" for seq_mean_token_sum_norm; >= T below
CLIPS = [(0.2, 0.2), (0.2, 0.28)]  # symmetric (DeepSeekMath) and clip-higher (DAPO)


# --- the slow reference -------------------------------------------------------------------------


def reference_loss(logprobs, old, ref, adv, mask, clip_low, clip_high, kl_coef, estimator, agg,
                   max_len=None, total_tokens=None, total_seqs=None, policy_loss="clip", cispo_cap=5.0,
                   delta=0.0, behavior=None, is_correction="none", is_cap=2.0, truncated=None):
    """DeepSeekMath eq. 3 token by token, with if/else clipping; autograd flows through logprobs.
    The options, each as its paper writes it: GSPO's s_i, CISPO's sg(min(r, cap)) * A * log pi,
    INTELLECT-2's delta, TIS/MIS weights pi_old / mu, DAPO's overlong filtering."""
    N, T = logprobs.shape
    per_seq = []  # per sequence, the list of its token losses (0-dim tensors)
    for i in range(N):
        positions = [t for t in range(T) if mask[i, t] != 0]
        if truncated is not None and truncated[i]:
            positions = []  # overlong filtering: the sequence has no loss, but still counts
        a = float(adv[i])
        if policy_loss == "gspo" and positions:  # one ratio for the whole sequence
            seq_ratio = torch.exp(sum(logprobs[i, t] - old[i, t] for t in positions) / len(positions))
        if is_correction.startswith("seq_"):  # W = product of the token weights
            seq_w = math.prod(math.exp(float(old[i, t] - behavior[i, t])) for t in positions)
        tokens = []
        for t in positions:
            ratio = seq_ratio if policy_loss == "gspo" else torch.exp(logprobs[i, t] - old[i, t])
            if policy_loss == "cispo":
                loss = -min(float(ratio.detach()), cispo_cap) * a * logprobs[i, t]  # the weight is a constant
            else:
                if ratio > 1 + clip_high:  # clip(ratio) is a constant here: no gradient through it
                    clipped_ratio = torch.tensor(1 + clip_high, dtype=torch.float64)
                elif ratio < 1 - clip_low:
                    clipped_ratio = torch.tensor(1 - clip_low, dtype=torch.float64)
                else:
                    clipped_ratio = ratio
                if delta and ratio > delta:
                    ratio = torch.tensor(delta, dtype=torch.float64)
                unclipped, clipped = ratio * a, clipped_ratio * a
                surrogate = unclipped if float(unclipped.detach()) <= float(clipped.detach()) else clipped
                loss = -surrogate
            if is_correction != "none":
                w = seq_w if is_correction.startswith("seq_") else math.exp(float(old[i, t] - behavior[i, t]))
                if is_correction.endswith("tis"):
                    loss = loss * min(w, is_cap)
                elif w > is_cap:  # mis: the token's policy term is dropped
                    loss = loss * 0.0
            if kl_coef > 0:
                log_r = ref[i, t] - logprobs[i, t]  # Schulman's log(p/q), q the policy
                if estimator == "k1":
                    kl = -log_r
                elif estimator == "k2":
                    kl = 0.5 * log_r * log_r
                else:
                    kl = torch.exp(log_r) - log_r - 1
                loss = loss + kl_coef * kl
            tokens.append(loss)
        per_seq.append(tokens)
    n_seq = total_seqs if total_seqs is not None else N
    all_tokens = [x for tokens in per_seq for x in tokens]
    if agg == "token_mean":
        n_tok = total_tokens if total_tokens is not None else max(len(all_tokens), 1)
        return sum(all_tokens, torch.tensor(0.0, dtype=torch.float64)) / n_tok
    if agg == "seq_mean_token_mean":
        seq_means = [sum(tokens) / len(tokens) if tokens else torch.tensor(0.0, dtype=torch.float64)
                     for tokens in per_seq]
        return sum(seq_means) / n_seq
    return sum(all_tokens, torch.tensor(0.0, dtype=torch.float64)) / (n_seq * max_len)


def random_batch(N=6, T=9, seed=0):
    """Random float64 inputs with ragged right-padded masks (one sequence empty) and some A == 0."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(N, T, generator=g, dtype=torch.float64)  # (N, T)
    old = logprobs + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)  # ratios 0.5..2
    ref = logprobs + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    adv[1] = 0.0
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[2] = 0  # an empty completion
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)  # (N, T)
    return logprobs, old, ref, adv, mask


def loss_and_grad(fn, logprobs, *args, **kwargs):
    lp = logprobs.clone().requires_grad_(True)
    out = fn(lp, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), lp.grad


# --- grpo_loss against the reference --------------------------------------------------------------


CASES = list(itertools.product(AGGS, KL_ESTIMATORS, CLIPS, [0.04, 0.0]))


@pytest.mark.parametrize("seed,agg,estimator,clip,kl_coef", [(i, *c) for i, c in enumerate(CASES)])
def test_grpo_loss_matches_reference(seed, agg, estimator, clip, kl_coef):
    logprobs, old, ref, adv, mask = random_batch(seed=seed)
    kw = dict(clip_low=clip[0], clip_high=clip[1], kl_coef=kl_coef)
    loss, grad = loss_and_grad(grpo_loss, logprobs, old, ref, adv, mask, kl_estimator=estimator,
                               agg=agg, max_len=MAX_LEN, **kw)
    ref_loss, ref_grad = loss_and_grad(reference_loss, logprobs, old, ref, adv, mask,
                                       estimator=estimator, agg=agg, max_len=MAX_LEN, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


# Each option of the 2025-26 family, with settings that make its branches fire on random_batch.
# behavior logprobs are old + noise; is_cap 1.2 sits inside the weights' spread on both sides.
OPTIONS = {
    "gspo": dict(policy_loss="gspo", clip_low=0.05, clip_high=0.05),
    "gspo_delta": dict(policy_loss="gspo", clip_low=0.05, clip_high=0.05, delta=1.06),
    "cispo": dict(policy_loss="cispo", cispo_cap=1.3),
    "cispo_default_cap": dict(policy_loss="cispo"),
    "delta": dict(delta=1.5),
    "token_tis": dict(is_correction="token_tis", is_cap=1.2),
    "token_mis": dict(is_correction="token_mis", is_cap=1.2),
    "seq_tis": dict(is_correction="seq_tis", is_cap=1.2),
    "seq_mis": dict(is_correction="seq_mis", is_cap=1.2),
    "gspo_seq_tis": dict(policy_loss="gspo", is_correction="seq_tis", is_cap=1.2),
    "cispo_token_mis": dict(policy_loss="cispo", cispo_cap=1.3, is_correction="token_mis", is_cap=1.2),
    "mask_truncated": dict(truncated=True),
    "everything": dict(delta=1.5, is_correction="token_tis", is_cap=1.2, truncated=True),
}


def option_inputs(seed, options):
    """random_batch plus the sampler's logprobs and a truncated-row flag for the option's kwargs."""
    logprobs, old, ref, adv, mask = random_batch(seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    kw = dict(options)
    if kw.get("is_correction", "none") != "none":
        kw["behavior"] = old + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    if kw.pop("truncated", False):
        kw["truncated"] = torch.tensor([i % 3 == 0 for i in range(len(adv))])  # rows 0, 3: cut off
    return (logprobs, old, ref, adv, mask), kw


def to_grpo_kwargs(kw):
    out = dict(kw)
    if "behavior" in out:
        out["behavior_logprobs"] = out.pop("behavior")
    return out


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_loss_options_match_reference(name, agg, kl_coef):
    """Every option, in every aggregation, with and without the KL: value and gradient in float64."""
    (logprobs, old, ref, adv, mask), kw = option_inputs(AGGS.index(agg), OPTIONS[name])
    kw = {"clip_low": 0.2, "clip_high": 0.2, **kw}
    loss, grad = loss_and_grad(grpo_loss, logprobs, old, ref, adv, mask, kl_coef=kl_coef, agg=agg,
                               max_len=MAX_LEN, **to_grpo_kwargs(kw))
    ref_loss, ref_grad = loss_and_grad(reference_loss, logprobs, old, ref, adv, mask, kl_coef=kl_coef,
                                       estimator="k3", agg=agg, max_len=MAX_LEN, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_batches_exercise_their_branches(name):
    """The parity test means something only if each option's cap or clip fires on some tokens
    and not on others."""
    (logprobs, old, ref, adv, mask), kw = option_inputs(0, OPTIONS[name])
    _, stats = grpo_loss(logprobs, old, ref, adv, mask, **to_grpo_kwargs(kw))
    if kw.get("policy_loss") == "gspo":
        assert 0 < stats["clip_frac_low"] + stats["clip_frac_high"] < 1
    if kw.get("policy_loss") == "cispo" and kw.get("cispo_cap", 5.0) < 2:
        assert 0 < stats["clip_frac_high"] < 1
    if kw.get("delta"):
        assert 0 < stats["clip_frac_delta"] < 1
    if kw.get("is_correction", "none") != "none":
        assert 0 < stats["is_capped_frac"] < 1
    if "truncated" in kw:
        assert stats["num_tokens"] < float(mask.sum())


@pytest.mark.parametrize("name", ["gspo", "cispo", "token_tis", "seq_mis", "mask_truncated"])
@pytest.mark.parametrize("agg", AGGS)
def test_options_microbatch_invariance(name, agg):
    """Shares over micro-batches sum to the full batch's loss and gradient for the options too (GSPO
    and seq_* act per sequence, which a micro-batch never splits)."""
    (logprobs, old, ref, adv, mask), kw = option_inputs(3, OPTIONS[name])
    kw = to_grpo_kwargs(kw)
    full_loss, full_grad = loss_and_grad(grpo_loss, logprobs, old, ref, adv, mask, agg=agg, max_len=MAX_LEN,
                                         **kw)
    lp = logprobs.clone().requires_grad_(True)
    from grpo import effective_mask
    total_tokens = effective_mask(mask, kw.get("truncated")).sum()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        part = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in kw.items()}
        loss, _ = grpo_loss(lp[rows], old[rows], ref[rows], adv[rows], mask[rows], agg=agg, max_len=MAX_LEN,
                            total_tokens=total_tokens, total_seqs=len(adv), **part)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp.grad, full_grad, rtol=1e-12, atol=1e-12)


def test_cispo_keeps_every_tokens_gradient():
    """CISPO's point: a token whose ratio is far outside the clip range still gets -w A / n."""
    logprobs, old, adv, mask = clip_example()
    lp = logprobs.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, old, None, adv, mask, kl_coef=0.0, agg="token_mean", policy_loss="cispo",
                        cispo_cap=1.3)
    loss.backward()
    weights = torch.tensor([1.3, 0.5, 1.0, 1.25], dtype=torch.float64)  # min(ratio, 1.3)
    torch.testing.assert_close(lp.grad, -adv[:, None] * weights / 12)


def test_on_policy_sampler_match_is_a_no_op():
    """behavior == old: w = 1 on every token, so each correction leaves loss and gradient alone."""
    logprobs, old, ref, adv, mask = random_batch(seed=11)
    base = loss_and_grad(grpo_loss, logprobs, old, ref, adv, mask)
    for mode in IS_CORRECTIONS:
        got = loss_and_grad(grpo_loss, logprobs, old, ref, adv, mask, behavior_logprobs=old.clone(),
                            is_correction=mode, is_cap=1.0)
        torch.testing.assert_close(got, base, rtol=0, atol=0)
    _, stats = grpo_loss(logprobs, old, ref, adv, mask, behavior_logprobs=old)
    assert stats["is_logw_abs_mean"] == 0 and stats["is_w_max"] == 1 and stats["is_capped_frac"] == 0


def test_mismatch_stats_values():
    (logprobs, old, ref, adv, mask), kw = option_inputs(0, OPTIONS["token_mis"])
    beh = kw["behavior"]
    _, stats = grpo_loss(logprobs, old, ref, adv, mask, behavior_logprobs=beh, is_correction="token_mis",
                         is_cap=1.2)
    log_w = (old - beh)[mask.bool()]
    assert stats["is_logw_abs_mean"] == pytest.approx(float(log_w.abs().mean()))
    assert stats["is_w_max"] == pytest.approx(float(log_w.exp().max()))
    assert stats["is_capped_frac"] == pytest.approx(float((log_w.exp() > 1.2).double().mean()))


def test_random_batch_exercises_both_clips():
    """The parity test above only means something if some tokens are clipped on each side."""
    logprobs, old, ref, adv, mask = random_batch()
    _, stats = grpo_loss(logprobs, old, ref, adv, mask)
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0


@pytest.mark.parametrize("agg", AGGS)
def test_microbatch_and_rank_invariance(agg):
    """Micro-batches (or ranks) with global counts: losses and gradients sum to the full batch's."""
    logprobs, old, ref, adv, mask = random_batch(N=8, T=7, seed=3)
    kw = dict(kl_coef=0.04, agg=agg, max_len=MAX_LEN)
    full_loss, full_grad = loss_and_grad(grpo_loss, logprobs, old, ref, adv, mask, **kw)
    lp = logprobs.clone().requires_grad_(True)
    total_tokens, total_seqs = mask.sum(), mask.shape[0]
    shares, stat_shares = [], []
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):  # uneven splits, one holds the empty row
        loss, stats = grpo_loss(lp[rows], old[rows], ref[rows], adv[rows], mask[rows],
                                total_tokens=total_tokens, total_seqs=total_seqs, **kw)
        loss.backward()  # accumulates into lp.grad, as gradient accumulation does
        shares.append(loss.detach())
        stat_shares.append(stats["pg_loss"] + stats["kl_loss"])
    torch.testing.assert_close(sum(shares), full_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp.grad, full_grad, rtol=1e-12, atol=1e-12)
    assert math.isclose(sum(stat_shares), float(full_loss), rel_tol=1e-9)


@pytest.mark.parametrize("agg", AGGS)
def test_on_policy_without_kl_is_plain_policy_gradient(agg):
    """ratio == 1 (first pass) and kl_coef = 0: grad = -A * mask / normaliser, token by token."""
    logprobs, _, _, adv, mask = random_batch(seed=5)
    N = mask.shape[0]
    _, grad = loss_and_grad(grpo_loss, logprobs, logprobs, None, adv, mask, kl_coef=0.0, agg=agg,
                            max_len=MAX_LEN)
    if agg == "token_mean":
        norm = mask.sum()
    elif agg == "seq_mean_token_mean":
        norm = N * mask.sum(dim=1, keepdim=True).clamp(min=1)  # (N, 1)
    else:
        norm = N * MAX_LEN
    torch.testing.assert_close(grad, -adv[:, None] * mask / norm, rtol=1e-12, atol=1e-12)


# --- clipping and stats ------------------------------------------------------------------------


def clip_example():
    """3 sequences (A = +1, -1, 0) x 4 tokens with ratios 1.5, 0.5, 1.0, 1.25 (old logprobs 0)."""
    ratios = torch.tensor([1.5, 0.5, 1.0, 1.25], dtype=torch.float64)
    logprobs = ratios.log().repeat(3, 1)  # (3, 4)
    old = torch.zeros_like(logprobs)
    adv = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    return logprobs, old, adv, torch.ones_like(logprobs)


@pytest.mark.parametrize("clip_high,high_clipped", [(0.2, [0, 3]), (0.28, [0])])
def test_clipped_tokens_get_no_gradient(clip_high, high_clipped):
    logprobs, old, adv, mask = clip_example()
    lp = logprobs.clone().requires_grad_(True)
    loss, stats = grpo_loss(lp, old, None, adv, mask, clip_high=clip_high, kl_coef=0.0,
                            agg="token_mean")
    loss.backward()
    zero = torch.zeros(3, 4, dtype=torch.bool)
    zero[0, high_clipped] = True  # A > 0 and ratio > 1 + clip_high
    zero[1, 1] = True  # A < 0 and ratio < 1 - clip_low
    zero[2, :] = True  # A == 0
    assert (lp.grad[zero] == 0).all() and (lp.grad[~zero] != 0).all()
    # A > 0 with ratio 0.5 and A < 0 with ratio 1.5 are *not* clipped: the min keeps the ratio.
    assert stats["clip_frac_high"] == pytest.approx(len(high_clipped) / 12)
    assert stats["clip_frac_low"] == pytest.approx(1 / 12)
    assert stats["clip_frac"] == pytest.approx((len(high_clipped) + 1) / 12)
    assert stats["ratio_min"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(1.5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.0 + 1.25) / 4)


def test_stats_values():
    logprobs, old, ref, adv, mask = random_batch(seed=7)
    loss, stats = grpo_loss(logprobs, old, ref, adv, mask, kl_coef=0.1, kl_estimator="k3")
    m = mask.bool()
    log_r = (ref - logprobs)[m]
    assert stats["kl"] == pytest.approx(float((log_r.exp() - log_r - 1).mean()))
    assert stats["entropy_proxy"] == pytest.approx(float(-logprobs[m].mean()))
    assert stats["loss"] == pytest.approx(float(loss))
    assert stats["pg_loss"] + stats["kl_loss"] == pytest.approx(float(loss))
    assert stats["adv_mean"] == pytest.approx(float(adv.mean()))
    assert stats["adv_std"] == pytest.approx(float(adv.std(correction=0)))
    assert stats["adv_zero_frac"] == pytest.approx(1 / len(adv))
    assert stats["num_tokens"] == float(mask.sum()) and stats["num_seqs"] == len(adv)
    assert all(isinstance(v, float) for v in stats.values())
    _, no_ref = grpo_loss(logprobs, old, None, adv, mask, kl_coef=0.0)
    assert no_ref["kl"] == 0.0 and no_ref["kl_loss"] == 0.0


def test_empty_microbatch():
    """A rank or micro-batch with no sequences (or no tokens) gives loss 0, a zero gradient, no NaN."""
    logprobs, old, ref, adv, mask = random_batch()
    for rows in (slice(0, 0), slice(2, 3)):  # no sequences; one sequence with no tokens
        for agg in AGGS:
            loss, grad = loss_and_grad(grpo_loss, logprobs[rows], old[rows], ref[rows], adv[rows],
                                       mask[rows], agg=agg, max_len=MAX_LEN)
            _, stats = grpo_loss(logprobs[rows], old[rows], ref[rows], adv[rows], mask[rows],
                                 agg=agg, max_len=MAX_LEN)
            assert float(loss) == 0 and (grad == 0).all()
            assert all(math.isfinite(v) for v in stats.values()) and stats["ratio_max"] == 1.0


def test_padding_values_are_ignored():
    """Garbage (inf, nan) at masked-out positions changes neither the loss nor the gradient."""
    logprobs, old, ref, adv, mask = random_batch(seed=9)
    dirty_lp, dirty_old, dirty_ref = logprobs.clone(), old.clone(), ref.clone()
    pad = mask == 0
    dirty_lp[pad], dirty_old[pad], dirty_ref[pad] = float("-inf"), float("nan"), float("inf")
    for agg in AGGS:
        clean = loss_and_grad(grpo_loss, logprobs, old, ref, adv, mask, agg=agg, max_len=MAX_LEN)
        dirty = loss_and_grad(grpo_loss, dirty_lp, dirty_old, dirty_ref, adv, mask, agg=agg,
                              max_len=MAX_LEN)
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_grpo_loss_errors():
    logprobs, old, ref, adv, mask = random_batch()
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo_loss(logprobs, old, None, adv, mask, kl_coef=0.04)
    with pytest.raises(ValueError, match="needs max_len"):
        grpo_loss(logprobs, old, ref, adv, mask, agg="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="choose one of"):
        grpo_loss(logprobs, old, ref, adv, mask, agg="sum")
    with pytest.raises(ValueError, match="choose one of"):
        grpo_loss(logprobs, old, ref, adv, mask, kl_estimator="k4")
    with pytest.raises(ValueError, match=r"advantages \(N,\)"):
        grpo_loss(logprobs, old, ref, adv[:-1], mask)


# --- advantages, filters, shaping -------------------------------------------------------------


def test_group_advantages_known_values():
    r = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    std = group_advantages(r)
    eps = 1e-4
    s2 = math.sqrt(1 / 3)  # sample std of (1, 0, 0)
    expected = torch.tensor([[-1 / (1 + eps), 0.0, 1 / (1 + eps)],
                             [(2 / 3) / (s2 + eps), (-1 / 3) / (s2 + eps), (-1 / 3) / (s2 + eps)]])
    torch.testing.assert_close(std, expected)
    torch.testing.assert_close(group_advantages(r, scale="none"),
                               torch.tensor([[-1.0, 0.0, 1.0], [2 / 3, -1 / 3, -1 / 3]]))


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_flat_groups_and_g1(scale):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "degrees of freedom <= 0" warning for G = 1
        # float32 mean of (0.9, 0.9, 0.9) is not 0.9: without the explicit zeroing, A = 6e-4
        flat = group_advantages(torch.tensor([[0.9, 0.9, 0.9], [1.0, 1.0, 1.0]]), scale=scale)
        single = group_advantages(torch.tensor([[0.3], [1.0]]), scale=scale)
    assert (flat == 0).all() and (single == 0).all()
    assert group_advantages(torch.tensor([[1, 0]]), scale=scale).dtype.is_floating_point


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.sampled_from(["std", "none"]), st.data())
def test_group_advantages_properties(P, G, scale, data):
    values = data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]), min_size=P * G,
                                max_size=P * G))
    r = torch.tensor(values).reshape(P, G)
    adv = group_advantages(r, scale=scale)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(P), atol=1e-5, rtol=0)
    assert (adv[~informative_groups(r)] == 0).all()


def reference_advantages(rewards, scale, baseline, eps=1e-4):
    """Plain loops: A_i = (r_i - b_i) / s with b_i the group mean or the mean of the others."""
    rows = rewards.tolist()
    everything = [x for row in rows for x in row]
    out = []
    for row in rows:
        G = len(row)
        mean = sum(row) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (G - 1)) if G > 1 else 0.0
        batch_mean = sum(everything) / len(everything)
        batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in everything) / (len(everything) - 1))
        adv = []
        for i, x in enumerate(row):
            if all(y == row[0] for y in row):
                adv.append(0.0)
                continue
            b = mean if baseline == "mean" else sum(row[j] for j in range(G) if j != i) / (G - 1)
            s = {"std": std + eps, "none": 1.0, "batch": batch_std + eps}[scale]
            adv.append((x - b) / s)
        out.append(adv)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["std", "none", "batch"])
@pytest.mark.parametrize("baseline", ["mean", "rloo"])
def test_group_advantages_match_reference(scale, baseline):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5, 4, generator=g, dtype=torch.float64).round(decimals=1)
    r[1] = 0.7  # a tied group
    got = group_advantages(r, scale=scale, baseline=baseline)
    torch.testing.assert_close(got, reference_advantages(r, scale, baseline), rtol=1e-12, atol=1e-12)
    assert (got[1] == 0).all()


def test_rloo_known_values_and_batch_std_override():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # A_0 = 1 - 0 = 1; A_j = 0 - 1/3 for the others
    torch.testing.assert_close(group_advantages(r, scale="none", baseline="rloo"),
                               torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3]]))
    got = group_advantages(r, scale="batch", batch_std=2.0)  # e.g. the std over every rank
    torch.testing.assert_close(got, (r - 0.25) / (2.0 + 1e-4))


def test_decoupled_advantages_gdpo():
    """GDPO: each component normalised in its group, weighted, summed, over the batch's std. Two
    reward combinations that GRPO maps to the same advantage stay apart."""
    acc = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    fmt = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    comps, w = torch.stack([acc, fmt], dim=2), torch.tensor([1.0, 0.5])
    got = decoupled_advantages(comps, w)
    summed = reference_advantages(acc, "std", "mean") + 0.5 * reference_advantages(fmt, "std", "mean")
    flat = summed.flatten().tolist()
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
    torch.testing.assert_close(got, summed / (std + 1e-4), rtol=1e-12, atol=1e-12)
    assert (got[1] == 0).all()  # every component tied: exactly 0
    # GDPO's example: groups {(1, 1), (0, 0)} and {(1, 0), (0, 0)} of (accuracy, format) get the same
    # advantages when the sum is normalised (2 vs 0 and 1 vs 0 both give +-0.707), not when each is
    pairs = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])  # (P=2, G=2, K=2)
    grpo_adv = group_advantages(pairs.sum(dim=2))
    torch.testing.assert_close(grpo_adv[0], grpo_adv[1], atol=1e-3, rtol=0)  # equal up to eps
    gdpo_adv = decoupled_advantages(pairs, torch.tensor([1.0, 1.0]))
    assert gdpo_adv[0, 0] > gdpo_adv[1, 0] > 0


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(2, 3), scale="mad")
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(torch.zeros(2, 3), baseline="median")
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[0.0, float("nan")]]))


def test_informative_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.6]])
    assert informative_groups(r).tolist() == [False, True, False, True]
    assert informative_groups(torch.ones(3, 1)).tolist() == [False] * 3


def test_overlong_penalty():
    lengths = torch.tensor([0, 15, 16, 18, 20, 25])
    out = overlong_penalty(lengths, max_len=20, buffer=5, penalty=0.5)
    torch.testing.assert_close(out, 0.5 * torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0]))
    assert (overlong_penalty(lengths, max_len=20, buffer=0) == 0).all()
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_len=20, buffer=30)


# --- presets --------------------------------------------------------------------------------------


def test_presets():
    g, d, a = LOSS_PRESETS["grpo"], LOSS_PRESETS["dr_grpo"], LOSS_PRESETS["dapo"]
    assert (g.adv_scale, g.agg, g.kl_estimator, g.kl_coef, g.clip_low, g.clip_high) == \
        ("std", "seq_mean_token_mean", "k3", 0.04, 0.2, 0.2)
    assert not g.dynamic_sampling and g.overlong_buffer_frac == 0
    assert (d.adv_scale, d.agg, d.kl_coef, d.clip_low, d.clip_high) == \
        ("none", "seq_mean_token_sum_norm", 0.0, 0.2, 0.2)
    assert (a.clip_low, a.clip_high, a.agg, a.kl_coef, a.dynamic_sampling) == \
        (0.2, 0.28, "token_mean", 0.0, True)
    assert a.overlong_buffer_frac == pytest.approx(0.2) and a.overlong_penalty == 1.0


def test_loss_preset_overrides_and_errors():
    cfg = loss_preset("grpo", kl_coef=0.0, agg="token_mean")
    assert cfg.kl_coef == 0.0 and cfg.agg == "token_mean" and cfg.adv_scale == "std"
    assert LOSS_PRESETS["grpo"].kl_coef == 0.04  # the preset itself is untouched
    with pytest.raises(ValueError, match="choose one of grpo, dr_grpo, dapo"):
        loss_preset("ppo")
    with pytest.raises(ValueError, match="unknown LossConfig field.*valid: adv_scale"):
        loss_preset("grpo", beta=0.1)
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        loss_preset("grpo", kl_estimator="k4")
    with pytest.raises(ValueError, match="clip_low"):
        LossConfig(clip_low=1.5)
    for bad, match in ((dict(policy_loss="ppo"), "policy_loss='ppo'"), (dict(is_correction="tis"), "is_correction"),
                       (dict(adv_baseline="median"), "adv_baseline"), (dict(reward_norm="gdpo"), "reward_norm"),
                       (dict(delta=1.1), "delta=1.1 must be 0"), (dict(policy_loss="cispo", delta=4.0), "cispo"),
                       (dict(is_cap=0.0), "is_cap > 0"), (dict(cispo_cap=-1.0), "cispo_cap > 0")):
        with pytest.raises(ValueError, match=match):
            LossConfig(**bad)


def test_gspo_and_cispo_presets():
    g, c = LOSS_PRESETS["gspo"], LOSS_PRESETS["cispo"]
    assert (g.policy_loss, g.clip_low, g.clip_high, g.kl_coef, g.agg) == \
        ("gspo", 3e-4, 4e-4, 0.0, "seq_mean_token_mean")
    assert (c.policy_loss, c.cispo_cap, c.kl_coef, c.agg) == ("cispo", 5.0, 0.0, "token_mean")
    for p in LOSS_PRESETS.values():  # the sampler correction and filtering are opt-in everywhere
        assert p.is_correction == "none" and not p.mask_truncated and p.delta == 0


def test_rl_loop_advantages_follow_the_loss_config():
    """advantages.step_advantages with a LossConfig's settings: the summed reward or GDPO's
    components (with the reward function's weights
    and the overlong penalty at weight 1); a batch std over all ranks through all_reduce."""

    def advantages(rewards, parts, weights, lcfg, all_reduce=None):
        return step_advantages(rewards, parts, weights, lcfg.adv_scale, lcfg.adv_baseline, lcfg.reward_norm,
                               all_reduce)
    acc = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    fmt = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    over = torch.tensor([[0.0, -0.5, 0.0], [0.0, 0.0, -1.0]])
    parts, weights = {"accuracy": acc, "format": fmt, "language": fmt, "overlong": over}, \
        {"accuracy": 1.0, "format": 0.1, "language": 0.0}
    rewards = acc + 0.1 * fmt + over
    got = advantages(rewards, parts, weights, LossConfig(reward_norm="per_component"))
    want = decoupled_advantages(torch.stack([acc, fmt, over], dim=2), torch.tensor([1.0, 0.1, 1.0]))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(advantages(rewards, parts, None, LossConfig(adv_baseline="rloo")),
                               group_advantages(rewards, baseline="rloo"))
    # two ranks holding the same rewards: the global std is that of the batch stacked twice
    two = advantages(rewards, parts, None, LossConfig(adv_scale="batch"), all_reduce=lambda x: 2 * x)
    torch.testing.assert_close(two, group_advantages(rewards, scale="batch",
                                                     batch_std=float(torch.cat([rewards, rewards]).std())))
    with pytest.raises(ValueError, match="weighted components"):
        advantages(rewards, parts, None, LossConfig(reward_norm="per_component"))
    with pytest.raises(ValueError, match="no value per sample"):
        advantages(rewards, {"format": fmt}, weights, LossConfig(reward_norm="per_component"))


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("baseline", ["mean", "rloo"])
def test_gdpo_leaves_out_samples_a_reward_does_not_apply_to(scale, baseline):
    """NaN (a reward's None) is left out of its group's mean and std and gets 0; written per group
    over the applicable samples only, with reference_advantages."""
    nan = math.nan
    r = torch.tensor([[1.0, nan, 0.0, 0.5], [nan, nan, 1.0, 0.0], [0.3, 0.3, nan, 0.3], [nan, 2.0, nan, nan],
                      [1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    got = decoupled_advantages(r[:, :, None], torch.tensor([1.0]), scale, baseline, batch_std=lambda s: 1.0 - 1e-4)
    want = torch.zeros_like(r)
    for p in range(r.shape[0]):
        cols = [g for g in range(r.shape[1]) if not math.isnan(float(r[p, g]))]
        if len(cols) > 1:
            want[p, cols] = reference_advantages(r[p:p + 1, cols], scale, baseline)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
