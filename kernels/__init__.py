"""Fused kernels. `attention` is flash attention (Triton, with a torch SDPA fallback);
`prefix_attention` is a decode step over a prefix shared by groups of rows (GRPO's G samples of one
prompt); `attention_reference` is the float64 plain-torch version the tests compare them against.
`linear` is F.linear, through oneDNN for no-grad float32 forwards on x86 CPUs."""

from kernels.attention import attention, attention_reference, prefix_attention
from kernels.linear import linear

__all__ = ["attention", "attention_reference", "linear", "prefix_attention"]
