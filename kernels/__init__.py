"""Kernels. `attention` is flash attention (our Triton kernel in kernels/flash_attention.py on CUDA,
torch SDPA elsewhere or without Triton); `prefix_attention` is a decode step over a prefix shared by
groups of rows (GRPO's G samples of one prompt); `attention_reference` is the float64 plain-torch
version the tests compare them against. kernels/cpu_decode.py holds the sampler's CPU fast paths,
applied only inside its decode loop (`from kernels.cpu_decode import cpu_decode`)."""

from kernels.attention import attention, attention_reference, padding_mask, prefix_attention

__all__ = ["attention", "attention_reference", "padding_mask", "prefix_attention"]
