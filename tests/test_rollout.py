"""rollout.py: the KV-cache sampler against full recomputation, transformers' generate and the trainer."""
import socket

import pytest
import torch

import rollout
from checkpoint import load_pretrained
from model import KVCache, Transformer, preset
from rollout import generate, generate_naive, gathered_weights, sample, token_logprobs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine a busy core
    stalls every multi-threaded op; one thread keeps this file's run time steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16, 17, 18]]  # ragged


def toy(seed=0, vocab=50):
    """A tiny random fp32 model; init_std 0.1 (not 0.02) so greedy outputs do not collapse to one token."""
    torch.manual_seed(seed)
    return Transformer(preset("toy", vocab_size=vocab, num_layers=2, init_std=0.1)).eval()


# --- the cache changes nothing but speed -------------------------------------------------------

@pytest.mark.parametrize("eos", [None, [7, 13]])
def test_greedy_cache_equals_full_recompute(eos, monkeypatch):
    m = toy()
    selects = []
    real_select = KVCache.select
    monkeypatch.setattr(KVCache, "select", lambda self, idx: selects.append(len(idx)) or real_select(self, idx))
    fast = generate(m, PROMPTS, 12, temperature=0, num_samples=2, eos_token_id=eos)
    slow = generate_naive(m, PROMPTS, 12, temperature=0, num_samples=2, eos_token_id=eos)
    assert fast.tokens == slow.tokens
    assert fast.finish_reasons == slow.finish_reasons
    if eos:  # rows end at steps 2, 2, 8 and never: the batch is compacted twice, 8 -> 4 -> 2 rows
        assert fast.finish_reasons[::2] == ["eos", "eos", "eos", "length"]
        assert selects == [4, 2]  # the first copies the shared prompt slots into the rows it keeps
    assert (fast.old_logprobs - slow.old_logprobs).abs().max().item() < 1e-5


def test_sampling_cache_equals_full_recompute_same_seed():
    # no EOS: no compaction, so both consume the generator in the same (N, V) shapes
    m = toy(1)
    fast = generate(m, PROMPTS, 10, temperature=0.8, top_p=0.9, top_k=20, num_samples=3, seed=7)
    slow = generate_naive(m, PROMPTS, 10, temperature=0.8, top_p=0.9, top_k=20, num_samples=3, seed=7)
    assert fast.tokens == slow.tokens


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=1e6, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    ref = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.eval().save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    ours_out = generate(ours, PROMPTS, 10, temperature=0)
    for i, p in enumerate(PROMPTS):  # transformers, one unpadded prompt at a time
        out = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           do_sample=False, max_new_tokens=10, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True)
        assert ours_out.tokens[i] == out.sequences[0, len(p):].tolist()
        hf_lp = torch.stack([lg[0].float().log_softmax(-1)[t] for lg, t in zip(out.logits, ours_out.tokens[i])])
        assert (hf_lp - torch.tensor(ours_out.logprobs[i])).abs().max().item() < 1e-4


# --- what the trainer sees ---------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_sampler_logprobs_equal_trainer_logprobs(temperature):
    m = toy(2)
    r = generate(m, PROMPTS, 9, temperature=temperature, top_p=0.95, num_samples=3, eos_token_id=[3, 5], seed=0)
    with torch.no_grad():
        logits = m(r.input_ids, kv_start=r.kv_start)                 # the trainer's forward
    lp = token_logprobs(logits, r.input_ids, temperature)            # (N, Tp + Tc)
    assert lp.shape == r.old_logprobs.shape
    assert (lp - r.old_logprobs).mul(r.completion_mask).abs().max().item() < 1e-4
    assert (r.old_logprobs * (1 - r.completion_mask)).abs().max().item() == 0


def test_rollout_layout():
    G = 3
    r = generate(toy(), PROMPTS, 6, num_samples=G, eos_token_id=[3, 5], seed=1, pad_token_id=49)
    N, Tp = len(PROMPTS) * G, max(map(len, PROMPTS))
    Tc = max(map(len, r.tokens))
    assert len(r.tokens) == len(r.logprobs) == len(r.finish_reasons) == N
    assert r.input_ids.shape == r.completion_mask.shape == r.old_logprobs.shape == (N, Tp + Tc)
    assert r.prompt_len == Tp and r.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(G)]
    for n in range(N):
        p, c, pad = PROMPTS[n // G], r.tokens[n], Tp - len(PROMPTS[n // G])
        assert r.kv_start[n] == pad and r.lengths[n] == len(c) == len(r.logprobs[n])
        assert r.input_ids[n].tolist() == [49] * pad + p + c + [49] * (Tc - len(c))  # sample j of prompt i at i*G+j
        assert r.completion_mask[n].tolist() == [0.0] * Tp + [1.0] * len(c) + [0.0] * (Tc - len(c))
        assert r.old_logprobs[n, Tp:Tp + len(c)].tolist() == pytest.approx(r.logprobs[n])


def test_token_logprobs_chunks_and_gradient(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(3, 11, 7, requires_grad=True)
    ids = torch.randint(0, 7, (3, 11))
    lp = (logits[:, :-1] / 0.5).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (3, 10)
    want = torch.cat([torch.zeros(3, 1), lp], 1)                                         # (3, 11)
    monkeypatch.setattr(rollout, "_LOGPROB_CHUNK_ELEMS", 3 * 7 * 4)  # 4 positions per chunk
    got = token_logprobs(logits, ids, 0.5)
    assert torch.allclose(got, want, atol=1e-6)
    g_got, = torch.autograd.grad(got.sum(), logits)
    g_want, = torch.autograd.grad(want.sum(), logits)
    assert torch.allclose(g_got, g_want, atol=1e-6)


# --- sampling ----------------------------------------------------------------------------------

def test_same_seed_same_rollout():
    m = toy(3)
    kw = dict(temperature=1.0, num_samples=4, eos_token_id=[3, 5, 7], top_p=0.9)
    a, b = generate(m, PROMPTS, 8, seed=5, **kw), generate(m, PROMPTS, 8, seed=5, **kw)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert generate(m, PROMPTS, 8, seed=6, **kw).tokens != a.tokens
    torch.manual_seed(9)
    c = generate(m, PROMPTS, 8, **kw)
    torch.manual_seed(9)
    assert generate(m, PROMPTS, 8, **kw).tokens == c.tokens  # seed=None follows torch.manual_seed


def test_sampling_frequencies_match_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]).expand(40000, 6)  # one row, 40000 draws
    g = torch.Generator().manual_seed(0)
    tok, lp = sample(logits, temperature=1.3, generator=g)
    probs = (logits[0] / 1.3).softmax(-1)
    freq = torch.bincount(tok, minlength=6).float() / len(tok)
    assert (freq - probs).abs().max().item() < 0.01
    assert torch.allclose(lp, probs.log()[tok], atol=1e-6)  # logprobs under the tempered distribution


def one_level_inverse_cdf(weights, u01):
    """The plain inverse CDF in float64: first token whose prefix sum exceeds u * total."""
    cdf = weights.double().cumsum(-1)                                   # (B, V)
    u = torch.minimum(u01 * cdf[:, -1:], torch.nextafter(cdf[:, -1:], torch.zeros(1, dtype=cdf.dtype)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


@pytest.mark.parametrize("V", [7, 128, 300, 2048, 2049])
def test_two_level_inverse_cdf_equals_the_one_level_draw(V):
    """Same uniforms, same tokens as one prefix sum over the whole vocabulary, for vocabularies
    smaller than, equal to and not a multiple of the block; zero-weight tokens are never drawn."""
    g = torch.Generator().manual_seed(V)
    w = torch.rand(512, V, generator=g) ** 6                            # (B, V) a wide range of weights
    w[:, ::3] = 0                                                       # zero-weight tokens
    w[0] = 0
    w[0, V - 1] = 1e-30                                                 # the only token is the last
    w[1] = 0
    w[1, 0] = 1.0                                                       # the only token is the first
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    tok = rollout._inverse_cdf(w, g1)                                   # (B,)
    ref = one_level_inverse_cdf(w, torch.rand(512, 1, generator=g2, dtype=torch.float64))
    assert torch.equal(tok, ref)
    assert (w.gather(1, tok[:, None]) > 0).all()
    assert tok[0] == V - 1 and tok[1] == 0


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.5), (1, 1.0)])
def test_top_k_top_p_never_leave_their_set(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(64, 100) * 2
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        tok, lp = sample(logits, temperature=0.9, top_k=top_k, top_p=top_p, generator=g)
        for row, t in zip(logits, tok.tolist()):
            order = (row / 0.9).argsort(descending=True)
            probs = (row / 0.9).softmax(-1)[order]
            k = top_k or len(row)
            probs = probs[:k] / probs[:k].sum()
            n = int(((probs.cumsum(0) - probs) < top_p).sum())  # smallest prefix reaching top_p
            assert t in order[:min(k, n)].tolist()
        assert torch.allclose(lp, (logits / 0.9).log_softmax(-1).gather(-1, tok[:, None])[:, 0], atol=1e-6)


def test_top_k_1_and_tiny_top_p_rollouts_are_greedy():
    m = toy(7)
    greedy = generate(m, PROMPTS, 8, temperature=0, num_samples=2).tokens
    assert generate(m, PROMPTS, 8, top_k=1, num_samples=2, seed=0).tokens == greedy
    assert generate(m, PROMPTS, 8, top_p=1e-6, num_samples=2, seed=1).tokens == greedy


def test_greedy_is_argmax():
    logits = torch.randn(5, 30)
    tok, lp = sample(logits, temperature=0)
    assert tok.tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(lp, logits.log_softmax(-1).max(-1).values)


# --- ending a sample ---------------------------------------------------------------------------

@pytest.mark.parametrize("as_list", [False, True])
def test_eos_ends_a_sample(as_list):
    m = toy(4)
    free = generate(m, PROMPTS, 12, temperature=0)
    row = free.tokens[1]
    k = next(i for i in range(2, 12) if row[i] not in row[:i])  # an id whose first occurrence is at i
    eos = [row[k], 49] if as_list else row[k]
    r = generate(m, PROMPTS, 12, temperature=0, eos_token_id=eos)
    assert r.tokens[1] == row[:k + 1] and r.finish_reasons[1] == "eos"  # EOS kept as the last token
    for full, got, why in zip(free.tokens, r.tokens, r.finish_reasons):
        cut = next((i for i, t in enumerate(full) if t == row[k]), None)
        assert got == (full if cut is None else full[:cut + 1])
        assert why == ("length" if cut is None else "eos")


def test_decode_loop_runs_on_one_thread_and_restores_the_count(monkeypatch):
    """The decode loop runs inside kernels.cpu_decode's block (one thread for its small ops) and the
    caller's thread count is back after generate returns, or raises mid-loop."""
    m, seen = toy(), []
    real_sample = rollout.sample

    def spy(*args, **kw):  # called once per decode step, inside the loop
        seen.append(torch.get_num_threads())
        if len(seen) == 3:
            raise RuntimeError("sampling failed")
        return real_sample(*args, **kw)

    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(rollout, "sample", spy)
        with pytest.raises(RuntimeError, match="sampling failed"):
            generate(m, PROMPTS, 5, num_samples=2)
        after = torch.get_num_threads()
        monkeypatch.setattr(rollout, "sample", real_sample)
        generate(m, PROMPTS, 3, num_samples=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert seen == [1] * 3 and after == 2


@pytest.mark.parametrize("n", [1, 5])
def test_max_new_tokens_is_respected(n):
    r = generate(toy(), PROMPTS, n, num_samples=2, seed=0)
    assert [len(t) for t in r.tokens] == [n] * 8 and set(r.finish_reasons) == {"length"}
    r = generate(toy(), PROMPTS, n, num_samples=2, seed=0, eos_token_id=[1, 2, 3, 4, 5, 6, 7, 8])
    assert max(len(t) for t in r.tokens) <= n


# --- bad input: one clear error each ------------------------------------------------------------

@pytest.mark.parametrize("prompts,kw,match", [
    ([], {}, "prompts is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1] * 300], {}, "longer than the model's context"),
    ([[1] * 250], {"max_new_tokens": 10}, "exceeds the model's context"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens=0"),
    ([[1, 50]], {}, "token id 50 is outside the vocabulary"),
    ([[1, -1]], {}, "token id -1 is outside the vocabulary"),
    ([[1.5]], {}, "integer token ids"),
    ("hello", {}, "list of token-id lists"),
    ([[1]], {"top_p": 0.0}, "top_p"),
    ([[1]], {"num_samples": 0}, "num_samples"),
    ([[1]], {"eos_token_id": 99}, "eos_token_id"),
])
def test_bad_input_gives_a_clear_error(prompts, kw, match):
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=match):
        generate(toy(), prompts, **kw)


# --- FSDP2 --------------------------------------------------------------------------------------

def test_fsdp2_rollout_equals_unsharded_and_gathers_once(monkeypatch):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch built without distributed/gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.tensor import DTensor

    m = toy(6)
    kw = dict(num_samples=2, seed=3, eos_token_id=[3, 7, 9], top_p=0.9)
    want = generate(m, PROMPTS, 8, **kw)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        mesh = init_device_mesh("cpu", (1,))
        for block in m.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(m, mesh=mesh)
        gathers = []
        real_unshard = FSDPParamGroup.unshard

        def counting_unshard(self, *a, **k):
            if not self.is_unsharded and self._all_gather_result is None:
                gathers.append(self)
            return real_unshard(self, *a, **k)

        monkeypatch.setattr(FSDPParamGroup, "unshard", counting_unshard)
        settings = [g.post_forward_mesh_info for b in (*m.layers, m) for g in b._get_fsdp_state()._fsdp_param_groups]
        got = generate(m, PROMPTS, 8, **kw)
        assert settings == [g.post_forward_mesh_info for b in (*m.layers, m)
                            for g in b._get_fsdp_state()._fsdp_param_groups]  # reshard setting restored
        assert got.tokens == want.tokens
        assert len(gathers) == len(m.layers) + 1  # once per FSDP module per rollout, not per token
        assert isinstance(m.lm_head.weight, DTensor)  # resharded afterwards
        # and the trainer can run forward + backward on what came back
        lp = token_logprobs(m(got.input_ids, kv_start=got.kv_start), got.input_ids)
        assert (lp - got.old_logprobs).mul(got.completion_mask).abs().max().item() < 1e-4
        lp.sum().backward()
        assert m.layers[0].mlp.gate_up_proj.weight.grad is not None
        gathers.clear()
        with gathered_weights(m):  # as the trainer uses it: several rollouts under one gather
            assert not isinstance(m.lm_head.weight, DTensor)
            assert generate(m, PROMPTS, 8, **kw).tokens == want.tokens
            generate(m, PROMPTS, 3, temperature=0)
        assert len(gathers) == len(m.layers) + 1 and isinstance(m.lm_head.weight, DTensor)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("switches", [[], ["--linear", "mkl", "--decode-threads", "all"]])
def test_bench_rollout_smoke(switches, capsys):
    pytest.importorskip("transformers")
    import bench
    from kernels import cpu_decode
    bench.main(["rollout", "--prompts", "2", "--samples", "2", "--new-tokens", "3", "--repeats", "1", "--no-naive",
                *switches])
    out = capsys.readouterr().out
    assert "transformers generate" in out and "batch scaling" in out and "machine:" in out
    assert ("--linear mkl --decode-threads all" in out) == bool(switches)
    assert cpu_decode.ONEDNN and cpu_decode.SERIAL  # the flags' settings do not outlive the benchmark



def test_bench_linear_smoke(capsys):
    import bench
    bench.main(["linear", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "machine:" in out and "lm_head" in out and "(64, 256) x (256, 2048)" in out and "oneDNN path taken" in out

def test_concat_groups_keeps_the_layout_generate_returns():
    """Dynamic sampling's regrouping (rollout.concat_groups) rebuilds exactly generate()'s tensors."""
    from rollout import concat_groups
    torch.manual_seed(3)
    m = Transformer(preset("toy", vocab_size=50, num_layers=2)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
    roll = generate(m, prompts, 6, num_samples=2, eos_token_id=7, seed=0)
    same = concat_groups([(roll, [0, 1, 2, 3])], 2, 0)
    for name in ("input_ids", "kv_start", "completion_mask", "old_logprobs", "prompt_index", "lengths"):
        assert torch.equal(getattr(same, name), getattr(roll, name)), name
    assert same.tokens == roll.tokens and same.finish_reasons == roll.finish_reasons
    part = concat_groups([(roll, [2]), (roll, [0])], 2, 0)
    assert part.tokens == roll.tokens[4:6] + roll.tokens[0:2]
    assert part.input_ids[0, part.kv_start[0]:part.prompt_len].tolist() == prompts[2]


def test_derive_seed_names_every_stream_apart():
    seeds = {rollout.derive_seed(0, "rollout", step, rank) for step in range(200) for rank in range(4)}
    seeds |= {rollout.derive_seed(s, name) for s in range(50) for name in ("sft", "rs", "distill", "epoch")}
    assert len(seeds) == 200 * 4 + 50 * 4  # no two named streams share a seed
    assert rollout.derive_seed(3, "rs") == rollout.derive_seed(3, "rs")  # the same on every run and machine
    assert all(0 <= s < 2 ** 63 for s in seeds)
    torch.Generator().manual_seed(max(seeds))


def test_token_entropy_matches_a_per_position_loop():
    """rollout.token_entropy against -sum p log p written out for each masked position."""
    from rollout import token_entropy
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g) * 3
    mask = torch.zeros(3, 6)
    mask[0, 2:5] = 1
    mask[2, 1:6] = 1
    for temperature in (1.0, 0.7):
        got = token_entropy(logits, mask, temperature)
        want = torch.zeros(3, 6)
        for i in range(3):
            for t in range(1, 6):
                if mask[i, t]:
                    p = torch.softmax(logits[i, t - 1].double() / temperature, -1)
                    want[i, t] = float(-(p * p.log()).sum())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_are_a_clear_error(temperature):
    """A blown-up model's NaN logits: one clear error, not an IndexError deep in the inverse CDF."""
    logits = torch.randn(3, 300)
    logits[1, 5] = float("nan")
    with pytest.raises(rollout.NonFiniteLogits, match="NaN or inf"):
        sample(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    m = toy()
    with torch.no_grad():
        m.lm_head.weight.fill_(float("inf"))
    with pytest.raises(rollout.NonFiniteLogits):
        generate(m, PROMPTS, 4, temperature=temperature, num_samples=2, seed=0)


def test_a_prompts_samples_depend_on_its_own_seed_only():
    """Per-prompt streams: prompt i's samples are the same alone or in a batch with others, given its
    seed; this is what lets ranks that hold different prompts sample what one process does."""
    m = toy(4)
    kw = dict(temperature=1.0, num_samples=3, eos_token_id=[3, 5])
    both = generate(m, PROMPTS[:2], 8, seed=[11, 12], **kw)
    alone = generate(m, PROMPTS[1:2], 8, seed=[12], **kw)
    assert both.tokens[3:] == alone.tokens
    assert generate(m, PROMPTS[:2], 8, seed=[11, 13], **kw).tokens[:3] == both.tokens[:3]
