"""The DeepSeek-R1 recipe, stage by stage, in the report's order (Guo et al. 2025).

    pretrain  the embedded toy's base model, trained from scratch on its corpus (stands in for
              DeepSeek-V3-Base; a real checkpoint skips it: --init DIR)
    zero      R1-Zero (§2.2): GRPO on the base model; accuracy + format rewards
    sft       stage 1, cold start (§2.3.1): sample the R1-Zero model, keep readable verified
              samples, SFT the *base* model on them
    grpo      stage 2, reasoning RL (§2.3.2): GRPO on the cold-started model; accuracy + format +
              language-consistency rewards
    rm        the preference reward model of stage 4's general prompts (reward_model.py)
    rs        stage 3, rejection sampling (§2.3.3): verified reasoning samples of the stage-2 model
              and the reward model's best general answers, 3:1, then SFT of the base model
    rl        stage 4, RL for all scenarios (§2.3.4): rule rewards on reasoning prompts, the reward
              model's score on general ones
    distill   distillation (§2.4): SFT of a smaller student on the RL model's verified traces,
              against GRPO on the same student for the same time
    eval, summary, plot: evaluation.py

Each stage builds what differs (a reward function, a prompt stream, a data set) and calls one of
two drivers: `run_rl` (grpo.train_rl's steps) or `run_sft` (sft.sft_step's); both hand their steps to
`runtime.fit`, the one loop. Every stage writes <out>/<stage>/model, metrics.jsonl, run_config.json.

Departures from the report:
- Stage 3 (§2.3.3): about 600k reasoning and 200k general samples, 3:1; here the toy's verified
  reasoning samples and the reward model's best ended answer (of --rs_samples) to each general
  prompt, mixed at --rs_reasoning_frac (default 3:1).
- Distillation (§2.4): the report distils on all 800k stage-3 samples; here only verified reasoning
  traces of the teacher, and the teacher's sampling time is not counted in the comparison.
- The report gives no reward weights: R1-Zero uses accuracy + 0.1 * format, stages 2 and 4 add the
  language reward with weight 1 (rewards.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

import grpo
import reward_model as rmod
import sft
from data import load_pref_jsonl, load_sft_jsonl, write_jsonl
from evaluation import evaluate, format_table, stage_eval, stage_plot, stage_summary
from grpo import GRPOConfig, RewardFn
from model import Transformer, preset
from optim import make_optimizer
from rewards import accuracy_reward, format_reward, language_reward, load_rewards, rule_reward
from rollout import completion_text, derive_seed, gathered_weights, generate
from runtime import (Dist, ExampleStream, StageRun, UserError, check_prompts, cosine_lr, find_model, fit,
                     get_task, load_frozen_rm, load_model, resolve_dtype, shard, supervised_steps)
from settings import RL_STAGES, SFT_STAGES, RunConfig, shaping
from tokenizer import Tokenizer, build_char_tokenizer
from toy import EOS_TEXT


# --- a model trained from scratch ---------------------------------------------------------------

def new_model(name: str, tok: Tokenizer, seed: int, device, dtype: torch.dtype = torch.float32) -> Transformer:
    """A randomly initialised model of preset `name` for `tok`'s vocabulary, in `dtype` (--dtype)."""
    try:
        cfg = preset(name, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    except ValueError as e:
        raise UserError(str(e)) from None
    torch.manual_seed(seed)
    return Transformer(cfg).to(device=device, dtype=dtype)


# --- the two drivers ------------------------------------------------------------------------------

def run_sft(c: dict, d: Dist, name: str, model, tok, examples: list, first_row: dict | None = None) -> dict:
    """SFT `model` on encoded examples (sft.encode_example) into <out>/<name>; `first_row` (e.g. data
    counts) is logged as step 0 of a fresh run. Returns runtime.fit's {steps, seconds}."""
    run, scfg = c["run"], c["sft"]
    if scfg.batch_size % d.world:
        raise UserError(f"--batch_size {scfg.batch_size} must be a multiple of the {d.world} ranks")
    longest, ctx = max((len(ids) for ids, _ in examples), default=0), model.cfg.max_seq_len
    if longest > ctx:  # found now, not when the example is drawn
        raise UserError(f"--max_len {scfg.max_len}: an example keeps {longest} tokens, more than the model's "
                        f"context of {ctx}; lower --max_len to at most {ctx}")
    model = shard(model, d)
    opt = make_optimizer(model, scfg.lr, scfg.weight_decay)
    sr = StageRun(run.out, name, d, run.ckpt_every, c, shaping(c, name), run.restart)
    state = sr.resume(model, opt)
    if sr.finished:
        return sr.result()
    if first_row and sr.start == 0:
        sr.metrics.log({"step": 0, **first_row})
    stream = ExampleStream(examples, run.seed, state.get("pos", 0))

    def step(batch, lr):
        return sft.sft_step(model, opt, batch, tok.pad_id, scfg, lr, d.rank, d.world, d.sum_fn())
    steps = supervised_steps(step, stream, scfg.batch_size, sr.start, scfg.steps, cosine_lr(scfg))
    result = fit(sr, model, opt, tok, steps, scfg.steps, loop_state=lambda: {"pos": stream.position},
                 keys=("loss", "lr"))
    sr.save_model(model, tok)
    return result


class PromptStream:
    """This rank's share of each RL step's prompts. Every rank walks the same streams and takes its
    own contiguous share, so groups stay whole on one rank and the global batch does not depend on
    the number of ranks. With `general`, each full step also takes `n_general` prompts (global) from
    it (stage 4); a dynamic-sampling refill draws reasoning prompts only. The positions in both
    streams are the loop state a checkpoint keeps."""

    def __init__(self, reasoning, d: Dist, per_step: int, general=None, n_general: int = 0):
        self.make, self.d, self.per_step, self.n_general = (reasoning, general), d, per_step, n_general
        self.restore({})

    def restore(self, state: dict) -> None:
        self.pos = [state.get("pos", 0), state.get("general_pos", 0)]
        self.streams = [make(start=p) if make else None for make, p in zip(self.make, self.pos)]

    def state(self) -> dict:
        return {"pos": self.pos[0], "general_pos": self.pos[1]}

    def _take(self, which: int, n: int) -> list[dict]:
        self.pos[which] += n * self.d.world
        batch = [next(self.streams[which]) for _ in range(n * self.d.world)]
        return batch[self.d.rank * n:(self.d.rank + 1) * n]

    def draw(self, n: int) -> list[dict]:
        if self.streams[1] is None or n * self.d.world != self.per_step:  # no mixture, or a refill
            return self._take(0, n)
        n_gen = self.n_general // self.d.world
        return self._take(0, n - n_gen) + self._take(1, n_gen)

    def index(self) -> list[int]:
        """The indices of this rank's prompts of a full step in the one-process batch (reasoning
        prompts first, then general ones), whatever the number of ranks: what seeds their rollouts."""
        n, r = self.per_step // self.d.world, self.d.rank
        n_gen = self.n_general // self.d.world if self.streams[1] is not None else 0
        n_rsn = n - n_gen
        return ([r * n_rsn + i for i in range(n_rsn)]
                + [self.per_step - self.n_general + r * n_gen + i for i in range(n_gen)])


RL_KEYS = ("reward", "reward/accuracy", "reward/format", "reward/language", "reward/rm", "response_length",
           "kl", "clip_frac", "entropy", "is_logw_abs_mean", "eval/accuracy", "gen_tok_per_s", "train_tok_per_s")


def run_rl(c: dict, d: Dist, name: str, src: Path, reward_fn: RewardFn, prompts: PromptStream,
           eval_set: list[dict], time_budget: float = 0.0) -> dict:
    """GRPO from the checkpoint `src` into <out>/<name>: grpo.train_rl's steps through runtime.fit,
    evaluating on `eval_set` every --eval_every steps. Returns {steps, seconds}."""
    run, g, lcfg = c["run"], c["grpo"], c["loss"]
    if g.prompts_per_step % d.world:
        raise UserError(f"--prompts_per_step {g.prompts_per_step} must be a multiple of the {d.world} ranks")
    if lcfg.reward_norm == "per_component" and not hasattr(reward_fn, "weights"):
        raise UserError(f"--reward_norm per_component needs named, weighted rewards; stage {name} routes some "
                        "prompts to the reward model, so use --reward_norm sum there")
    if lcfg.dynamic_sampling and d.world > 1:  # ranks would refill different numbers of groups
        raise UserError("--dynamic_sampling runs on one process only for now; drop it or run without torchrun")
    policy, tok = load_model(src, run, d)
    ref = None
    if lcfg.kl_coef > 0:  # the reference policy is the starting point, frozen (DeepSeekMath eq. 3)
        ref, _ = load_model(src, run, d)
        ref = shard(ref.requires_grad_(False), d)
    policy = shard(policy, d)
    opt = make_optimizer(policy, g.lr, g.weight_decay)
    sr = StageRun(run.out, name, d, run.ckpt_every, c, shaping(c, name), run.restart)
    prompts.restore(sr.resume(policy, opt))
    if sr.finished:
        return sr.result()
    steps = grpo.train_rl(policy, ref, tok, prompts.draw, reward_fn, g, lcfg, opt, start=sr.start,
                          seed=run.seed, rank=d.rank, world=d.world, all_reduce=d.sum_fn(),
                          prompt_index=prompts.index())
    result = fit(sr, policy, opt, tok, steps, g.steps, loop_state=prompts.state, keys=RL_KEYS,
                 evaluate=lambda: evaluate(policy, tok, eval_set, g.max_new_tokens, d=d),
                 eval_every=run.eval_every, time_budget=time_budget, token_budget=g.token_budget)
    sr.save_model(policy, tok)
    return result


def rule_rl(c: dict, d: Dist, name: str, src: Path, weights: dict, time_budget: float = 0.0) -> dict:
    """GRPO on the task's reasoning prompts with the rule rewards at `weights` (zero, grpo, rl without
    general prompts, distill's baseline)."""
    run, g = c["run"], c["grpo"]
    task = get_task(run, c["toy"], src)
    check_prompts(task, src, g.max_new_tokens)
    prompts = PromptStream(lambda start: task.train_samples(run.seed, start=start), d, g.prompts_per_step)
    return run_rl(c, d, name, src, stage_reward(run, weights), prompts, task.eval_samples(run.eval_n), time_budget)


def stage_reward(run: RunConfig, weights: dict):
    """The rule rewards at `weights` plus the --reward plug-ins (rewards.RewardSum)."""
    return rule_reward(weights, load_rewards(run.reward))


def zero_weights(run: RunConfig) -> dict:
    """R1-Zero's rewards (§2.2.2): accuracy and format, no language consistency."""
    return {"accuracy": run.w_accuracy, "format": run.w_format, "language": 0.0}


def stage2_weights(run: RunConfig) -> dict:
    """Reasoning RL's rewards (§2.3.2): R1-Zero's plus language consistency."""
    return {**zero_weights(run), "language": run.w_language}


# --- sampling data from a model ---------------------------------------------------------------------

SAMPLE_CHUNK = 64  # prompts per generate call when sampling data (memory: chunk * k rows of KV cache)


def sample_share(model, tok, samples: list, k: int, g: GRPOConfig, seed: int, d: Dist):
    """This rank's share of `samples`, k completions each, SAMPLE_CHUNK prompts per `generate` call:
    yields (chunk of samples, its Rollout; completion j answers chunk[j // k]). Each prompt's seed
    comes from its index in `samples`, so any number of ranks samples the same completions."""
    mine = samples[d.rank::d.world]
    for i in range(0, len(mine), SAMPLE_CHUNK):
        chunk = mine[i:i + SAMPLE_CHUNK]
        seeds = [derive_seed(seed, "prompt", d.rank + (i + j) * d.world) for j in range(len(chunk))]
        with torch.no_grad(), gathered_weights(model):
            yield chunk, generate(model, [tok.encode(s["prompt"]) for s in chunk], g.max_new_tokens,
                                  temperature=g.temperature, num_samples=k, eos_token_id=tok.eos_ids,
                                  seed=seeds, pad_token_id=tok.pad_id)


def collect_verified(model, tok, task, n_prompts: int, k: int, g: GRPOConfig, seed: int, d: Dist) -> list[dict]:
    """Sample k responses for n training prompts; keep the verified, well-formed, language-consistent
    ones (the report's "readable" filter), at most one per distinct response. `seed` picks the
    prompts and the samples. Returns rows {prompt, response, source} gathered on every rank."""
    stream = task.train_samples(seed)
    rows, seen = [], set()
    for chunk, roll in sample_share(model, tok, [next(stream) for _ in range(n_prompts)], k, g, seed, d):
        for j, ids in enumerate(roll.tokens):
            s, text = chunk[j // k], completion_text(tok, ids)
            ok = (roll.finish_reasons[j] == "eos" and format_reward(text) == 1.0
                  and language_reward(text, s["prompt"]) == 1.0 and accuracy_reward(text, s) == 1.0)
            if ok and (s["prompt"], text) not in seen:
                seen.add((s["prompt"], text))
                rows.append({"prompt": s["prompt"], "response": text, "source": "reasoning"})
    return d.gather(rows)


def best_general(model, tok, rm, rm_tok, task, n_prompts: int, k: int, g: GRPOConfig,
                 max_len: int, seed: int, d: Dist) -> list[dict]:
    """R1 §2.3.3's non-reasoning data, here: k samples for each of n general prompts, the reward
    model's best among those that ended (eos). Rows {prompt, response, source, rm_score}, gathered
    on every rank."""
    stream = task.general_samples(seed)
    rows = []
    for chunk, roll in sample_share(model, tok, [next(stream) for _ in range(n_prompts)], k, g, seed, d):
        texts = [completion_text(tok, ids) for ids in roll.tokens]
        scores = rmod.score_texts(rm, rm_tok, [chunk[j // k]["prompt"] for j in range(len(texts))],
                                  texts, max_len).tolist()
        for p, s in enumerate(chunk):
            ended = [j for j in range(p * k, (p + 1) * k) if roll.finish_reasons[j] == "eos"]
            if ended:
                j = max(ended, key=lambda j: scores[j])
                rows.append({"prompt": s["prompt"], "response": texts[j], "source": "general",
                             "rm_score": scores[j]})
    return d.gather(rows)


def mix_at_ratio(reasoning: list, general: list, reasoning_frac: float) -> tuple[list, list]:
    """The largest prefixes of both lists whose sizes stand at reasoning_frac : 1 - reasoning_frac
    (R1 §2.3.3: about 600k reasoning and 200k general samples, 3:1)."""
    if reasoning_frac >= 1.0:
        return reasoning, []
    total = min(len(reasoning) / reasoning_frac, len(general) / (1.0 - reasoning_frac))
    n_r = min(len(reasoning), round(total * reasoning_frac))
    n_g = min(len(general), round(total * (1.0 - reasoning_frac)))
    return reasoning[:n_r], general[:n_g]


def routed_reward(rule: RewardFn, rm_scores) -> RewardFn:
    """R1 §2.3.4's reward routing: a sample whose task is "general" gets the reward model's score
    (rm_scores(prompts, responses) -> floats), any other the rule rewards. A group is one prompt,
    so one source, and group normalisation puts both on the same scale. Components are logged over
    the samples of their own source: reward/rm over general ones, reward/accuracy over the others."""
    def score(completions: list[str], samples: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        general = [i for i, s in enumerate(samples) if s.get("task") == "general"]
        rest = [i for i, s in enumerate(samples) if s.get("task") != "general"]
        totals, comps = [0.0] * len(completions), {}
        if general:
            values = rm_scores([samples[i]["prompt"] for i in general], [completions[i] for i in general])
            for i, v in zip(general, values):
                totals[i] = float(v)
            comps["rm"] = [float(v) for v in values]
        if rest:
            values, parts = rule([completions[i] for i in rest], [samples[i] for i in rest])
            for i, v in zip(rest, values):
                totals[i] = v
            comps.update(parts)
        return totals, comps
    return score


# --- the stages ---------------------------------------------------------------------------------------

def stage_pretrain(c: dict, d: Dist, name: str = "pretrain") -> None:
    """The toy's base model: a character-level transformer trained from scratch on the task corpus.
    (distill also calls it, as <out>/student_base, for the student's smaller base model.)"""
    run, scfg = c["run"], c["sft"]
    task = get_task(run, c["toy"])
    if not hasattr(task, "pretrain_corpus"):
        raise UserError(f"stage pretrain needs the toy task (got --task {run.task}); real checkpoints "
                        "start at --stage zero --init DIR")
    tok = build_char_tokenizer(task.alphabet())
    model = new_model(run.model, tok, run.seed, d.device, resolve_dtype(run.dtype, d.device))
    docs = task.pretrain_corpus(scfg.steps * scfg.batch_size, run.seed)
    examples = [sft.encode_example(tok, "", doc.removesuffix(EOS_TEXT), scfg.max_len) for doc in docs]
    run_sft(c, d, name, model, tok, examples)


def stage_zero(c: dict, d: Dist) -> dict:
    """R1-Zero (§2.2): GRPO straight from the base model, accuracy + format rewards."""
    run = c["run"]
    return rule_rl(c, d, "zero", find_model(run, run.init, "--init DIR", "zero", "pretrain"), zero_weights(run))


def stage_sft(c: dict, d: Dist) -> None:
    """R1 stage 1, cold start (§2.3.1): readable, verified samples of the R1-Zero model (or --data),
    SFT of the base model on them."""
    run, scfg = c["run"], c["sft"]
    if run.data:
        rows = load_sft_jsonl(run.data)
    else:
        zero = find_model(run, "", "--data FILE", "sft", "zero", "R1-Zero model to sample")
        task = get_task(run, c["toy"], zero)
        check_prompts(task, zero, c["grpo"].max_new_tokens)
        teacher, ttok = load_model(zero, run, d)
        rows = collect_verified(teacher, ttok, task, run.sft_prompts, run.sft_samples, c["grpo"],
                                derive_seed(run.seed, "sft"), d)
        if d.main:
            write_jsonl(Path(run.out) / "sft" / "cold_start.jsonl", rows)
        if not rows:
            raise UserError("stage sft: no R1-Zero sample passed the filter; train zero longer or pass "
                            "--data FILE")
        del teacher
    model, tok = load_model(find_model(run, run.init, "--init DIR", "sft", "pretrain"), run, d)
    examples = [sft.encode_example(tok, r["prompt"], r["response"], scfg.max_len) for r in rows]
    if d.main:
        print(f"[sft] {len(rows)} cold-start samples", flush=True)
    run_sft(c, d, "sft", model, tok, examples)


def stage_grpo(c: dict, d: Dist) -> dict:
    """R1 stage 2, reasoning RL (§2.3.2): GRPO on the cold-started model, with language consistency."""
    run = c["run"]
    return rule_rl(c, d, "grpo", find_model(run, run.init, "--init DIR", "grpo", "sft"), stage2_weights(run))


def preference_data(run: RunConfig, task, n_train: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference pairs: --data's lines (the last 10% held out) or the toy's."""
    if run.data:
        pairs = load_pref_jsonl(run.data)
        if len(pairs) < 2:
            raise UserError(f"stage rm: {run.data} has {len(pairs)} pair(s); it needs at least 2 "
                            "(the last 10% are held out for the accuracy)")
        n_held = max(1, len(pairs) // 10)
        return pairs[:-n_held], pairs[-n_held:]
    if not hasattr(task, "preference_pairs"):
        raise UserError(f"stage rm: task {run.task!r} has no preference pairs; pass --data FILE with "
                        "{prompt, chosen, rejected} lines")
    # another seed for the held-out pairs; the toy has only 32 general prompts, so held-out
    # pairs share prompts (and often responses) with training pairs
    held = task.preference_pairs(run.rm_eval_pairs, derive_seed(run.seed, "rm-heldout"))
    return task.preference_pairs(n_train, run.seed), held


def stage_rm(c: dict, d: Dist) -> None:
    """The reward model of stage 4 (reward_model.py): the base model (or --init) with a scalar head,
    Bradley-Terry loss, one pass over rm_steps * rm_batch_size pairs; then held-out pairwise accuracy."""
    run, rcfg = c["run"], c["rm"]
    if rcfg.batch_size % d.world:
        raise UserError(f"--rm_batch_size {rcfg.batch_size} must be a multiple of the {d.world} ranks")
    src = find_model(run, run.init, "--init DIR", "rm", "pretrain")
    train_pairs, held = preference_data(run, get_task(run, c["toy"], src), rcfg.steps * rcfg.batch_size)
    backbone, tok = load_model(src, run, d)
    rm = shard(rmod.init_reward_model(backbone), d)
    opt = make_optimizer(rm, rcfg.lr, rcfg.weight_decay)
    sr = StageRun(run.out, "rm", d, run.ckpt_every, c, shaping(c, "rm"), run.restart)
    stream = ExampleStream(train_pairs, run.seed, sr.resume(rm, opt).get("pos", 0))
    if sr.finished:
        return

    def step(batch, lr):
        return rmod.rm_step(rm, opt, batch, tok, rcfg, lr, d.rank, d.world, d.sum_fn())
    fit(sr, rm, opt, tok, supervised_steps(step, stream, rcfg.batch_size, sr.start, rcfg.steps, cosine_lr(rcfg)),
        rcfg.steps, loop_state=lambda: {"pos": stream.position}, keys=("loss", "accuracy", "margin"))
    with torch.no_grad(), gathered_weights(rm):  # every rank scores all pairs: the same collectives
        acc = rmod.pairwise_accuracy(rm, tok, held, rcfg.max_len)
    sr.metrics.log({"step": rcfg.steps, "eval/pairwise_accuracy": acc, "eval/pairs": len(held)})
    sr.print(f"held-out pairwise accuracy {acc:.3f} on {len(held)} pairs")
    sr.save_model(rm, tok)


def stage_rs(c: dict, d: Dist) -> None:
    """R1 stage 3, rejection sampling and SFT (§2.3.3): verified reasoning samples of the stage-2
    model plus the reward model's best answers to general prompts, mixed at --rs_reasoning_frac,
    written to <out>/rs/rs_data.jsonl; then SFT of the base model (or --init) on them."""
    run, g, frac = c["run"], c["grpo"], c["run"].rs_reasoning_frac
    teacher_path = find_model(run, run.teacher, "--teacher DIR", "rs", "grpo", "teacher checkpoint")
    task = get_task(run, c["toy"], teacher_path)
    check_prompts(task, teacher_path, g.max_new_tokens)
    if frac < 1.0 and not hasattr(task, "general_samples"):
        raise UserError(f"stage rs: task {run.task!r} has no general prompts; use --task toy or "
                        "--rs_reasoning_frac 1")
    teacher, ttok = load_model(teacher_path, run, d)
    rm, rm_tok = load_frozen_rm(run, d, "rs") if frac < 1.0 else (None, None)
    reasoning = collect_verified(teacher, ttok, task, run.rs_prompts, run.rs_samples, g,
                                 derive_seed(run.seed, "rs"), d)
    n_general = math.ceil(len(reasoning) * (1.0 - frac) / frac)  # enough general prompts for the ratio
    general = (best_general(teacher, ttok, rm, rm_tok, task, n_general, run.rs_samples, g,
                            c["rm"].max_len, derive_seed(run.seed, "rs-general"), d) if n_general else [])
    keep_r, keep_g = mix_at_ratio(reasoning, general, frac)
    counts = {"rs/reasoning_prompts": run.rs_prompts, "rs/reasoning_verified": len(reasoning),
              "rs/general_prompts": n_general, "rs/general_ended": len(general),
              "rs/reasoning": len(keep_r), "rs/general": len(keep_g)}
    data = Path(run.out) / "rs" / "rs_data.jsonl"
    if d.main:
        write_jsonl(data, keep_r + keep_g)
        print("[rs] " + "  ".join(f"{k.split('/')[1]} {v}" for k, v in counts.items()) + f"  -> {data}",
              flush=True)
    if not keep_r:
        raise UserError("stage rs: no sample of the stage-2 model passed the filter; train grpo longer, "
                        "raise --rs_prompts, or pass --teacher DIR")
    del teacher, rm
    model, tok = load_model(find_model(run, run.init, "--init DIR", "rs", "pretrain"), run, d)
    examples = [sft.encode_example(tok, r["prompt"], r["response"], c["sft"].max_len) for r in keep_r + keep_g]
    run_sft(c, d, "rs", model, tok, examples, first_row=counts)


def stage_rl(c: dict, d: Dist) -> dict:
    """R1 stage 4, RL for all scenarios (§2.3.4): GRPO on the rs model over reasoning prompts (stage
    2's rule rewards) and --general_frac general prompts (the reward model's score), routed by
    sample["task"]."""
    run, g = c["run"], c["grpo"]
    src = find_model(run, run.init, "--init DIR", "rl", "rs")
    task = get_task(run, c["toy"], src)
    n_general = round(g.prompts_per_step * run.general_frac)
    if not n_general:
        return rule_rl(c, d, "rl", src, stage2_weights(run))
    if not hasattr(task, "general_samples"):
        raise UserError(f"stage rl: task {run.task!r} has no general prompts; use --task toy or --general_frac 0")
    if n_general % d.world:
        raise UserError(f"stage rl: {n_general} general prompts a step (--general_frac) must be a multiple "
                        f"of the {d.world} ranks, so every rank logs both reward sources")
    rm, rm_tok = load_frozen_rm(run, d, "rl")
    reward = routed_reward(stage_reward(run, stage2_weights(run)),
                           lambda ps, ts: rmod.score_texts(rm, rm_tok, ps, ts, c["rm"].max_len).tolist())
    prompts = PromptStream(lambda start: task.train_samples(run.seed, start=start), d, g.prompts_per_step,
                           general=lambda start: task.general_samples(run.seed, start=start), n_general=n_general)
    return run_rl(c, d, "rl", src, reward, prompts, task.eval_samples(run.eval_n))


DISTILL_RL_MAX_STEPS = 10_000  # the equal-time GRPO baseline stops on the clock, long before this


def stage_distill(c: dict, d: Dist) -> None:
    """Distillation (§2.4): SFT a smaller student on the RL model's verified traces, against
    R1-Zero-style GRPO on the same student base for the same time (<out>/distill_zero).

    The student base is <out>/student_base/model, pretrained here if missing (--student_model,
    --student_steps, the training settings c["student"] of `stage_configs`). Both sides' times count
    their training steps only; the teacher's sampling is not counted (see the module docstring)."""
    run, g = c["run"], c["grpo"]
    teacher_path = find_model(run, run.teacher, "--teacher DIR", "distill", "rl", "teacher checkpoint")
    task = get_task(run, c["toy"], teacher_path)
    check_prompts(task, teacher_path, g.max_new_tokens)
    base = Path(run.out) / "student_base" / "model"
    if not (base / "config.json").is_file():
        if not hasattr(task, "pretrain_corpus"):
            raise UserError(f"stage distill: no student base at {base}; it is pretrained on the toy "
                            "corpus, so use --task toy, or put a small checkpoint there")
        if d.main:
            print(f"[distill] no student base at {base}: pretraining --student_model "
                  f"{run.student_model} for {run.student_steps} steps", flush=True)
        stage_pretrain({**c, "run": replace(run, model=run.student_model), "sft": c["student"]}, d, "student_base")
    teacher, ttok = load_model(teacher_path, run, d)
    rows = collect_verified(teacher, ttok, task, run.distill_prompts, run.rs_samples, g,
                            derive_seed(run.seed, "distill"), d)
    sdir = Path(run.out) / "distill"
    counts = {"distill/prompts": run.distill_prompts, "distill/verified": len(rows)}
    if d.main:
        write_jsonl(sdir / "distill_data.jsonl", rows)
        print(f"[distill] {len(rows)} verified traces from {teacher_path}", flush=True)
    if not rows:
        raise UserError(f"stage distill: no trace of {teacher_path} passed the filter; train the "
                        "teacher longer, raise --distill_prompts, or pass --teacher DIR")
    student, stok = load_model(base, run, d)
    probe = task.eval_samples(1)[0]["prompt"]
    if stok.vocab_size != ttok.vocab_size or stok.encode(probe) != ttok.encode(probe):
        raise UserError(f"stage distill: the student base {base} and the teacher {teacher_path} have "
                        "different tokenizers; build the student from the same task")
    examples = [sft.encode_example(stok, r["prompt"], r["response"], c["sft"].max_len) for r in rows]
    sft_time = run_sft(c, d, "distill", student, stok, examples, first_row=counts)["seconds"]
    del student
    # the equal-time baseline: GRPO on the student base, no intermediate evals, stopped by the clock
    zc = {**c, "run": replace(run, eval_every=0), "grpo": replace(g, steps=DISTILL_RL_MAX_STEPS)}
    zero = rule_rl(zc, d, "distill_zero", base, zero_weights(run), time_budget=sft_time)
    evals = {}
    for label, path in (("teacher", teacher_path), ("student base", base), ("distilled student", sdir / "model"),
                        ("student + GRPO, same time", Path(run.out) / "distill_zero" / "model")):
        model, tok = load_model(path, run, d)
        evals[label] = evaluate(model, tok, task.eval_samples(run.eval_n), g.max_new_tokens, d=d)
    blob = {"sft_seconds": sft_time, "sft_steps": c["sft"].steps, "grpo_seconds": zero["seconds"],
            "grpo_steps": zero["steps"], "traces": len(rows), "eval_n": run.eval_n, "results": evals}
    if d.main:
        (sdir / "comparison.json").write_text(json.dumps(blob, indent=2) + "\n")
        print(f"[distill] student {run.student_model}: SFT {c['sft'].steps} steps in {sft_time:.0f}s vs "
              f"GRPO {zero['steps']} steps in {zero['seconds']:.0f}s", flush=True)
        print(format_table([{"model": k, **v} for k, v in evals.items()], "model",
                           ["accuracy", "format", "response_length"]), flush=True)
        print(f"[distill] wrote {sdir / 'comparison.json'}", flush=True)


def run_stage(stage: str, c: dict, d: Dist) -> None:
    """RUNNERS[stage], unless its checkpoint says it is already done with these settings (or was made
    with others: refused) before the stage samples data or loads teachers. distill checks each of its
    three runs itself."""
    run = c["run"]
    if stage in SFT_STAGES + RL_STAGES + ("rm",) and stage != "distill":
        if StageRun(run.out, stage, d, run.ckpt_every, c, shaping(c, stage), run.restart).peek():
            return
    RUNNERS[stage](c, d)


RUNNERS = {"pretrain": stage_pretrain, "zero": stage_zero, "sft": stage_sft, "grpo": stage_grpo,
           "rm": stage_rm, "rs": stage_rs, "rl": stage_rl, "distill": stage_distill,
           "eval": stage_eval, "summary": stage_summary, "plot": stage_plot}
