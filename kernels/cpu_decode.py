"""CPU speed-ups for a sampler's decode loop, behind one context manager: `with cpu_decode(model): ...`

`rollout.generate` enters it around its prefill and around its decode loop, and nothing else does:
the model, the trainer and evaluation forwards run plain torch. Inside the block, for a model on a CPU:
    - every nn.Linear runs oneDNN's matmul where it applies (`linear`, switch `ONEDNN`), on every thread;
    - every other op runs on one thread (`serial`, switch `SERIAL`), except
    - attention (each block's `self_attn`) over at least PARALLEL_MIN_KEYS keys, which gets every thread.
It sets an instance-level `forward` on those modules and torch's thread count, and restores both when
the block ends, also on an exception. The model's code is not changed; for a model on a GPU the
block changes nothing. The slow path is the same loop outside the block (or with both switches off).

Why oneDNN's matmul (`ONEDNN`)
    torch's float32 matmul on x86 CPUs calls MKL's sgemm. On the AMD EPYC (AVX-512) this project is
    measured on, MKL's verbose log names no vector extension ("Intel(R) Architecture processors"),
    and on the sampler's shapes, (64, 256) x (256, 2048) and alike, it is slower than oneDNN, which
    torch ships too and which picks its kernels from the CPU's instruction set (its log: "isa: Intel
    AVX-512"); `python bench.py linear` prints both. Matmuls are the largest part of a CPU decode
    step. On other CPUs (an Intel one, where MKL uses AVX-512) the gap may be smaller or absent.

Why one thread (`SERIAL`)
    A decode step of a small model is a few hundred small ops (norms, RoPE, activations, sampling)
    around a few matmuls. torch splits an op over its threads once it has more than a few thousand
    elements (exp, sin, cos) or 32768 (most others), and each hand-off wakes a sleeping thread through
    the kernel (OMP_WAIT_POLICY=PASSIVE, which this project sets because spinning threads make a busy
    neighbour many times slower). On the 2-core machine of the README that wake-up costs more than
    most of these ops take on one thread, and torch's CPU attention over a few dozen keys runs each of
    its (row, head) tasks slower on two threads than on one, at any batch size. Matmuls and long
    attention have enough work per thread to pay for it, so they get every thread back (`parallel`).

How
    `torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")` is the op torch's own compiler
    (inductor) emits for a float32 linear layer on CPU: dense tensors in and out, the same (out, in)
    weight layout as nn.Linear, no weight conversion. It has no autograd formula, so it runs only
    when no gradient is needed; with autograd on, the layer is F.linear as always.

Measured with `python bench.py rollout` (`--linear mkl` and `--decode-threads all` turn each part off):
each raises the ratio to transformers' generate on the README's machine; the figures are there.
Prefill runs inside the block too. Measured both ways, the prefill alone is about as fast either
way (inside, faster for short prompts, slower for long ones, whose small ops have work for every
thread), but a decode loop on oneDNN that follows a prefill on MKL's matmuls runs slower, so the
rollout is faster with the prefill inside.

Departures and limits
    - Private op: looked up once at import; without it (a torch built without oneDNN, a non-x86 CPU)
      every call is F.linear.
    - float32 only: bfloat16 matmuls already go through oneDNN inside F.linear. Under CPU autocast,
      with tensor subclasses (a DTensor), zero input features or a single row (a matrix-vector
      product, where MKL's kernel is the faster one; see _MIN_ROWS) a layer also takes F.linear.
      FSDP2's forwards see plain unsharded parameters, so a sharded model's decode uses oneDNN too.
    - Only modules whose class keeps nn.Linear's own forward are switched (a subclass with its own
      forward, say a LoRA layer, keeps it), and attention modules are found by their HF name
      `self_attn` and read the KV cache's `length`, `prefix_len` and `prefix_k` (model.KVCache).
    - Results differ from F.linear's (MKL) by float32 rounding (a different summation order), not
      more: a ratio pi_theta / pi_old of the trainer's logprobs to the sampler's is 1 to about 1e-6,
      not exactly (tests/test_rollout.py checks the logprobs agree to 1e-4).
    - The thread count is process-wide torch state, so another Python thread running torch ops
      during a rollout runs them on one thread too. Nested blocks are no-ops for the thread count.
    - Attention gets every thread per module call, so with a long cache the module's small ops
      (RoPE, the cache write) run on every thread too.
"""

import contextlib
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

ONEDNN = True  # switch: False sends every linear layer to F.linear (MKL) inside cpu_decode too
SERIAL = True  # switch: False makes serial() a no-op (every op keeps every thread)
# Attention over at least this many keys gets every thread inside serial(): on the README's machine
# two threads are even with one at 256 keys and faster beyond (one call of the benchmark's batch).
PARALLEL_MIN_KEYS = 256
# A single row (batch-1 decoding) is a matrix-vector product, where MKL's kernel is the faster one
# (measured at 1 and 2 threads for every matrix of the benchmark model).
_MIN_ROWS = 2
_AVAILABLE = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_threads = 0  # inside serial(): the thread count parallel() blocks get back; 0 outside


# --- the matmul --------------------------------------------------------------------------------

def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `linear` takes oneDNN's path for these arguments."""
    return (ONEDNN and _AVAILABLE and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and x.shape[-1] > 0 and x.numel() >= _MIN_ROWS * x.shape[-1]
            and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and type(weight) in (torch.Tensor, torch.nn.Parameter) and type(x) is torch.Tensor)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, like F.linear: x (..., in), weight (out, in), bias (out,) -> (..., out);
    oneDNN's matmul where `uses_onednn`, else F.linear itself (the slow reference)."""
    if uses_onednn(x, weight):
        b = None if bias is None else bias.contiguous()  # the op reads the bias as dense
        return torch.ops.mkldnn._linear_pointwise(x, weight, b, "none", [], "")
    return F.linear(x, weight, bias)


# --- threads -----------------------------------------------------------------------------------

@contextlib.contextmanager
def serial():
    """Run the block on one torch thread, except its parallel() blocks; restore the count after."""
    global _threads
    n = torch.get_num_threads()
    if not SERIAL or _threads or n == 1:
        yield
        return
    _threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _threads = 0


@contextlib.contextmanager
def parallel(active: bool = True):
    """Inside serial(): run the block on every thread when `active`. Elsewhere: do nothing."""
    if not (active and _threads):
        yield
        return
    n = torch.get_num_threads()  # 1, or _threads in a nested parallel()
    torch.set_num_threads(_threads)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --- the context manager -----------------------------------------------------------------------

def _keys_read(cache, T: int) -> int:
    """The most keys one attention call of this forward reads: T new keys appended to the cache's;
    with a shared prompt, the prompt part and each row's own part are separate calls."""
    if cache is None:
        return T
    total = cache.length + T
    return total if cache.prefix_k is None else max(cache.prefix_len, total - cache.prefix_len)


def _fast_linear(m: nn.Linear):
    """m's forward inside the block: `linear` on m's weight and bias, on every thread."""
    def forward(x):
        with parallel():
            return linear(x, m.weight, m.bias)
    return forward


def _wide_attention(inner):
    """An attention module's forward (x (B, T, C), cos, sin, kv_start, cache), on every thread when it
    reads at least PARALLEL_MIN_KEYS keys."""
    def forward(x, cos, sin, kv_start, cache):
        with parallel(_keys_read(cache, x.shape[1]) >= PARALLEL_MIN_KEYS):
            return inner(x, cos, sin, kv_start, cache)
    return forward


@contextlib.contextmanager
def cpu_decode(model: nn.Module):
    """Run the block with `model`'s linear layers on oneDNN and every thread, its long attention on
    every thread, and everything else on one thread (see the module docstring). Does nothing for a
    model that is not on a CPU. Yields the model."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        yield model
        return
    saved = []  # (module, its instance-level forward before, or None)

    def swap(m, forward):
        saved.append((m, m.__dict__.get("forward")))
        m.forward = forward

    try:
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
                swap(m, _fast_linear(m))
            elif name.rsplit(".", 1)[-1] == "self_attn":
                swap(m, _wide_attention(m.forward))
        with serial():
            yield model
    finally:
        for m, forward in reversed(saved):
            if forward is None:
                del m.forward
            else:
                m.forward = forward
