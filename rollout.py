"""Rollouts for GRPO: a batched KV-cache sampler that draws G completions per prompt.

GRPO (DeepSeekMath, Shao et al. 2024, §4.1) samples a group of G outputs {o_1..o_G} from the old
policy for each question q and scores each output against the group's other outputs. Here a group is
`num_samples` completions of one prompt: the prompt is prefilled once into the KV cache and its
slots are shared by its G rows (`KVCache.share_prefix`: stored once, never copied), and all P*G rows
then decode together, one token per step, each step attending to the cache instead of recomputing
the prefix. Decode attention is `kernels.prefix_attention`: each prompt's keys are read once for its
G samples and merged with each sample's own keys by log-sum-exp (Triton on CUDA, torch elsewhere).

Sampling is temperature, then top-k, then nucleus (top-p) truncation (Holtzman et al. 2020, "The
Curious Case of Neural Text Degeneration", §3.1: the smallest set of tokens whose probability mass
reaches p), drawn with an explicit `torch.Generator`, so a seed fixes the whole rollout.

What the trainer gets (`Rollout`): the completions as lists and, in the layout `grpo.py` consumes,
`input_ids` (N, Tp+Tc) with the prompt left-padded to Tp and the completion right-padded to Tc,
`kv_start`, `completion_mask` and `old_logprobs`; `model(r.input_ids, kv_start=r.kv_start)` followed
by `token_logprobs(...)` recomputes `old_logprobs` (the test checks max |diff| < 1e-4 in fp32).

Shapes: P prompts, G = num_samples, N = P * G rows (prompt-major: sample j of prompt i is row
i * G + j), B rows still decoding, Tp longest prompt, Tc longest completion, S cache slots, V vocab.

Departures and choices:
- Logprobs are those of softmax(logits / temperature) over the whole vocabulary, *before* top-k/top-p
  truncation (temperature 1 when greedy): that is the distribution the trainer recomputes from
  logits, so the importance ratio pi_theta / pi_old is exactly 1 on the first pass. The tokens are
  drawn from the truncated distribution, so with top_p < 1 or top_k > 0 pi_old is not strictly the
  sampling distribution (TRL's GRPOTrainer makes the same choice).
- Draws use a two-level inverse CDF (one uniform per row, float64 prefix sums over blocks, then
  inside the chosen block) instead of torch.multinomial, whose V exponentials per row cost more than
  the rest of a CPU decode step's sampling; same distribution, different random stream.
- Static batch, no continuous batching or paged cache (vLLM): rows that finish keep running until
  fewer than 3/4 of the batch is alive, then the batch is compacted with `KVCache.select`, which
  copies the shared prompt slots into the rows it keeps (from then on a plain per-row cache).
- Each prompt has its own random stream (`seed` per prompt, or derive_seed(seed, i) for prompt i),
  drawn up front as one uniform per sample and step (`_uniforms`), so a sample's tokens depend on
  its prompt's seed and its logits only, not on the other rows in the batch: the trainer seeds each
  prompt by its index in the global batch, and a rollout split over ranks is the one-process rollout
  (up to float rounding of the logits). Same inputs + same seed = same rollout.
- A completion ends at an end-of-sequence id or at max_new_tokens; there are no stop strings.
- top-k keeps every token tied with the k-th largest logit (no tie-breaking).
- The longest prompt plus max_new_tokens must fit in the model's context (`cfg.max_seq_len`).
- On CPU, prefill and the decode loop run inside `kernels.cpu_decode.cpu_decode`: oneDNN's matmuls
  and long attention on every thread, the rest on one (a small batch's ops are too small to split
  over threads); on a GPU it changes nothing.
- Runs under `torch.no_grad()`, not `inference_mode()`: tensors created under inference mode can
  never be saved for backward, yet the trainer feeds `input_ids` to an embedding, and FSDP2 would
  allocate its unsharded parameters here (as inference tensors, unusable for training after).
- FSDP2 (`gathered_weights`): every shard is all-gathered once per rollout, not once per token, and
  the full weights stay resident for all decode steps (memory: one full copy per rank while
  generating). After that one unshard, FSDP2's per-forward unshard is a no-op, so the decode loop
  issues no collectives and ranks may finish after different numbers of steps; every rank must
  still call `generate` (the unshard itself is collective).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from kernels.cpu_decode import cpu_decode

FINISH_REASONS = ("length", "eos")  # code 0, 1 in the per-row finish tensor
# Compact the batch (copy the alive rows of the cache) once fewer than this fraction of rows is alive:
# the copy costs about as much memory traffic as one decode step, so it pays only if it removes a
# sizeable share of every later step's work.
_COMPACT_BELOW = 0.75
# token_logprobs materialises at most this many float32 logits at once (256 MiB): a chunk of the
# sequence, not (N, L, V) of a 151k vocabulary.
_LOGPROB_CHUNK_ELEMS = 1 << 26
# Tokens per block of the two-level inverse-CDF draw (`_inverse_cdf`): about sqrt(V) for V ~ 16k-152k.
_CDF_BLOCK = 128


class ContextError(ValueError):
    """A prompt plus max_new_tokens does not fit the model's context: the caller's input is wrong."""


class NonFiniteLogits(FloatingPointError):
    """The model's next-token scores are NaN or inf: its weights have blown up; nothing to sample."""

    def __init__(self):
        super().__init__("sampling: the model's logits are NaN or inf (its weights have blown up); "
                         "use a checkpoint from before the blow-up")


@dataclass
class Rollout:
    """N = len(prompts) * num_samples completions, prompt-major (row i * G + j = sample j of prompt i)."""
    tokens: list[list[int]]        # completion ids, without the prompt, ending with EOS if produced
    logprobs: list[list[float]]    # log softmax(logits / temperature)[token], before top-k/top-p
                                   # truncation (temperature 1 if greedy): what the trainer recomputes
    finish_reasons: list[str]      # "eos" or "length"
    input_ids: torch.Tensor        # (N, Tp + Tc) long: left-padded prompt, right-padded completion
    kv_start: torch.Tensor         # (N,) long: number of left pads = first real slot of each row
    completion_mask: torch.Tensor  # (N, Tp + Tc) float: 1 on completion tokens (EOS included)
    old_logprobs: torch.Tensor     # (N, Tp + Tc) float: sampler logprob at completion positions, else 0
    prompt_index: torch.Tensor     # (N,) long: which prompt each row answers
    lengths: torch.Tensor          # (N,) long: completion lengths
    prompt_len: int                # Tp: completion tokens start at column Tp


def derive_seed(*parts) -> int:
    """The seed of one random stream, named by its parts: derive_seed(run_seed, "rollout", step, rank).
    Every seed the recipe uses beyond --seed itself comes from here: a hash of the parts, so two
    streams with different names never share a seed, whatever the numbers in them."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: torch.Generator.manual_seed takes it


# --- pure functions: sampling and logprobs ------------------------------------------------------

def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 logits / temperature; temperature 0 (greedy) scores at temperature 1. One helper, so the
    sampler and the trainer (`token_logprobs`) do exactly the same arithmetic."""
    x = logits.float()
    return x if temperature in (0, 1) else x / temperature


def _inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None,
                 uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row from unnormalised weights (B, V) >= 0: the first token whose cumulative
    weight exceeds u * total, u ~ U[0, 1) (`uniform` (B,) float64 if given, else from `generator`).

    One uniform per row instead of torch.multinomial's V exponentials per row, in two levels:
    cumulative sums over blocks of _CDF_BLOCK tokens pick the block, then a cumulative sum inside
    that block picks the token, so only V / _CDF_BLOCK + _CDF_BLOCK prefix sums run per row instead
    of V. Sums are float64, so no token's weight is
    absorbed by rounding (float32 spacing near 1 is 6e-8); a zero-weight token is never drawn.
    """
    B, V = weights.shape
    pad = -V % _CDF_BLOCK
    blocks = F.pad(weights, (0, pad)).view(B, -1, _CDF_BLOCK)                          # (B, nb, bs)
    cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)                                # (B, nb)
    total = cdf[:, -1:]                                                                 # (B, 1)
    if not bool(torch.isfinite(total).all()):  # NaN logits: searchsorted would run off the end
        raise NonFiniteLogits()
    below = lambda x: torch.nextafter(x, torch.zeros_like(x))  # noqa: E731  largest double < x
    u01 = (torch.rand(total.shape, generator=generator, dtype=cdf.dtype, device=cdf.device) if uniform is None
           else uniform.to(cdf.dtype)[:, None])                                         # (B, 1)
    u = u01 * total
    u = torch.minimum(u, below(total))                           # u < total after rounding
    blk = torch.searchsorted(cdf, u, right=True)                 # (B, 1) first block with cdf > u
    before = torch.where(blk > 0, cdf.gather(1, (blk - 1).clamp(min=0)), 0.0)         # (B, 1)
    inner = blocks.gather(1, blk[..., None].expand(B, 1, _CDF_BLOCK)).squeeze(1).double().cumsum(-1)
    rest = torch.minimum(u - before, below(inner[:, -1:]))       # (B, 1) in [0, block total)
    return (blk * _CDF_BLOCK + torch.searchsorted(inner, rest, right=True)).squeeze(-1)  # (B,)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None,
           uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from logits (B, V); return tokens (B,) and their logprobs (B,).
    The randomness: one uniform per row, `uniform` (B,) if given, else drawn from `generator`.

    temperature 0 is greedy (argmax). top_k > 0 keeps the k largest logits; top_p < 1 keeps the
    smallest prefix of the sorted distribution whose mass reaches top_p (Holtzman et al. 2020).
    Logprobs are under softmax(logits / temperature) without truncation (temperature 1 if greedy).
    """
    logp = _tempered(logits, temperature).log_softmax(-1)      # (B, V) what the trainer recomputes
    if temperature == 0:
        tokens = logp.argmax(-1)                                # (B,)
        lp = logp.gather(-1, tokens[:, None]).squeeze(-1)       # (B,)
        if not bool(torch.isfinite(lp).all()):                  # argmax of NaN is an arbitrary token
            raise NonFiniteLogits()
        return tokens, lp
    scores = logp
    if 0 < top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]    # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(-1, descending=True)  # (B, V) each
        probs = sorted_scores.softmax(-1)                         # (B, V) renormalised after top-k
        mass_before = probs.cumsum(-1) - probs                    # (B, V) mass of strictly larger tokens
        sorted_scores = sorted_scores.masked_fill(mass_before >= top_p, float("-inf"))  # keeps rank 0
        scores = torch.empty_like(scores).scatter_(-1, order, sorted_scores)             # (B, V)
    tokens = _inverse_cdf(scores.exp(), generator, uniform)     # (B,) exp(-inf) = 0: never drawn
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logprob of input_ids[:, t] under softmax(logits[:, t-1] / temperature); (N, L, V), (N, L) -> (N, L).

    Position 0 has no predecessor and gets 0. temperature 0 (greedy) counts as 1, as in `sample`.
    log_softmax runs in float32 over chunks of the sequence; with autograd on, each chunk is
    checkpointed, so the float32 (chunk, V) copies are recomputed in backward instead of stored.
    This is the function the trainer uses, so sampler and trainer logprobs are the same math.
    """
    N, L, V = logits.shape

    def chunk_logprobs(lg: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logp = _tempered(lg, temperature).log_softmax(-1)      # (N, c, V)
        return logp.gather(-1, ids[..., None]).squeeze(-1)    # (N, c)

    step = max(1, _LOGPROB_CHUNK_ELEMS // max(1, N * V))
    grad = torch.is_grad_enabled() and logits.requires_grad
    out = [logits.new_zeros(N, 1, dtype=torch.float32)]        # position 0
    for t0 in range(1, L, step):
        t1 = min(L, t0 + step)
        lg, ids = logits[:, t0 - 1:t1 - 1], input_ids[:, t0:t1]  # (N, c, V), (N, c)
        if grad:
            out.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, lg, ids, use_reentrant=False))
        else:
            out.append(chunk_logprobs(lg, ids))
    return torch.cat(out, 1)                                   # (N, L)


def token_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits[:, t-1] / temperature), the distribution token t was drawn from, at
    the positions where mask (N, L) is nonzero; (N, L, V), (N, L) -> (N, L), 0 elsewhere. No grad.
    Only masked positions are computed, in chunks of at most _LOGPROB_CHUNK_ELEMS floats."""
    N, L, V = logits.shape
    out = torch.zeros(N, L, dtype=torch.float32, device=logits.device)
    rows, cols = mask[:, 1:].nonzero(as_tuple=True)              # (M,) each; position t = cols + 1
    step = max(1, _LOGPROB_CHUNK_ELEMS // max(1, V))
    with torch.no_grad():
        for i in range(0, rows.numel(), step):
            r, c = rows[i:i + step], cols[i:i + step]
            logp = _tempered(logits[r, c], temperature).log_softmax(-1)  # (m, V)
            out[r, c + 1] = torch.special.entr(logp.exp()).sum(-1)     # (m,) -sum p log p, 0 log 0 = 0
    return out                                                    # (N, L)


def completion_text(tok, ids: list[int]) -> str:
    """A completion's text, without its end-of-sequence token(s): what the rewards read."""
    return tok.decode([t for t in ids if t not in tok.eos_ids])


# --- FSDP2: gather the weights once per rollout -------------------------------------------------

@contextlib.contextmanager
def gathered_weights(model: torch.nn.Module):
    """Hold every FSDP2 shard of `model` unsharded for the duration of the block.

    Without this, an FSDP2 model all-gathers each block's weights in every forward and frees them
    after it: once per *token* when decoding. Here each FSDPModule gets reshard_after_forward=False
    and one `unshard()` (one all-gather per rollout), then `reshard()` frees the full weights and
    the previous reshard setting is restored. Nested uses (a trainer wrapping several `generate`
    calls, each of which enters it too) gather once, in the outermost. A plain module passes through.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed: nothing can be sharded
        yield model
        return
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods or getattr(model, "_rollout_gathered", False):
        yield model
        return
    # The reshard setting lives in FSDP2's private state (no getter); remember it to restore it exactly.
    saved = [(m._get_fsdp_state(), m._get_fsdp_state()._auto_reshard_after_forward,
              [g.post_forward_mesh_info for g in m._get_fsdp_state()._fsdp_param_groups]) for m in mods]
    model._rollout_gathered = True
    try:
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()  # one all-gather of this module's shards
        yield model
    finally:
        for m in mods:
            m.reshard()  # frees the full weights; not a collective
        for state, auto, infos in saved:
            state._auto_reshard_after_forward = auto
            for g, info in zip(state._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info
        model._rollout_gathered = False


# --- generation ---------------------------------------------------------------------------------

def _check_inputs(model, prompts, max_new_tokens, temperature, top_k, top_p, num_samples):
    """Raise one clear ValueError for input a caller can get wrong."""
    V, ctx = model.cfg.vocab_size, model.cfg.max_seq_len
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, (list, tuple)):
        raise ValueError("generate: prompts must be a list of token-id lists; encode text with the tokenizer")
    if len(prompts) == 0:
        raise ValueError("generate: prompts is empty; pass at least one prompt (a list of token ids)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens}; it must be at least 1")
    if num_samples < 1:
        raise ValueError(f"generate: num_samples={num_samples}; it must be at least 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; "
                         f"got {temperature}, {top_k}, {top_p}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if len(p) > ctx:
            raise ContextError(f"generate: prompt {i} has {len(p)} tokens, longer than the model's context "
                               f"of {ctx}; truncate it")
        if len(p) + max_new_tokens > ctx:
            raise ContextError(f"generate: prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} "
                               f"that exceeds the model's context of {ctx}; shorten it or lower max_new_tokens")
    flat = torch.tensor([t for p in prompts for t in p])  # one vectorised range check for all prompts
    if flat.is_floating_point() or flat.dtype == torch.bool:
        raise ValueError(f"generate: prompts must hold integer token ids, got {flat.dtype} values")
    bad = ((flat < 0) | (flat >= V)).nonzero()
    if len(bad):
        raise ValueError(f"generate: token id {flat[bad[0, 0]].item()} is outside the vocabulary [0, {V})")


def _eos_tensor(eos_token_id, V: int, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(not 0 <= e < V for e in ids):
        raise ValueError(f"generate: eos_token_id {eos_token_id!r} must be ids in [0, {V})")
    return torch.tensor(ids, dtype=torch.long, device=device)  # (E,)


def _uniforms(seed, P: int, G: int, T: int, device) -> torch.Tensor:
    """(P * G, T) float64 uniforms, row i * G + j for sample j of prompt i: prompt i's rows come from
    its own generator, seeded with seed[i] (a list), derive_seed(seed, i) (an int), or from torch's
    global RNG (None)."""
    if seed is None:
        seed = int(torch.randint(2 ** 62, (1,)).item())
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [derive_seed(seed, i) for i in range(P)]
    if len(seeds) != P:
        raise ValueError(f"generate: {len(seeds)} seeds for {P} prompts; pass one seed per prompt or one int")
    return torch.cat([torch.rand(G, T, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                      for s in seeds]).to(device)                                      # (P * G, T)


def _left_pad(prompts, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ids (P, Tp) left-padded with `pad`, start (P,) = number of pads."""
    Tp = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (Tp - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    start = torch.tensor([Tp - len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, start  # (P, Tp), (P,)


def _last_logits(model, ids, cache=None, kv_start=None) -> torch.Tensor:
    """Logits (B, V) of the last position only: the head never runs on the T-1 prompt positions."""
    h = model(ids, kv_start=kv_start, cache=cache, return_hidden=True)  # (B, T, C)
    return model.lm_head(h[:, -1])                                      # (B, V)


def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, num_samples: int = 1, eos_token_id=None,
             seed: int | None = None, pad_token_id: int = 0) -> Rollout:
    """Sample `num_samples` completions of up to `max_new_tokens` tokens for each prompt.

    prompts: token-id lists of any lengths. temperature 0 is greedy. eos_token_id: an id, a list of
    ids, or None (every row runs to max_new_tokens). seed: fixes the rollout, one int, or one per
    prompt (each prompt's samples then depend on its own seed only, see `_uniforms`); None draws one
    from torch's global RNG. pad_token_id fills the padding of `Rollout.input_ids`. On CPU the whole
    rollout runs inside `kernels.cpu_decode.cpu_decode` (see the module docstring).
    """
    _check_inputs(model, prompts, max_new_tokens, temperature, top_k, top_p, num_samples)
    with torch.no_grad(), gathered_weights(model), cpu_decode(model):
        device = model.lm_head.weight.device
        V, G, P = model.cfg.vocab_size, num_samples, len(prompts)
        N = P * G
        eos = _eos_tensor(eos_token_id, V, device)
        U = _uniforms(seed, P, G, max_new_tokens, device) if temperature > 0 else None    # (N, Tc_max)

        # prefill each prompt once, then share its cache rows among its G samples
        prompt_ids, start = _left_pad(prompts, pad_token_id, device)    # (P, Tp), (P,)
        Tp = prompt_ids.shape[1]
        cache = model.new_cache(P, Tp + max_new_tokens - 1, start=start)  # the last token is never fed
        logits = _last_logits(model, prompt_ids, cache)                    # (P, V)
        expand = torch.arange(P, device=device).repeat_interleave(G)       # (N,) row -> prompt
        if G > 1:
            cache = cache.share_prefix(G)                                  # prompt slots stored once
            logits = logits.index_select(0, expand)                        # (N, V)

        out_tokens = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)     # (N, Tc_max)
        out_logprobs = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
        lengths = torch.zeros(N, dtype=torch.long, device=device)          # (N,)
        finish = torch.zeros(N, dtype=torch.long, device=device)           # (N,) FINISH_REASONS code
        rows = torch.arange(N, device=device)  # (B,) output row of each batch row
        alive = torch.ones(N, dtype=torch.bool, device=device)  # (B,) rows whose completion is open
        for t in range(max_new_tokens):
            tok, lp = sample(logits, temperature, top_k, top_p,
                             uniform=None if U is None else U[rows, t])          # (B,), (B,)
            out_tokens[rows, t] = tok    # dead rows write too; their lengths stop counting
            out_logprobs[rows, t] = lp
            lengths[rows] += alive
            done = torch.zeros_like(alive) if eos is None else torch.isin(tok, eos) & alive  # (B,)
            finish[rows[done]] = 1
            alive &= ~done
            n_alive = int(alive.sum())
            if n_alive == 0 or t == max_new_tokens - 1:
                break
            if n_alive < _COMPACT_BELOW * alive.numel():  # drop finished rows from the batch
                keep = alive.nonzero().squeeze(1)          # (B',)
                cache, rows, tok, alive = cache.select(keep), rows[keep], tok[keep], alive[keep]
            logits = _last_logits(model, tok[:, None], cache)                  # (B, V)
    return _pack(prompt_ids, start, expand, out_tokens, out_logprobs, lengths, finish, pad_token_id)


def _pack(prompt_ids, start, expand, out_tokens, out_logprobs, lengths, finish, pad) -> Rollout:
    """Sampler buffers -> the lists and the padded (N, Tp + Tc) tensors the trainer consumes."""
    N, Tp = expand.shape[0], prompt_ids.shape[1]
    Tc = max(1, int(lengths.max()))
    mask = torch.arange(Tc, device=lengths.device)[None] < lengths[:, None]  # (N, Tc)
    completion = out_tokens[:, :Tc].masked_fill(~mask, pad)                   # (N, Tc)
    input_ids = torch.cat([prompt_ids.index_select(0, expand), completion], 1)  # (N, Tp + Tc)
    completion_mask = torch.cat([torch.zeros(N, Tp, device=mask.device), mask.float()], 1)
    old_logprobs = torch.cat([torch.zeros(N, Tp, device=mask.device),
                              out_logprobs[:, :Tc] * mask], 1)                # (N, Tp + Tc)
    n = lengths.tolist()
    return Rollout(
        tokens=[row[:k] for row, k in zip(out_tokens[:, :Tc].tolist(), n)],
        logprobs=[row[:k] for row, k in zip(out_logprobs[:, :Tc].tolist(), n)],
        finish_reasons=[FINISH_REASONS[c] for c in finish.tolist()],
        input_ids=input_ids, kv_start=start.index_select(0, expand), completion_mask=completion_mask,
        old_logprobs=old_logprobs, prompt_index=expand, lengths=lengths, prompt_len=Tp)


def concat_groups(parts: list[tuple[Rollout, list[int]]], G: int, pad_id: int) -> Rollout:
    """Whole groups of several rollouts as one, in generate()'s layout. parts: (rollout, indices of
    the prompts whose G samples to keep); DAPO's dynamic sampling keeps some groups, adds refills."""
    prompts, rows = [], []
    for roll, keep in parts:
        for p in keep:
            r0 = p * G
            prompts.append(roll.input_ids[r0, int(roll.kv_start[r0]):roll.prompt_len].tolist())
            rows += [(roll, r) for r in range(r0, r0 + G)]
    device = parts[0][0].input_ids.device
    prompt_ids, start = _left_pad(prompts, pad_id, device)                      # (P, Tp), (P,)
    lengths = torch.tensor([len(roll.tokens[r]) for roll, r in rows], device=device)  # (N,)
    Tc = max(1, int(lengths.max()))
    out_tokens = torch.full((len(rows), Tc), pad_id, dtype=torch.long, device=device)  # (N, Tc)
    out_logprobs = torch.zeros(len(rows), Tc, device=device)                            # (N, Tc)
    for i, (roll, r) in enumerate(rows):
        n = len(roll.tokens[r])
        out_tokens[i, :n] = torch.tensor(roll.tokens[r], dtype=torch.long)
        out_logprobs[i, :n] = torch.tensor(roll.logprobs[r])
    finish = torch.tensor([FINISH_REASONS.index(roll.finish_reasons[r]) for roll, r in rows], device=device)
    expand = torch.arange(len(prompts), device=device).repeat_interleave(G)        # (N,)
    return _pack(prompt_ids, start, expand, out_tokens, out_logprobs, lengths, finish, pad_id)


def generate_naive(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                   top_p: float = 1.0, top_k: int = 0, num_samples: int = 1, eos_token_id=None,
                   seed: int | None = None, pad_token_id: int = 0) -> Rollout:
    """The slow reference: no cache, every step recomputes the whole (N, Tp + t) batch.

    Same sampling, same outputs; greedy rollouts must equal `generate`'s token for token.
    """
    _check_inputs(model, prompts, max_new_tokens, temperature, top_k, top_p, num_samples)
    with torch.no_grad(), gathered_weights(model):
        device = model.lm_head.weight.device
        G, P = num_samples, len(prompts)
        eos = _eos_tensor(eos_token_id, model.cfg.vocab_size, device)
        U = _uniforms(seed, P, G, max_new_tokens, device) if temperature > 0 else None    # (N, Tc_max)
        prompt_ids, start = _left_pad(prompts, pad_token_id, device)  # (P, Tp), (P,)
        expand = torch.arange(P, device=device).repeat_interleave(G)  # (N,)
        ids, kv_start = prompt_ids.index_select(0, expand), start.index_select(0, expand)  # (N, Tp), (N,)
        N = ids.shape[0]
        out_logprobs = torch.zeros(N, max_new_tokens, device=device)
        lengths = torch.zeros(N, dtype=torch.long, device=device)
        finish = torch.zeros(N, dtype=torch.long, device=device)
        alive = torch.ones(N, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            tok, out_logprobs[:, t] = sample(_last_logits(model, ids, kv_start=kv_start), temperature, top_k,
                                             top_p, uniform=None if U is None else U[:, t])  # (N,)
            ids = torch.cat([ids, tok[:, None]], 1)                          # (N, Tp + t + 1)
            lengths += alive
            done = torch.zeros_like(alive) if eos is None else torch.isin(tok, eos) & alive
            finish[done] = 1
            alive &= ~done
            if not alive.any():
                break
    Tp = prompt_ids.shape[1]
    out_tokens = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)
    out_tokens[:, :ids.shape[1] - Tp] = ids[:, Tp:]
    return _pack(prompt_ids, start, expand, out_tokens, out_logprobs, lengths, finish, pad_token_id)
