"""A preference reward model: R1 stage 4's reward for general (non-verifiable) data.

DeepSeek-R1 report (Guo et al. 2025), section 2.3.4: in the last RL stage, "for general data, we
resort to reward models to capture human preferences in complex and nuanced scenarios". The report
does not describe its reward model, so this is the standard one of InstructGPT (Ouyang et al. 2022,
section 3.5): the SFT model with its unembedding replaced by a linear layer to one scalar, trained
on human comparisons with the pairwise Bradley-Terry loss (their eq. 1)

    loss = -E_(x, y_w, y_l) [ log sigmoid( r(x, y_w) - r(x, y_l) ) ],

y_w the chosen response, y_l the rejected one. The score r(x, y) is read at the last real token
of prompt + response + eos: the end-of-sequence token is the one position that has attended to
the whole response. `score_texts` appends the eos to every response, cut off by the length limit
or not; what an unfinished response is worth is the RL stage's decision, not this model's.

Its checkpoint (`checkpoint.save_reward_model` / `load_reward_model`) is the backbone as an
ordinary HF-layout directory plus the score head and a marker file; see checkpoint.py.

Departures from InstructGPT:
- One comparison per prompt (K = 2). InstructGPT ranks K = 4..9 responses and puts all C(K, 2)
  pairs of a prompt in one batch element so they do not overfit; the toy data has one pair a prompt.
- The score is not normalised after training (InstructGPT shifts it so demonstrations score 0 on
  average). GRPO normalises rewards within each group, which cancels any offset; the scale still
  matters when the score is added to rule-based rewards, so the RL stage should weigh it.
- InstructGPT starts from its SFT model; the recipe's rm stage starts from the base model (or
  --init DIR, e.g. an SFT checkpoint: `checkpoint.load_pretrained`, then `init_reward_model`), and
  the tests train micro backbones from scratch.
- Pairs are truncated from the left (prompt first) so the eos token, where the score is read,
  always survives; InstructGPT does not say how it truncates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Transformer
from optim import check_training, clip_and_step, set_lr
from tokenizer import Tokenizer


# Toy defaults: on the toy's preference pairs a "toy" backbone ranks held-out pairs right after a
# few dozen steps at this lr. InstructGPT (appendix C.2) trains its 6B reward model at lr 9e-6,
# batch 64, cosine to 10% of the peak, one epoch.
@dataclass
class RMConfig:
    steps: int = field(default=40, metadata={"help": "optimizer steps (one pass over steps * batch_size pairs)"})
    batch_size: int = field(default=32, metadata={"help": "preference pairs per optimizer step (global)"})
    micro_batch: int = field(default=32, metadata={"help": "pairs per forward/backward (2 rows each)"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (sized for the toy)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at lr * min_lr_ratio"})
    warmup: int = field(default=10, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient L2 norm to this"})
    max_len: int = field(default=256, metadata={"help": "prompt + response + eos longer than this is cut "
                                                       "from the left"})

    def __post_init__(self):
        check_training("RMConfig", self)


# --- the model --------------------------------------------------------------------------------

class RewardModel(nn.Module):
    """A `Transformer` backbone and a linear score head on its final (normed) hidden state."""

    def __init__(self, backbone: Transformer):
        super().__init__()
        self.backbone = backbone
        p = backbone.embed_tokens.weight
        self.score_head = nn.Linear(backbone.cfg.hidden_size, 1, device=p.device, dtype=p.dtype)
        self.init_head()

    def init_head(self):
        """Zero weight and bias: every response scores 0 at first, so the first loss is exactly
        log 2 and the head starts with no preference of its own (a random head would add a
        random ranking that training must first undo). The backbone gets gradient from step 2,
        once the head is non-zero."""
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)

    def forward(self, input_ids: torch.Tensor, kv_start: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> scores (B,) float32, read at each row's last real token.

        Right-padded rows: `lengths` (B,) counts the real tokens, the score is read at lengths-1.
        Left-padded rows: `kv_start` (B,) is the first real token (as in `Transformer.forward`),
        the score is read at kv_start + lengths - 1, or at T-1 without `lengths`.
        """
        B, T = input_ids.shape
        h = self.backbone(input_ids, kv_start=kv_start, return_hidden=True)         # (B, T, C)
        if lengths is None:
            last = torch.full((B,), T - 1, dtype=torch.long, device=h.device)     # (B,)
        else:
            last = lengths.to(h.device) - 1 + (0 if kv_start is None else kv_start.to(h.device))
        h_last = h[torch.arange(B, device=h.device), last]                          # (B, C)
        return self.score_head(h_last).squeeze(-1).float()                          # (B,)


def init_reward_model(backbone: Transformer) -> RewardModel:
    """A fresh reward model on `backbone` (the SFT model in the recipe); see `init_head`."""
    return RewardModel(backbone)


# --- data -------------------------------------------------------------------------------------

def encode_pair(tok: Tokenizer, prompt: str, response: str, max_len: int) -> list[int]:
    """Token ids of prompt + response + eos, at most max_len of them.

    Too long: the first tokens are dropped (the prompt's, then the response's), never the eos
    the score is read at. Prompt and response are encoded apart, as sft.encode_example does.
    """
    p = tok.encode(prompt) if prompt else []
    return (p + tok.encode(response, add_bos=None if not p else False) + [tok.eos_id])[-max_len:]


def collate_scores(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: ids (B, T) long and lengths (B,) long. With causal attention the
    padding after a row's last token changes nothing at or before it."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)   # (B,)
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


# --- the loss ---------------------------------------------------------------------------------

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       total_pairs: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT eq. 1 on scores chosen (N,), rejected (N,): mean of -log sigmoid(c - r).

    With `total_pairs` (pairs in the whole global batch) the result is this micro-batch's share,
    so shares summed over micro-batches and ranks give the batch mean (as sft.sft_loss does).
    Also returns the fraction of these pairs ranked right (c > r; a tie counts as wrong), no grad.
    """
    margin = chosen.float() - rejected.float()                     # (N,)
    nll = -F.logsigmoid(margin)                                    # (N,) = log(1 + exp(-margin))
    denom = total_pairs if total_pairs is not None else max(margin.numel(), 1)
    return nll.sum() / denom, (margin.detach() > 0).float().mean()


# --- training ---------------------------------------------------------------------------------

def rm_step(rm: RewardModel, optimizer, pairs_batch: list[dict], tok: Tokenizer, cfg: RMConfig,
            lr: float, rank: int = 0, world: int = 1, all_reduce=None) -> dict:
    """One optimizer step on a global batch of {prompt, chosen, rejected} pairs.

    Each rank takes every `world`-th pair and runs micro-batches of `cfg.micro_batch` pairs, the
    chosen and rejected rows of a micro-batch in one forward. The loss is scaled by `world`
    because FSDP averages gradients over ranks; summed, the ranks' shares give the global mean.
    `all_reduce(x)` sums a float over ranks (None on one process).
    """
    mine = pairs_batch[rank::world]
    total = float(len(pairs_batch))
    set_lr(optimizer, lr)
    dev = next(rm.parameters()).device
    loss_sum = correct = margin_sum = 0.0
    for i in range(0, len(mine), cfg.micro_batch):
        chunk = mine[i:i + cfg.micro_batch]
        seqs = ([encode_pair(tok, p["prompt"], p["chosen"], cfg.max_len) for p in chunk]
                + [encode_pair(tok, p["prompt"], p["rejected"], cfg.max_len) for p in chunk])
        ids, lengths = collate_scores(seqs, tok.pad_id)           # (2m, T), (2m,)
        scores = rm(ids.to(dev), lengths=lengths.to(dev))         # (2m,)
        chosen, rejected = scores[:len(chunk)], scores[len(chunk):]  # (m,) each
        loss, acc = bradley_terry_loss(chosen, rejected, total_pairs=total)
        (loss * world).backward()
        loss_sum += loss.item()
        correct += acc.item() * len(chunk)
        margin_sum += (chosen - rejected).sum().item()
    if all_reduce is not None:
        loss_sum, correct, margin_sum = all_reduce(loss_sum), all_reduce(correct), all_reduce(margin_sum)
    grad_norm = clip_and_step(rm, optimizer, cfg.max_grad_norm, loss_sum)
    return {"loss": loss_sum, "accuracy": correct / total, "margin": margin_sum / total,
            "grad_norm": grad_norm, "lr": lr, "pairs": total}


# --- scoring ----------------------------------------------------------------------------------

@torch.no_grad()
def score_texts(rm: RewardModel, tok: Tokenizer, prompts: list[str], responses: list[str],
                max_len: int, batch_size: int = 64) -> torch.Tensor:
    """Scores (N,) float32 on the CPU of N prompt/response pairs (the RL stage's reward), batched.
    `responses` are the generated texts without the eos; it is appended here, as in training."""
    if len(prompts) != len(responses):
        raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses; pass one each")
    dev = next(rm.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [encode_pair(tok, p, r, max_len) for p, r in zip(prompts[i:i + batch_size],
                                                                responses[i:i + batch_size])]
        ids, lengths = collate_scores(seqs, tok.pad_id)           # (b, T), (b,)
        out.append(rm(ids.to(dev), lengths=lengths.to(dev)).cpu())  # (b,)
    return torch.cat(out) if out else torch.zeros(0)


def pairwise_accuracy(rm: RewardModel, tok: Tokenizer, pairs: list[dict], max_len: int,
                      batch_size: int = 64) -> float:
    """Fraction of pairs with score(chosen) > score(rejected) (ties count as wrong)."""
    if not pairs:
        raise ValueError("pairwise_accuracy: no pairs given; pass a non-empty list of {prompt, chosen, rejected}")
    prompts = [p["prompt"] for p in pairs]
    c = score_texts(rm, tok, prompts, [p["chosen"] for p in pairs], max_len, batch_size)    # (N,)
    r = score_texts(rm, tok, prompts, [p["rejected"] for p in pairs], max_len, batch_size)  # (N,)
    return (c > r).float().mean().item()
