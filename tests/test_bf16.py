"""bfloat16 on CPU: every dtype path the GPU takes (`--dtype auto` is bf16 on CUDA), at micro size.

What runs in bf16 and what in float32 (model.py's docstring says the same):
- bf16: the weights, the activations between layers, the matmuls, the KV cache and the gradients.
  The optimizer steps float32 master copies of the weights with float32 moments (optim.MasterAdamW;
  see test_bf16_weights_step_through_float32_masters).
- float32: RMSNorm's normalisation, the rotary angles, attention's softmax (inside SDPA / our
  kernel), and everything after the logits: logprobs (sampler and trainer), the SFT and GRPO losses,
  the advantages. The logged gradient norm is torch's clip_grad_norm_ over bf16 gradients (per-tensor
  norms accumulated in float32, rounded to bf16: about 3 significant digits).

Tolerances: bf16 keeps 8 significant bits, a relative rounding error of at most 2^-9 = 0.2% per
operation. A 2-layer forward chains a few dozen such roundings, so bf16 logits land within a few
tenths of a percent of the float32 ones (measured 0.6% of the largest logit); the bounds below are
2% of the largest value, 3x-10x above what was measured and far below what a wrong dtype path gives
(a float32 value cast to bf16 before a long reduction, or a missing upcast, is off by whole percents
at least, or changes the output dtype, which the tests check directly).
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import grpo
import rollout
import sft
import train
from checkpoint import load_pretrained, save_pretrained
from model import RMSNorm, Transformer, preset, rope_frequencies
from optim import make_optimizer

BF16_EPS = 2.0 ** -8  # spacing of bf16 numbers in [1, 2): twice the largest relative rounding error
TINY = ["--model", "micro", "--eval_n", "4", "--eval_every", "0", "--prompts_per_step", "4",
        "--group_size", "4", "--max_new_tokens", "16", "--micro_batch", "8", "--batch_size", "8",
        "--threads", "1"]


def models(vocab=50, seed=0):
    """The same micro model in float32 and in bf16 (the bf16 weights are the float32 ones rounded)."""
    torch.manual_seed(seed)
    m32 = Transformer(preset("micro", vocab_size=vocab))
    m16 = Transformer(preset("micro", vocab_size=vocab))
    m16.load_state_dict(m32.state_dict())
    return m32, m16.to(torch.bfloat16)


def test_forward_and_backward_bf16_close_to_fp32():
    m32, m16 = models()
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids = torch.randint(0, 50, (3, 40), generator=torch.Generator().manual_seed(1))
    l32, l16 = m32(ids), m16(ids)  # (B, T, V)
    assert l16.dtype == torch.bfloat16
    assert (l16.float() - l32).abs().max() <= 0.02 * l32.abs().max()
    # the same scalar loss through both: log-sum-exp of the float32 logits (the losses' upcast)
    l32.float().logsumexp(-1).sum().backward()
    l16.float().logsumexp(-1).sum().backward()
    for (name, p32), p16 in zip(m32.named_parameters(), m16.parameters()):
        g32, g16 = p32.grad, p16.grad
        assert g16.dtype == torch.bfloat16, name
        # each gradient a sum over 120 tokens of bf16 products: measured <= 0.9% relative L2 error
        assert (g16.float() - g32).norm() <= 0.03 * g32.norm(), name
        assert F.cosine_similarity(g16.float().flatten(), g32.flatten(), dim=0) > 0.999, name


def test_rotary_frequencies_stay_fp32_through_a_dtype_cast():
    _, m16 = models()
    assert m16.inv_freq.dtype == torch.float32
    assert torch.equal(m16.inv_freq, rope_frequencies(m16.cfg))
    # far positions: with bf16 frequencies these angles would be off by radians
    cfg = preset("micro", vocab_size=50, max_seq_len=4096, rope_theta=1e6)
    torch.manual_seed(0)
    m32 = Transformer(cfg)
    m16 = Transformer(cfg)
    m16.load_state_dict(m32.state_dict())
    m16 = m16.to(torch.bfloat16)
    ids = torch.randint(0, 50, (1, 8))
    far = torch.tensor([-4000])  # kv_start < 0: positions start at 4000 (the model's arithmetic allows it)
    l32, l16 = m32(ids, kv_start=far), m16(ids, kv_start=far)
    assert (l16.float() - l32).abs().max() <= 0.02 * l32.abs().max()


def test_norm_and_logprobs_run_in_fp32(monkeypatch):
    """The float32 islands: RMSNorm normalises a float32 copy, and the logits are upcast before
    log_softmax in both the trainer's token_logprobs and the sampler's sample()."""
    seen = []
    rms = F.rms_norm

    def spy(x, *args, **kw):
        seen.append(x.dtype)
        return rms(x, *args, **kw)
    monkeypatch.setattr(F, "rms_norm", spy)
    x = torch.randn(2, 3, 32).to(torch.bfloat16)
    y = RMSNorm(32, 1e-6).to(torch.bfloat16)(x)
    assert seen == [torch.float32] and y.dtype == torch.bfloat16

    logits = (torch.randn(2, 6, 50) * 4).to(torch.bfloat16)  # (N, L, V) what a bf16 model returns
    ids = torch.randint(0, 50, (2, 6))
    lp = rollout.token_logprobs(logits, ids)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, rollout.token_logprobs(logits.float(), ids), rtol=0, atol=0)
    # in bf16 the log_softmax itself would round its outputs (|logprob| ~ 4-12) by up to 2^-5
    assert (lp - logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0].float())[:, 1:].abs().max() > 0
    tok, tok_lp = rollout.sample(logits[:, -1], temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert tok_lp.dtype == torch.float32
    want = (logits[:, -1].float() / 0.7).log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    torch.testing.assert_close(tok_lp, want, rtol=0, atol=0)


def test_losses_are_fp32_on_bf16_logits():
    logits = torch.randn(2, 7, 50).to(torch.bfloat16).requires_grad_()  # (B, T, V)
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
    loss = sft.sft_loss(logits, ids, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, sft.sft_loss(logits.detach().float(), ids, mask), rtol=0, atol=0)
    lp = rollout.token_logprobs(logits, ids)  # (B, T) float32, differentiable
    g_loss, stats = grpo.grpo_loss(lp, lp.detach(), lp.detach(), torch.tensor([1.0, -1.0]), mask)
    assert g_loss.dtype == torch.float32 and stats["kl"] == 0.0 and stats["ratio_mean"] == 1.0
    g_loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_sampler_bf16_logprobs_fp32_and_equal_to_trainer():
    _, m16 = models()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]  # ragged: left padding in bf16 too
    r = rollout.generate(m16, prompts, 16, num_samples=3, seed=0, temperature=1.0)
    assert r.old_logprobs.dtype == torch.float32
    with torch.no_grad():
        logits = m16(r.input_ids, kv_start=r.kv_start)  # (N, L, V) bf16, the trainer's forward
        lp = rollout.token_logprobs(logits, r.input_ids)  # (N, L)
    # the cached decode and the full forward round in different orders: a few bf16 ulps of the
    # logits apart (measured 1e-3 here); a logprob moves by at most twice the largest logit change
    tol = 8 * BF16_EPS * max(1.0, logits.float().abs().max().item())
    assert ((lp - r.old_logprobs) * r.completion_mask).abs().max() <= tol
    greedy = rollout.generate(m16, prompts, 12, temperature=0, seed=0)
    naive = rollout.generate_naive(m16, prompts, 12, temperature=0, seed=0)
    # bf16 near-ties may flip an argmax between the two orders of rounding; most tokens agree
    same = sum(a == b for x, y in zip(greedy.tokens, naive.tokens) for a, b in zip(x, y))
    assert same >= 0.75 * sum(map(len, naive.tokens))


def test_bf16_weights_step_through_float32_masters(tmp_path):
    """bf16 parameters are stepped through float32 masters (optim.MasterAdamW): the moments and the
    master are float32, the weight is the master rounded. An update below half a bf16 spacing of its
    weight (|update| < |w| * 2^-9) is lost by a pure-bf16 AdamW, which at lr 1e-6 (DeepSeekMath's RL
    rate) leaves every weight above ~5e-4 in place for ever; the master accumulates it. The master is
    part of the trainer state and survives a save and load."""
    from checkpoint import load_trainer_state, save_trainer_state
    _, m16 = models()
    opt = make_optimizer(m16, 1e-3, 0.0)
    m16(torch.randint(0, 50, (2, 9))).float().logsumexp(-1).sum().backward()
    opt.step()
    for p in m16.parameters():
        st = opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == st["master"].dtype == torch.float32
        assert p.dtype == p.grad.dtype == torch.bfloat16 if p.grad is not None else p.dtype == torch.bfloat16
        assert torch.equal(st["master"].to(torch.bfloat16), p.detach())
    # one weight of 0.02 (bf16 spacing 1.2e-4) under 100 steps of lr 1e-6 with a unit gradient: the
    # pure-bf16 AdamW rounds every step away, the master moves by 1e-4 and the weight by one spacing
    w_plain, w_ours = (torch.nn.Parameter(torch.full((4,), 0.02, dtype=torch.bfloat16)) for _ in range(2))
    plain = torch.optim.AdamW([w_plain], lr=1e-6, weight_decay=0.0)
    ours = make_optimizer(torch.nn.ParameterList([w_ours]), 1e-6, 0.0)
    for _ in range(100):
        for w, o in ((w_plain, plain), (w_ours, ours)):
            w.grad = torch.ones_like(w)
            o.step()
    assert bool((w_plain == torch.tensor(0.02, dtype=torch.bfloat16)).all())
    start = float(torch.tensor(0.02, dtype=torch.bfloat16))  # 0.019958..., the nearest bf16
    torch.testing.assert_close(ours.state[w_ours]["master"], torch.full((4,), start - 1e-4), rtol=0, atol=2e-7)
    assert bool((w_ours < torch.tensor(0.02, dtype=torch.bfloat16)).all())
    # the master is saved with the trainer state and restored exactly
    save_trainer_state(tmp_path / "ckpt", m16, opt, {"step": 1})
    _, fresh = models()
    fresh_opt = make_optimizer(fresh, 1e-3, 0.0)
    load_trainer_state(tmp_path / "ckpt", fresh, fresh_opt)
    for (name, p), q in zip(m16.named_parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p]["master"], fresh_opt.state[q]["master"]), name


def test_bf16_checkpoint_is_hf_bf16_safetensors(tmp_path):
    _, m16 = models()
    save_pretrained(m16, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    back = load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    for (name, a), b in zip(m16.state_dict().items(), back.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), name
    assert back.inv_freq.dtype == torch.float32
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    assert hf.dtype == torch.bfloat16
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        ours, theirs = back(ids).float(), hf(ids).logits.float()
    assert (ours - theirs).abs().max() <= 0.02 * theirs.abs().max()  # two bf16 implementations


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretrained micro model (2 steps, float32), the starting point of the bf16 stages."""
    out = tmp_path_factory.mktemp("bf16")
    assert train.main(["--stage", "pretrain", "--out", str(out), "--steps", "2", *TINY]) == 0
    return out / "pretrain" / "model"


def metrics(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _weights_dtype(model_dir):
    from safetensors import safe_open
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_grpo_step_bf16_through_train_main(base, tmp_path):
    out = tmp_path / "r"
    assert train.main(["--stage", "zero", "--init", str(base), "--out", str(out), "--steps", "1",
                       "--dtype", "bfloat16", *TINY]) == 0
    row = [r for r in metrics(out / "zero" / "metrics.jsonl") if r["step"] == 1][0]
    assert all(isinstance(v, str) or v == v for v in row.values())  # no NaN anywhere
    assert abs(row["loss"]) < 10 and row["kl"] < 1e-6  # policy == reference before the first update
    # one update per batch: pi_old is the update's own forward, detached, so every ratio is exactly 1;
    # the sampler's bf16 logprobs differ from it by bf16 rounding, which the mismatch log shows
    assert row["ratio_min"] == row["ratio_max"] == 1.0
    assert 0 < row["is_logw_abs_mean"] < 0.05
    assert _weights_dtype(out / "zero" / "model") == {"BF16"}
    osd = torch.load(out / "zero" / "ckpt" / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    # float32 moments and masters (optim.MasterAdamW), saved as such
    assert {v[k].dtype for v in osd.values() for k in ("exp_avg", "master")} == {torch.float32}
    cfg = json.loads((out / "zero" / "run_config.json").read_text())
    assert cfg["run"]["dtype"] == "bfloat16"


def test_sft_step_bf16_through_train_main(base, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"User: {a}+{a}=? Assistant:",
                                        "response": f" <answer>{2 * a}</answer>"}) + "\n" for a in range(10, 26)))
    out = tmp_path / "r"
    assert train.main(["--stage", "sft", "--init", str(base), "--data", str(data), "--out", str(out),
                       "--steps", "1", "--dtype", "bfloat16", *TINY]) == 0
    row = [r for r in metrics(out / "sft" / "metrics.jsonl") if r["step"] == 1][0]
    assert 0 < row["loss"] < 10 and row["grad_norm"] == row["grad_norm"]
    assert _weights_dtype(out / "sft" / "model") == {"BF16"}


def test_pretrain_honours_dtype(tmp_path):
    out = tmp_path / "r"
    assert train.main(["--stage", "pretrain", "--out", str(out), "--steps", "1", "--dtype", "bfloat16",
                       *TINY]) == 0
    assert _weights_dtype(out / "pretrain" / "model") == {"BF16"}
    assert os.path.isfile(out / "pretrain" / "model" / "config.json")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_master_step_equals_torch_adamw_in_float32(weight_decay):
    """MasterAdamW's written-out update on a bf16 parameter's master is torch's AdamW on a float32
    copy fed the same gradients (bf16-exact, so the upcast loses nothing): the reference is torch."""
    g = torch.Generator().manual_seed(0)
    w32 = torch.nn.Parameter(torch.randn(5, 7, generator=g).to(torch.bfloat16).float())
    w16 = torch.nn.Parameter(w32.detach().to(torch.bfloat16))
    ref = torch.optim.AdamW([w32], lr=1e-2, betas=(0.9, 0.95), weight_decay=weight_decay)
    ours = make_optimizer(torch.nn.ParameterList([w16]), 1e-2, weight_decay)
    for _ in range(5):
        grad = torch.randn(5, 7, generator=g).to(torch.bfloat16)
        w32.grad, w16.grad = grad.float(), grad.clone()
        ref.step()
        ours.step()
    torch.testing.assert_close(ours.state[w16]["master"], w32.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(w16.detach(), w32.detach().to(torch.bfloat16))
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ours.state[w16][k], ref.state[w32][k], rtol=1e-6, atol=1e-9)
