"""gguf_convert: tiny random Llama and Qwen2 models written as GGUF files (llama.cpp's layout: q/k rows
permuted for Llama, quantised tensors), converted back, and checked against the original weights and
against transformers' own GGUF loader."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[real]')")
transformers = pytest.importorskip("transformers")

import gguf_convert  # noqa: E402
from checkpoint import load_pretrained  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_vocab():
    """A byte-level BPE vocabulary: the specials, the 256 byte symbols, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    symbols = list(bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "Ġ t", "Ġt h", "1 2"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = SPECIALS + symbols + merged
    types = [gguf_convert.CONTROL] * len(SPECIALS) + [gguf_convert.NORMAL] * (len(symbols) + len(merged))
    return tokens, types, merges


def hf_model(arch: str, vocab: int):
    torch.manual_seed(0)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=(arch == "llama"))
    cfg = (transformers.LlamaConfig(**kw) if arch == "llama"
           else transformers.Qwen2Config(**kw, use_sliding_window=False))
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them random, so a swapped norm shows
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in n else 0.0))
    return m


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), the transform gguf_convert undoes."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {v: k for k, v in gguf_convert.LAYER_NAMES.items()}


def write_gguf(path: Path, arch: str, model, qtype, pre: str = "smollm") -> None:
    """`model`'s weights as llama.cpp writes them; 2-D weights as `qtype`, norms and biases F32."""
    tokens, types, merges = byte_vocab()
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().float().numpy()
        if arch == "llama" and "q_proj" in name:
            a = permute(a, c.num_attention_heads)
        elif arch == "llama" and "k_proj" in name:
            a = permute(a, c.num_key_value_heads)
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            gname = f"blk.{i}.{GGUF_NAMES['.'.join(rest[:-1])]}.{rest[-1]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gname, a.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CASES = [("llama", Q.F32), ("llama", Q.Q4_1), ("llama", Q.BF16), ("qwen2", Q.F16), ("qwen2", Q.Q8_0),
         ("qwen2", Q.Q4_0)]


@pytest.mark.parametrize("arch,qtype", CASES, ids=[f"{a}-{q.name}" for a, q in CASES])
def test_convert_matches_transformers_gguf_loader(tmp_path, arch, qtype):
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    tokens, _, _ = byte_vocab()
    orig = hf_model(arch, len(tokens))
    write_gguf(tmp_path / "m.gguf", arch, orig, qtype)
    out = gguf_convert.convert(tmp_path / "m.gguf", tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                            dtype=torch.float32).eval()
    from safetensors.torch import load_file
    mine, theirs = load_file(str(out / "model.safetensors")), ref.state_dict()
    assert set(mine) <= set(theirs)
    for k, v in mine.items():  # the same dequantised values, q/k rows in the same order
        assert torch.equal(v, theirs[k]), k
    if qtype == Q.F32:  # lossless: exactly the original weights (the permutation undone)
        for k, v in mine.items():
            assert torch.equal(v, orig.state_dict()[k]), k
    ids = torch.randint(0, len(tokens), (2, 12))
    ours = load_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
        if qtype == Q.F32:
            torch.testing.assert_close(ours(ids), orig(ids).logits, rtol=1e-4, atol=1e-4)


def test_tokenizer_files(tmp_path):
    """The rebuilt tokenizer: specials whole, merges applied, digits split (SmolLM's pre-tokenizer),
    the chat template and eos/bos carried; transformers' AutoTokenizer reads the same ids."""
    tokens, _, _ = byte_vocab()
    write_gguf(tmp_path / "m.gguf", "qwen2", hf_model("qwen2", len(tokens)), Q.F32)
    out = gguf_convert.convert(tmp_path / "m.gguf", tmp_path / "hf")
    tok = Tokenizer.from_dir(out)
    assert tok.eos_ids == [2] and tok.bos_id == 1 and not tok.add_bos and tok.chat_template == TEMPLATE
    text = "hello 12 th<|im_end|>"
    ids = tok.encode(text)
    assert ids[-1] == 2 and tokens.index("hell") in ids and tokens.index("Ġth") in ids
    assert tokens.index("12") not in ids  # smollm: every digit its own piece, so the "1 2" merge never applies
    assert tok.decode(ids) == text
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto.encode(text, add_special_tokens=False) == ids
    assert auto.encode(text) == ids


def test_qwen2_pre_tokenizer_keeps_digit_merges_apart(tmp_path):
    """Another `tokenizer.ggml.pre` gives another split: Qwen2's regex also takes digits one by one,
    GPT-2's ("default") keeps them together so the "1 2" merge applies."""
    tokens, _, _ = byte_vocab()
    m = hf_model("qwen2", len(tokens))
    write_gguf(tmp_path / "a.gguf", "qwen2", m, Q.F32, pre="default")
    tok = Tokenizer.from_dir(gguf_convert.convert(tmp_path / "a.gguf", tmp_path / "a"))
    assert tokens.index("12") in tok.encode("x 12")
    write_gguf(tmp_path / "b.gguf", "qwen2", m, Q.F32, pre="qwen2")
    tok = Tokenizer.from_dir(gguf_convert.convert(tmp_path / "b.gguf", tmp_path / "b"))
    assert tokens.index("12") not in tok.encode("x 12")


def test_unsupported_files_fail_with_one_line(tmp_path):
    tokens, _, _ = byte_vocab()
    write_gguf(tmp_path / "m.gguf", "llama", hf_model("llama", len(tokens)), Q.F32, pre="no-such-pre")
    with pytest.raises(gguf_convert.ConvertError, match="pre-tokenizer 'no-such-pre'"):
        gguf_convert.convert(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(FileNotFoundError, match="not found"):
        gguf_convert.convert(tmp_path / "missing.gguf", tmp_path / "out")
    r = subprocess.run([sys.executable, str(ROOT / "gguf_convert.py"), str(tmp_path / "m.gguf"), str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    assert np.array_equal(gguf_convert.unpermute(permute(w, 4), 4), w)
    b = np.arange(2 * 8, dtype=np.float32)
    assert np.array_equal(gguf_convert.unpermute(permute(b, 2), 2), b)


def test_find_smollm2():
    pytest.importorskip("importlib.metadata")
    try:
        path = gguf_convert.find_smollm2()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert path.is_file() and path.name == gguf_convert.SMOLLM2_FILE
