"""Supervised fine-tuning: next-token cross-entropy on response tokens only.

Serves every supervised stage of the recipe (DeepSeek-R1 report, section 2.3):
- pretraining of the embedded toy model (a "response" with an empty prompt: loss on every token),
- stage 1, cold start: SFT of the base model on filtered long chain-of-thought samples (2.3.1),
- stage 3, rejection sampling: SFT on verified reasoning samples plus general samples (2.3.3),
- distillation: SFT of a small student on the large model's traces (section 2.4).

The prompt is formatted by the same template the RL stages use (the task's `prompt` field is
already templated), the response is appended, then the end-of-sequence token, so what SFT
teaches is exactly what the sampler later continues. Batches are right-padded: with causal
attention, padding after the last real token changes nothing before it.

Departures: no sequence packing (toy and GSM8K samples are short and padding is cheap at this
scale; packing would need a block-diagonal mask); the loss is a token mean over the whole
(global) batch, not a per-sample mean, so long samples weigh more (as in most SFT code).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SFTConfig:
    steps: int = 300                # optimizer steps
    batch_size: int = 32            # examples per optimizer step (global, across ranks)
    micro_batch: int = 32           # examples per forward/backward (gradient accumulation below it)
    lr: float = 1e-3                # peak AdamW learning rate
    min_lr_ratio: float = 0.1       # cosine decay ends at lr * min_lr_ratio
    warmup: int = 20                # linear warm-up steps
    weight_decay: float = 0.0       # AdamW decoupled weight decay
    max_grad_norm: float = 1.0      # gradient clipping (global L2 norm)
    max_len: int = 256              # examples longer than this (in tokens) are truncated
    epochs_shuffle_seed: int = 0    # data order seed (the data position is saved for resume)


def encode_example(tok, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + eos, and a loss mask that is 1 on response and eos tokens."""
    p = tok.encode(prompt) if prompt else []
    r = tok.encode(response) + [tok.eos_id]
    ids, mask = (p + r)[:max_len], ([0] * len(p) + [1] * len(r))[:max_len]
    return ids, mask


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: ids (B, T) long, loss mask (B, T) float."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)   # (B, T)
    mask = torch.zeros(len(examples), T)                              # (B, T)
    for i, (x, m) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    return ids, mask


def sft_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
             total_tokens: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over masked target tokens.

    logits (B, T, V) predict ids[:, 1:]; mask (B, T) marks which target tokens count. With
    `total_tokens` (the masked-token count of the whole global batch), the result is this
    micro-batch's share, so shares summed over micro-batches and ranks give the batch mean:
    the gradient does not depend on how the batch is split.
    """
    tgt_mask = mask[:, 1:]                                                     # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                          reduction="none").view_as(tgt_mask)                  # (B, T-1)
    denom = total_tokens if total_tokens is not None else tgt_mask.sum().clamp(min=1)
    return (nll * tgt_mask).sum() / denom


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to peak * min_ratio (the usual LLM schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class ExampleStream:
    """An endless, reshuffled-every-epoch stream over encoded examples; `position` is the number
    of examples handed out so far, which is all a resumed run needs to continue the same order."""

    def __init__(self, examples: list, seed: int, position: int = 0):
        if not examples:
            raise ValueError("SFT data is empty; check the data file or the filter that built it")
        self.examples, self.seed, self.position = examples, seed, 0
        self._order: list[int] = []
        self.take(position)

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.examples))
            if i == 0 or not self._order:
                self._order = list(range(len(self.examples)))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            out.append(self.examples[self._order[i]])
            self.position += 1
        return out


def sft_step(model, optimizer, batch: list, pad_id: int, cfg: SFTConfig, lr: float,
             rank: int = 0, world: int = 1, all_reduce=None) -> dict:
    """One optimizer step on a global batch of encoded examples.

    Each rank takes every `world`-th example, runs micro-batches of `cfg.micro_batch`, and scales
    its loss so that the sum over ranks is the global token mean (FSDP averages gradients over
    ranks, hence the factor `world`). `all_reduce(x)` sums a float over ranks (None on one process).
    """
    mine = batch[rank::world]
    total = float(sum(sum(m[1:]) for _, m in batch))  # target tokens in the global batch
    for g in optimizer.param_groups:
        g["lr"] = lr
    loss_sum = 0.0
    for i in range(0, len(mine), cfg.micro_batch):
        ids, mask = collate(mine[i:i + cfg.micro_batch], pad_id)
        ids, mask = ids.to(_device(model)), mask.to(_device(model))
        loss = sft_loss(model(ids), ids, mask, total_tokens=total) * world
        loss.backward()
        loss_sum += loss.item() / world
    if all_reduce is not None:
        loss_sum = all_reduce(loss_sum)
    grad_norm = clip_and_step(model, optimizer, cfg.max_grad_norm, loss_sum)
    return {"loss": loss_sum, "grad_norm": grad_norm, "lr": lr, "tokens": total}


def clip_and_step(model, optimizer, max_grad_norm: float, loss: float = 0.0) -> float:
    """Clip the global gradient norm and take the optimizer step; on a non-finite loss or norm,
    drop the gradient and raise FloatingPointError instead (train.py stops without saving)."""
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)  # DTensor under FSDP
    if not math.isfinite(grad_norm) or not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)  # never step on a non-finite gradient
        raise FloatingPointError(f"loss {loss}, gradient norm {grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _device(model) -> torch.device:
    return next(model.parameters()).device
