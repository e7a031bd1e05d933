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

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from optim import check_training, clip_and_step, set_lr


@dataclass
class SFTConfig:
    """One supervised stage's settings. The defaults are the toy's cold start (R1 stage 1); the
    recipe overrides some per stage (see settings.SFT_STAGE_DEFAULTS)."""
    steps: int = field(default=150, metadata={"help": "training steps (RL: rollout batches, each mu * "
                                                      "minibatches optimizer steps)"})
    batch_size: int = field(default=32, metadata={"help": "examples per optimizer step (global, over ranks)"})
    micro_batch: int = field(default=32, metadata={"help": "examples (RL: sequences) per forward/backward; "
                                                          "memory only, the update does not change"})
    lr: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "SFT: cosine decay ends at lr * min_lr_ratio"})
    warmup: int = field(default=10, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient L2 norm to this"})
    max_len: int = field(default=160, metadata={"help": "SFT: examples longer than this (tokens) are truncated"})

    def __post_init__(self):
        check_training("SFTConfig", self)


def encode_example(tok, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + eos, and a loss mask that is 1 on response and eos tokens."""
    p = tok.encode(prompt) if prompt else []
    r = tok.encode(response, add_bos=None if not p else False) + [tok.eos_id]  # BOS only at the start
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


def sft_step(model, optimizer, batch: list, pad_id: int, cfg: SFTConfig, lr: float,
             rank: int = 0, world: int = 1, all_reduce=None) -> dict:
    """One optimizer step on a global batch of encoded examples.

    Each rank takes every `world`-th example, runs micro-batches of `cfg.micro_batch`, and scales
    its loss so that the sum over ranks is the global token mean (FSDP averages gradients over
    ranks, hence the factor `world`). `all_reduce(x)` sums a float over ranks (None on one process).
    """
    # micro-batches of similar lengths pad less (the toy corpus mixes 20- and 130-token documents:
    # pretraining ran 2.4x faster per step at micro_batch 16 than unsorted at 64); the loss is a
    # sum over tokens, so the grouping does not change the update
    mine = sorted(batch[rank::world], key=lambda example: len(example[0]))
    total = float(sum(sum(m[1:]) for _, m in batch))  # target tokens in the global batch
    set_lr(optimizer, lr)
    device = next(model.parameters()).device
    loss_sum = 0.0
    for i in range(0, len(mine), cfg.micro_batch):
        ids, mask = collate(mine[i:i + cfg.micro_batch], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        loss = sft_loss(model(ids), ids, mask, total_tokens=total) * world
        loss.backward()
        loss_sum += loss.item() / world
    if all_reduce is not None:
        loss_sum = all_reduce(loss_sum)
    grad_norm = clip_and_step(model, optimizer, cfg.max_grad_norm, loss_sum)
    return {"loss": loss_sum, "grad_norm": grad_norm, "lr": lr, "tokens": total}
