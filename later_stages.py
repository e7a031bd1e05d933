"""R1 stages 3 and 4 and distillation (DeepSeek-R1 report, Guo et al. 2025), run by train.py.

    rm        reward model for stage 4's general prompts: the base model with a scalar head,
              Bradley-Terry loss on {prompt, chosen, rejected} pairs (--data FILE, else the toy's)
    rs        stage 3, rejection sampling (2.3.3): k samples per prompt from the stage-2 model;
              verified reasoning samples plus the reward model's best general answers, mixed
              3:1, then SFT of the base model on them (needs rm: `all` runs rm before rs)
    rl        stage 4, RL for all scenarios (2.3.4): GRPO on the rs model over reasoning prompts
              (rule rewards) and general prompts (reward-model score), routed by sample["task"];
              the loop is train.stage_rl, the routing is `mixed_scorer` here
    distill   distillation (2.4): SFT of a smaller student (--student_model) on the RL model's
              verified traces, compared with R1-Zero-style GRPO on the same student base for
              the same wall time
    summary   one table over every stage's model in <out>: accuracy, format, language, RM score,
              length (<out>/summary.json)

Departures from the report:
- Stage 3 (2.3.3): about 600k reasoning and 200k general samples, 3:1; here the toy's verified
  reasoning samples and the reward model's best ended answer (of --rs_samples) to each general
  prompt, mixed at --rs_reasoning_frac (default 3:1).
- Distillation (2.4): the report distils on all 800k stage-3 samples; here only verified reasoning
  traces of the teacher, and the teacher's sampling time is not counted in the wall time.
Settings, checkpoints, sharding and the shared helpers live in train.py; this module imports them.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

import grpo
import reward_model as rmod
import sft
import tasks
from model import Transformer
from rewards import combine_rewards
from rollout import gathered_weights, generate
from tokenizer import Tokenizer
from train import (Dist, RunConfig, UserError, Metrics, _is_sharded, _model_dir, _text, _train_sft, check_finite,
                   collect_verified, evaluate, full_state, gather_rows, get_task, init_dir, load_checkpoint,
                   load_model, make_optimizer, progress, resolve_dtype, sample_share, save_checkpoint, shard,
                   stage_pretrain, stage_rl, write_run_config)


def mixed_scorer(rm_score, weights: dict):
    """R1 section 2.3.4's reward routing, as a grpo.rl_step scorer: a sample whose task is
    "general" gets the reward model's score (rm_score(prompts, responses) -> floats), any other
    gets the rule rewards (rewards.combine_rewards with `weights`). A group is one prompt, so one
    source, and group normalisation puts both on the same scale. Components are averaged over the
    samples of their own source: reward/rm over general ones, reward/accuracy over the others."""
    def score(texts: list[str], samples: list[dict], G: int) -> tuple[torch.Tensor, dict]:
        totals, comps = [0.0] * len(texts), {}
        general = [i for i in range(len(texts)) if samples[i // G].get("task") == "general"]
        if general:
            scores = rm_score([samples[i // G]["prompt"] for i in general], [texts[i] for i in general])
            for i, v in zip(general, scores):
                totals[i] = float(v)
                comps.setdefault("rm", []).append(float(v))
        for i, text in enumerate(texts):
            s = samples[i // G]
            if s.get("task") != "general":
                totals[i], parts = combine_rewards(text, s["prompt"], s, weights)
                for k, v in parts.items():
                    comps.setdefault(k, []).append(v)
        return torch.tensor(totals).view(-1, G), {k: sum(v) / len(v) for k, v in comps.items()}  # (P, G)
    return score


# --- R1 stages 3 and 4, distillation ------------------------------------------------------------

def load_rm(run: RunConfig, d: Dist, stage: str):
    """The frozen reward model, unsharded on every rank (it only scores, it is never trained here)."""
    path = Path(run.reward_model) if run.reward_model else Path(run.out) / "rm" / "model"
    if not (path / rmod.RM_MARKER).is_file():
        hint = ("run --stage rm first, or pass --reward_model DIR" if not run.reward_model
                else "pass a directory written by --stage rm")
        raise UserError(f"stage {stage}: no reward model at {path}; {hint}")
    try:
        rm, tok = rmod.load_reward_model(path, dtype=resolve_dtype(run, d), device=d.device)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    rm.requires_grad_(False)
    return rm, tok


def teacher_dir(run: RunConfig, stage: str, previous: str) -> Path:
    """--teacher if given, else the previous stage's model in this run directory."""
    return _model_dir(run.teacher, "--teacher", run, stage, previous, "teacher checkpoint")


def preference_data(run: RunConfig, task, n_train: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference pairs: --data's lines (the last 10% held out) or the toy's."""
    if run.data:
        try:
            pairs = tasks.load_pref_jsonl(run.data)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
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
    return task.preference_pairs(n_train, run.seed), task.preference_pairs(run.rm_eval_pairs, run.seed + 1)


def stage_rm(c: dict, d: Dist) -> None:
    """The reward model of R1 stage 4 (reward_model.py): the base model (or --init) with a scalar
    head, Bradley-Terry loss, one epoch over rm_steps * rm_batch_size pairs."""
    run, rcfg = c["run"], c["rm"]
    if rcfg.batch_size % d.world:
        raise UserError(f"--rm_batch_size {rcfg.batch_size} must be a multiple of the {d.world} ranks")
    train_pairs, held = preference_data(run, get_task(run, c["toy"]), rcfg.steps * rcfg.batch_size)
    backbone, tok = load_model(init_dir(run, "rm", "pretrain"), run, d)
    rm = shard(rmod.init_reward_model(backbone), d)
    opt = make_optimizer(rm, rcfg.lr, rcfg.weight_decay)
    sdir = Path(run.out) / "rm"
    ckpt = sdir / "ckpt"
    state = load_checkpoint(ckpt, rm, opt) if (ckpt / "trainer_state.pt").is_file() else {"step": 0, "pos": 0}
    write_run_config(sdir, c, d)
    metrics = Metrics(sdir / "metrics.jsonl", d, state["step"] if state["step"] else None)
    stream = sft.ExampleStream(train_pairs, run.seed, state["pos"])
    t0 = time.perf_counter()
    for step in range(state["step"], rcfg.steps):
        lr = sft.lr_at(step, rcfg.steps, rcfg.lr, rcfg.warmup, rcfg.min_lr_ratio)
        try:
            row = rmod.rm_step(rm, opt, stream.take(rcfg.batch_size), tok, rcfg, lr, d.rank, d.world,
                               d.all_reduce if d.world > 1 else None)
        except FloatingPointError as e:
            check_finite(float("nan"), str(e), step + 1, ckpt)
        row = {"step": step + 1, **row}
        metrics.log(row)
        if (step + 1) % 10 == 0 or step + 1 == rcfg.steps:
            progress("rm", step + 1, rcfg.steps, t0, row, ["loss", "accuracy", "margin"], d)
        if (step + 1) % run.ckpt_every == 0 or step + 1 == rcfg.steps:
            save_checkpoint(ckpt, rm, tok, opt, {"step": step + 1, "pos": stream.position}, d)
    with torch.no_grad(), gathered_weights(rm):  # every rank scores all pairs: the same collectives
        acc = rmod.pairwise_accuracy(rm, tok, held, rcfg.max_len)
    metrics.log({"step": rcfg.steps, "eval/pairwise_accuracy": acc, "eval/pairs": len(held)})
    if d.main:
        print(f"[rm] held-out pairwise accuracy {acc:.3f} on {len(held)} pairs", flush=True)
    save_rm(rm, tok, sdir / "model", d)
    if d.main:
        print(f"[rm] wrote {sdir / 'model'}", flush=True)


def save_rm(rm, tok: Tokenizer, path: Path, d: Dist) -> None:
    """reward_model.save_reward_model on an unsharded copy, written by rank 0."""
    state = full_state(rm)  # a collective under FSDP
    if d.main:
        plain = rm
        if _is_sharded(rm):
            plain = rmod.RewardModel(Transformer(rm.backbone.cfg))
            plain.load_state_dict(state, strict=False)
            if rm.backbone.cfg.tie_embeddings:
                plain.backbone.lm_head.weight = plain.backbone.embed_tokens.weight
        rmod.save_reward_model(plain, path, tok)
    d.barrier()


def best_general(model, tok, rm, rm_tok, task, n_prompts: int, k: int, g: grpo.GRPOConfig,
                 max_len: int, seed: int, d: Dist) -> list[dict]:
    """R1 section 2.3.3's non-reasoning data, here: k samples for each of n general prompts, the
    reward model's best among those that ended (eos). Rows {prompt, response, source, rm_score},
    gathered on every rank."""
    stream = task.general_samples(seed)
    rows = []
    for chunk, roll in sample_share(model, tok, [next(stream) for _ in range(n_prompts)], k, g, seed, d):
        texts = [_text(tok, ids) for ids in roll.tokens]
        scores = rmod.score_texts(rm, rm_tok, [chunk[j // k]["prompt"] for j in range(len(texts))],
                                  texts, max_len).tolist()
        for p, s in enumerate(chunk):
            ended = [j for j in range(p * k, (p + 1) * k) if roll.finish_reasons[j] == "eos"]
            if ended:
                j = max(ended, key=lambda j: scores[j])
                rows.append({"prompt": s["prompt"], "response": texts[j], "source": "general",
                             "rm_score": scores[j]})
    return gather_rows(rows, d)


def mix_at_ratio(reasoning: list, general: list, reasoning_frac: float) -> tuple[list, list]:
    """The largest prefixes of both lists whose sizes stand at reasoning_frac : 1 - reasoning_frac
    (R1 section 2.3.3: about 600k reasoning and 200k general samples, 3:1)."""
    if reasoning_frac >= 1.0:
        return reasoning, []
    total = min(len(reasoning) / reasoning_frac, len(general) / (1.0 - reasoning_frac))
    n_r = min(len(reasoning), round(total * reasoning_frac))
    n_g = min(len(general), round(total * (1.0 - reasoning_frac)))
    return reasoning[:n_r], general[:n_g]


RS_SEED, DISTILL_SEED = 2, 3  # prompt-stream offsets from --seed: other prompts than sft's (seed + 1)


def stage_rs(c: dict, d: Dist) -> None:
    """R1 stage 3, rejection sampling and SFT (section 2.3.3): verified reasoning samples of the
    stage-2 model plus the reward model's best answers to general prompts, mixed at
    --rs_reasoning_frac, written to <out>/rs/rs_data.jsonl; then SFT of the base model (or --init)."""
    run, g, frac = c["run"], c["grpo"], c["run"].rs_reasoning_frac
    if not 0.0 < frac <= 1.0:
        raise UserError(f"--rs_reasoning_frac {frac}: use a fraction in (0, 1] (1: reasoning data only)")
    task = get_task(run, c["toy"])
    if frac < 1.0 and not hasattr(task, "general_samples"):
        raise UserError(f"stage rs: task {run.task!r} has no general prompts; use --task toy or "
                        "--rs_reasoning_frac 1")
    teacher, ttok = load_model(teacher_dir(run, "rs", "grpo"), run, d)
    rm, rm_tok = load_rm(run, d, "rs") if frac < 1.0 else (None, None)
    reasoning = collect_verified(teacher, ttok, task, run.rs_prompts, run.rs_samples, g,
                                 run.seed + RS_SEED, d)
    n_general = math.ceil(len(reasoning) * (1.0 - frac) / frac)  # enough general prompts for the ratio
    general = (best_general(teacher, ttok, rm, rm_tok, task, n_general, run.rs_samples, g,
                            c["rm"].max_len, run.seed + RS_SEED, d) if n_general else [])
    keep_r, keep_g = mix_at_ratio(reasoning, general, frac)
    counts = {"rs/reasoning_prompts": run.rs_prompts, "rs/reasoning_verified": len(reasoning),
              "rs/general_prompts": n_general, "rs/general_ended": len(general),
              "rs/reasoning": len(keep_r), "rs/general": len(keep_g)}
    sdir = Path(run.out) / "rs"
    if d.main:
        tasks.write_jsonl(sdir / "rs_data.jsonl", keep_r + keep_g)
        print("[rs] " + "  ".join(f"{k.split('/')[1]} {v}" for k, v in counts.items())
              + f"  -> {sdir / 'rs_data.jsonl'}", flush=True)
    if not keep_r:
        raise UserError("stage rs: no sample of the stage-2 model passed the filter; train grpo longer, "
                        "raise --rs_prompts, or pass --teacher DIR")
    del teacher, rm
    model, tok = load_model(init_dir(run, "rs", "pretrain"), run, d)
    examples = [sft.encode_example(tok, r["prompt"], r["response"], c["sft"].max_len) for r in keep_r + keep_g]
    _train_sft(c, d, model, tok, examples, "rs", first_row=counts)


def stage_distill(c: dict, d: Dist) -> None:
    """Distillation (R1 section 2.4): SFT a smaller student on the RL model's verified traces.

    The student base is <out>/student_base/model (pretrained here with --student_model for
    --student_steps steps if missing). The baseline for the comparison is R1-Zero-style GRPO on
    the same student base for the same wall time as the distillation SFT (<out>/distill_zero).
    Departures: the report distils on all 800k stage-3 samples; here only verified reasoning
    traces of the teacher, and the teacher's sampling time is not counted in the wall time."""
    run, g = c["run"], c["grpo"]
    task = get_task(run, c["toy"])
    teacher_path = teacher_dir(run, "distill", "rl")
    base = Path(run.out) / "student_base" / "model"
    if not (base / "config.json").is_file():
        if not hasattr(task, "pretrain_corpus"):
            raise UserError(f"stage distill: no student base at {base}; it is pretrained on the toy "
                            "corpus, so use --task toy, or put a small checkpoint there")
        if d.main:
            print(f"[distill] no student base at {base}: pretraining --student_model "
                  f"{run.student_model} for {run.student_steps} steps", flush=True)
        stage_pretrain({**c, "run": replace(run, model=run.student_model), "sft": c["student_sft"]},
                       d, "student_base")
    teacher, ttok = load_model(teacher_path, run, d)
    rows = collect_verified(teacher, ttok, task, run.distill_prompts, run.rs_samples, g,
                            run.seed + DISTILL_SEED, d)
    sdir = Path(run.out) / "distill"
    counts = {"distill/prompts": run.distill_prompts, "distill/verified": len(rows)}
    if d.main:
        tasks.write_jsonl(sdir / "distill_data.jsonl", rows)
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
    sft_time = _train_sft(c, d, student, stok, examples, "distill", first_row=counts)
    del student
    # the equal-time baseline: GRPO on the student base, no intermediate evals, stopped by the clock
    zc = {**c, "run": replace(run, init="", eval_every=0), "grpo": replace(g, steps=DISTILL_RL_MAX_STEPS)}
    zero = stage_rl(zc, d, "zero", name="distill_zero", src=base, time_budget=sft_time)
    evals = {}
    for label, path in (("teacher", teacher_path), ("student base", base),
                        ("distilled student", sdir / "model"),
                        ("student + GRPO, same time", Path(run.out) / "distill_zero" / "model")):
        model, tok = load_model(path, run, d)
        evals[label] = evaluate(model, tok, task.eval_samples(run.eval_n), g.max_new_tokens, d=d)
    blob = {"sft_seconds": sft_time, "sft_steps": c["sft"].steps, "grpo_seconds": zero["rl_time"],
            "grpo_steps": zero["steps"], "traces": len(rows), "eval_n": run.eval_n, "results": evals}
    if d.main:
        (sdir / "comparison.json").write_text(json.dumps(blob, indent=2) + "\n")
        print(f"[distill] student {run.student_model}: SFT {c['sft'].steps} steps in {sft_time:.0f}s vs "
              f"GRPO {zero['steps']} steps in {zero['rl_time']:.0f}s", flush=True)
        print(format_table([{"model": k, **v} for k, v in evals.items()], "model",
                           ["accuracy", "format", "response_length"]), flush=True)
        print(f"[distill] wrote {sdir / 'comparison.json'}", flush=True)


DISTILL_RL_MAX_STEPS = 10_000  # the equal-time GRPO baseline stops on the clock, long before this


def format_table(rows: list[dict], key: str, cols: list[str]) -> str:
    """A plain-text table: one row per dict, `key` first, then `cols` (floats to 3 decimals)."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    table = [[key, *cols]] + [[cell(r.get(key)), *(cell(r.get(c)) for c in cols)] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table)


SUMMARY_STAGES = ("pretrain", "zero", "sft", "grpo", "rs", "rl", "student_base", "distill", "distill_zero")


def rm_eval(model, tok, rm, rm_tok, samples: list[dict], max_new_tokens: int, max_len: int, d: Dist) -> float:
    """Mean reward-model score of the model's greedy answers to `samples` (general prompts)."""
    mine = samples[d.rank::d.world]
    total = 0.0
    if mine:
        with torch.no_grad(), gathered_weights(model):
            roll = generate(model, [tok.encode(s["prompt"]) for s in mine], max_new_tokens, temperature=0.0,
                            eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
        texts = [_text(tok, ids) for ids in roll.tokens]
        total = float(rmod.score_texts(rm, rm_tok, [s["prompt"] for s in mine], texts, max_len).sum())
    return d.all_reduce(total) / max(d.all_reduce(float(len(mine))), 1.0)


GENERAL_EVAL_SEED = 10_007  # the general prompts of the summary (the toy has 32 distinct ones)


def stage_summary(c: dict, d: Dist) -> list[dict]:
    """One table over every stage's model in <out>: held-out accuracy, format rate, language
    consistency, reward-model score (greedy answers to general prompts; needs <out>/rm/model or
    --reward_model) and mean response length. Written to <out>/summary.json."""
    run, g = c["run"], c["grpo"]
    out, task = Path(run.out), get_task(run, c["toy"])
    have_rm = (Path(run.reward_model) if run.reward_model else out / "rm" / "model").is_dir()
    rm, rm_tok = load_rm(run, d, "summary") if have_rm else (None, None)
    general = []
    if hasattr(task, "general_samples"):
        stream, seen = task.general_samples(GENERAL_EVAL_SEED), set()
        for s in (next(stream) for _ in range(run.eval_n)):
            if s["prompt"] not in seen:
                seen.add(s["prompt"])
                general.append(s)
    rows = []
    for st in SUMMARY_STAGES:
        path = out / st / "model"
        if not (path / "config.json").is_file():
            continue
        model, tok = load_model(path, run, d)
        ev = evaluate(model, tok, task.eval_samples(run.eval_n), g.max_new_tokens, d=d)
        if rm is not None and general:
            ev["rm_score"] = rm_eval(model, tok, rm, rm_tok, general, g.max_new_tokens, c["rm"].max_len, d)
        rows.append({"stage": st, **ev})
    if not rows:
        raise UserError(f"stage summary: no trained model under {out}; run some stages first")
    if d.main:
        (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(format_table(rows, "stage", ["accuracy", "format", "language", "rm_score", "response_length"]),
              flush=True)
        print(f"[summary] {run.eval_n} held-out problems, {len(general)} general prompts; wrote "
              f"{out / 'summary.json'}", flush=True)
    return rows
