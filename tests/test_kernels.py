"""kernels.attention (Triton and torch SDPA backends) against the float64 plain-torch reference, and
kernels.cpu_decode (the sampler's CPU fast paths) against the plain model.

Without a GPU the Triton kernels run under the interpreter (set by kernels/flash_attention.py), so
every size here is tiny. With a GPU the same tests run the compiled kernels on CUDA tensors. Without
the triton package only the torch backend is tested (and the error that asks for triton).
"""

import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import attention, attention_reference, cpu_decode as cpu_decode_module, padding_mask

attention_module = importlib.import_module("kernels.attention")  # `kernels.attention` is the function
HAS_TRITON = attention_module._triton is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"] if HAS_TRITON else ["torch"]
FP32_TOL = dict(atol=2e-5, rtol=1e-4)  # fp32 accumulation over <= 65 keys, compared with float64

# name: (B, H, Hkv, Tq, Tk, D, causal, kv_start)
CASES = {
    "causal": (2, 2, 2, 17, 17, 16, True, None),
    "noncausal": (2, 2, 2, 17, 17, 16, False, None),
    "gqa_causal_T33": (1, 4, 2, 33, 33, 32, True, None),
    "mqa_noncausal": (1, 4, 1, 17, 17, 16, False, None),
    "single_token": (2, 2, 1, 1, 1, 16, True, None),
    "decode_Tq1_Tk19": (2, 4, 2, 1, 19, 16, True, None),
    "chunked_Tq5_Tk21": (1, 4, 2, 5, 21, 16, True, None),
    "chunked_noncausal": (1, 2, 2, 5, 21, 16, False, None),
    "chunked_Tq5_Tk35": (1, 2, 1, 5, 35, 16, True, None),  # diagonal offset 30 = 14 mod 16: block edges
    "head_dim_48": (1, 2, 1, 17, 17, 48, True, None),
    "head_dim_80_gqa": (1, 4, 2, 9, 9, 80, False, None),
    "ragged_causal": (3, 2, 1, 17, 17, 16, True, [0, 5, 16]),
    "ragged_all_padding": (2, 2, 2, 17, 17, 16, False, [0, 17]),
    "ragged_decode": (2, 4, 2, 1, 19, 16, True, [0, 7]),
    "ragged_chunked": (2, 2, 1, 5, 21, 16, True, [3, 18]),
    "ragged_T65": (1, 2, 1, 65, 65, 16, True, [20]),
}


def _inputs(B, H, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)  # (B, H, Tq, D)
    k = torch.randn(B, Hkv, Tk, D, generator=g)  # (B, Hkv, Tk, D)
    v = torch.randn(B, Hkv, Tk, D, generator=g)  # (B, Hkv, Tk, D)
    do = torch.randn(B, H, Tq, D, generator=g)  # (B, H, Tq, D)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)]


def _forward_backward(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn at fresh leaves q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _reference(q, k, v, do, **kw):
    return _forward_backward(attention_reference, q.double(), k.double(), v.double(), do.double(), **kw)


def _kv_start(kv_start):
    return None if kv_start is None else torch.tensor(kv_start, dtype=torch.int64, device=DEVICE)


def _assert_matches(got, want, **tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, backend):
    B, H, Hkv, Tq, Tk, D, causal, kv_start = CASES[case]
    q, k, v, do = _inputs(B, H, Hkv, Tq, Tk, D)
    kw = dict(causal=causal, kv_start=_kv_start(kv_start))
    got = _forward_backward(attention, q, k, v, do, backend=backend, **kw)
    assert got[0].shape == (B, H, Tq, D) and got[0].dtype == q.dtype
    _assert_matches(got, _reference(q, k, v, do, **kw), **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows_are_zero_with_zero_grads(backend):
    # batch 1: keys < 12 are padding, causal prefill, so query rows 0..11 see no key at all
    q, k, v, do = _inputs(2, 2, 1, 17, 17, 16)
    kv_start = _kv_start([0, 12])
    out, dq, dk, dv = _forward_backward(attention, q, k, v, do, backend=backend, kv_start=kv_start)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert torch.equal(out[1, :, :12], torch.zeros_like(out[1, :, :12]))
    assert torch.equal(dq[1, :, :12], torch.zeros_like(dq[1, :, :12]))
    assert torch.equal(dk[1, :, :12], torch.zeros_like(dk[1, :, :12]))  # padding keys get no gradient
    assert torch.equal(dv[1, :, :12], torch.zeros_like(dv[1, :, :12]))
    assert out[1, :, 12:].abs().sum() > 0  # the real rows are not zeroed by mistake


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    # what the model passes: q from a transpose, k and v as slices of a preallocated KV cache
    B, H, Hkv, T, Tmax, D = 2, 4, 2, 13, 40, 16
    g = torch.Generator().manual_seed(1)
    xq = torch.randn(B, T, H, D, generator=g).to(DEVICE).requires_grad_()  # (B, T, H, D)
    cache_k = torch.randn(B, Hkv, Tmax, D, generator=g).to(DEVICE).requires_grad_()  # (B, Hkv, Tmax, D)
    cache_v = torch.randn(B, Hkv, Tmax, D, generator=g).to(DEVICE).requires_grad_()  # (B, Hkv, Tmax, D)
    do = torch.randn(B, H, T, D, generator=g).to(DEVICE)  # (B, H, T, D)
    L = T + 6  # chunk of T queries onto a cache holding L keys
    kv_start = _kv_start([0, 4])

    def run(fn, **kw):
        q = xq.transpose(1, 2)  # (B, H, T, D), non-contiguous
        k, v = cache_k[:, :, :L], cache_v[:, :, :L]  # (B, Hkv, L, D), non-contiguous
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        out = fn(q, k, v, kv_start=kv_start, **kw)
        out.backward(do)
        grads = [t.grad.clone() for t in (xq, cache_k, cache_v)]
        for t in (xq, cache_k, cache_v):
            t.grad = None
        return [out.detach()] + grads

    got = run(attention, backend=backend)
    want = run(attention_reference)
    _assert_matches(got, [t.double() for t in want], **FP32_TOL)
    assert torch.equal(got[2][:, :, L:], torch.zeros_like(got[2][:, :, L:]))  # cache past L untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_equals_suffix_of_full_prefill(backend):
    # bottom-right causal: the last 5 queries over all 21 keys are the last 5 rows of full causal attention
    q, k, v, _ = _inputs(1, 2, 1, 21, 21, 16)
    full = attention(q, k, v, causal=True, backend=backend)  # (1, 2, 21, 16)
    chunk = attention(q[:, :, -5:], k, v, causal=True, backend=backend)  # (1, 2, 5, 16)
    torch.testing.assert_close(chunk, full[:, :, -5:], **FP32_TOL)


@needs_triton
def test_grad_of_sum_has_stride_zero_upstream_grad():
    # out.sum().backward() hands the kernel an expanded dO whose strides are all 0
    q, k, v, _ = _inputs(1, 2, 1, 17, 17, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    attention(q, k, v, backend="triton", kv_start=_kv_start([3])).sum().backward()
    got = [t.grad for t in (q, k, v)]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_reference(qd, kd, vd, kv_start=_kv_start([3])).sum().backward()
    for a, b in zip(got, (qd.grad, kd.grad, vd.grad)):
        torch.testing.assert_close(a.double(), b, **FP32_TOL)


def _interpreter_bf16_dot_works():
    """The Triton interpreter of some versions returns garbage for tl.dot on bf16 (numpy has no bf16)."""
    if DEVICE == "cuda":
        return True
    q, k, v, _ = _inputs(1, 1, 1, 16, 16, 16, dtype=torch.bfloat16)
    out = attention(q, k, v, backend="triton")
    return bool((out.float() - attention_reference(q, k, v).float()).abs().max() < 0.1)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    if dtype == torch.bfloat16 and not _interpreter_bf16_dot_works():
        pytest.skip("this Triton interpreter computes tl.dot on bf16 wrongly; bf16 is checked on GPU only")
    B, H, Hkv, Tq, Tk, D, causal, kv_start = CASES["ragged_chunked"]
    q, k, v, do = _inputs(B, H, Hkv, Tq, Tk, D, dtype=dtype)
    kw = dict(causal=causal, kv_start=_kv_start(kv_start))
    got = _forward_backward(attention, q, k, v, do, backend="triton", **kw)
    assert got[0].dtype == dtype
    # half inputs, p and dS rounded to half before each matmul: about 3 significant digits
    _assert_matches(got, _reference(q, k, v, do, **kw), atol=3e-2, rtol=3e-2)


@needs_triton
@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2]), Tq=st.integers(1, 20),
       extra=st.integers(0, 20), D=st.sampled_from([16, 24, 32]), causal=st.booleans(), data=st.data())
def test_random_shapes_triton(B, Hkv, group, Tq, extra, D, causal, data):
    Tk = Tq + extra
    starts = data.draw(st.one_of(st.none(), st.lists(st.integers(0, Tk), min_size=B, max_size=B)))
    q, k, v, do = _inputs(B, Hkv * group, Hkv, Tq, Tk, D, seed=Tq * 31 + Tk)
    kw = dict(causal=causal, kv_start=_kv_start(starts))
    got = _forward_backward(attention, q, k, v, do, backend="triton", **kw)
    _assert_matches(got, _reference(q, k, v, do, **kw), **FP32_TOL)


def test_reference_matches_sdpa():
    # the reference itself, against torch's fused attention where their conventions agree (Tq == Tk)
    q, k, v, _ = _inputs(2, 4, 2, 17, 17, 16)
    kd, vd = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # (B, H, T, D)
    for causal in (True, False):
        want = torch.nn.functional.scaled_dot_product_attention(q, kd, vd, is_causal=causal)
        torch.testing.assert_close(attention_reference(q, k, v, causal=causal), want, **FP32_TOL)
    # a decode step sees every key, causal or not
    q1 = q[:, :, -1:]  # (B, H, 1, D)
    torch.testing.assert_close(attention_reference(q1, k, v, causal=True), attention_reference(q1, k, v, causal=False))


def test_default_backend_and_errors():
    q, k, v, _ = _inputs(1, 4, 2, 5, 7, 16)
    want = attention(q, k, v, backend="triton" if DEVICE == "cuda" and HAS_TRITON else "torch")
    assert torch.equal(attention(q, k, v), want)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="Tk >= Tq"):
        attention(k.repeat(1, 2, 1, 1), q[:, :2], q[:, :2])  # Tk = 5 < Tq = 7
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="kv_start"):
        attention(q, k, v, kv_start=torch.zeros(3, dtype=torch.int64))
    if HAS_TRITON:
        with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
            attention(q.double(), k.double(), v.double(), backend="triton")


@needs_triton
def test_interpreter_uses_one_small_config():
    # the CPU tests rely on this to stay fast; on a GPU the autotuner has the full list
    flash = importlib.import_module("kernels.flash_attention")
    if DEVICE == "cpu":
        assert len(flash._FWD_CONFIGS) == len(flash._BWD_CONFIGS) == 1


def test_model_and_sampler_run_without_triton():
    """With triton missing (as on macOS or Windows), the model and the sampler import and run on SDPA,
    and asking for the Triton backend says, in one line, what to install or pass instead."""
    code = """
import sys
sys.modules["triton"] = None  # import triton now raises ImportError
import torch
import model, rollout
from kernels import attention
m = model.Transformer(model.preset("micro", vocab_size=50)).eval()
r = rollout.generate(m, [[1, 2, 3], [4, 5]], 4, num_samples=2, seed=0)
assert [len(t) for t in r.tokens] == [4] * 4
q = torch.randn(1, 2, 3, 16)
assert torch.isfinite(attention(q, q, q)).all()
try:
    attention(q, q, q, backend="triton")
except ValueError as e:
    print(e)
"""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ("attention backend 'triton' needs the triton package, which is not "
                                  "installed: pip install triton, or pass backend='torch'")


# --- prefix_attention: one decode step over a prompt shared by G rows -----------------------------

# name: (P, G, H, Hkv, Tp, Tk, D, prefix_start)
PREFIX_CASES = {
    "gqa_ragged": (2, 3, 4, 2, 7, 5, 16, [0, 3]),
    "one_sample_one_own_key": (3, 1, 2, 1, 9, 1, 16, [8, 0, 2]),
    "mha_d48_empty_prefix": (2, 2, 4, 4, 17, 4, 48, [0, 17]),  # prompt 1 has no visible prefix key
}


@pytest.mark.parametrize("backend", BACKENDS + ["torch-math", "torch-kept-mask"])
@pytest.mark.parametrize("case", list(PREFIX_CASES))
def test_prefix_attention_matches_reference(case, backend, monkeypatch):
    """Equal to attention over each row's materialised [prefix; own] keys, on every path: Triton, the
    CPU flash op with its log-sum-exp, the explicit math used where that op is missing, and with the
    padding mask a KV cache keeps (`padding_mask`, built once per rollout) passed in."""
    P, G, H, Hkv, Tp, Tk, D, start = PREFIX_CASES[case]
    if backend == "torch-math":
        monkeypatch.setattr(attention_module, "_CPU_FLASH", None)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(P * G, H, 1, D, generator=g).to(DEVICE)                       # (N, H, 1, D)
    kp, vp = (torch.randn(P, Hkv, Tp, D, generator=g).to(DEVICE) for _ in range(2))  # (P, Hkv, Tp, D)
    k, v = (torch.randn(P * G, Hkv, Tk, D, generator=g).to(DEVICE) for _ in range(2))  # (N, Hkv, Tk, D)
    prefix_start = _kv_start(start)
    kept = padding_mask(prefix_start, Tp, q.dtype) if backend == "torch-kept-mask" else None
    out = attention_module.prefix_attention(q, kp, vp, prefix_start, k, v, prefix_mask=kept,
                                            backend="triton" if backend == "triton" else "torch")
    k_full = torch.cat([kp.repeat_interleave(G, 0), k], 2)                          # (N, Hkv, Tp + Tk, D)
    v_full = torch.cat([vp.repeat_interleave(G, 0), v], 2)
    want = attention_reference(q.double(), k_full.double(), v_full.double(), causal=True,
                               kv_start=prefix_start.repeat_interleave(G))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, **FP32_TOL)


def test_prefix_attention_errors():
    q, kp, vp = torch.randn(4, 2, 2, 16), torch.randn(2, 1, 5, 16), torch.randn(2, 1, 5, 16)
    k = v = torch.randn(4, 1, 3, 16)
    with pytest.raises(ValueError, match="one token per row"):
        attention_module.prefix_attention(q, kp, vp, None, k, v)  # Tq = 2


# name: (B, Tq, Tk, causal, kv_start)
MASK_CASES = {
    "decode": (3, 1, 9, True, [0, 3, 8]),
    "decode_no_padding": (2, 1, 9, True, [0, 0]),
    "decode_one_pad": (2, 1, 9, True, [0, 1]),
    "noncausal": (2, 4, 9, False, [2, 5]),
    "noncausal_no_key": (2, 4, 9, False, [0, 9]),
    "causal_prefill": (2, 6, 6, True, [0, 4]),
    "causal_chunk_no_key": (2, 3, 9, True, [1, 8]),  # row 0 of batch 1 sees keys <= 6 < 8: none
    "causal_chunk_no_kv_start": (1, 3, 9, True, None),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_sdpa_mask_equals_visible(case):
    """The SDPA path's mask, built in each call (no cache of masks, (B, 1, 1, Tk) where every row sees
    the same keys): broadcast to (B, 1, Tq, Tk) it is `_visible`, the reference's mask, except on rows
    that see no key, which see every key and are flagged in no_key; the additive form has 0 / -inf on
    the same entries; `padding_mask`, which a KV cache keeps for its shared prompt, is the same."""
    B, Tq, Tk, causal, start = MASK_CASES[case]
    kv_start, device = _kv_start(start), torch.device(DEVICE)
    visible = attention_module._visible(B, Tq, Tk, causal, kv_start, device)   # (B, 1, Tq, Tk)
    empty = ~visible.any(-1, keepdim=True)                                      # (B, 1, Tq, 1)
    for dtype in (torch.bool, torch.float32):
        mask, no_key = attention_module._sdpa_mask(B, Tq, Tk, causal, kv_start, device, dtype)
        if mask is None:  # on CPU: nothing to mask
            assert DEVICE == "cpu" and visible.all() and no_key is None
            continue
        want = visible | empty
        got = mask.expand(B, 1, Tq, Tk)
        assert torch.equal(got, want if dtype == torch.bool else torch.where(want, 0.0, -math.inf))
        assert torch.equal(empty, torch.zeros_like(empty) if no_key is None else no_key.expand_as(empty))
        if not causal or Tq == 1:
            kept = padding_mask(kv_start, Tk, dtype)
            assert torch.equal(kept[0], mask) and (kept[1] is None) == (no_key is None)
    if kv_start is not None:  # and attention through it
        q, k, v, _ = _inputs(B, 4, 2, Tq, Tk, 16)
        got = attention(q, k, v, causal=causal, backend="torch", kv_start=kv_start)
        want = attention_reference(q.double(), k.double(), v.double(), causal=causal, kv_start=kv_start)
        torch.testing.assert_close(got.double(), want, **FP32_TOL)


# --- kernels.cpu_decode: the sampler's CPU fast paths, inside one context manager ----------------

cd = cpu_decode_module


@pytest.fixture
def two_threads():
    """Run the test with two torch threads (the count the scheduling decides between), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _spy(seen, fn):
    """fn, recording torch's thread count at each call."""
    def wrapped(*args, **kw):
        seen.append(torch.get_num_threads())
        return fn(*args, **kw)
    return wrapped


def _toy(**overrides):
    from model import Transformer, preset
    torch.manual_seed(0)
    return Transformer(preset("toy", vocab_size=64, **overrides)).eval()


def test_serial_and_parallel_blocks(two_threads, monkeypatch):
    """serial() runs on one thread and restores the count, also on an exception; parallel() inside it
    gets every thread back (nested too), outside it does nothing; a nested serial() is a no-op, and so
    is every serial() with the SERIAL switch off."""
    with cd.parallel():
        assert torch.get_num_threads() == 2
    with cd.serial():
        assert torch.get_num_threads() == 1
        with cd.parallel():
            assert torch.get_num_threads() == 2
            with cd.parallel():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 2  # a nested parallel() restores what it found
        with cd.parallel(active=False):
            assert torch.get_num_threads() == 1
        with cd.serial():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ZeroDivisionError), cd.serial():
        with cd.parallel():
            1 / 0
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(cd, "SERIAL", False)
    with cd.serial():
        assert torch.get_num_threads() == 2


@pytest.mark.skipif(DEVICE != "cpu", reason="thread scheduling of torch's CPU attention")
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("keys", [5, 255, 256])
def test_decode_attention_threads(keys, shared, two_threads, monkeypatch):
    """Inside cpu_decode(model), a decode step whose attention reads fewer than PARALLEL_MIN_KEYS keys
    runs it on one thread (both `prefix_attention` calls over a shared prompt, or SDPA over a plain
    cache), one reading more on every thread; outside it every call keeps every thread."""
    m = _toy(num_layers=1, max_seq_len=300)
    seen = []
    monkeypatch.setattr(attention_module, "_CPU_FLASH", _spy(seen, attention_module._CPU_FLASH))
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        _spy(seen, attention_module.F.scaled_dot_product_attention))
    with torch.no_grad():
        for inside in (True, False):
            # shared: a prompt of `keys` tokens read by 2 samples (+1 own key each); plain: keys - 1 cached
            cache = m.new_cache(2, keys + 1, start=torch.tensor([0, 2]))
            m(torch.randint(0, 64, (2, keys if shared else keys - 1)), cache=cache)
            if shared:
                cache = cache.share_prefix(2)
            seen.clear()
            with cd.cpu_decode(m) if inside else torch.no_grad():
                m(torch.randint(0, 64, (cache.batch_size, 1)), cache=cache)
            wide = 2 if keys >= cd.PARALLEL_MIN_KEYS or not inside else 1
            assert seen == [wide] * (2 if shared else 1)


def test_linear_gets_every_thread_inside_cpu_decode(two_threads, monkeypatch):
    """Inside cpu_decode, a linear layer runs on every thread, on oneDNN (several rows) or F.linear
    (one row); the block's other ops run on one."""
    mkl, onednn = [], []
    monkeypatch.setattr(torch.nn.functional, "linear", _spy(mkl, torch.nn.functional.linear))
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", _spy(onednn, torch.ops.mkldnn._linear_pointwise))
    layer, x = torch.nn.Linear(8, 3), torch.randn(4, 8)
    with torch.no_grad(), cd.cpu_decode(layer):
        layer(x)        # oneDNN where available
        layer(x[:1])    # one row: F.linear
        assert torch.get_num_threads() == 1
    assert (mkl, onednn) == (([2], [2]) if cd._AVAILABLE else ([2, 2], []))


# name: (x shape, out features, bias: None / "dense" / "strided", transpose x)
LINEAR_CASES = {
    "2d": ((5, 16), 24, None, False),
    "3d_bias": ((2, 3, 16), 24, "dense", False),
    "decode_rows": ((8, 1, 32), 40, "dense", False),
    "non_contiguous_x": ((6, 16), 8, None, True),
    "strided_bias": ((6, 16), 8, "strided", False),
    "single_row": ((1, 1, 16), 24, "dense", False),  # a matrix-vector product: F.linear
}


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_matches_reference(case, onednn, monkeypatch):
    """`linear`, and an nn.Linear inside cpu_decode, equal the float64 product in every mode (oneDNN
    on/off, bias, 2-D/3-D, strided x, one row), take oneDNN's path exactly where documented, and under
    autograd are F.linear with its grads."""
    monkeypatch.setattr(cd, "ONEDNN", onednn)
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", _spy(calls, torch.ops.mkldnn._linear_pointwise))
    shape, out_f, bias, transpose = LINEAR_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    if transpose:
        x = torch.randn(*reversed(shape), generator=g).t()      # same shape, column-major
    w = torch.randn(out_f, shape[-1], generator=g)               # (out, in)
    b = {None: None, "dense": torch.randn(out_f, generator=g),
         "strided": torch.randn(2 * out_f, generator=g)[::2]}[bias]
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    layer = torch.nn.Linear(shape[-1], out_f, bias=b is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
        got = cd.linear(x, w, b)
        fast = cd.uses_onednn(x, w)
        with cd.cpu_decode(layer):
            got_layer = layer(x)
    assert fast == (onednn and cd._AVAILABLE and x.numel() > x.shape[-1])
    assert len(calls) == 2 * fast                                 # `linear`, then the layer
    for out in (got, got_layer):
        assert out.shape == want.shape and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    assert not cd.uses_onednn(xg, wg)                             # autograd on: F.linear and its backward
    cd.linear(xg, wg, b).sum().backward()
    ones = torch.ones(*shape[:-1], out_f, dtype=torch.float64)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xg.grad.double(), ones @ w.double(), **tol)
    torch.testing.assert_close(wg.grad.double(), ones.reshape(-1, out_f).T @ x.double().reshape(-1, shape[-1]), **tol)


def test_linear_other_dtypes_devices_and_modes_take_f_linear():
    """bf16/float64/CUDA inputs, CPU autocast (its output dtype is autocast's) and zero input
    features (F.linear gives zeros, oneDNN would refuse) all take F.linear."""
    with torch.no_grad():
        assert not cd.uses_onednn(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16))
        assert not cd.uses_onednn(torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64))
        if torch.cuda.is_available():
            assert not cd.uses_onednn(torch.randn(4, 8, device="cuda"), torch.randn(3, 8, device="cuda"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cd.linear(torch.randn(4, 8), torch.randn(3, 8)).dtype == torch.bfloat16
        assert torch.equal(cd.linear(torch.randn(4, 0), torch.randn(3, 0)), torch.zeros(4, 3))


def _forwards_are_the_class_ones(model):
    return all("forward" not in m.__dict__ for m in model.modules())


def test_cpu_decode_logits_equal_the_plain_model_and_restore_it(two_threads, monkeypatch):
    """Inside cpu_decode the model's no-grad logits (what the sampler computes) equal the plain model's
    to float32 rounding (not bitwise at the toy's width), every linear layer takes oneDNN where it
    exists, on a cache too; after the block, also one left by an exception, every module's forward
    is its class's again and the thread count is the caller's."""
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", _spy(calls, torch.ops.mkldnn._linear_pointwise))
    m = _toy()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = m(ids)
        assert calls == []
        with cd.cpu_decode(m) as same:
            fast = m(ids)
            assert same is m and not _forwards_are_the_class_ones(m)
        n_linear = sum(isinstance(x, torch.nn.Linear) for x in m.modules())  # 4 per block + lm_head
        assert calls == ([2] * n_linear if cd._AVAILABLE else [])
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
        assert _forwards_are_the_class_ones(m) and torch.equal(m(ids), plain)
        with pytest.raises(RuntimeError, match="mid-block"), cd.cpu_decode(m):
            m(ids)
            raise RuntimeError("mid-block")
    assert _forwards_are_the_class_ones(m) and torch.get_num_threads() == 2


def test_cpu_decode_does_nothing_off_cpu(monkeypatch):
    """A model that is not on a CPU (here on the meta device; a GPU model alike) is left alone."""
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with cd.cpu_decode(m):
        assert _forwards_are_the_class_ones(m)
