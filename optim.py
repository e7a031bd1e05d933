"""The optimizer every update of the recipe takes: AdamW, a learning-rate schedule, one clipped step.

- AdamW (Loshchilov & Hutter 2019) with betas (0.9, 0.95), the pair most LLM training uses
  (GPT-3, Llama, DeepSeek-V3 all take beta2 = 0.95).
- Supervised stages (toy pretraining, cold start, rejection-sampling SFT, distillation, the reward
  model): linear warm-up, then cosine decay to a fraction of the peak (`lr_at`).
- RL stages: linear warm-up, then constant (`warmup_lr`); DeepSeekMath §4.2 trains its policy at a
  constant 1e-6.
- `clip_and_step`: the global gradient-norm clip, then the step; a non-finite loss or gradient
  norm drops the gradient and raises instead, so a blown-up step is never applied, and parameters
  that a finite step made non-finite (an absurd learning rate) raise too, before anything saves them.

Imports torch only: grpo.py, sft.py and reward_model.py share this one step.
"""
from __future__ import annotations

import math

import torch

ADAM_BETAS = (0.9, 0.95)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # foreach=False: the per-parameter loop, one code path for plain and FSDP2 (DTensor) parameters
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay,
                             foreach=False)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to peak * min_ratio at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def warmup_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then constant at `peak`."""
    return peak * min(1.0, (step + 1) / max(1, warmup))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                  loss: float = 0.0) -> float:
    """Clip the global gradient norm to `max_grad_norm`, step, zero the gradients; return the norm
    before clipping. On a non-finite `loss` or norm: drop the gradient and raise FloatingPointError
    (the caller stops without saving); also when the step left a parameter non-finite."""
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)  # a DTensor under FSDP2
    if not math.isfinite(grad_norm) or not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)  # never step on a non-finite gradient
        raise FloatingPointError(f"loss {loss}, gradient norm {grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not parameters_finite(model):
        raise FloatingPointError(f"parameters non-finite after the step (gradient norm {grad_norm})")
    return grad_norm


def parameters_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite: one float64 sum over all of them (inf - inf and NaN both
    make it NaN, and float64 cannot overflow on float32 values), so one sync. Under FSDP2 each rank
    sums its own shards and the sums are added over ranks, so every rank gets the same answer."""
    total, sharded = torch.zeros((), dtype=torch.float64), False
    for p in model.parameters():
        x = p.detach()
        if hasattr(x, "to_local"):  # a DTensor shard (FSDP2)
            x, sharded = x.to_local(), True
        total = total.to(x.device) + x.sum(dtype=torch.float64)
    if sharded:
        torch.distributed.all_reduce(total)
    return bool(torch.isfinite(total))


def check_training(name: str, cfg) -> None:
    """The checks SFTConfig and RMConfig share: one line naming every bad setting."""
    bad = [f"{n}={getattr(cfg, n)}" for n in ("batch_size", "micro_batch") if getattr(cfg, n) < 1]
    bad += [f"{n}={getattr(cfg, n)}" for n in ("steps", "warmup", "lr") if getattr(cfg, n) < 0]
    bad += [] if cfg.max_len >= 2 else [f"max_len={cfg.max_len}"]
    bad += [] if 0 <= cfg.min_lr_ratio <= 1 and cfg.max_grad_norm > 0 else [
        f"min_lr_ratio={cfg.min_lr_ratio}, max_grad_norm={cfg.max_grad_norm}"]
    if bad:
        raise ValueError(f"{name}: {', '.join(bad)}; need batch sizes >= 1, steps, warmup and lr >= 0, "
                         "max_len >= 2, 0 <= min_lr_ratio <= 1 and max_grad_norm > 0")
