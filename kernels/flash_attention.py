"""Flash attention in Triton: forward and backward, causal or not, grouped-query, ragged left padding.

Credits
    FlashAttention-2 (Dao, 2023, arXiv:2307.08691): tile the queries, stream the keys with an online
    softmax so the T x T score matrix never exists, save only the row log-sum-exp, and recompute the
    probabilities in the backward pass (Algorithms 1 and 2). The code layout and the exp2 trick
    (fold log2(e) into the softmax scale) follow Triton's fused-attention tutorial
    (triton-lang/triton, python/tutorials/06-fused-attention.py).

Departures from the paper and the tutorial
    - Causal masking is aligned bottom-right (the FlashAttention >= 2.1 convention): query row i sits at
      key position i + Tk - Tq. One kernel then serves prefill (Tq == Tk), chunked prefill onto a cache
      (Tq < Tk) and decode (Tq == 1).
    - `kv_start[b]` masks keys j < kv_start[b] (left padding of ragged prompts). A query row that sees no
      key outputs 0 and gets zero gradients instead of NaN: the running max is kept finite while a row
      has seen nothing, and such rows store lse = +inf so the backward recomputes p = 0 for them.
    - Grouped-query attention happens in the kernel (query head h reads kv head h // (H // Hkv)); K/V are
      never repeated in memory. The dK/dV program loops over the query heads of its group, so dK/dV need
      no atomics and no per-query-head buffers.
    - Head dims that are not a power of two are padded to the next one with load/store masks.
    - Each key block is classified once: blocks fully inside the visible window run without masks, only
      blocks crossing the causal diagonal, kv_start or the end of the sequence pay for them.
    - Plain pointer arithmetic, no block pointers / TMA descriptors / warp specialisation, no dropout,
      no FP8, no split-K decode: a decode step (Tq == 1) runs the prefill kernel on one padded query
      block of 16 rows (tl.dot needs every dim >= 16).

Without a GPU the kernels run under Triton's interpreter (numpy), which is slow but exact enough for
the tests in tests/test_kernels.py. The public entry is `kernels.attention` (kernels/attention.py),
which calls `flash_attention` and `flash_attention_lse` here, checks shapes, and falls back to torch
SDPA where Triton is not installed; its float64 `attention_reference` is what the tests compare
these kernels with. `python -m kernels.attention` benchmarks against torch SDPA on a GPU (`bench`).
"""

import json
import math
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

if not torch.cuda.is_available():
    # triton.jit decides at decoration time whether a kernel is compiled or interpreted, so the switch
    # must be set before the kernels below are defined; without a GPU the interpreter is the only way
    # to run (and test) them on CPU tensors. setdefault leaves an explicit user choice alone.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (must follow the TRITON_INTERPRET switch)
import triton.language as tl  # noqa: E402

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634  # log2(e): softmax runs in base 2, exp(x) == exp2(x * log2(e))
_MIN_BLOCK = 16  # tl.dot needs every block dim >= 16
_MAX_HEAD_DIM = 256  # one (BLOCK_M, D) tile of q, o and the accumulator must fit in registers

# ----------------------------------------------------------------------------- inner loops


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
               offs_m, offs_d, lo, hi, Tk, kv_lo, diag, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi) for one query block (FA2 Algorithm 1, lines 6-11)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        kt = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < Tk) & (offs_d[:, None] < HEAD_DIM), other=0.0)  # (D, BLOCK_N)
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            keep = (offs_n[None, :] < Tk) & (offs_n[None, :] >= kv_lo)  # (1, BLOCK_N)
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)  # (BLOCK_M, BLOCK_N)
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # (BLOCK_M,)
        # a row that has seen no key yet has m_new = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # (BLOCK_M,)
        p = tl.math.exp2(qk - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_safe)  # (BLOCK_M,) rescales what was accumulated so far
        l_i = l_i * alpha + tl.sum(p, 1)  # (BLOCK_M,)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # (BLOCK_M, D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                    offs_n, offs_d, lo, hi, Tq, kv_lo, diag, qk_scale,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) (FA2 Algorithm 2, lines 9-20)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = offs_m < Tq  # (BLOCK_M,)
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_M, D)
        # rows past Tq read q = dO = 0 and lse = delta = 0, so they add exactly nothing below
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT - lse[None, :])  # (BLOCK_N, BLOCK_M); rows with lse = +inf give 0
        if MASK:
            keep = offs_n[:, None] >= kv_lo  # (BLOCK_N, 1)
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + diag)  # (BLOCK_N, BLOCK_M)
            pT = tl.where(keep, pT, 0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_M, D)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)  # (BLOCK_N, D)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])  # (BLOCK_N, BLOCK_M)
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)  # (BLOCK_N, D)
    return dk, dv


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                  offs_m, offs_d, lo, hi, Tk, kv_lo, diag, qk_scale,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi) (FA2 Algorithm 2, line 17)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_N, D)
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASK:
            keep = (offs_n[None, :] < Tk) & (offs_n[None, :] >= kv_lo)  # (1, BLOCK_N)
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)  # (BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # (BLOCK_M, D)
    return dq


# ----------------------------------------------------------------------------- configs


def _configs(tiles):
    """Autotune space, (BLOCK_M, BLOCK_N, num_warps, num_stages) per config. On a GPU the best tile
    depends on head dim, dtype and length: bigger tiles reuse each load more but spill registers at
    D = 128 and leave SMs idle on short sequences; more pipeline stages hide load latency at the price
    of shared memory (configs that do not fit are skipped by the autotuner). The list is short on
    purpose: every config is compiled on first use of each key. Under the interpreter tiles cost
    Python time per op, so one small config keeps the CPU tests fast (and a single config skips the
    benchmark)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": _MIN_BLOCK, "BLOCK_N": _MIN_BLOCK}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


def _prune(configs, named_args, **kwargs):
    """Decode (Tq == 1) keeps the 16-row query tiles instead of padding one row to 128; fp32 keeps
    tiles of at most 64 * 64 elements, since fp32 tiles take twice the registers and shared memory."""
    bm_max = max(_MIN_BLOCK, named_args["TQ_KEY"])
    small = named_args["Q"].dtype == torch.float32
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= bm_max
            and (not small or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


# forward: 128 x 64 is FA2's tile for D <= 128 on A100/H100; 16-row tiles are for decode
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 2),
                         (16, 64, 4, 2), (16, 128, 4, 2)])
# backward programs hold four tiles (k, v, dk, dv or q, do, dq, p) so they use smaller ones
_BWD_CONFIGS = _configs([(64, 64, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2),
                         (16, 64, 4, 2)])
# TQ_KEY / TK_KEY are lengths rounded up to a power of two: a KV cache grows one key per decode step,
# and keying on the exact Tk would re-run the autotune benchmark at every step.
_KEY = ["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "HAS_KV_START"]
_PRUNE = {"early_config_prune": _prune}


# ----------------------------------------------------------------------------- forward


@triton.jit
def _query_block_keys(KV_START, off_b, start_m, Tq, Tk, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which key blocks the query rows [start_m, start_m + BLOCK_M) visit, shared by the forward and
    the dQ kernel: [lo, full_lo) and [full_hi, hi) need masks, [full_lo, full_hi) every row sees whole."""
    diag = Tk - Tq  # bottom-right causal: row i sees keys j <= i + diag
    if HAS_KV_START:
        kv_lo = tl.maximum(tl.load(KV_START + off_b), 0).to(tl.int32)
    else:
        kv_lo = tl.full([], 0, tl.int32)  # a tensor either way: a jit function returns one type
    hi = tl.minimum(Tk, start_m + BLOCK_M + diag) if CAUSAL else Tk
    lo = (kv_lo // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.cdiv(kv_lo, BLOCK_N) * BLOCK_N, hi)
    full_hi = (tl.minimum(Tk, start_m + diag + 1) if CAUSAL else Tk) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)
    return diag, kv_lo, lo, full_lo, full_hi, hi


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV_START,
              stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
              stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
              H, GROUP, Tq, Tk, qk_scale, TQ_KEY, TK_KEY,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_KV_START: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)  # b * H + h
    off_b = off_bh // H
    off_h = off_bh % H
    off_kvh = off_h // GROUP  # grouped-query attention: GROUP query heads share one kv head
    Q += off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    K += off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    O += off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) head dim padded to a power of two
    io_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_M, D)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # (BLOCK_M,) running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # (BLOCK_M,) running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # (BLOCK_M, D)

    diag, kv_lo, lo, full_lo, full_hi, hi = _query_block_keys(KV_START, off_b, start_m, Tq, Tk, CAUSAL,
                                                              HAS_KV_START, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, lo, full_lo, Tk, kv_lo, diag, qk_scale,
                               True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, full_lo, full_hi, Tk, kv_lo, diag, qk_scale,
                               False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, full_hi, hi, Tk, kv_lo, diag, qk_scale,
                               True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)

    # a row that saw no key (l = 0) outputs 0 and stores lse = +inf, so the backward recomputes p = 0
    empty = l_i == 0.0  # (BLOCK_M,)
    l_safe = tl.where(empty, 1.0, l_i)  # (BLOCK_M,)
    out = acc / l_safe[:, None]  # (BLOCK_M, D)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # (BLOCK_M,)
    tl.store(LSE + off_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=io_mask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_od,
                    stride_dob, stride_doh, stride_dot, stride_dod, H, Tq,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i), the softmax-Jacobian term of FA2 Algorithm 2, line 4."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_M, D)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, D)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, D)
    tl.store(DELTA + off_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, KV_START,
                   stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                   stride_vb, stride_vh, stride_vt, stride_vd, stride_dob, stride_doh, stride_dot, stride_dod,
                   H, GROUP, Tq, Tk, qk_scale, sm_scale, TQ_KEY, TK_KEY,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_KV_START: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key block, b, kv head); loops over the GROUP query heads that read it."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bkv = tl.program_id(1)  # b * Hkv + kv head
    Hkv = H // GROUP
    off_b = off_bkv // Hkv
    off_kvh = off_bkv % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_N, D)
    kv_off = offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd  # (BLOCK_N, D)
    K += off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # (BLOCK_N, D)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # (BLOCK_N, D)

    diag = Tk - Tq
    kv_lo = tl.maximum(tl.load(KV_START + off_b), 0).to(tl.int32) if HAS_KV_START else 0
    # query blocks that see some key of this block start at lo; from mid on they see all of them
    lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M if CAUSAL else 0
    mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M if CAUSAL else 0
    if HAS_KV_START:
        mid = tl.where(start_n < kv_lo, Tq, mid)  # the block straddles kv_start: mask everywhere
        lo = tl.where(start_n + BLOCK_N <= kv_lo, Tq, lo)  # the block is all padding: dK = dV = 0
    mid = tl.maximum(mid, lo)
    for g in range(GROUP):
        off_h = (off_kvh * GROUP + g).to(tl.int64)
        bh = off_b.to(tl.int64) * H + off_h
        Qh = Q + off_b.to(tl.int64) * stride_qb + off_h * stride_qh
        DOh = DO + off_b.to(tl.int64) * stride_dob + off_h * stride_doh
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + bh * Tq, DELTA + bh * Tq,
                                 stride_qt, stride_qd, stride_dot, stride_dod,
                                 offs_n, offs_d, lo, tl.minimum(mid, Tq), Tq, kv_lo, diag, qk_scale,
                                 True, CAUSAL, HEAD_DIM, BLOCK_M, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + bh * Tq, DELTA + bh * Tq,
                                 stride_qt, stride_qd, stride_dot, stride_dod,
                                 offs_n, offs_d, mid, Tq, Tq, kv_lo, diag, qk_scale,
                                 False, CAUSAL, HEAD_DIM, BLOCK_M, PRECISION)
    # DK, DV are fresh contiguous (B, Hkv, Tk, D) buffers
    out_off = off_bkv.to(tl.int64) * Tk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, KV_START,
                 stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                 stride_vb, stride_vh, stride_vt, stride_vd, stride_dob, stride_doh, stride_dot, stride_dod,
                 H, GROUP, Tq, Tk, qk_scale, sm_scale, TQ_KEY, TK_KEY,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_KV_START: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, b, h); walks the same key blocks as the forward."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_kvh = off_h // GROUP
    K += off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    io_mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_M, D)
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=io_mask, other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # (BLOCK_M, D)

    diag, kv_lo, lo, full_lo, full_hi, hi = _query_block_keys(KV_START, off_b, start_m, Tq, Tk, CAUSAL,
                                                              HAS_KV_START, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_m, offs_d, lo, full_lo, Tk, kv_lo, diag, qk_scale,
                       True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_m, offs_d, full_lo, full_hi, Tk, kv_lo, diag, qk_scale,
                       False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_m, offs_d, full_hi, hi, Tk, kv_lo, diag, qk_scale,
                       True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
    # DQ is a fresh contiguous (B, H, Tq, D) buffer
    out_off = off_bh.to(tl.int64) * Tq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=io_mask)



# ----------------------------------------------------------------------------- autograd

class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal, kv_start):
        o, lse = _flash_forward(q, k, v, causal, kv_start)
        ctx.save_for_backward(q, k, v, o, lse, kv_start)
        ctx.causal = causal
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, kv_start = ctx.saved_tensors
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        sm_scale = 1.0 / math.sqrt(D)
        a = _launch_args(q, k, kv_start, ctx.causal)
        kvs = kv_start if kv_start is not None else lse  # dummy pointer, never read
        delta = torch.empty_like(lse)  # (B, H, Tq)
        _bwd_preprocess[(triton.cdiv(Tq, _MIN_BLOCK), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, Tq,
            HEAD_DIM=D, BLOCK_D=a["BLOCK_D"], BLOCK_M=_MIN_BLOCK)
        dq = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)  # (B, H, Tq, D)
        dk = torch.empty((B, Hkv, Tk, D), device=k.device, dtype=k.dtype)  # (B, Hkv, Tk, D)
        dv = torch.empty((B, Hkv, Tk, D), device=v.device, dtype=v.dtype)  # (B, Hkv, Tk, D)
        strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
        scales = dict(qk_scale=sm_scale * _LOG2E, sm_scale=sm_scale)
        grid_kv = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
        _attn_bwd_dkdv[grid_kv](q, k, v, do, dk, dv, lse, delta, kvs, *strides, **scales, **a)
        grid_q = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_bwd_dq[grid_q](q, k, v, do, dq, lse, delta, kvs, *strides, **scales, **a)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------- launch


def _launch_args(q, k, kv_start, causal):
    """Scalars and constexprs shared by every kernel launch."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    return dict(H=H, GROUP=H // Hkv, Tq=Tq, Tk=Tk, TQ_KEY=triton.next_power_of_2(Tq),
                TK_KEY=triton.next_power_of_2(Tk), HEAD_DIM=D,
                BLOCK_D=max(_MIN_BLOCK, triton.next_power_of_2(D)), CAUSAL=causal,
                HAS_KV_START=kv_start is not None,
                # fp32 inputs get true fp32 matmuls (tf32 would cost ~1e-3 relative error)
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _flash_forward(q, k, v, causal, kv_start):
    """Launch the forward kernel: out (B, H, Tq, D) and lse (B, H, Tq) in log2 units, +inf where a
    row sees no key."""
    B, H, Tq, D = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)       # (B, H, Tq, D)
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)  # (B, H, Tq)
    kvs = kv_start if kv_start is not None else lse  # dummy pointer, never read
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](q, k, v, o, lse, kvs, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                    qk_scale=(1.0 / math.sqrt(D)) * _LOG2E, **_launch_args(q, k, kv_start, causal))
    return o, lse


def _check(q, k, v):
    """What only this backend requires; kernels.attention has checked the shapes."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton attention needs q, k, v all fp32, fp16 or bf16; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype} (use backend='torch')")
    if not (q.is_cuda or _INTERPRET):
        raise ValueError("triton attention needs CUDA tensors here (or TRITON_INTERPRET=1 set before "
                         "importing kernels); use backend='torch' for CPU tensors")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}")


def flash_attention(q, k, v, causal, kv_start):
    """Differentiable attention: q (B, H, Tq, D), k, v (B, Hkv, Tk, D), kv_start int64 (B,) or None
    -> (B, H, Tq, D). Semantics as `kernels.attention`, which validates the shapes first."""
    _check(q, k, v)
    return _FlashAttention.apply(q, k, v, causal, kv_start)


def flash_attention_lse(q, k, v, kv_start):
    """Non-causal forward only, with the natural-log log-sum-exp of each row's scores:
    out (B, H, Tq, D) and lse (B, H, Tq) float32, -inf where a row sees no key (its out is 0)."""
    _check(q, k, v)
    o, lse = _flash_forward(q, k, v, False, kv_start)  # lse in log2 units, +inf if no key
    return o, torch.where(torch.isinf(lse), -math.inf, lse / _LOG2E)


# ----------------------------------------------------------------------------- benchmark


# Goals at T = 4096, D = 128 (issue 15): forward >= 1.0x and backward >= 0.8x SDPA's flash backend.
# D = 128 first: the goal's row is the third measured, so a timeout cuts the others first.
BENCH_LENGTHS, BENCH_HEAD_DIMS, BENCH_TOKENS, BENCH_WIDTH = (1024, 2048, 4096, 8192), (128, 64), 16384, 2048


def _sdpa_fn(backend_name):
    """torch SDPA pinned to one backend ("FLASH_ATTENTION", "CUDNN_ATTENTION"), or None if this torch
    lacks it. Pinning matters: unpinned, SDPA picks a backend per call and the row would mix them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return None

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def _tflops(fn, q, k, v, do, flops):
    """Median forward and backward TFLOP/s of fn(q, k, v) -> out; None for a backend that refuses."""
    try:
        fwd_ms = triton.testing.do_bench(lambda: fn(q, k, v), return_mode="median")
        o = fn(q, k, v)
        bwd_ms = triton.testing.do_bench(lambda: o.backward(do, retain_graph=True), grad_to_none=[q, k, v],
                                         return_mode="median")
    except RuntimeError:  # e.g. "No available kernel" from a pinned SDPA backend on this device
        return None, None
    # backward = 2.5x the forward's FLOPs: 5 matmuls instead of 2 (FlashAttention-2 section 4.1)
    return flops / fwd_ms * 1e-9, 2.5 * flops / bwd_ms * 1e-9


def bench(json_path=None, compile_only=False):
    """Forward and backward TFLOP/s of our kernel, SDPA-flash and SDPA-cuDNN: causal, bf16, T = 1k-8k,
    D = 64 and 128, B * T = 16384 tokens and H * D = 2048 at every size. Returns the rows.
    compile_only: one forward and backward of ours per head dim, timing nothing: it fills Triton's
    cache with every autotune config the benchmark runs (every length here shares the binaries)."""
    if not torch.cuda.is_available():
        print("no CUDA device: the attention benchmark needs one (the kernels only run interpreted on CPU)")
        return []
    if compile_only:
        for D in BENCH_HEAD_DIMS:
            q, k, v = (torch.randn(BENCH_TOKENS // 1024, BENCH_WIDTH // D, 1024, D, device="cuda",
                                   dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            flash_attention(q, k, v, True, None).backward(torch.randn_like(q))
        torch.cuda.synchronize()
        print(f"compiled the benchmark's kernels for D = {BENCH_HEAD_DIMS}")
        return []
    impls = {"ours": lambda q, k, v: flash_attention(q, k, v, True, None),
             "sdpa_flash": _sdpa_fn("FLASH_ATTENTION"), "sdpa_cudnn": _sdpa_fn("CUDNN_ATTENTION")}
    impls = {name: fn for name, fn in impls.items() if fn is not None}
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'D':>4} {'T':>5} {'B':>3} {'H':>3} | " + " | ".join(f"{n + ' fwd':>15} {'bwd':>6}" for n in impls)
          + "   (TFLOP/s, median; causal bf16)", flush=True)
    rows = []
    for D in BENCH_HEAD_DIMS:
        H = BENCH_WIDTH // D
        for T in BENCH_LENGTHS:
            B = BENCH_TOKENS // T
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))  # (B, H, T, D); Tq == Tk, H == Hkv: SDPA's causal mask is ours
            do = torch.randn_like(q)  # (B, H, T, D)
            flops = 4 * B * H * T * T * D * 0.5  # 2 matmuls of 2*T*T*D FLOPs each, half of them causal
            row = {"D": D, "T": T, "B": B, "H": H}
            for name, fn in impls.items():
                row[f"{name}_fwd"], row[f"{name}_bwd"] = _tflops(fn, q, k, v, do, flops)
            rows.append(row)
            fmt = lambda x: f"{x:6.1f}" if x is not None else f"{'n/a':>6}"  # noqa: E731
            print(f"{D:>4} {T:>5} {B:>3} {H:>3} | " + " | ".join(
                f"{fmt(row[n + '_fwd']):>15} {fmt(row[n + '_bwd'])}" for n in impls), flush=True)
            if json_path:  # rewritten after each row: a timeout keeps the rows measured so far
                with open(json_path, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    bench()
