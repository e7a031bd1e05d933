"""A decoder-only transformer for the Qwen2/Qwen2.5, Qwen3 and Llama-3 families, from scratch.

One class reads all three families because they are one architecture with switches:
pre-norm blocks of RMSNorm (Zhang & Sennrich 2019) -> grouped-query attention (Ainslie et al. 2023)
with rotary position embeddings (Su et al. 2021) -> RMSNorm -> SwiGLU MLP (Shazeer 2020).
    Qwen2/Qwen2.5 : bias on q/k/v projections.
    Qwen3         : no bias; RMSNorm on each query and key head before RoPE; explicit head_dim.
    Llama-3       : no bias; `rope_scaling` of type "llama3" stretches the low rotary frequencies.
Attention runs through `kernels.attention` (our Triton FlashAttention-2 kernel on CUDA, torch's
SDPA elsewhere). Checkpoints are read and written in the Hugging Face layout (config.json,
*.safetensors, optional model.safetensors.index.json), with the same tensor names, so the
transformers library and other HF-layout tools load what we save and we load what they save.

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

from kernels import attention

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
    """cos, sin of shape (B, 1, T, D) for integer positions (B, T); halves layout as in HF."""
    ang = positions.float()[..., None] * inv_freq.to(positions.device)  # (B, T, D/2)
    ang = torch.cat([ang, ang], dim=-1)[:, None]                        # (B, 1, T, D)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the position's angle. x (B, h, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)                          # (B, h, T, D/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # (B, h, T, D)


# --- layers -----------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 whatever the activation dtype, then cast back (as the references do).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache:
    """Preallocated keys and values for a batch of B sequences, one buffer pair per layer.

    All rows share one write index `length` (slots filled so far); ragged prompts are left-padded
    and `start[b]` is the first real slot of row b, so row b's rotary position at slot s is
    s - start[b]. Buffers are (B, Hkv, max_len, D); a decode step writes one slot per row.
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

    @property
    def batch_size(self) -> int:
        return self.start.shape[0]

    def select(self, index: torch.Tensor) -> "KVCache":
        """A new cache holding rows `index` (B',) of this one: share one prefill across samples."""
        out = object.__new__(KVCache)
        out.k = [k.index_select(0, index) for k in self.k]  # (B', Hkv, S, D)
        out.v = [v.index_select(0, index) for v in self.v]
        out.max_len, out.length, out.start = self.max_len, self.length, self.start.index_select(0, index)
        return out

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at slots [length, length+T); return the filled (B, Hkv, S, D) views."""
        T = k.shape[2]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length}+{T} slots > max_len={self.max_len}")
        self.k[layer][:, :, self.length:self.length + T] = k
        self.v[layer][:, :, self.length:self.length + T] = v
        S = self.length + T
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S]  # (B, Hkv, S, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.H, self.Hkv, self.D = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.H * self.D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, self.Hkv * self.D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, self.Hkv * self.D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.H * self.D, C, bias=False)
        if cfg.qk_norm:  # Qwen3: normalise each head's q and k before the rotation
            self.q_norm = RMSNorm(self.D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, kv_start, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D)    # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.Hkv, self.D)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.Hkv, self.D)  # (B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)      # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)      # (B, Hkv, T, D)
        v = v.transpose(1, 2)                            # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)        # (B, Hkv, S, D), S = cached + T
        y = attention(q, k, v, causal=True, kv_start=kv_start)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.H * self.D)    # (B, T, H*D)
        return self.o_proj(y)                            # (B, T, C)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
    """Module names follow the HF checkpoints (without the leading "model."), so a state dict
    maps onto a checkpoint by adding or stripping that prefix."""

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
        cos, sin = rope_cos_sin(self.inv_freq, positions.expand(B, T), x.dtype)  # (B, 1, T, D)
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
            hf = hf_name(name)
            if hf not in tensors:
                if name == "lm_head.weight" and cfg.tie_embeddings:
                    continue
                raise ValueError(f"{path}: tensor {hf} is missing from the checkpoint; "
                                 f"is it a complete {cfg.model_type} checkpoint?")
            t = tensors.pop(hf)
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"{path}: tensor {hf} has shape {tuple(t.shape)}, config.json implies "
                                 f"{tuple(ref.shape)}; config and weights disagree")
            state[name] = t.to(dtype)
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
        state = {hf_name(k): v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if not (k == "lm_head.weight" and self.cfg.tie_embeddings)}
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


def hf_name(name: str) -> str:
    """Our state-dict name -> the HF checkpoint's tensor name."""
    return name if name.startswith("lm_head.") else "model." + name


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
