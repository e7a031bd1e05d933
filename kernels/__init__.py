"""Fused kernels. `attention` is flash attention (Triton, with a torch SDPA fallback);
`prefix_attention` is a decode step over a prefix shared by groups of rows (GRPO's G samples of one
prompt); `attention_reference` is the float64 plain-torch version the tests compare them against."""

from kernels.attention import attention, attention_reference, prefix_attention

__all__ = ["attention", "attention_reference", "prefix_attention"]
