"""The model's linear layers on CPU: oneDNN's matmul when no gradient is needed, F.linear otherwise.

Why
    torch's float32 matmul on x86 CPUs calls MKL's sgemm. On the AMD EPYC (AVX-512) this project is
    measured on, MKL's verbose log names no vector extension ("Intel(R) Architecture processors")
    and it reaches about 100 GFLOP/s per core on the sampler's shapes, (64, 256) x (256, 2048) and
    alike; oneDNN, which torch ships too and which picks its kernels from the CPU's instruction set
    (its log: "isa: Intel AVX-512"), reaches about 200 (`python bench.py linear` prints both). Matmuls
    are half of a CPU decode step, so the sampler and every no-grad forward (reference-model
    logprobs, evaluation) route through oneDNN. On other CPUs the gap may be smaller or absent.

How
    `torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")` is the op torch's own compiler
    (inductor) emits for a float32 linear layer on CPU: dense tensors in and out, same (out, in) weight
    layout as nn.Linear, no weight conversion. It has no autograd formula, so it is used only under
    `torch.no_grad()` / `inference_mode()`; training forwards keep F.linear and its backward.

Departures and limits
    - Private op: it is looked up once at import; without it (a torch built without oneDNN, a
      non-x86 CPU) every call is F.linear. `ONEDNN = False` turns the fast path off (tests, A/B runs).
    - float32 only: bfloat16 matmuls already go through oneDNN inside F.linear.
    - Results differ from MKL's by float32 rounding (a different summation order), not more; the
      tests compare both against float64.
    - A single row (x with one row in all) takes F.linear: see _MIN_ROWS.
    - Tensor subclasses (a DTensor) take F.linear. FSDP2's forwards see plain unsharded parameters,
      so a sharded model's no-grad forwards use oneDNN too.
    - Under CPU autocast every call is F.linear, so the output dtype is autocast's.
    - The training forward (F.linear, MKL) and a no-grad forward (oneDNN) of the same weights agree
      to float32 rounding, not bit for bit: a ratio pi_theta / pi_old computed from the two is 1
      to about 1e-6 (see grpo.py), and a fork adding reentrant activation checkpointing would
      recompute with slightly different values.
"""

import platform

import torch
import torch.nn.functional as F

from kernels.threads import parallel

ONEDNN = True  # the one switch: False sends every call to F.linear
# A single row (batch-1 decoding) is a matrix-vector product, where MKL's kernel is the faster one
# (7-33 us against oneDNN's 16-74 us for the benchmark model's matrices, measured at 1 and 2 threads).
_MIN_ROWS = 2
_AVAILABLE = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `linear` takes oneDNN's path for these arguments."""
    return (ONEDNN and _AVAILABLE and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and x.shape[-1] > 0 and x.numel() >= _MIN_ROWS * x.shape[-1]
            and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and type(weight) in (torch.Tensor, torch.nn.Parameter) and type(x) is torch.Tensor)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, like F.linear: x (..., in), weight (out, in), bias (out,) -> (..., out).
    Inside a decode loop's `kernels.threads.serial()` block it still gets every thread."""
    with parallel():
        if uses_onednn(x, weight):
            b = None if bias is None else bias.contiguous()  # the op reads the bias as dense
            return torch.ops.mkldnn._linear_pointwise(x, weight, b, "none", [], "")
        return F.linear(x, weight, bias)

