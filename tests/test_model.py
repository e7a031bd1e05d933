"""model.py against transformers (the reference), on tiny random checkpoints transformers writes."""
import json
import os

import pytest
import torch

from checkpoint import config_from_hf, load_pretrained, save_pretrained
from model import Transformer, preset

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def hf_model(family: str, **extra):
    """A random tiny HF model of one family (weights perturbed so biases and norms are not trivial)."""
    torch.manual_seed(0)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**TINY, rope_theta=1e6, **extra)
        m = transformers.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**TINY, head_dim=32, **extra)  # head_dim != hidden/heads
        m = transformers.Qwen3ForCausalLM(cfg)
    else:
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        cfg = transformers.LlamaConfig(**TINY, rope_scaling=scaling, rope_theta=500000.0, **extra)
        m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def hf_logits(m, ids, attention_mask=None):
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("family,extra", [("qwen2", {}), ("qwen3", {}), ("llama", {}),
                                          ("qwen2", {"tie_word_embeddings": True})])
@pytest.mark.parametrize("sharded", [False, True])
def test_logits_match_transformers(tmp_path, family, extra, sharded):
    ref = hf_model(family, **extra)
    ref.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_pretrained(tmp_path).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))  # past original_max_position_embeddings=16
    with torch.no_grad():
        got = ours(ids)
    assert got.shape == (2, 40, TINY["vocab_size"])
    assert (got - hf_logits(ref, ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_save_pretrained_roundtrip_through_transformers(tmp_path, family):
    ref = hf_model(family)
    ref.save_pretrained(tmp_path / "a")
    ours = load_pretrained(tmp_path / "a")
    save_pretrained(ours, tmp_path / "b", max_shard_bytes=30_000)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["architectures"][0].lower().startswith(family)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 33))
    assert (hf_logits(back, ids) - hf_logits(ref, ids)).abs().max().item() < 1e-5
    again = load_pretrained(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    assert not any(p.name.startswith("b.") for p in tmp_path.iterdir())  # no temp dirs left


def test_left_padding_matches_unpadded_and_transformers(tmp_path):
    ref = hf_model("qwen2")
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    ids = torch.randint(0, TINY["vocab_size"], (3, 12))
    start = torch.tensor([0, 5, 9])
    mask = (torch.arange(12)[None] >= start[:, None]).long()
    with torch.no_grad():
        got = ours(ids, kv_start=start)
        want = hf_logits(ref, ids, attention_mask=mask)
        for b in range(3):
            alone = ours(ids[b:b + 1, start[b]:])
            assert (got[b, start[b]:] - alone[0]).abs().max().item() < 1e-4
            assert (got[b, start[b]:] - want[b, start[b]:]).abs().max().item() < 1e-4
    assert torch.isfinite(got).all()


def test_kv_cache_prefill_then_decode_equals_full_forward():
    torch.manual_seed(1)
    m = Transformer(preset("toy", vocab_size=50, num_layers=2)).eval()
    ids = torch.randint(0, 50, (2, 20))
    start = torch.tensor([0, 3])
    with torch.no_grad():
        full = m(ids, kv_start=start)                    # (B, T, V)
        cache = m.new_cache(2, 32, start=start)
        parts = [m(ids[:, :11], cache=cache)]            # prefill
        for t in range(11, 16):                          # decode one token at a time
            parts.append(m(ids[:, t:t + 1], cache=cache))
        parts.append(m(ids[:, 16:], cache=cache))        # a chunk appended to the cache
    assert cache.length == 20
    assert (torch.cat(parts, 1) - full)[1:, 3:].abs().max().item() < 1e-5
    assert (torch.cat(parts, 1) - full)[0].abs().max().item() < 1e-5


def test_cache_select_shares_prefill():
    torch.manual_seed(2)
    m = Transformer(preset("toy", vocab_size=50, num_layers=2)).eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        cache = m.new_cache(2, 16)
        m(ids, cache=cache)
        big = cache.select(torch.tensor([0, 0, 1, 1]))
        nxt = torch.randint(0, 50, (4, 1))
        got = m(nxt, cache=big)[:, -1]
        want = m(torch.cat([ids.repeat_interleave(2, 0), nxt], 1))[:, -1]
    assert (got - want).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="overflow"):
        m(torch.zeros(4, 11, dtype=torch.long), cache=big)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_shared_prefix_cache_equals_copied_rows(family):
    """share_prefix (prompt slots stored once per group) decodes exactly like G real copies of the
    prefill, on ragged prompts, also after select() turns it back into a plain cache of some rows."""
    torch.manual_seed(3)
    m = Transformer(preset("toy", vocab_size=50, num_layers=2, qk_norm=family == "qwen3",
                           qkv_bias=family == "qwen2")).eval()
    P, G = 2, 3
    ids = torch.randint(0, 50, (P, 7))
    start = torch.tensor([0, 4])
    expand = torch.arange(P).repeat_interleave(G)
    with torch.no_grad():
        cache = m.new_cache(P, 16, start=start)
        m(ids, cache=cache)
        shared, copied = cache.share_prefix(G), cache.select(expand)
        for _ in range(3):                               # decode steps on both
            nxt = torch.randint(0, 50, (P * G, 1))
            got, want = m(nxt, cache=shared), m(nxt, cache=copied)
            assert (got - want).abs().max().item() < 1e-5
        keep = torch.tensor([1, 2, 5])                   # compaction: a plain cache of 3 rows
        shared, copied = shared.select(keep), copied.select(keep)
        assert shared.prefix_k is None
        nxt = torch.randint(0, 50, (3, 1))
        assert (m(nxt, cache=shared) - m(nxt, cache=copied)).abs().max().item() < 1e-5
    assert shared.length == copied.length == 11


def test_plain_model_never_calls_onednn(monkeypatch):
    """The model is plain torch: its linear layers are nn.Linear, and outside the sampler's
    `kernels.cpu_decode` block no forward (no-grad, training, with a KV cache) calls oneDNN's private
    matmul op; the CPU fast paths live in that one block."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(4)
    m = Transformer(preset("toy", vocab_size=50, num_layers=2)).eval()
    assert all(type(x) is torch.nn.Linear for x in m.modules() if isinstance(x, torch.nn.Linear))
    ids = torch.randint(0, 50, (4, 12))
    with torch.no_grad():
        m(ids, kv_start=torch.tensor([0, 2, 5, 0]))
        cache = m.new_cache(4, 16)
        m(ids, cache=cache)
        m(ids[:, :1], cache=cache)
    m(ids).sum().backward()
    assert calls == []


def test_presets_and_param_count():
    m = Transformer(preset("toy", vocab_size=64))
    assert 0.5e6 < m.num_params() < 1.5e6
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt5")
    for name in ("qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b"):
        assert preset(name).head_dim in (64, 128)


# --- bad checkpoints: each gives one clear line -----------------------------------------------

def _write_tiny(tmp_path, family="qwen2"):
    hf_model(family).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_error_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_error_missing_config(tmp_path):
    _write_tiny(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)


def test_error_missing_weights(tmp_path):
    _write_tiny(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_pretrained(tmp_path)


def test_error_unsupported_family(tmp_path):
    cfg = _write_tiny(tmp_path)
    cfg["model_type"] = "mixtral"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'mixtral' is not supported"):
        load_pretrained(tmp_path)


def test_error_misshaped_tensor(tmp_path):
    cfg = _write_tiny(tmp_path)
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape .* config and weights disagree"):
        load_pretrained(tmp_path)


def test_error_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    _write_tiny(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight is missing"):
        load_pretrained(tmp_path)


def test_error_unsupported_rope_scaling():
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
        config_from_hf({**{"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                                "intermediate_size": 8, "num_hidden_layers": 1,
                                "num_attention_heads": 2}, "rope_scaling": {"rope_type": "yarn", "factor": 2}})
