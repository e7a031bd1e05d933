"""A decoder-only transformer for the Qwen2/Qwen2.5, Qwen3 and Llama-3 families, from scratch.

One class reads all three families because they are one architecture with switches:
pre-norm blocks of RMSNorm (Zhang & Sennrich 2019) -> grouped-query attention (Ainslie et al. 2023)
with rotary position embeddings (Su et al. 2021) -> RMSNorm -> SwiGLU MLP (Shazeer 2020).
    Qwen2/Qwen2.5 : bias on q/k/v projections.
    Qwen3         : no bias; RMSNorm on each query and key head before RoPE; explicit head_dim.
    Llama-3       : no bias; `rope_scaling` of type "llama3" stretches the low rotary frequencies.
Attention runs through `kernels.attention` (our Triton FlashAttention-2 kernel on CUDA, torch's
SDPA elsewhere or without Triton), or `kernels.prefix_attention` when the KV cache shares a prompt
among rows. Everything else is plain torch; the sampler's CPU fast paths are applied from outside,
by `kernels.cpu_decode` around its prefill and decode loop.
Module names follow the Hugging Face checkpoints', so checkpoint.py reads and writes their layout;
the one renaming: q/k/v and gate/up projections are stored fused (`qkv_proj`, `gate_up_proj`, one
matmul each instead of three and two), split or stacked on save and load (`checkpoint.FUSED`).

Shape legend (used in every comment of this project):
    B batch, T time (tokens in this call), S cache slots (keys visible), H query heads,
    Hkv key/value heads, D head dim, C hidden size (H * D need not equal C in Qwen3), V vocab.

Precision: the weights and activations are in the parameters' dtype (float32, or bfloat16 with
`--dtype bfloat16`, the default on CUDA); these run in float32 whatever that dtype is:
- RMSNorm's normalisation (x.float(), then cast back before the weight, as the references do);
- the rotary angles (`inv_freq` stays float32 through `model.to(dtype)`; cos and sin are cast after);
- attention's softmax: the Triton kernel keeps scores, running max, sum and accumulator in float32;
  torch SDPA's kernels accumulate in float32 too;
- everything after the logits: `rollout.token_logprobs` and the sampler upcast the logits before
  log_softmax, the SFT and GRPO losses are float32 (tests/test_bf16.py checks each).

Departures from the reference implementations:
- Ragged batches are left-padded; `kv_start[b]` is the first real slot of row b. Rotary
  positions are counted from it, so a left-padded prompt gets the same positions (and logits)
  as the same prompt alone. The reference uses an attention mask plus explicit position ids.
- Qwen2's sliding-window attention (`use_sliding_window: true`) is not implemented; such a
  checkpoint is refused with an error. Dropout is not implemented (R1 training uses none).
- Llama-3 rope scaling is the only scaling type; others (yarn, dynamic, linear) are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention, padding_mask, prefix_attention

# --- config -----------------------------------------------------------------------------------


MODEL_TYPES = ("qwen2", "qwen3", "llama")  # the HF model_type names this one class reads


@dataclass
class ModelConfig:
    model_type: str = "qwen2"          # "qwen2" (also Qwen2.5), "qwen3" or "llama": the HF family name
    vocab_size: int = 64               # V: rows of the embedding and of the output head
    hidden_size: int = 128             # C: width of the residual stream
    intermediate_size: int = 384       # width of the SwiGLU MLP's hidden layer
    num_layers: int = 4                # transformer blocks
    num_heads: int = 4                 # H: query heads
    num_kv_heads: int = 2              # Hkv: key/value heads (GQA); H must be a multiple
    head_dim: int | None = None        # D; None means hidden_size // num_heads (Qwen3 sets it)
    max_seq_len: int = 512             # longest sequence the model is used on (max_position_embeddings)
    rope_theta: float = 10000.0        # RoPE base: Qwen2.5/Qwen3 use 1e6, Llama-3 5e5
    rope_scaling: dict | None = None   # Llama-3.1+ {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    rms_norm_eps: float = 1e-6         # Qwen 1e-6, Llama-3 1e-5
    qkv_bias: bool = False             # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False              # RMSNorm per head on q and k (Qwen3)
    tie_embeddings: bool = False       # output head shares the embedding matrix
    bos_token_id: int | None = None    # written to config.json for HF tools; the tokenizer owns ids
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    init_std: float = 0.02             # std of the normal init (GPT-2/Qwen initializer_range)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; use one of {sorted(MODEL_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")


# Named presets. "toy" is the embedded default (about 0.8M parameters with the toy's ~60-token
# vocabulary); the others are the published shapes, for building a model to load weights into.
PRESETS: dict[str, dict] = {
    "toy": dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_layers=4,
                num_heads=4, num_kv_heads=2, max_seq_len=256, rope_theta=10000.0),
    # the distillation student (R1 section 2.4's smaller dense model): half the width and layers
    # of "toy", the same head size, about 1/7 of its parameters
    "toy-small": dict(model_type="qwen2", hidden_size=64, intermediate_size=192, num_layers=2,
                      num_heads=2, num_kv_heads=1, max_seq_len=256, rope_theta=10000.0, qkv_bias=True),
    # for tests: the same family, small enough that every stage runs in the CPU test suite
    "micro": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=1, max_seq_len=256, qkv_bias=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2, max_seq_len=32768,
                         rope_theta=1e6, tie_embeddings=True, qkv_bias=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2, max_seq_len=32768,
                         rope_theta=1e6, tie_embeddings=True, qkv_bias=True),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, max_seq_len=40960,
                       rope_theta=1e6, tie_embeddings=True, qk_norm=True),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_layers=16, num_heads=32, num_kv_heads=8, max_seq_len=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = dict(PRESETS[name])
    if name == "toy":
        cfg["qkv_bias"] = True  # the toy is a Qwen2-family model: bias on q/k/v
    cfg.update(overrides)
    return ModelConfig(**cfg)


# --- rotary embeddings ------------------------------------------------------------------------

def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,) of RoPE, with Llama-3's frequency-dependent scaling if configured."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))  # (D/2,)
    s = cfg.rope_scaling
    if s:
        # Llama 3.1 report / reference code: wavelengths longer than original_len/low_freq_factor
        # are divided by `factor`, shorter than original_len/high_freq_factor are kept, and the
        # band in between is interpolated smoothly.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and signed sin, each (B, T, 1, D), for integer positions (B, T); HF's halves layout.
    The sin carries the rotation's sign (-sin on the first half, +sin on the second), so
    `apply_rope` needs no negation."""
    ang = positions.float()[..., None] * inv_freq.to(positions.device)  # (B, T, D/2)
    cos, sin = ang.cos(), ang.sin()
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (B, T, D)
    return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the position's angle. x (B, T, h, D), cos and sin (B, T, 1, D).
    roll swaps the halves, [x1, x2] -> [x2, x1]; with the signed sin this is HF's
    x * cos + rotate_half(x) * sin = [x1 cos - x2 sin, x2 cos + x1 sin]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin  # (B, T, h, D)


# --- layers -----------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 whatever the activation dtype, then cast back before the weight (as the
        # references do); F.rms_norm is x * rsqrt(mean(x^2) + eps) in one kernel.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class KVCache:
    """Preallocated keys and values for a batch of B sequences, one buffer pair per layer.

    All rows share one write index `length` (slots filled so far); ragged prompts are left-padded
    and `start[b]` is the first real slot of row b, so row b's rotary position at slot s is
    s - start[b]. Buffers are (B, Hkv, max_len, D); a decode step writes one slot per row.

    Shared prefix (`share_prefix`): slots [0, prefix_len) are stored once per group of G consecutive
    rows, in `prefix_k`/`prefix_v` (P, Hkv, Tp, D) with their own left pads `prefix_start` (P,);
    `k`/`v` (B, Hkv, max_len - Tp, D) then hold only each row's later slots, and attention reads
    both through `kernels.prefix_attention`, with the prompts' padding mask `prefix_mask`, built once
    here instead of in every layer of every decode step.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 start: torch.Tensor | None = None):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)  # (B, Hkv, S, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0
        self.start = (torch.zeros(batch_size, dtype=torch.long, device=device) if start is None
                      else start.to(device=device, dtype=torch.long))  # (B,)
        self.prefix_k = self.prefix_v = self.prefix_start = self.prefix_mask = None  # set by share_prefix
        self.prefix_len, self.group = 0, 1

    @property
    def batch_size(self) -> int:
        return self.start.shape[0]

    def share_prefix(self, group: int) -> "KVCache":
        """A cache for B * group rows whose filled slots are this cache's B rows, stored once: row i
        continues row i // group. GRPO's G samples of one prompt read the prompt's keys from one copy."""
        if self.prefix_k is not None:
            raise ValueError("share_prefix: this cache already shares a prefix")
        Tp = self.length
        out = object.__new__(KVCache)
        out.prefix_k = [k[:, :, :Tp].contiguous() for k in self.k]  # (P, Hkv, Tp, D)
        out.prefix_v = [v[:, :, :Tp].contiguous() for v in self.v]
        out.prefix_start, out.prefix_len, out.group = self.start, Tp, group
        out.prefix_mask = padding_mask(self.start, Tp, self.k[0].dtype)  # (P, 1, 1, Tp) and no-key rows
        B, Hkv, S, D = self.k[0].shape
        out.k = [self.k[0].new_zeros(B * group, Hkv, S - Tp, D) for _ in self.k]  # (B * group, Hkv, S - Tp, D)
        out.v = [self.v[0].new_zeros(B * group, Hkv, S - Tp, D) for _ in self.v]
        out.max_len, out.length, out.start = self.max_len, Tp, self.start.repeat_interleave(group)
        return out

    def select(self, index: torch.Tensor) -> "KVCache":
        """A new cache holding rows `index` (B',) of this one, as a plain cache (a shared prefix is
        copied into each selected row, so any subset of rows works)."""
        out = object.__new__(KVCache)
        if self.prefix_k is None:
            out.k = [k.index_select(0, index) for k in self.k]  # (B', Hkv, S, D)
            out.v = [v.index_select(0, index) for v in self.v]
        else:
            rows = index // self.group                          # (B',) prefix row of each selected row
            out.k = [torch.cat([pk.index_select(0, rows), k.index_select(0, index)], 2)
                     for pk, k in zip(self.prefix_k, self.k)]   # (B', Hkv, S, D)
            out.v = [torch.cat([pv.index_select(0, rows), v.index_select(0, index)], 2)
                     for pv, v in zip(self.prefix_v, self.v)]
        out.max_len, out.length, out.start = self.max_len, self.length, self.start.index_select(0, index)
        out.prefix_k = out.prefix_v = out.prefix_start = out.prefix_mask = None
        out.prefix_len, out.group = 0, 1
        return out

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at slots [length, length+T); return the filled (B, Hkv, S, D)
        views (with a shared prefix: the rows' own slots only, S = length + T - prefix_len)."""
        T = k.shape[2]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length}+{T} slots > max_len={self.max_len}")
        at = self.length - self.prefix_len
        self.k[layer][:, :, at:at + T] = k
        self.v[layer][:, :, at:at + T] = v
        return self.k[layer][:, :, :at + T], self.v[layer][:, :, :at + T]  # (B, Hkv, S, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.H, self.Hkv, self.D = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v projections as one matmul: the rows of qkv_proj are [q_proj; k_proj; v_proj]
        # (checkpoint.FUSED). One (B*T, C) x (C, (H + 2Hkv) D) product instead of three small ones.
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.H + 2 * self.Hkv) * self.D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.H * self.D, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: normalise each head's q and k before the rotation
            self.q_norm = RMSNorm(self.D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, kv_start, cache: KVCache | None):
        B, T, _ = x.shape
        H, Hkv = self.H, self.Hkv
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.D)  # (B, T, H + 2Hkv, D)
        qk, v = qkv.split([H + Hkv, Hkv], dim=2)               # (B, T, H + Hkv, D), (B, T, Hkv, D)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        qk = apply_rope(qk, cos, sin).transpose(1, 2)           # (B, H + Hkv, T, D): one rotation for q and k
        q, k = qk.split([H, Hkv], dim=1)                        # (B, H, T, D), (B, Hkv, T, D)
        v = v.transpose(1, 2)                                   # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)        # (B, Hkv, S, D), S = cached + T
        if cache is not None and cache.prefix_k is not None:  # G rows read each cached prompt once
            y = prefix_attention(q, cache.prefix_k[self.layer], cache.prefix_v[self.layer],
                                 cache.prefix_start, k, v, prefix_mask=cache.prefix_mask)  # (B, H, 1, D)
        else:
            y = attention(q, k, v, causal=True, kv_start=kv_start)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.H * self.D)    # (B, T, H*D)
        return self.o_proj(y)                            # (B, T, C)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)). gate and up are one matmul: the rows of
    gate_up_proj are [gate_proj; up_proj] (checkpoint.FUSED)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(F.silu(gate) * up)          # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_start, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_start, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# --- the model --------------------------------------------------------------------------------

class Transformer(nn.Module):
    """Module names follow the HF checkpoints (without the leading "model."), except the fused
    projections; `checkpoint.hf_parts` maps each state-dict tensor onto the checkpoint's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)  # (D/2,)
        self.init_weights()

    def init_weights(self):
        """All initialisation in one place: N(0, init_std) for matrices, zero biases, unit norms.
        Output projections get std / sqrt(2 * layers) (GPT-2, Radford et al. 2019 section 2.3), so
        the residual stream's variance does not grow with depth at init."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.num_layers))
            else:
                nn.init.normal_(p, std=std)
        self.inv_freq.copy_(rope_frequencies(self.cfg))

    def _apply(self, fn, recurse=True):
        """`model.to(torch.bfloat16)` casts every floating buffer; the rotary frequencies stay float32
        (rounded to bf16, the angles at position 4096 would be off by radians) and only move device."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_frequencies(self.cfg).to(self.inv_freq.device)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, *, kv_start: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or the final hidden states (B, T, C).

        kv_start (B,): first real token of each left-padded row (default: no padding). With a
        `cache`, the T tokens are appended after the cached ones and `cache.start` is used.
        """
        B, T = input_ids.shape
        offset = 0
        if cache is not None:
            kv_start, offset = cache.start, cache.length
        slots = torch.arange(offset, offset + T, device=input_ids.device)[None]  # (1, T)
        positions = slots if kv_start is None else (slots - kv_start[:, None]).clamp(min=0)  # (B or 1, T)
        x = self.embed_tokens(input_ids)                                        # (B, T, C)
        cos, sin = rope_cos_sin(self.inv_freq, positions.expand(B, T), x.dtype)  # (B, T, 1, D)
        for block in self.layers:
            x = block(x, cos, sin, kv_start, cache)                             # (B, T, C)
        if cache is not None:
            cache.length += T
        x = self.norm(x)                                                        # (B, T, C)
        return x if return_hidden else self.lm_head(x)                          # (B, T, V)

    def new_cache(self, batch_size: int, max_len: int, start: torch.Tensor | None = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg, batch_size, max_len, device=p.device, dtype=p.dtype, start=start)
