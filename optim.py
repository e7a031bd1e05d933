"""The optimizer every update of the recipe takes: AdamW, a learning-rate schedule, one clipped step.

- AdamW (Loshchilov & Hutter 2019) with betas (0.9, 0.95), the pair most LLM training uses
  (GPT-3, Llama, DeepSeek-V3 all take beta2 = 0.95).
- Supervised stages (toy pretraining, cold start, rejection-sampling SFT, distillation, the reward
  model): linear warm-up, then cosine decay to a fraction of the peak (`lr_at`).
- RL stages: linear warm-up, then constant (`warmup_lr`); DeepSeekMath §4.2 trains its policy at a
  constant 1e-6.
- Mixed precision: parameters held in bf16 (`--dtype bfloat16`, the default on CUDA) are stepped
  through float32 master copies kept in the optimizer's state (`MasterAdamW`), as mixed-precision
  training does (Micikevicius et al. 2018): AdamW's moments and the update are float32 and the bf16
  weight is the master rounded to nearest. Without them an update below half a bf16 spacing of its
  weight is lost: at DeepSeekMath's RL rate of 1e-6 every weight above ~5e-4 would never move.
- `clip_and_step`: the global gradient-norm clip, then the step; a non-finite loss or gradient
  norm drops the gradient and raises instead, so a blown-up step is never applied, and parameters
  that a finite step made non-finite (an absurd learning rate) raise too, before anything saves them.

Imports torch only: grpo.py, sft.py and reward_model.py share this one step.
"""
from __future__ import annotations

import math

import torch

ADAM_BETAS = (0.9, 0.95)


class MasterAdamW(torch.optim.AdamW):
    """AdamW whose low-precision parameters are stepped through float32 master copies.

    Float32 parameters take torch's AdamW unchanged. For any other, the per-parameter state holds a
    float32 `master` beside float32 moments, the AdamW update (torch's formula, written out in
    `_master_step`) is applied to the master with the gradient upcast, and the parameter becomes the
    master rounded to its dtype. The master lives in the state, so the trainer state's optimizer dict
    saves it and FSDP2 shards it like the moments (every op here works on DTensors too)."""

    @torch.no_grad()
    def step(self, closure=None):
        low = [(p, group) for group in self.param_groups for p in group["params"]
               if p.grad is not None and p.dtype != torch.float32]
        grads = [p.grad for p, _ in low]
        for p, _ in low:
            p.grad = None  # hidden from torch's step, which then sees only the float32 parameters
        try:
            loss = super().step(closure)
        finally:
            for (p, _), g in zip(low, grads):
                p.grad = g
        for p, group in low:
            self._master_step(p, group)
        return loss

    def _master_step(self, p: torch.Tensor, group: dict) -> None:
        """torch.optim.AdamW's single-tensor update (decoupled weight decay, bias-corrected moments)
        on the float32 master of `p`, then p = master rounded."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["master"] = p.detach().float()
        (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
        master, m, v, grad = state["master"], state["exp_avg"], state["exp_avg_sq"], p.grad.float()
        state["step"] += 1
        step = float(state["step"])
        master.mul_(1 - lr * group["weight_decay"])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        master.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
        p.copy_(master)  # round to the parameter's dtype

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every floating state tensor to its parameter's dtype, which would round
        a bf16 parameter's master and moments to bf16: put the float32 values back after it."""
        kept = {i: {k: v for k, v in s.items() if torch.is_tensor(v) and k != "step"}
                for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        # the saved ids (indices, or names from torch.distributed.checkpoint) in the groups' order
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = dict(zip(ids, (p for group in self.param_groups for p in group["params"])))
        for i, tensors in kept.items():
            p = params[i]
            if p.dtype != torch.float32:
                self.state[p].update({k: v.to(device=p.device, dtype=torch.float32) for k, v in tensors.items()})


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # foreach=False: the per-parameter loop, one code path for plain and FSDP2 (DTensor) parameters
    return MasterAdamW(model.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay, foreach=False)


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
