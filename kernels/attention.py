"""Attention for the model: one entry, `attention`, on our Triton kernel or torch SDPA; `prefix_attention`
for a decode step over a prompt shared by a group of rows; the float64 reference they are tested against.

`attention(q, k, v, causal, kv_start)` is FlashAttention-2 semantics with two additions every caller of
this project needs: bottom-right causal alignment (query row i sits at key i + Tk - Tq, so one call
serves prefill, chunked prefill and decode) and left padding (`kv_start[b]`: keys j < kv_start[b] are
masked; a row that sees no key outputs 0, with zero gradients). Two backends:
    "triton" : our kernel (kernels/flash_attention.py, FlashAttention-2, Dao 2023), the default on CUDA.
    "torch"  : torch's F.scaled_dot_product_attention with a mask, the default elsewhere.
Triton is optional (pyproject installs it on Linux only): without it the model runs on SDPA everywhere,
and asking for "triton" says how to get it.

`prefix_attention` is one decode step of rows whose KV cache shares a prompt (GRPO's G samples of one
prompt, `model.KVCache.share_prefix`): the prompt's keys and each row's own keys are attended
separately, each with its log-sum-exp (from the Triton forward on CUDA, torch's CPU flash op on CPU),
and merged (split-KV / Hydragen, see its docstring).

Departures and choices:
- SDPA's `is_causal` is top-left aligned, so it is used only where that agrees with ours (Tq == Tk, or
  one decode row); every other masked call passes an explicit mask (`_sdpa_mask`).
- No cache of masks keyed on tensors: each call builds its mask, in every layer, except the mask of
  a shared prompt's padding, which the KV cache builds once per rollout (`padding_mask`) and passes to
  `prefix_attention`; rebuilt in every layer of every decode step, its few small ops were a measurable
  share of a CPU decode step. Where every query row sees the same keys (a decode row, non-causal
  calls) the mask is (B, 1, 1, Tk), broadcast over heads and rows; on CPU an unpadded call has none.
- No thread policy here: on CPU, the sampler's decode loop gives long attention every thread and
  short attention one (kernels/cpu_decode.py); every other call runs on torch's threads as they are.
"""

import math

import torch
import torch.nn.functional as F

try:  # optional: importing it needs the triton package (and sets TRITON_INTERPRET=1 without a GPU)
    from kernels import flash_attention as _triton
except ImportError:
    _triton = None

_NO_TRITON = ("attention backend 'triton' needs the triton package, which is not installed: "
              "pip install triton, or pass backend='torch'")
# torch's CPU flash kernel, the op F.scaled_dot_product_attention dispatches to on CPU; called directly
# because the public API does not return the log-sum-exp that prefix_attention merges with.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# ----------------------------------------------------------------------------- public entry


def _check(q, k, v, kv_start):
    """One clear error for shapes no backend accepts."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q (B, H, Tq, D) and k, v (B, Hkv, Tk, D); "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    (B, H, Tq, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if B != Bk or D != Dk or H % Hkv != 0 or Tk < Tq:
        raise ValueError(f"attention needs matching B and D, H a multiple of Hkv and Tk >= Tq; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if kv_start is not None and tuple(kv_start.shape) != (B,):
        raise ValueError(f"kv_start must have shape ({B},), got {tuple(kv_start.shape)}")


def _backend(backend, q):
    """The backend a call runs on: None means Triton on CUDA when it is installed, torch SDPA otherwise."""
    if backend is None:
        return "triton" if q.is_cuda and _triton is not None else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"unknown attention backend {backend!r}; use 'triton', 'torch' or None")
    if backend == "triton" and _triton is None:
        raise ValueError(_NO_TRITON)
    return backend


def attention(q, k, v, causal=True, backend=None, kv_start=None):
    """Scaled dot-product attention, softmax scale 1/sqrt(D).

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H % Hkv == 0 and Tk >= Tq; returns (B, H, Tq, D).
    causal: bottom-right aligned, query row i sees keys j <= i + Tk - Tq.
    kv_start: optional int64 (B,); keys j < kv_start[b] are masked (left padding). Rows that see no
    key output 0. backend: "triton", "torch" (SDPA), or None (Triton on CUDA if installed, else torch).
    """
    _check(q, k, v, kv_start)
    backend = _backend(backend, q)
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int64).contiguous()  # (B,)
    if backend == "triton":
        return _triton.flash_attention(q, k, v, causal, kv_start)
    return _sdpa(q, k, v, causal, kv_start)


def _sdpa(q, k, v, causal, kv_start):
    """torch SDPA with the same semantics: bottom-right causal, kv_start padding, empty rows -> 0."""
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    if kv_start is None and (not causal or Tq == Tk or Tq == 1):  # SDPA's is_causal is top-left
        # aligned, so use it only where that agrees: Tq == Tk, or a decode row, which sees every key
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1, enable_gqa=True)
    mask, no_key = _sdpa_mask(B, Tq, Tk, causal, kv_start, q.device)  # (B, 1, Tq or 1, Tk), (B, 1, Tq or 1, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, Tq, D)
    return out if no_key is None else out.masked_fill(no_key, 0.0)


def _sdpa_mask(B, Tq, Tk, causal, kv_start, device, dtype=torch.bool):
    """SDPA's mask and no_key (True where a row sees no key), equal to `_visible` broadcast. The mask is
    boolean (True = visible), or additive (0 / -inf) in a float `dtype`.

    Causal with several query rows: mask (B, 1, Tq, Tk), no_key (B, 1, Tq, 1). Otherwise (non-causal,
    or one decode row, which sees every key up to its own) every row sees the same keys, so both
    are built for one row, (B, 1, 1, Tk) and (B, 1, 1, 1), and broadcast over the Tq rows; on CPU,
    where every kv_start is 0 there is nothing to mask and both are None.

    An all-False row gives NaN in SDPA, so a row with no key sees everything here and the caller
    zeroes its output (its gradients are 0 too). On CPU, no_key is None when every row has a key
    (checking costs nothing there; on a GPU it would be a host sync, so the zeroing always runs).
    """
    j = torch.arange(Tk, device=device)                                       # (Tk,) key index
    if causal and Tq > 1:
        lo = (torch.zeros(B, 1, 1, 1, dtype=torch.int64, device=device) if kv_start is None
              else kv_start.view(B, 1, 1, 1))                                 # (B, 1, 1, 1) first visible key
        hi = torch.arange(Tk - Tq, Tk, device=device).view(1, 1, Tq, 1)      # (1, 1, Tq, 1) last visible key
        no_key = hi < lo                                                      # (B, 1, Tq, 1)
        mask = ((j >= lo) & (j <= hi)) | no_key                               # (B, 1, Tq, Tk)
        if device.type == "cpu" and not no_key.any():
            no_key = None
    else:
        lo = kv_start.view(B, 1, 1, 1)                                        # (B, 1, 1, 1) first visible key
        last = int(kv_start.max()) if device.type == "cpu" else None          # a host sync on a GPU: skipped
        if last == 0:
            return None, None                                                 # no padding (a batch of one prompt)
        no_key = None if last is not None and last < Tk else lo >= Tk        # (B, 1, 1, 1)
        mask = j >= lo if no_key is None else (j >= lo) | no_key              # (B, 1, 1, Tk)
    if dtype != torch.bool:
        mask = torch.where(mask, 0.0, -math.inf).to(dtype)                    # additive: 0 or -inf
    return mask, no_key


def padding_mask(start, Tk, dtype):
    """`prefix_attention`'s mask of a cached prompt's left padding: keys j < start[p] are hidden.
    For a caller that decodes many steps over the same prompt and keeps it (model.KVCache.share_prefix
    builds it once per rollout, instead of once per layer and step). start (P,) int64 ->
    (mask (P, 1, 1, Tk), additive in `dtype`, or None; no_key (P, 1, 1, 1) or None), as `_sdpa_mask`."""
    start = start.to(torch.int64)
    return _sdpa_mask(start.shape[0], 1, Tk, False, start, start.device, dtype)


def prefix_attention(q, k_prefix, v_prefix, prefix_start, k, v, backend=None, prefix_mask=None):
    """One decode step of rows that share a cached prefix: G consecutive rows read one prompt's keys.

    q (N, H, 1, D) with N = P * G, prompt-major (row b's prefix is prefix row b // G);
    k_prefix, v_prefix (P, Hkv, Tp, D), prefix keys j < prefix_start[p] are left padding;
    k, v (N, Hkv, Tk, D), each row's own keys after the prefix, all visible (Tk >= 1).
    prefix_mask: optional `padding_mask(prefix_start, Tp, q.dtype)`, kept by a caller that decodes many
    steps over the same prefix; built here when None (the Triton path reads prefix_start instead).
    Returns (N, H, 1, D), equal to `attention` over each row's concatenated [prefix; own] keys.

    Attention over a union of key sets is a weighted mix of the attention over each set, weighted by
    their softmax mass: out = s * out_prefix + (1 - s) * out_own with s = sigmoid(lse_prefix -
    lse_own), lse the log-sum-exp of each set's scores (the merge of FlashAttention's split-KV and
    of Hydragen, Juravsky et al. 2024, arXiv:2402.05099). The prefix part stacks a group's G * H/Hkv
    query rows on each kv head, so a prompt's keys are read once for its G samples instead of G times,
    and no per-sample copy of the prompt's cache exists.
    """
    (N, H, Tq, D), (P, Hkv, _, _), Tk = q.shape, k_prefix.shape, k.shape[2]
    if Tq != 1 or N % P or k.shape[0] != N or Tk < 1 or H % Hkv:
        raise ValueError(f"prefix_attention decodes one token per row over a shared prefix; got q {tuple(q.shape)}, "
                         f"k_prefix {tuple(k_prefix.shape)}, k {tuple(k.shape)}")
    G, r = N // P, H // Hkv
    rows = q.view(N, Hkv, r, D)                                               # (N, Hkv, r, D) r query rows per kv head
    grouped = rows.view(P, G, Hkv, r, D).transpose(1, 2).reshape(P, Hkv, G * r, D)
    out_p, lse_p = _attend_lse(grouped, k_prefix, v_prefix, prefix_start, backend,
                               prefix_mask)                                   # (P, Hkv, G r, D), (P, Hkv, G r)
    out_o, lse_o = _attend_lse(rows, k, v, None, backend)                     # (N, Hkv, r, D), (N, Hkv, r)
    out_p = out_p.view(P, Hkv, G, r, D).transpose(1, 2).reshape(N, Hkv, r, D)
    lse_p = lse_p.view(P, Hkv, G, r).transpose(1, 2).reshape(N, Hkv, r)
    share = torch.sigmoid(lse_p - lse_o)[..., None]                           # (N, Hkv, r, 1) mass on the prefix
    return torch.lerp(out_o, out_p.to(out_o.dtype), share.to(out_o.dtype)).view(N, H, 1, D)


def _attend_lse(q, k, v, kv_start, backend, padding=None):
    """Non-causal attention of M query rows per kv head, with its natural-log log-sum-exp; no autograd.
    On CPU it calls torch's CPU flash kernel directly (`_CPU_FLASH`).
    q (B, Hkv, M, D), k, v (B, Hkv, Tk, D) -> out (B, Hkv, M, D), lse (B, Hkv, M) float32.
    padding: `padding_mask(kv_start, Tk, q.dtype)` if the caller has it.
    A row that sees no key gets out 0 and lse -inf (zero weight in `prefix_attention`'s merge)."""
    B, Hkv, M, D = q.shape
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int64).contiguous()
    if _backend(backend, q) == "triton":
        return _triton.flash_attention_lse(q, k, v, kv_start)
    if padding is None and kv_start is not None:
        padding = padding_mask(kv_start, k.shape[2], q.dtype)
    mask, no_key = padding or (None, None)                                     # (B, 1, 1, Tk), (B, 1, 1, 1)
    if _CPU_FLASH is not None and q.device.type == "cpu":
        out, lse = _CPU_FLASH(q, k, v, attn_mask=mask)[:2]                     # lse (B, Hkv, M)
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


if __name__ == "__main__":  # python -m kernels.attention [--json FILE]: kernels/flash_attention.py's bench
    import argparse
    parser = argparse.ArgumentParser(description="forward and backward TFLOP/s of our Triton kernel, "
                                     "SDPA-flash and SDPA-cuDNN (causal, bf16, T 1k-8k, D 64 and 128)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--compile-only", action="store_true", help="compile the kernels it runs, time nothing")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the attention benchmark needs one")
    elif _triton is None:
        raise SystemExit(_NO_TRITON)
    else:
        _triton.bench(args.json or None, compile_only=args.compile_only)
