"""One entry point for every stage of the DeepSeek-R1 recipe.

    python train.py --stage pretrain,zero                 # toy base model, then R1-Zero
    python train.py --stage sft,grpo                      # R1 stage 1 (cold start) and stage 2
    python train.py --stage eval --init runs/toy/zero/model
    torchrun --nproc_per_node=2 train.py --stage zero     # the same, sharded with FSDP2

Stages (DeepSeek-R1 report, Guo et al. 2025):
    pretrain  the embedded toy's base model, trained from scratch on the task's corpus
              (stands in for DeepSeek-V3-Base; real checkpoints skip it: --init DIR)
    zero      R1-Zero (section 2.2): GRPO on the base model, accuracy + format rewards
    sft       stage 1, cold start (2.3.1): sample the R1-Zero model, keep readable verified
              samples, SFT the *base* model on them
    grpo      stage 2, reasoning RL (2.3.2): GRPO on the cold-started model, accuracy + format
              + language-consistency rewards
    rm, rs, rl, distill, summary
              R1 stages 3-4 and distillation: the reward model, rejection sampling, RL for all
              scenarios, distillation vs RL on a small student, one table; see later_stages.py
    eval      held-out accuracy, format rate, language consistency, response length (greedy;
              pass@k and maj@k with --k)
    plot      PNGs of accuracy and response length against RL step for one or more runs
    all       pretrain, zero, sft, grpo, rm, rs, rl, distill, summary (11 minutes on 2 cores)

Every stage writes <out>/<stage>/model (an HF-layout checkpoint with its tokenizer),
<out>/<stage>/metrics.jsonl and <out>/<stage>/run_config.json (the fully resolved config).
A stage that is killed resumes from <out>/<stage>/ckpt (model, optimizer, step, data position;
rollout seeds are derived from the step, so a resumed run repeats the uninterrupted one).

Settings live in dataclasses (RunConfig here, SFTConfig in sft.py, GRPOConfig and LossConfig in
grpo.py, ToyConfig in tasks.py); every field is a command-line flag, `--help` lists them. A name
shared by two classes sets both (--steps sets the SFT and the GRPO steps of every stage that runs),
so the reward model's RMConfig is built from RunConfig's own rm_* flags (--rm_steps, --rm_lr,
--rm_batch_size) and a multi-stage run can give it its own values. --data is read by sft
({prompt, response} lines) and by rm ({prompt, chosen, rejected} lines): run those separately.
Stage step counts for the toy: PRETRAIN/COLD_START/RS/DISTILL_DEFAULTS and RL_DEFAULTS below.
Measured on the 2-core CI machine: `all` took 11 min 3 s (17 min with --threads 1 and other jobs running).
Distributed code lives here only: `init_distributed` and `shard`.
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting made a 2-thread training step 9x slower than a 1-thread
# one on the 2-core CI machine (4.0 s vs 0.44 s for the toy model); sleeping waiters fix it
# (0.47 s). It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

import grpo
import reward_model as rmod
import sft
import tasks
from model import Transformer, preset, replace_dir
from rewards import DEFAULT_WEIGHTS, STAGE2_WEIGHTS, accuracy_reward, format_reward, language_reward
from rollout import gathered_weights, generate
from tokenizer import Tokenizer, build_char_tokenizer

STAGES = ("pretrain", "zero", "sft", "grpo", "rm", "rs", "rl", "distill", "eval", "summary", "plot")
# rm runs before rs: rejection sampling ranks the general answers with the reward model
ALL_STAGES = ("pretrain", "zero", "sft", "grpo", "rm", "rs", "rl", "distill", "summary")


@dataclass
class RunConfig:
    stage: str = "pretrain,zero"      # comma-separated stages, run in order
    out: str = "runs/toy"             # run directory; each stage writes <out>/<stage>/
    init: str = ""                    # checkpoint to start from (default: the previous stage's model)
    task: str = "toy"                 # toy | countdown | gsm8k | jsonl:PATH
    model: str = "toy"                # model preset when training from scratch (pretrain stage)
    seed: int = 0                     # one seed for data order, init and rollout seeds
    device: str = "auto"              # auto | cpu | cuda
    dtype: str = "auto"               # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16
    threads: int = 0                  # torch CPU threads per process (0: torch's default)
    eval_n: int = 200                 # held-out prompts for eval and the in-run eval curve
    eval_every: int = 10              # RL steps between held-out evals (0: only at start and end)
    ckpt_every: int = 20              # steps between resumable checkpoints
    k: int = 1                        # eval: samples per prompt for pass@k / maj@k (1: greedy only)
    sft_prompts: int = 1024           # sft: prompts sampled from the R1-Zero model for cold-start data
    sft_samples: int = 4              # sft: samples per prompt before filtering
    data: str = ""                    # sft: {prompt, response} JSONL instead of sampling; rm:
                                      # {prompt, chosen, rejected} JSONL instead of the toy's pairs
    runs: str = ""                    # plot: comma-separated run directories to overlay
    w_accuracy: float = DEFAULT_WEIGHTS["accuracy"]   # reward weights (rewards.combine_rewards)
    w_format: float = DEFAULT_WEIGHTS["format"]
    w_language: float = STAGE2_WEIGHTS["language"]    # used by grpo and rl only (R1 section 2.3.2)
    teacher: str = ""                 # rs / distill: the sampled model (default <out>/grpo/model for
                                      # rs, <out>/rl/model for distill)
    reward_model: str = ""            # rs / rl / summary: reward model directory (default <out>/rm/model)
    # rm: its own names, because RMConfig's steps/lr/batch_size would collide with SFTConfig's
    rm_steps: int = 40                # optimizer steps (one epoch over rm_steps * rm_batch_size pairs)
    rm_lr: float = 1e-3               # peak learning rate (RMConfig.lr; cosine to 10%)
    rm_batch_size: int = 32           # preference pairs per step
    rm_eval_pairs: int = 200          # held-out pairs (toy: another seed; --data: the last 10%)
    rs_prompts: int = 256             # rs: reasoning prompts sampled
    rs_samples: int = 4               # rs and distill: samples per prompt (k)
    rs_reasoning_frac: float = 0.75   # rs: reasoning share of the SFT set (R1: 600k of 800k = 3:1)
    general_frac: float = 0.25        # rl: share of each step's prompts that are general (RM reward)
    distill_prompts: int = 256        # distill: teacher prompts sampled for traces
    student_model: str = "toy-small"  # distill: the student's model preset
    student_steps: int = 600          # distill: pretraining steps of the student base, if missing


# Per-stage defaults for the embedded toy (a flag on the command line overrides them).
PRETRAIN_DEFAULTS = dict(steps=600, batch_size=64, micro_batch=64, lr=3e-3, warmup=30, max_len=160)
COLD_START_DEFAULTS = dict(steps=150, batch_size=32, micro_batch=32, lr=5e-4, warmup=10, max_len=160)
RS_DEFAULTS = dict(COLD_START_DEFAULTS, steps=100)        # stage 3's SFT, from the base model
DISTILL_DEFAULTS = dict(COLD_START_DEFAULTS, steps=300, lr=1e-3)  # the student is smaller: a larger lr
RL_DEFAULTS = dict(steps=20)      # stage 4: a short polish of the rs model (GRPOConfig otherwise)
SFT_DEFAULTS = {"pretrain": PRETRAIN_DEFAULTS, "rs": RS_DEFAULTS, "distill": DISTILL_DEFAULTS}
CONFIG_CLASSES = (RunConfig, sft.SFTConfig, grpo.GRPOConfig, grpo.LossConfig, tasks.ToyConfig)


class UserError(Exception):
    """A problem the person running the command can fix; printed as one line, exit code 2."""


# --- configuration ----------------------------------------------------------------------------

def parse_args(argv: list[str]) -> dict[str, dict]:
    """--field value pairs -> {class name: {field: value}}, typed by the dataclass field."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        for cls in CONFIG_CLASSES:
            print(f"{cls.__name__}:")
            for f in fields(cls):
                print(f"  --{f.name} (default {f.default!r})")
        raise SystemExit(0)
    owners = {}
    for cls in CONFIG_CLASSES:
        for f in fields(cls):
            owners.setdefault(f.name, []).append((cls, f))
    out: dict[str, dict] = {cls.__name__: {} for cls in CONFIG_CLASSES}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise UserError(f"unexpected argument {a!r}; settings are given as --name value (see --help)")
        name, _, val = a[2:].partition("=")
        if not _:
            if i + 1 >= len(argv):
                raise UserError(f"flag --{name} needs a value")
            val, i = argv[i + 1], i + 1
        name = name.replace("-", "_")
        if name not in owners:
            raise UserError(f"unknown flag --{name}; run with --help for the list of settings")
        for cls, f in owners[name]:  # a name shared by two configs (e.g. lr) sets both
            out[cls.__name__][name] = _convert(val, f, name)
        i += 1
    return out


def _convert(val: str, f, name: str):
    kind = type(f.default)
    try:
        if kind is bool:
            if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return val.lower() in ("1", "true", "yes")
        return kind(val)
    except ValueError:
        raise UserError(f"--{name} {val!r}: expected a {kind.__name__}") from None


def build_configs(args: dict[str, dict], stage: str) -> dict:
    """The resolved configs of one stage: dataclass defaults < stage defaults < command line."""
    run = RunConfig(**args["RunConfig"])
    sft_cfg = sft.SFTConfig(**{**SFT_DEFAULTS.get(stage, COLD_START_DEFAULTS), **args["SFTConfig"]})
    g = grpo.GRPOConfig(**{**(RL_DEFAULTS if stage == "rl" else {}), **args["GRPOConfig"]})
    loss = grpo.loss_preset(g.loss, **args["LossConfig"])
    toy = tasks.ToyConfig(**args["ToyConfig"])
    rm = rmod.RMConfig(steps=run.rm_steps, lr=run.rm_lr, batch_size=run.rm_batch_size,
                       micro_batch=min(run.rm_batch_size, rmod.RMConfig.micro_batch),
                       warmup=min(rmod.RMConfig.warmup, max(1, run.rm_steps // 4)))
    c = {"run": run, "sft": sft_cfg, "grpo": g, "loss": loss, "toy": toy, "rm": rm}
    if stage == "distill":  # the student base, pretrained by distill when missing
        c["student_sft"] = sft.SFTConfig(**{**PRETRAIN_DEFAULTS, **args["SFTConfig"], "steps": run.student_steps})
    return c


# --- distributed (the only place torch.distributed is set up) -----------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: float, op: str = "sum") -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
        return float(t.item())

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(run: RunConfig) -> Dist:
    """torchrun sets RANK/WORLD_SIZE: gloo on CPU, NCCL on GPU. A plain `python` run is one rank."""
    want_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
    if run.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if want_cuda else "gloo")
    return Dist(rank, world, device)


def shard(model, d: Dist):
    """FSDP2: shard each block, then the root (embeddings, final norm, head). No-op on one rank.
    A RewardModel is sharded the same way through its backbone's blocks."""
    if d.world == 1:
        return model
    from torch.distributed.fsdp import fully_shard
    for block in (model.backbone if isinstance(model, rmod.RewardModel) else model).layers:
        fully_shard(block)
    fully_shard(model)
    return model


# --- checkpoints --------------------------------------------------------------------------------

def full_state(model) -> dict:
    """Unsharded, unwrapped state dict on CPU (under FSDP, rank 0 gets it and the others {})."""
    if not _is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def save_model(model, tok: Tokenizer, path: Path, d: Dist) -> None:
    """An HF-layout checkpoint (transformers loads it), written by rank 0, atomically."""
    if not _is_sharded(model):
        if d.main:
            model.save_pretrained(path, tokenizer=tok)
        return
    state = full_state(model)  # a collective: every rank takes part
    if d.main:
        with torch.device("meta"):
            plain = Transformer(model.cfg)
        plain.load_state_dict(state, assign=True, strict=False)
        if model.cfg.tie_embeddings:
            plain.lm_head.weight = plain.embed_tokens.weight
        plain.save_pretrained(path, tokenizer=tok)
    d.barrier()


def save_checkpoint(ckpt: Path, model, tok, optimizer, state: dict, d: Dist) -> None:
    """Model + optimizer + trainer state, atomically: a crash mid-write keeps the previous one.

    Both state dicts are full and keyed by parameter name (not by index, not sharded), so a run
    checkpointed on N ranks resumes on any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    msd = full_state(model)
    osd = get_optimizer_state_dict(model, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        tmp = ckpt.with_name(ckpt.name + f".tmp-{os.getpid()}")
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        torch.save({"model": msd, "optimizer": osd, "state": state}, tmp / "trainer_state.pt")
        if tok is not None:
            tok.save(tmp)
        replace_dir(tmp, ckpt)
    d.barrier()


def load_checkpoint(ckpt: Path, model, optimizer) -> dict:
    """Restore model and optimizer from save_checkpoint's file (every rank reads it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    blob = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    # strict=False below only tolerates a tied head; any other name mismatch means the checkpoint
    # holds another model's layout, and loading it would silently keep freshly initialised weights
    diff = (set(blob["model"]) ^ set(model.state_dict())) - {"lm_head.weight"}
    if diff:
        raise UserError(f"{ckpt} holds a different model layout (e.g. {sorted(diff)[0]}); "
                        f"delete that ckpt directory to start the stage afresh")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, blob["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, blob["optimizer"], options=opts)
    return blob["state"]


class Metrics:
    """metrics.jsonl, one JSON object a step, written by rank 0. On resume, lines past the resumed
    step are dropped so the file reads as if the run had never stopped."""

    def __init__(self, path: Path, d: Dist, resume_step: int | None):
        self.path, self.d = path, d
        if d.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = []
            if resume_step is not None and path.exists():
                rows = [ln for ln in path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(r + "\n" for r in rows))

    def log(self, row: dict) -> None:
        if self.d.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# --- shared pieces ----------------------------------------------------------------------------

def resolve_dtype(run: RunConfig, d: Dist) -> torch.dtype:
    if run.dtype == "auto":
        return torch.bfloat16 if d.device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[run.dtype]
    except KeyError:
        raise UserError(f"--dtype {run.dtype!r}: use auto, float32 or bfloat16") from None


def init_dir(run: RunConfig, stage: str, previous: str) -> Path:
    """--init if given, else the previous stage's model in this run directory."""
    return _model_dir(run.init, "--init", run, stage, previous, "checkpoint")


def _model_dir(given: str, flag: str, run: RunConfig, stage: str, previous: str, what: str) -> Path:
    path = Path(given) if given else Path(run.out) / previous / "model"
    if not (path / "config.json").is_file():
        hint = (f"run --stage {previous} first, or pass {flag} DIR" if not given
                else "pass a directory holding config.json, *.safetensors and tokenizer.json")
        raise UserError(f"stage {stage}: no {what} at {path}; {hint}")
    return path


def load_model(path: Path, run: RunConfig, d: Dist) -> tuple[Transformer, Tokenizer]:
    try:
        tok = Tokenizer.from_dir(path)
        model = Transformer.from_pretrained(path, dtype=resolve_dtype(run, d), device=d.device)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    return model, tok


def make_optimizer(model, lr: float, weight_decay: float):
    # AdamW (Loshchilov & Hutter 2019) with the betas most LLM training uses.
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                             foreach=False)


def check_finite(value: float, what: str, step: int, ckpt: Path) -> None:
    if not math.isfinite(value):
        raise UserError(f"step {step}: {what} is {value} (non-finite); stopped without saving, the last "
                        f"good checkpoint is {ckpt} -- lower the learning rate or check the data")


def _fmt(v) -> str:
    """4 significant digits for rates and losses, whole numbers for throughputs."""
    if not isinstance(v, float):
        return str(v)
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def progress(stage: str, step: int, total: int, t0: float, row: dict, keys: list[str], d: Dist) -> None:
    if not d.main:
        return
    el = time.perf_counter() - t0
    left = el / max(step, 1) * (total - step)
    parts = [f"{k} {_fmt(row[k])}" for k in keys if k in row]
    print(f"[{stage}] step {step}/{total}  " + "  ".join(parts) + f"  ({el:.0f}s, {left:.0f}s left)",
          flush=True)


def get_task(run: RunConfig, toy: tasks.ToyConfig):
    try:
        return tasks.get_task(run.task, **({"cfg": toy} if run.task == "toy" else {}))
    except (tasks.DataError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


# --- evaluation -------------------------------------------------------------------------------

def evaluate(model, tok: Tokenizer, samples: list[dict], max_new_tokens: int, k: int = 1,
             seed: int = 0, d: Dist | None = None, temperature: float = 1.0) -> dict:
    """Greedy accuracy, format and language rates and mean length on `samples`; with k > 1 also
    pass@k (any of k samples right) and maj@k (the most common answer right), sampled at `temperature`."""
    from rewards import accuracy_reward, extract_answer
    d = d or Dist()
    mine = samples[d.rank::d.world]
    prompts = [tok.encode(s["prompt"]) for s in mine]
    sums = {"n": 0.0, "accuracy": 0.0, "format": 0.0, "language": 0.0, "response_length": 0.0}
    if k > 1:
        sums.update({f"pass@{k}": 0.0, f"maj@{k}": 0.0})
    with torch.no_grad(), gathered_weights(model):
        greedy = generate(model, prompts, max_new_tokens, temperature=0.0, eos_token_id=tok.eos_ids,
                          pad_token_id=tok.pad_id) if prompts else None
        sampled = (generate(model, prompts, max_new_tokens, temperature=temperature, num_samples=k,
                            eos_token_id=tok.eos_ids, seed=seed, pad_token_id=tok.pad_id)
                   if prompts and k > 1 else None)
    for i, s in enumerate(mine):
        text = _text(tok, greedy.tokens[i])
        sums["n"] += 1
        sums["accuracy"] += accuracy_reward(text, s)
        sums["format"] += format_reward(text)
        sums["language"] += language_reward(text, s["prompt"])
        sums["response_length"] += len(greedy.tokens[i])
        if sampled is not None:
            texts = [_text(tok, t) for t in sampled.tokens[i * k:(i + 1) * k]]
            rights = [accuracy_reward(t, s) for t in texts]
            sums[f"pass@{k}"] += float(max(rights))
            answers = [extract_answer(t) for t in texts]
            votes = {}
            for a, r in zip(answers, rights):
                if a is not None:
                    votes.setdefault(a.strip(), []).append(r)
            if votes:
                best = max(votes.values(), key=len)
                sums[f"maj@{k}"] += float(best[0])
    tot = {key: d.all_reduce(v) for key, v in sums.items()}
    n = max(tot.pop("n"), 1.0)
    return {key: v / n for key, v in tot.items()}


def _text(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode([t for t in ids if t not in tok.eos_ids])


# --- stages -----------------------------------------------------------------------------------

def stage_pretrain(c: dict, d: Dist, stage: str = "pretrain") -> None:
    """The toy base model: a character-level transformer trained from scratch on the task corpus.
    (distill also calls it, as stage "student_base", for the student's smaller base model.)"""
    run, scfg = c["run"], c["sft"]
    task = get_task(run, c["toy"])
    if not hasattr(task, "pretrain_corpus"):
        raise UserError(f"stage pretrain needs the toy task (got --task {run.task}); real checkpoints "
                        "start at --stage zero --init DIR")
    tok = build_char_tokenizer(task.alphabet())
    torch.manual_seed(run.seed)
    model = Transformer(preset(run.model, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                               pad_token_id=tok.pad_id)).to(d.device)
    docs = task.pretrain_corpus(scfg.steps * scfg.batch_size, run.seed)
    examples = [sft.encode_example(tok, "", doc.removesuffix(tasks.EOS_TEXT), scfg.max_len) for doc in docs]
    _train_sft(c, d, model, tok, examples, stage)


def stage_sft(c: dict, d: Dist) -> None:
    """R1 stage 1, cold start: readable, verified samples of the R1-Zero model, SFT on the base."""
    run, scfg = c["run"], c["sft"]
    out = Path(run.out) / "sft"
    if run.data:
        try:
            rows = tasks.load_sft_jsonl(run.data)
        except (tasks.DataError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
    else:
        teacher, ttok = load_model(init_dir(replace(run, init=""), "sft", "zero"), run, d)
        task = get_task(run, c["toy"])
        rows = collect_verified(teacher, ttok, task, run.sft_prompts, run.sft_samples, c["grpo"], run.seed, d)
        if d.main:
            tasks.write_jsonl(out / "cold_start.jsonl", rows)
        if not rows:
            raise UserError("stage sft: no R1-Zero sample passed the filter; train zero longer "
                            "or pass --data FILE")
        del teacher
    base = Path(run.init) if run.init else Path(run.out) / "pretrain" / "model"
    model, tok = load_model(init_dir(replace(run, init=str(base)), "sft", "pretrain"), run, d)
    examples = [sft.encode_example(tok, r["prompt"], r["response"], scfg.max_len) for r in rows]
    if d.main:
        print(f"[sft] {len(rows)} cold-start samples", flush=True)
    _train_sft(c, d, model, tok, examples, "sft")


def sample_share(model, tok, samples: list, k: int, g: grpo.GRPOConfig, seed: int, d: Dist):
    """This rank's share of `samples`, k completions each, 64 prompts per `generate` call: yields
    (chunk of samples, its Rollout; completion j answers chunk[j // k])."""
    mine = samples[d.rank::d.world]
    for i in range(0, len(mine), 64):
        chunk = mine[i:i + 64]
        with torch.no_grad(), gathered_weights(model):
            yield chunk, generate(model, [tok.encode(s["prompt"]) for s in chunk], g.max_new_tokens,
                                  temperature=g.temperature, num_samples=k, eos_token_id=tok.eos_ids,
                                  seed=seed + i, pad_token_id=tok.pad_id)


def gather_rows(rows: list, d: Dist) -> list:
    """Every rank's rows, in rank order, on every rank."""
    if d.world == 1:
        return rows
    gathered = [None] * d.world
    torch.distributed.all_gather_object(gathered, rows)
    return [r for part in gathered for r in part]


def collect_verified(model, tok, task, n_prompts: int, k: int, g: grpo.GRPOConfig, seed: int,
                     d: Dist) -> list[dict]:
    """Sample k responses for n training prompts; keep the verified, well-formed, language-consistent
    ones (the report's "readable" filter), at most one per distinct response. Returns rows
    {prompt, response} gathered on every rank."""
    stream = task.train_samples(seed + 1)
    rows, seen = [], set()
    for chunk, roll in sample_share(model, tok, [next(stream) for _ in range(n_prompts)], k, g, seed, d):
        for j, ids in enumerate(roll.tokens):
            s, text = chunk[j // k], _text(tok, ids)
            ok = (roll.finish_reasons[j] == "eos" and format_reward(text) == 1.0
                  and language_reward(text, s["prompt"]) == 1.0 and accuracy_reward(text, s) == 1.0)
            if ok and (s["prompt"], text) not in seen:
                seen.add((s["prompt"], text))
                rows.append({"prompt": s["prompt"], "response": text, "source": "reasoning"})
    return gather_rows(rows, d)


def _train_sft(c: dict, d: Dist, model, tok, examples: list, stage: str,
               first_row: dict | None = None) -> float:
    """SFT `model` on encoded examples into <out>/<stage>/model; `first_row` (e.g. data counts) is
    logged as step 0 of a fresh run. Returns the wall time of the training loop in seconds."""
    run, scfg = c["run"], c["sft"]
    if scfg.batch_size % d.world:
        raise UserError(f"--batch_size {scfg.batch_size} must be a multiple of the {d.world} ranks")
    sdir = Path(run.out) / stage
    model = shard(model, d)
    opt = make_optimizer(model, scfg.lr, scfg.weight_decay)
    ckpt = sdir / "ckpt"
    state = load_checkpoint(ckpt, model, opt) if (ckpt / "trainer_state.pt").is_file() else {"step": 0, "pos": 0}
    write_run_config(sdir, c, d)
    metrics = Metrics(sdir / "metrics.jsonl", d, state["step"] if state["step"] else None)
    if first_row and not state["step"]:
        metrics.log({"step": 0, **first_row})
    stream = sft.ExampleStream(examples, run.seed, state["pos"])
    t0 = time.perf_counter()
    for step in range(state["step"], scfg.steps):
        lr = sft.lr_at(step, scfg.steps, scfg.lr, scfg.warmup, scfg.min_lr_ratio)
        try:
            row = sft.sft_step(model, opt, stream.take(scfg.batch_size), tok.pad_id, scfg, lr,
                               d.rank, d.world, d.all_reduce if d.world > 1 else None)
        except FloatingPointError as e:
            check_finite(float("nan"), str(e), step + 1, ckpt)
        check_finite(row["loss"], "loss", step + 1, ckpt)
        row = {"step": step + 1, **row}
        metrics.log(row)
        if (step + 1) % 25 == 0 or step + 1 == scfg.steps:
            progress(stage, step + 1, scfg.steps, t0, row, ["loss", "lr"], d)
        if (step + 1) % run.ckpt_every == 0 or step + 1 == scfg.steps:
            save_checkpoint(ckpt, model, tok, opt, {"step": step + 1, "pos": stream.position}, d)
    wall = time.perf_counter() - t0
    save_model(model, tok, sdir / "model", d)
    if d.main:
        print(f"[{stage}] wrote {sdir / 'model'}", flush=True)
    return wall


RL_PREVIOUS = {"zero": "pretrain", "grpo": "sft", "rl": "rs"}  # where each RL stage starts


def stage_rl(c: dict, d: Dist, stage: str, name: str | None = None, src: Path | None = None,
             time_budget: float = 0.0) -> dict:
    """R1-Zero (`zero`, from the base model, accuracy + format), stage 2 (`grpo`, from the cold
    start, accuracy + format + language consistency) or stage 4 (`rl`, from the rs model: stage 2's
    rewards on reasoning prompts, the reward model's score on --general_frac general prompts).

    name: the directory under <out> (default: the stage); src: the starting checkpoint (default:
    --init or the previous stage's model); time_budget > 0: stop once the RL steps (evals not
    counted) have taken that many seconds (distill's equal-time baseline). Returns {steps, rl_time}.
    """
    run, g, lcfg = c["run"], c["grpo"], c["loss"]
    if g.prompts_per_step % d.world:
        raise UserError(f"--prompts_per_step {g.prompts_per_step} must be a multiple of the {d.world} ranks")
    name = name or stage
    src = src or init_dir(run, stage, RL_PREVIOUS[stage])
    policy, tok = load_model(src, run, d)
    ref = None
    if lcfg.kl_coef > 0:  # the reference policy is the starting point, frozen (DeepSeekMath eq. 3)
        ref, _ = load_model(src, run, d)
        ref.requires_grad_(False)
        ref = shard(ref, d)
    policy = shard(policy, d)
    opt = make_optimizer(policy, g.lr, g.weight_decay)
    weights = {"accuracy": run.w_accuracy, "format": run.w_format,
               "language": run.w_language if stage in ("grpo", "rl") else 0.0}
    task = get_task(run, c["toy"])
    n_general = round(g.prompts_per_step * run.general_frac) if stage == "rl" else 0
    scorer = None
    if n_general:
        if not hasattr(task, "general_samples"):
            raise UserError(f"stage rl: task {run.task!r} has no general prompts; use --task toy or "
                            "--general_frac 0")
        if n_general % d.world:
            raise UserError(f"stage rl: {n_general} general prompts a step (--general_frac) must be a "
                            f"multiple of the {d.world} ranks, so every rank logs both reward sources")
        import later_stages  # stage 4's reward model and routing (see runners())
        rm, rm_tok = later_stages.load_rm(run, d, stage)
        scorer = later_stages.mixed_scorer(lambda ps, ts: rmod.score_texts(rm, rm_tok, ps, ts, c["rm"].max_len).tolist(),
                              weights)
    sdir = Path(run.out) / name
    ckpt = sdir / "ckpt"
    fresh = {"step": 0, "pos": 0, "general_pos": 0}
    state = load_checkpoint(ckpt, policy, opt) if (ckpt / "trainer_state.pt").is_file() else fresh
    write_run_config(sdir, c, d)
    metrics = Metrics(sdir / "metrics.jsonl", d, state["step"] if state["step"] else None)
    eval_set = task.eval_samples(run.eval_n)
    # Every rank walks the same prompt streams and takes its own contiguous share of each step's
    # prompts, so groups stay whole on one rank and the global batch does not depend on the ranks.
    stream = task.train_samples(run.seed, start=state["pos"])
    gstream = task.general_samples(run.seed, start=state.get("general_pos", 0)) if n_general else None
    pos = [state["pos"], state.get("general_pos", 0)]

    def take(it, n: int, which: int) -> list[dict]:
        pos[which] += n * d.world
        batch = [next(it) for _ in range(n * d.world)]
        return batch[d.rank * n:(d.rank + 1) * n]

    def draw(n_local: int) -> list[dict]:
        if gstream is None or n_local * d.world != g.prompts_per_step:  # no mixture, or a refill
            return take(stream, n_local, 0)
        n_gen = n_general // d.world  # a step: round(P * general_frac) general prompts, on every rank alike
        return take(stream, n_local - n_gen, 0) + take(gstream, n_gen, 1)

    if state["step"] == 0:
        ev = evaluate(policy, tok, eval_set, g.max_new_tokens, d=d)
        metrics.log({"step": 0, **{f"eval/{k}": v for k, v in ev.items()}})
        _print_eval(name, 0, ev, d)
    t0, rl_time, step = time.perf_counter(), 0.0, state["step"]
    for step in range(state["step"], g.steps):
        lr = g.lr * min(1.0, (step + 1) / max(1, g.warmup))
        ts = time.perf_counter()
        try:  # rollout seeds come from (seed, step, rank): a resumed run samples the same
            row = grpo.rl_step(policy, ref, tok, draw, g, lcfg, weights, opt, lr,
                               seed=(run.seed * 100_003 + step) * 64 + d.rank, world=d.world,
                               all_reduce=d.all_reduce if d.world > 1 else None, scorer=scorer)
        except FloatingPointError as e:
            check_finite(float("nan"), str(e), step + 1, ckpt)
        rl_time += time.perf_counter() - ts
        check_finite(row["loss"], "loss", step + 1, ckpt)
        row = {"step": step + 1, **row,
               "gen_tok_per_s": row["gen_tokens"] / max(row["gen_time"], 1e-9),
               # completion tokens trained on per second (each of the mu passes counts)
               "train_tok_per_s": row["gen_tokens"] * g.mu / max(row["train_time"], 1e-9)}
        # every rank must stop at the same step: the slowest rank's clock decides
        done = step + 1 == g.steps or (time_budget > 0 and d.all_reduce(rl_time, "max") >= time_budget)
        if run.eval_every and ((step + 1) % run.eval_every == 0) or done:
            ev = evaluate(policy, tok, eval_set, g.max_new_tokens, d=d)
            row.update({f"eval/{k}": v for k, v in ev.items()})
        metrics.log(row)
        progress(name, step + 1, g.steps, t0, row,
                 ["reward", "reward/accuracy", "reward/format", "reward/language", "reward/rm",
                  "response_length", "kl", "clip_frac", "eval/accuracy", "gen_tok_per_s", "train_tok_per_s"], d)
        if (step + 1) % run.ckpt_every == 0 or done:
            save_checkpoint(ckpt, policy, tok, opt, {"step": step + 1, "pos": pos[0], "general_pos": pos[1]}, d)
        if done:
            step += 1
            break
    save_model(policy, tok, sdir / "model", d)
    if d.main:
        print(f"[{name}] wrote {sdir / 'model'}", flush=True)
    return {"steps": step, "rl_time": rl_time}


def _print_eval(stage, step, ev, d):
    if d.main:
        print(f"[{stage}] step {step} held-out " + "  ".join(f"{k} {v:.3f}" for k, v in ev.items()), flush=True)


def stage_eval(c: dict, d: Dist) -> dict:
    run, g = c["run"], c["grpo"]
    path = Path(run.init) if run.init else _last_model(Path(run.out))
    model, tok = load_model(init_dir(replace(run, init=str(path)), "eval", "zero"), run, d)
    task = get_task(run, c["toy"])
    ev = evaluate(model, tok, task.eval_samples(run.eval_n), g.max_new_tokens, k=run.k, seed=run.seed,
                  d=d, temperature=g.temperature)
    if d.main:
        print(json.dumps({"checkpoint": str(path), "n": run.eval_n, **ev}), flush=True)
    return ev


def _last_model(out: Path) -> Path:
    for stage in ("rl", "rs", "grpo", "sft", "zero", "pretrain"):
        if (out / stage / "model" / "config.json").is_file():
            return out / stage / "model"
    raise UserError(f"stage eval: no trained model under {out}; pass --init DIR")


def stage_plot(c: dict, d: Dist) -> None:
    """accuracy.png and length.png: held-out accuracy and mean response length against RL step,
    one line per run directory (for ablations: --runs runs/a/zero,runs/b/zero)."""
    run = c["run"]
    if not d.main:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("stage plot needs matplotlib: pip install -e '.[plot]'") from None
    dirs = [Path(p) for p in (run.runs.split(",") if run.runs else [str(Path(run.out) / "zero")])]
    figs = {name: plt.subplots(figsize=(5, 3.5)) for name in ("accuracy", "length")}
    for p in dirs:
        mfile = p / "metrics.jsonl"
        if not mfile.is_file():
            raise UserError(f"stage plot: {mfile} not found; pass --runs with stage directories that hold metrics.jsonl")
        rows = [json.loads(ln) for ln in mfile.read_text().splitlines() if ln.strip()]
        ev = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        tr = [(r["step"], r["reward/accuracy"]) for r in rows if "reward/accuracy" in r]
        ln = [(r["step"], r["response_length"]) for r in rows if "response_length" in r]
        label = str(p)
        ax = figs["accuracy"][1]
        if ev:
            ax.plot(*zip(*ev), marker="o", label=f"{label} held-out (greedy)")
        if tr:
            ax.plot(*zip(*tr), alpha=0.5, label=f"{label} train (sampled)")
        if ln:
            figs["length"][1].plot(*zip(*ln), label=label)
    for name, (fig, ax) in figs.items():
        ax.set_xlabel("RL step")
        ax.set_ylabel("accuracy" if name == "accuracy" else "mean response length (tokens)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = Path(run.out) / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        print(f"[plot] wrote {out}", flush=True)


def write_run_config(sdir: Path, c: dict, d: Dist) -> None:
    if d.main:
        sdir.mkdir(parents=True, exist_ok=True)
        blob = {k: asdict(v) for k, v in c.items()}
        blob["world_size"] = d.world
        (sdir / "run_config.json").write_text(json.dumps(blob, indent=2) + "\n")


def runners() -> dict:
    """The RUNNERS table: stage name -> runner(c, d)."""
    # later_stages imports from this module, so it is imported here, once train is fully loaded,
    # rather than at the top (a circular import); stage_rl imports it the same way.
    import later_stages as later
    return {
        "pretrain": stage_pretrain,
        "zero": lambda c, d: stage_rl(c, d, "zero"),
        "sft": stage_sft,
        "grpo": lambda c, d: stage_rl(c, d, "grpo"),
        "rm": later.stage_rm,
        "rs": later.stage_rs,
        "rl": lambda c, d: stage_rl(c, d, "rl"),
        "distill": later.stage_distill,
        "eval": stage_eval,
        "summary": later.stage_summary,
        "plot": stage_plot,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        run = RunConfig(**args["RunConfig"])
        stages = []
        for s in (s.strip() for s in run.stage.split(",")):
            if s and s not in STAGES + ("all",):
                raise UserError(f"unknown stage {s!r}; choose from {', '.join(STAGES + ('all',))}")
            stages += list(ALL_STAGES) if s == "all" else [s] if s else []
        if run.threads:
            torch.set_num_threads(run.threads)
        d = init_distributed(run)
        random.seed(run.seed)
        RUNNERS = runners()
        for s in stages:
            c = build_configs(args, s)
            RUNNERS[s](c, d)
        if d.world > 1:
            torch.distributed.barrier()  # every rank done before gloo/NCCL tear down
            torch.distributed.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            # torch 2.13 + gloo: a communication thread sometimes aborts the interpreter's own exit
            # ("terminate called without an active exception", about 1 run in 6 in
            # tests/test_train.py); everything is written and flushed, so leave without it.
            os._exit(0)
        return 0
    except (UserError, tasks.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a config value rejected by a dataclass (LossConfig, ModelConfig, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as the module `train`, not as `__main__`: later_stages imports from `train`, and a second
    # copy of this file would hold a second UserError class that main() here would not catch.
    import train
    sys.exit(train.main())
