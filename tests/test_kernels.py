"""kernels.attention (Triton and torch SDPA backends) against the float64 plain-torch reference.

Without a GPU the Triton kernels run under the interpreter (set by kernels/attention.py), so every
size here is tiny. With a GPU the same tests run the compiled kernels on CUDA tensors.
"""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import attention, attention_reference

attention_module = importlib.import_module("kernels.attention")  # `kernels.attention` is the function
linear_module = importlib.import_module("kernels.linear")  # likewise `kernels.linear`
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"]
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
    want = attention(q, k, v, backend="triton" if DEVICE == "cuda" else "torch")
    assert torch.equal(attention(q, k, v), want)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="Tk >= Tq"):
        attention(k.repeat(1, 2, 1, 1), q[:, :2], q[:, :2])  # Tk = 5 < Tq = 7
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="kv_start"):
        attention(q, k, v, kv_start=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        attention(q.double(), k.double(), v.double(), backend="triton")


def test_interpreter_uses_one_small_config():
    # the CPU tests rely on this to stay fast; on a GPU the autotuner has the full list
    if DEVICE == "cpu":
        assert len(attention_module._FWD_CONFIGS) == len(attention_module._BWD_CONFIGS) == 1


# --- prefix_attention: one decode step over a prompt shared by G rows -----------------------------

# name: (P, G, H, Hkv, Tp, Tk, D, prefix_start)
PREFIX_CASES = {
    "gqa_ragged": (2, 3, 4, 2, 7, 5, 16, [0, 3]),
    "one_sample_one_own_key": (3, 1, 2, 1, 9, 1, 16, [8, 0, 2]),
    "mha_d48_empty_prefix": (2, 2, 4, 4, 17, 4, 48, [0, 17]),  # prompt 1 has no visible prefix key
}


@pytest.mark.parametrize("backend", ["triton", "torch", "torch-math"])
@pytest.mark.parametrize("case", list(PREFIX_CASES))
def test_prefix_attention_matches_reference(case, backend, monkeypatch):
    """Equal to attention over each row's materialised [prefix; own] keys, on every path: Triton, the
    CPU flash op with its log-sum-exp, and the explicit math used where that op is missing."""
    P, G, H, Hkv, Tp, Tk, D, start = PREFIX_CASES[case]
    if backend == "torch-math":
        monkeypatch.setattr(attention_module, "_CPU_FLASH", None)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(P * G, H, 1, D, generator=g).to(DEVICE)                       # (N, H, 1, D)
    kp, vp = (torch.randn(P, Hkv, Tp, D, generator=g).to(DEVICE) for _ in range(2))  # (P, Hkv, Tp, D)
    k, v = (torch.randn(P * G, Hkv, Tk, D, generator=g).to(DEVICE) for _ in range(2))  # (N, Hkv, Tk, D)
    prefix_start = _kv_start(start)
    out = attention_module.prefix_attention(q, kp, vp, prefix_start, k, v,
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


def test_mask_memo_follows_kv_start():
    """The torch path builds its mask once per kv_start tensor; a new tensor or an in-place change
    must rebuild it, never reuse a stale mask."""
    q, k, v, _ = _inputs(2, 4, 2, 1, 9, 16)
    kv = torch.tensor([0, 3], device=DEVICE)
    for change in (None, "inplace", "new"):
        if change == "inplace":
            kv[0] = 5
        elif change == "new":
            kv = torch.tensor([2, 8], device=DEVICE)
        got = attention(q, k, v, backend="torch", kv_start=kv)
        want = attention_reference(q.double(), k.double(), v.double(), kv_start=kv)
        torch.testing.assert_close(got.double(), want, **FP32_TOL)


# --- kernels.threads: one CPU thread for a decode loop's small ops, every thread for its big ones ----

threads_module = importlib.import_module("kernels.threads")


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


def test_serial_and_parallel_blocks(two_threads, monkeypatch):
    """serial() runs on one thread and restores the count, also on an exception; parallel() inside it
    gets every thread back (nested too), outside it does nothing; a nested serial() is a no-op, and so is every
    serial() with the SERIAL switch off."""
    with threads_module.parallel():
        assert torch.get_num_threads() == 2
    with threads_module.serial():
        assert torch.get_num_threads() == 1
        with threads_module.parallel():
            assert torch.get_num_threads() == 2
            with threads_module.parallel():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 2  # a nested parallel() restores what it found
        with threads_module.parallel(active=False):
            assert torch.get_num_threads() == 1
        with threads_module.serial():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ZeroDivisionError), threads_module.serial():
        with threads_module.parallel():
            1 / 0
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(threads_module, "SERIAL", False)
    with threads_module.serial():
        assert torch.get_num_threads() == 2


@pytest.mark.skipif(DEVICE != "cpu", reason="thread scheduling of torch's CPU attention")
@pytest.mark.parametrize("Tk", [5, 255, 256])
def test_decode_attention_threads(Tk, two_threads, monkeypatch):
    """Inside serial(), attention over fewer than PARALLEL_MIN_KEYS keys runs on one thread (both
    `prefix_attention` calls and a decode step without a shared prefix), longer keys on every thread;
    outside serial() every call keeps every thread."""
    seen = []
    monkeypatch.setattr(attention_module, "_CPU_FLASH", _spy(seen, attention_module._CPU_FLASH))
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        _spy(seen, attention_module.F.scaled_dot_product_attention))
    q, k, v, _ = _inputs(4, 4, 2, 1, Tk, 16)
    kp, vp = k[:2, :, :7], v[:2, :, :7]                       # (P, Hkv, Tp, D): 2 prompts, G = 2
    with threads_module.serial():
        attention_module.prefix_attention(q, kp, vp, None, k, v)  # prefix part (7 keys), then own part
        attention(q, k, v, backend="torch")
    attention(q, k, v, backend="torch")
    wide = 2 if Tk >= threads_module.PARALLEL_MIN_KEYS else 1
    assert seen == [1, wide, wide, 2]


def test_linear_gets_every_thread_inside_serial(two_threads, monkeypatch):
    mkl, onednn = [], []
    monkeypatch.setattr(torch.nn.functional, "linear", _spy(mkl, torch.nn.functional.linear))
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", _spy(onednn, torch.ops.mkldnn._linear_pointwise))
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with torch.no_grad(), threads_module.serial():
        linear_module.linear(x, w)       # oneDNN where available
        linear_module.linear(x[:1], w)   # one row: F.linear
    assert (mkl, onednn) == (([2], [2]) if linear_module._AVAILABLE else ([2, 2], []))


# --- kernels.linear: oneDNN's matmul for no-grad float32 forwards on CPU ---------------------------

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
    """`linear` equals the float64 product in every mode (oneDNN on/off, bias, 2-D/3-D, strided x, one
    row), takes oneDNN's path exactly where documented, and under autograd is F.linear with its grads."""
    monkeypatch.setattr(linear_module, "ONEDNN", onednn)
    shape, out_f, bias, transpose = LINEAR_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    if transpose:
        x = torch.randn(*reversed(shape), generator=g).t()      # same shape, column-major
    w = torch.randn(out_f, shape[-1], generator=g)               # (out, in)
    b = {None: None, "dense": torch.randn(out_f, generator=g),
         "strided": torch.randn(2 * out_f, generator=g)[::2]}[bias]
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    with torch.no_grad():
        got = linear_module.linear(x, w, b)
        fast = linear_module.uses_onednn(x, w)
    assert fast == (onednn and linear_module._AVAILABLE and x.numel() > x.shape[-1])
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    assert not linear_module.uses_onednn(xg, wg)                 # autograd on: F.linear and its backward
    linear_module.linear(xg, wg, b).sum().backward()
    ones = torch.ones(*shape[:-1], out_f, dtype=torch.float64)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xg.grad.double(), ones @ w.double(), **tol)
    torch.testing.assert_close(wg.grad.double(), ones.reshape(-1, out_f).T @ x.double().reshape(-1, shape[-1]), **tol)


def test_linear_other_dtypes_devices_and_modes_take_f_linear():
    """bf16/float64/CUDA inputs, CPU autocast (its output dtype is autocast's) and zero input
    features (F.linear gives zeros, oneDNN would refuse) all take F.linear."""
    with torch.no_grad():
        assert not linear_module.uses_onednn(torch.randn(4, 8, dtype=torch.bfloat16),
                                             torch.randn(3, 8, dtype=torch.bfloat16))
        assert not linear_module.uses_onednn(torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64))
        if torch.cuda.is_available():
            assert not linear_module.uses_onednn(torch.randn(4, 8, device="cuda"), torch.randn(3, 8, device="cuda"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear_module.linear(torch.randn(4, 8), torch.randn(3, 8)).dtype == torch.bfloat16
        assert torch.equal(linear_module.linear(torch.randn(4, 0), torch.randn(3, 0)), torch.zeros(4, 3))


def test_model_no_grad_forward_same_with_and_without_onednn(monkeypatch):
    """The model's no-grad logits (what the sampler and the reference model compute) agree with the
    fast path on and off to float32 rounding (they are not bitwise equal at the toy's width), and
    every linear layer takes the fast path where it exists."""
    from model import Transformer, preset
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", _spy(calls, torch.ops.mkldnn._linear_pointwise))
    torch.manual_seed(0)
    model = Transformer(preset("toy", vocab_size=64))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(ids)
        monkeypatch.setattr(linear_module, "ONEDNN", False)
        slow = model(ids)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # 4 per block + lm_head
    assert len(calls) == (n_linear if linear_module._AVAILABLE else 0)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
