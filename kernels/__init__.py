"""Fused kernels. `attention` is flash attention (Triton, with a torch SDPA fallback);
`attention_reference` is the float64 plain-torch version the tests compare it against."""

from kernels.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
