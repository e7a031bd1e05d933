"""The CUDA path: the Triton kernel compiled (not interpreted), bf16 on a GPU, NCCL and FSDP2, memory
at a real model's shape. Every test here is skipped without a CUDA device (CI has none); the file
still imports and collects on a CPU. scripts/device-check.sh runs it on a lent H100/H200.

Tolerances of the kernel tests (FlashAttention's own test rule): the kernel's largest error against
the float64 reference may be at most twice that of torch's SDPA in the same dtype on the same inputs,
plus two spacings of the dtype (2^-8 bf16, 2^-11 fp16) times the largest reference value; and never
above 5% of it, so a loose SDPA cannot hide a wrong mask (a wrong mask is off by the whole value).
"""
import importlib
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import grpo
import rollout
from kernels import attention, attention_reference
from model import Transformer, preset

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
HAS_TRITON = importlib.import_module("kernels.attention")._triton is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")
ROOT = Path(__file__).resolve().parents[1]
SPACING = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
DEV = "cuda"  # the kernel tests' device (a CPU dry run of their logic sets "cpu" under the interpreter)

# name: (dtype, B, H, Hkv, Tq, Tk, D, causal, kv_start). Each (dtype, D, causal, padded) compiles
# the autotuner's configs once, so the cases cover every mode in each dtype without the full product.
KERNEL_CASES = {
    "bf16_causal_gqa_T4096_D128": (torch.bfloat16, 1, 4, 2, 4096, 4096, 128, True, None),
    "fp16_causal_gqa_T4096_D64": (torch.float16, 1, 4, 2, 4096, 4096, 64, True, None),
    "bf16_noncausal_gqa_T2048_D64": (torch.bfloat16, 2, 4, 2, 2048, 2048, 64, False, None),
    "fp16_noncausal_mqa_T2048_D128": (torch.float16, 1, 8, 1, 2048, 2048, 128, False, None),
    "bf16_ragged_causal_T1500_D64": (torch.bfloat16, 3, 4, 2, 1500, 1500, 64, True, [0, 700, 1499]),
    "fp16_ragged_causal_T1500_D128": (torch.float16, 3, 4, 1, 1500, 1500, 128, True, [0, 37, 1200]),
    "bf16_ragged_chunked_Tq300_Tk4096_D128": (torch.bfloat16, 2, 4, 2, 300, 4096, 128, True, [0, 2000]),
    "fp16_ragged_noncausal_T1000_D64": (torch.float16, 2, 4, 2, 1000, 1000, 64, False, [5, 999]),
    "bf16_ragged_decode_Tk4096_D128": (torch.bfloat16, 2, 8, 2, 1, 4096, 128, True, [0, 3000]),
}


def _forward_backward(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn at fresh leaves q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


@needs_triton
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_float64_reference(case):
    dtype, B, H, Hkv, Tq, Tk, D, causal, kv_start = KERNEL_CASES[case]
    g = torch.Generator(device=DEV).manual_seed(0)
    q, do = (torch.randn(B, H, Tq, D, device=DEV, generator=g).to(dtype) for _ in range(2))  # (B, H, Tq, D)
    k, v = (torch.randn(B, Hkv, Tk, D, device=DEV, generator=g).to(dtype) for _ in range(2))  # (B, Hkv, Tk, D)
    kw = dict(causal=causal, kv_start=None if kv_start is None else torch.tensor(kv_start, device=DEV))
    ours = _forward_backward(attention, q, k, v, do, backend="triton", **kw)
    sdpa = _forward_backward(attention, q, k, v, do, backend="torch", **kw)
    ref = _forward_backward(attention_reference, q.double(), k.double(), v.double(), do.double(), **kw)
    for name, a, s, r in zip(("out", "dq", "dk", "dv"), ours, sdpa, ref):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        scale = r.abs().max().item()
        err, err_sdpa = (a.double() - r).abs().max().item(), (s.double() - r).abs().max().item()
        bound = min(2 * err_sdpa + 2 * SPACING[dtype] * scale, 0.05 * scale)
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (sdpa {err_sdpa:.3g}, scale {scale:.3g})"
    if kv_start is not None:  # rows that see no key: exactly 0, and so are their gradients
        b = max(range(B), key=lambda i: kv_start[i])
        empty = min(Tq, max(0, kv_start[b] - (Tk - Tq))) if causal else (Tq if kv_start[b] >= Tk else 0)
        assert torch.equal(ours[0][b, :, :empty], torch.zeros_like(ours[0][b, :, :empty]))


def _same_model(cfg, seed=0):
    """The same random weights as a CPU model and a CUDA model (float32)."""
    torch.manual_seed(seed)
    cpu = Transformer(cfg).eval()
    gpu = Transformer(cfg)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda().eval()


def test_model_logits_cuda_equal_cpu_fp32():
    cfg = preset("micro", vocab_size=256, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)
    cpu, gpu = _same_model(cfg)
    ids = torch.randint(0, 256, (3, 100), generator=torch.Generator().manual_seed(1))
    start = torch.tensor([0, 30, 99])  # ragged left padding, one row with a single real token
    with torch.no_grad():
        want = cpu(ids, kv_start=start)                           # (B, T, V) SDPA on CPU
        got = gpu(ids.cuda(), kv_start=start.cuda()).cpu()        # (B, T, V) Triton on CUDA (if installed)
    # float32 both ways (the kernel's fp32 matmuls are IEEE, not TF32): rounding-order differences only
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def test_greedy_rollout_cuda_equals_cpu():
    # init_std 0.1 as in tests/test_rollout.py: wide logit gaps, so no near-tie decides a token
    cpu, gpu = _same_model(preset("toy", vocab_size=50, num_layers=2, init_std=0.1))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16, 17, 18]]  # ragged
    kw = dict(temperature=0, num_samples=2, eos_token_id=[7, 13], seed=0)  # G=2: the shared-prefix decode
    a, b = rollout.generate(cpu, prompts, 24, **kw), rollout.generate(gpu, prompts, 24, **kw)
    assert a.tokens == b.tokens and a.finish_reasons == b.finish_reasons
    assert (a.old_logprobs - b.old_logprobs.cpu()).abs().max() < 1e-4


def _metrics(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def test_grpo_step_bf16_on_cuda(tmp_path):
    import train
    tiny = ["--model", "micro", "--eval_n", "4", "--eval_every", "0", "--prompts_per_step", "4", "--group_size",
            "4", "--max_new_tokens", "16", "--micro_batch", "8", "--batch_size", "8", "--out", str(tmp_path)]
    assert train.main(["--stage", "pretrain", "--steps", "2", "--device", "cpu", *tiny]) == 0
    assert train.main(["--stage", "zero", "--steps", "1", "--device", "cuda", "--dtype", "bfloat16", *tiny]) == 0
    row = [r for r in _metrics(tmp_path / "zero" / "metrics.jsonl") if r["step"] == 1][0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    assert row["kl"] < 1e-4  # policy == reference at step 1, both bf16 forwards on the same kernels
    assert 0.999 < row["ratio_min"] <= row["ratio_max"] < 1.001  # pi_old is the trainer's own forward on CUDA
    cfg = json.loads((tmp_path / "zero" / "model" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"


FSDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, {root!r})
import rollout
from checkpoint import full_state
from model import Transformer, preset
from optim import clip_and_step, make_optimizer

torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1,
                        device_id=torch.device("cuda", 0))
torch.manual_seed(0)
cfg = preset("micro", vocab_size=64, init_std=0.1)  # wide logit gaps: greedy has no near-ties
plain = Transformer(cfg).cuda()
sharded = Transformer(cfg).cuda()
sharded.load_state_dict(plain.state_dict())
for block in sharded.layers:  # what runtime.shard does on more than one rank
    fully_shard(block)
fully_shard(sharded)
ids = torch.randint(0, 64, (4, 20), device="cuda")
for m in (plain, sharded):
    opt = make_optimizer(m, 1e-3, 0.0)
    loss = m(ids).float().logsumexp(-1).mean()
    loss.backward()
    clip_and_step(m, opt, 1.0, loss.item())  # the gradient norm is an NCCL all-reduce under FSDP2
state = full_state(sharded)  # all-gathered to full tensors on CPU
for name, want in plain.state_dict().items():
    assert torch.allclose(state[name].float(), want.cpu().float(), atol=1e-6), name
r1 = rollout.generate(plain, [[1, 2, 3], [4, 5]], 8, temperature=0, num_samples=2)
r2 = rollout.generate(sharded, [[1, 2, 3], [4, 5]], 8, temperature=0, num_samples=2)
assert r1.tokens == r2.tokens
dist.barrier()
dist.destroy_process_group()
print("fsdp2 nccl ok")
"""


def test_fsdp2_one_process_nccl_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(FSDP_SCRIPT.format(root=str(ROOT), port=port))],
                       capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0 and "fsdp2 nccl ok" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]


# One GRPO update at the Qwen2.5-0.5B shape: 16 sequences of 1024 tokens, micro-batches of 8. Expected
# peak: bf16 weights and gradients 2 x 0.99 GB, AdamW's float32 master and two moments 3 x 1.98 GB
# (optim.MasterAdamW); the saved activations of one micro-batch, 63 KB per token and layer (measured
# on CPU at this width with saved-tensor hooks: norm inputs, q/k/v, attention output, the MLP's
# 2 x 4864 wide gate/up and their product) x 24 layers x 8192 tokens = 12.4 GB; its logits and their
# gradient 2 x 2.5 GB. About 25.5 GB; the bound leaves 50% for the allocator's slack and cuBLAS
# workspaces, and fails if a micro-batch's activations outlive it.
PEAK_BOUND_GIB = 38


def test_peak_memory_grpo_step_qwen05b_shape():
    import bench_gpu
    from optim import make_optimizer
    model = bench_gpu.random_model("cuda").train()
    opt = make_optimizer(model, 1e-6, 0.0)
    batch = bench_gpu.grpo_batch(model, 16, 256, 768)
    torch.cuda.reset_peak_memory_stats()
    stats = grpo.policy_update(model, batch, grpo.GRPOConfig(micro_batch=8, max_new_tokens=768),
                               grpo.LossConfig(), opt, 1e-6)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    out = os.environ.get("R1_DEVICE_OUT")  # scripts/device-check.sh collects the figure from here
    if out:
        Path(out, "peak_memory.json").write_text(json.dumps({"grpo_peak_mem_GiB": peak}) + "\n")
    assert math.isfinite(stats["loss"]) and abs(stats["kl"]) < 1e-3
    assert peak < PEAK_BOUND_GIB, f"peak {peak:.1f} GiB"
