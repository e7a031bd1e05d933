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
Checkpoints are read and written in the Hugging Face layout (config.json, *.safetensors, optional
model.safetensors.index.json) and the same tensor names, so the
transformers library and other HF-layout tools load what we save and we load what they save.
The one renaming: q/k/v and gate/up projections are stored fused (`qkv_proj`, `gate_up_proj`, one
matmul each instead of three and two; see `FUSED`) and split or stacked on save and load.

Shape legend (used in every comment of this project):
    B batch, T time (tokens in this call), S cache slots (keys visible), H query heads,
    Hkv key/value heads, D head dim, C hidden size (H * D need not equal C in Qwen3), V vocab.

Departures from the reference implementations:
- Ragged batches are left-padded; `kv_start[b]` is the first real slot of row b. Rotary
  positions are counted from it, so a left-padded prompt gets the same positions (and logits)
  as the same prompt alone. The reference uses an attention mask plus explicit position ids.
- Qwen2's sliding-window attention (`use_sliding_window: true`) is not implemented; such a
  checkpoint is refused with an error. Dropout is not implemented (R1 training uses none).
- Llama-3 rope scaling is the only scaling type; others (yarn, dynamic, linear) are refused.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention, padding_mask, prefix_attention

# --- config -----------------------------------------------------------------------------------


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
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; use one of {sorted(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

    # -- HF config.json <-> ModelConfig
    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        mt = cfg.get("model_type")
        if mt not in ARCHITECTURES:
            raise ValueError(f"{source}: model_type {mt!r} is not supported; this project loads "
                             f"{', '.join(sorted(ARCHITECTURES))} checkpoints")
        if cfg.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported; set it to false "
                             "(Qwen2.5 checkpoints ship with it off)")
        # transformers>=5 writes rope_parameters; older checkpoints write rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ValueError(f"{source}: rope scaling {kind!r} is not supported; only 'llama3' is")
            else:
                scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
            raise ValueError(f"{source}: only SiLU MLPs without bias are supported")
        qkv_bias = True if mt == "qwen2" else bool(cfg.get("attention_bias", False))
        return cls(
            model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"), max_seq_len=cfg.get("max_position_embeddings", 2048),
            rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            qkv_bias=qkv_bias, qk_norm=(mt == "qwen3"),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"), init_std=cfg.get("initializer_range", 0.02),
        )

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        cfg = {
            "architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu", "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": self.init_std, "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "use_cache": True,
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "llama":
            cfg.update(attention_bias=self.qkv_bias, mlp_bias=False)
        if self.model_type == "qwen3":
            cfg.update(attention_bias=self.qkv_bias)
        if self.model_type in ("qwen2", "qwen3"):
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
        return cfg


ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
MODEL_TYPES = tuple(ARCHITECTURES)

# Named presets. "toy" is the embedded default (about 0.8M parameters with the toy's ~60-token
# vocabulary); the others are the published shapes, for building a model to load weights into.
PRESETS: dict[str, dict] = {
    "toy": dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_layers=4,
                num_heads=4, num_kv_heads=2, max_seq_len=256, rope_theta=10000.0),
    # the distillation student (R1 section 2.4's smaller dense model): half the width and layers
    # of "toy", the same head size, about 1/7 of its parameters
    "toy-small": dict(model_type="qwen2", hidden_size=64, intermediate_size=192, num_layers=2,
                      num_heads=2, num_kv_heads=1, max_seq_len=256, rope_theta=10000.0, qkv_bias=True),
    # for tests: the same family at a size where every stage runs in a second or two
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
        # (see FUSED). One (B*T, C) x (C, (H + 2Hkv) D) product instead of three small ones.
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
    gate_up_proj are [gate_proj; up_proj] (see FUSED)."""

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
    projections; `hf_parts` maps each state-dict tensor onto the checkpoint's."""

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

    # -- checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu") -> "Transformer":
        """Load an HF-layout directory: config.json plus model.safetensors or shards + index."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist; pass a directory "
                                    "with config.json and *.safetensors")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found; an HF-layout checkpoint needs config.json")
        cfg = ModelConfig.from_hf(json.loads(cfg_file.read_text()), source=str(cfg_file))
        with torch.device("meta"):
            model = cls(cfg)
        tensors = read_safetensors(path)
        state = {}
        expected = {k: v for k, v in model.state_dict().items()}
        for name, ref in expected.items():
            parts = hf_parts(name, cfg)  # [(HF tensor, rows)]: several for a fused projection
            if name == "lm_head.weight" and cfg.tie_embeddings and parts[0][0] not in tensors:
                continue
            pieces = []
            for hf, rows in parts:
                if hf not in tensors:
                    raise ValueError(f"{path}: tensor {hf} is missing from the checkpoint; "
                                     f"is it a complete {cfg.model_type} checkpoint?")
                t = tensors.pop(hf)
                want = tuple(ref.shape) if rows is None else (rows, *ref.shape[1:])
                if tuple(t.shape) != want:
                    raise ValueError(f"{path}: tensor {hf} has shape {tuple(t.shape)}, config.json implies "
                                     f"{want}; config and weights disagree")
                pieces.append(t)
            state[name] = torch.cat(pieces).to(dtype) if len(pieces) > 1 else pieces[0].to(dtype)
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway
        stray = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
        if stray:
            raise ValueError(f"{path}: unexpected tensor {stray[0]} (+{len(stray) - 1} more); "
                             f"the weights do not match a {cfg.model_type} model")
        model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_frequencies(cfg)
        return model.to(device)

    def save_pretrained(self, path, tokenizer=None, max_shard_bytes: int = 4 << 30) -> None:
        """Write config.json, generation_config.json, safetensors (sharded above max_shard_bytes)
        and the tokenizer files, atomically: into a temporary sibling directory that then takes
        the place of `path`, so a crash never leaves a half-written checkpoint where a good one was."""
        from safetensors.torch import save_file
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {}
        for name, v in self.state_dict().items():
            if name == "lm_head.weight" and self.cfg.tie_embeddings:
                continue
            parts = hf_parts(name, self.cfg)
            chunks = v.detach().cpu().split([rows for _, rows in parts]) if len(parts) > 1 else [v.detach().cpu()]
            state.update({hf: c.contiguous() for (hf, _), c in zip(parts, chunks)})
        dtype = next(iter(state.values())).dtype
        shards, cur, size = [], {}, 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        cfg = self.cfg
        if tokenizer is not None:
            tokenizer.save(tmp)
            cfg = ModelConfig(**{**asdict(cfg), "eos_token_id": tokenizer.eos_id,
                                 "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id})
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2) + "\n")
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
               "pad_token_id": cfg.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        replace_dir(tmp, path)


# Fused projections and the HF tensors they stack along dim 0, in this order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def hf_parts(name: str, cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Our state-dict name -> [(HF checkpoint tensor name, rows along dim 0)]. One entry with rows
    None for a plain tensor; one entry per stacked HF tensor for a fused projection."""
    prefix = "" if name.startswith("lm_head.") else "model."
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            layer, kind = name.split(f".{fused}.")  # "layers.3", "weight" or "bias"
            D, I = cfg.head_dim, cfg.intermediate_size
            rows = ((cfg.num_heads * D, cfg.num_kv_heads * D, cfg.num_kv_heads * D) if fused.endswith("qkv_proj")
                    else (I, I))
            return [(f"{prefix}{layer}.{p}.{kind}", n) for p, n in zip(parts, rows)]
    return [(prefix + name, None)]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded (index.json) safetensors checkpoint."""
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json; "
                                "save the weights in safetensors format (save_pretrained does)")
    out = {}
    for f in files:
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} is listed in the index but missing; re-download the shard")
        out.update(load_file(str(path / f)))
    return out


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory src to dst, replacing dst; dst is whole before and after, never half-written."""
    old = dst.with_name(dst.name + f".old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
