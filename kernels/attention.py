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
the tests in tests/test_kernels.py. `python -m kernels.attention` benchmarks against torch SDPA.

Elsewhere (backend "torch", the default off CUDA) `attention` is torch SDPA with the same semantics;
its mask is built once per forward, not once per layer (`_sdpa_mask`), and inside a decode loop
it runs on one CPU thread unless the keys are many (`kernels/threads.py`). `prefix_attention` is the
decode step of rows sharing a cached prompt (a GRPO group): the prompt part and each row's own part
are attended separately, with their log-sum-exp, from the Triton forward kernel on CUDA or torch's
CPU flash op, and merged.
"""

import math
import os
import weakref

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

from kernels.threads import PARALLEL_MIN_KEYS, parallel  # noqa: E402

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


# ----------------------------------------------------------------------------- public entry


def _check(q, k, v, kv_start):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q (B, H, Tq, D) and k, v (B, Hkv, Tk, D); "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    (B, H, Tq, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if B != Bk or D != Dk or H % Hkv != 0 or Tk < Tq:
        raise ValueError(f"attention needs matching B and D, H a multiple of Hkv and Tk >= Tq; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if kv_start is not None and tuple(kv_start.shape) != (B,):
        raise ValueError(f"kv_start must have shape ({B},), got {tuple(kv_start.shape)}")


def _sdpa(q, k, v, causal, kv_start):
    """torch SDPA with the same semantics: bottom-right causal, kv_start padding, empty rows -> 0."""
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    with parallel(Tk >= PARALLEL_MIN_KEYS):  # inside a decode loop: see kernels/threads.py
        if kv_start is None and (not causal or Tq == Tk or Tq == 1):  # SDPA's is_causal is top-left
            # aligned, so use it only where that agrees: Tq == Tk, or a decode row, which sees every key
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1, enable_gqa=True)
        mask, no_key = _sdpa_mask(B, Tq, Tk, causal, kv_start, q.device)  # (B, 1, Tq, Tk), (B, 1, Tq, 1) or None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out if no_key is None else out.masked_fill(no_key, 0.0)  # (B, H, Tq, D)


_mask_memo: tuple = ()  # (weakref to kv_start, key, mask, no_key) of the last _sdpa_mask call


def _sdpa_mask(B, Tq, Tk, causal, kv_start, device, dtype=torch.bool):
    """SDPA's mask (B, 1, Tq, Tk) and no_key (B, 1, Tq, 1), True where a row sees no key. The mask is
    boolean (True = visible), or additive (0 / -inf) in a float `dtype`.

    An all-False row gives NaN in SDPA, so a row with no key sees everything here and `_sdpa` zeroes
    its output (its gradients are 0 too). On CPU, no_key is None when every row has a key (checking
    costs nothing there; on a GPU it would be a host sync, so the zeroing always runs).

    Every layer of one forward passes the same kv_start tensor and shapes, so the last result is
    reused: the mask is built once per forward, not once per layer (those few small ops per layer
    were 10% of a CPU decode step). The memo checks the kv_start object (weak reference) and its
    version counter, so a new or modified kv_start rebuilds it.
    """
    global _mask_memo
    key = (B, Tq, Tk, causal, device, dtype,
           None if kv_start is None or kv_start.is_inference() else kv_start._version)
    if _mask_memo and key[-1] is not None and _mask_memo[0]() is kv_start and _mask_memo[1] == key:
        return _mask_memo[2], _mask_memo[3]
    visible = _visible(B, Tq, Tk, causal, kv_start, device)  # (B, 1, Tq, Tk)
    no_key = ~visible.any(-1, keepdim=True)                   # (B, 1, Tq, 1)
    mask = visible | no_key
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill(~mask, -math.inf)
    if no_key.device.type == "cpu" and not no_key.any():
        no_key = None
    if key[-1] is not None:
        _mask_memo = (weakref.ref(kv_start), key, mask, no_key)
    return mask, no_key


def attention(q, k, v, causal=True, backend=None, kv_start=None):
    """Scaled dot-product attention, softmax scale 1/sqrt(D).

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H % Hkv == 0 and Tk >= Tq; returns (B, H, Tq, D).
    causal: bottom-right aligned, query row i sees keys j <= i + Tk - Tq.
    kv_start: optional int64 (B,); keys j < kv_start[b] are masked (left padding). Rows that see no
    key output 0. backend: "triton", "torch" (SDPA), or None (Triton on CUDA, torch elsewhere).
    """
    _check(q, k, v, kv_start)
    if backend is None:
        backend = "triton" if q.is_cuda else "torch"
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int64).contiguous()  # (B,)
    if backend == "torch":
        return _sdpa(q, k, v, causal, kv_start)
    if backend != "triton":
        raise ValueError(f"unknown attention backend {backend!r}; use 'triton', 'torch' or None")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton attention needs q, k, v all fp32, fp16 or bf16; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype} (use backend='torch')")
    if not (q.is_cuda or _INTERPRET):
        raise ValueError("triton attention needs CUDA tensors here (or TRITON_INTERPRET=1 set before "
                         "importing kernels); use backend='torch' for CPU tensors")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}")
    return _FlashAttention.apply(q, k, v, causal, kv_start)


def prefix_attention(q, k_prefix, v_prefix, prefix_start, k, v, backend=None):
    """One decode step of rows that share a cached prefix: G consecutive rows read one prompt's keys.

    q (N, H, 1, D) with N = P * G, prompt-major (row b's prefix is prefix row b // G);
    k_prefix, v_prefix (P, Hkv, Tp, D), prefix keys j < prefix_start[p] are left padding;
    k, v (N, Hkv, Tk, D), each row's own keys after the prefix, all visible (Tk >= 1).
    Returns (N, H, 1, D), equal to `attention` over each row's concatenated [prefix; own] keys.

    Attention over a union of key sets is a weighted mix of the attention over each set, weighted by
    their softmax mass: out = s * out_prefix + (1 - s) * out_own with s = sigmoid(lse_prefix -
    lse_own), lse the log-sum-exp of each set's scores (the merge of FlashAttention's split-KV and
    of Hydragen, Juravsky et al. 2024, arXiv:2402.05099). The prefix part stacks a group's G * H/Hkv
    query rows on each kv head, so a prompt's keys are read once for its G samples instead of G times,
    and no per-sample copy of the prompt's cache exists.
    """
    (N, H, Tq, D), (P, Hkv, Tp, _), Tk = q.shape, k_prefix.shape, k.shape[2]
    if Tq != 1 or N % P or k.shape[0] != N or Tk < 1 or H % Hkv:
        raise ValueError(f"prefix_attention decodes one token per row over a shared prefix; got q {tuple(q.shape)}, "
                         f"k_prefix {tuple(k_prefix.shape)}, k {tuple(k.shape)}")
    G, r = N // P, H // Hkv
    rows = q.view(N, Hkv, r, D)                                               # (N, Hkv, r, D) r query rows per kv head
    grouped = rows.view(P, G, Hkv, r, D).transpose(1, 2).reshape(P, Hkv, G * r, D)
    out_p, lse_p = _attend_lse(grouped, k_prefix, v_prefix, prefix_start, backend)  # (P, Hkv, G r, D), (P, Hkv, G r)
    out_o, lse_o = _attend_lse(rows, k, v, None, backend)                     # (N, Hkv, r, D), (N, Hkv, r)
    out_p = out_p.view(P, Hkv, G, r, D).transpose(1, 2).reshape(N, Hkv, r, D)
    lse_p = lse_p.view(P, Hkv, G, r).transpose(1, 2).reshape(N, Hkv, r)
    share = torch.sigmoid(lse_p - lse_o)[..., None]                           # (N, Hkv, r, 1) mass on the prefix
    return torch.lerp(out_o, out_p.to(out_o.dtype), share.to(out_o.dtype)).view(N, H, 1, D)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_lse(q, k, v, kv_start, backend):
    """Non-causal attention of M query rows per kv head, with its natural-log log-sum-exp; no autograd.
    On CPU it calls torch's CPU flash kernel directly (`aten::_scaled_dot_product_flash_attention_for_cpu`,
    what F.scaled_dot_product_attention dispatches to), the public API does not return the lse.
    q (B, Hkv, M, D), k, v (B, Hkv, Tk, D) -> out (B, Hkv, M, D), lse (B, Hkv, M) float32.
    A row that sees no key gets out 0 and lse -inf (zero weight in `prefix_attention`'s merge)."""
    B, Hkv, M, D = q.shape
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int64).contiguous()
    if backend is None:
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        o, lse = _flash_forward(q, k, v, False, kv_start)  # lse in log2 units, +inf if no key
        return o, torch.where(torch.isinf(lse), -math.inf, lse / _LOG2E)
    flash = _CPU_FLASH is not None and q.device.type == "cpu"  # it takes an additive mask of q's dtype
    mask, no_key = (None, None) if kv_start is None else _sdpa_mask(
        B, M, k.shape[2], False, kv_start, q.device, dtype=q.dtype if flash else torch.float32)
    if flash:
        with parallel(k.shape[2] >= PARALLEL_MIN_KEYS):  # inside a decode loop: see kernels/threads.py
            out, lse = _CPU_FLASH(q, k, v, attn_mask=mask)[:2]                  # lse (B, Hkv, M)
    else:  # explicit math: other devices, or a torch without the CPU flash op
        s = (q @ k.transpose(-1, -2)).float() / math.sqrt(D)                   # (B, Hkv, M, Tk)
        if mask is not None:
            s = s + mask
        lse = s.logsumexp(-1)
        out = ((s - lse[..., None]).exp().to(v.dtype) @ v)
    if no_key is not None:
        out, lse = out.masked_fill(no_key, 0.0), lse.masked_fill(no_key[..., 0], -math.inf)
    return out, lse.float()


# ----------------------------------------------------------------------------- reference


def _visible(B, Tq, Tk, causal, kv_start, device):
    """Boolean (B, 1, Tq, Tk): True where query row i may attend to key j."""
    i = torch.arange(Tq, device=device)[:, None]  # (Tq, 1)
    j = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
    vis = (j <= i + (Tk - Tq)) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    vis = vis.expand(B, 1, Tq, Tk)  # (B, 1, Tq, Tk)
    if kv_start is not None:
        vis = vis & (j >= kv_start.to(device).view(B, 1, 1, 1))  # (B, 1, Tq, Tk)
    return vis


def attention_reference(q, k, v, causal=True, kv_start=None):
    """Explicit math in float64: repeat K/V per group, masked softmax, rows with no key -> 0."""
    _check(q, k, v, kv_start)
    (B, H, Tq, D), (Hkv, Tk) = q.shape, k.shape[1:3]
    q64, k64, v64 = q.double(), k.double(), v.double()
    k64 = k64.repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)
    v64 = v64.repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)
    scores = q64 @ k64.transpose(-2, -1) / math.sqrt(D)  # (B, H, Tq, Tk)
    visible = _visible(B, Tq, Tk, causal, kv_start, q.device)  # (B, 1, Tq, Tk)
    has_key = visible.any(-1, keepdim=True)  # (B, 1, Tq, 1)
    scores = scores.masked_fill(~visible & has_key, float("-inf"))  # empty rows stay finite ...
    probs = torch.softmax(scores, dim=-1) * visible  # (B, H, Tq, Tk) ... and are zeroed here
    return (probs @ v64).to(q.dtype)  # (B, H, Tq, D)


# ----------------------------------------------------------------------------- benchmark


def _bench():
    """Forward and backward TFLOP/s of the Triton kernel vs torch SDPA, causal bf16."""
    if not torch.cuda.is_available():
        print("no CUDA GPU found: nothing to benchmark (the kernels only run interpreted on CPU)")
        return
    tokens = 16384  # B * T fixed so every length fills the GPU with the same amount of work
    print(f"{'D':>4} {'T':>6} {'B':>3} {'H':>3} | {'fwd ours':>9} {'fwd sdpa':>9} {'ratio':>6} | "
          f"{'bwd ours':>9} {'bwd sdpa':>9} {'ratio':>6}   (TFLOP/s, median)")
    for D in (64, 128):
        H = 2048 // D  # model width H * D = 2048
        for T in (1024, 2048, 4096, 8192):
            B = tokens // T
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))  # (B, H, T, D)
            do = torch.randn_like(q)  # (B, H, T, D)
            # causal: half of 2 matmuls of 2*T*T*D flops each; backward = 2.5x (5 matmuls, recompute)
            fwd_flops = 4 * B * H * T * T * D * 0.5
            row = []
            for backend in ("triton", "torch"):
                fn = lambda: attention(q, k, v, causal=True, backend=backend)  # noqa: E731
                fwd_ms = triton.testing.do_bench(fn, return_mode="median")
                o = fn()
                bwd = lambda: o.backward(do, retain_graph=True)  # noqa: E731
                bwd_ms = triton.testing.do_bench(bwd, grad_to_none=[q, k, v], return_mode="median")
                row.append((fwd_flops / fwd_ms * 1e-9, 2.5 * fwd_flops / bwd_ms * 1e-9))
            (f_ours, b_ours), (f_ref, b_ref) = row
            print(f"{D:>4} {T:>6} {B:>3} {H:>3} | {f_ours:9.1f} {f_ref:9.1f} {f_ours / f_ref:6.2f} | "
                  f"{b_ours:9.1f} {b_ref:9.1f} {b_ours / b_ref:6.2f}")


if __name__ == "__main__":
    _bench()
