"""What every stage runs on: processes and devices, sharding, the stage directory, and the one loop.

- `init_distributed` and `Dist`: a plain `python` run is one rank; under `torchrun` every process is
  a rank (gloo on CPU, NCCL on GPU). This is the one place a process group is set up.
- `shard`: FSDP2 (`fully_shard` on each block, then the root), applied after the model is built;
  checkpoints hold unwrapped names (checkpoint.py gathers full tensors).
- `StageRun`: one stage's directory `<out>/<stage>`: `run_config.json` (every resolved setting),
  `metrics.jsonl` (one row a step), `ckpt/` (trainer state, to resume a killed run) and `model/`,
  and the run contract (README, "Run contract"): a lock on the directory for the run's life, the
  recovery of a checkpoint swap a kill cut short, the settings that shaped the checkpoint compared
  with the rerun's, a finished stage left alone, a full disk and a non-finite step as one-line errors.
- `fit`: the one training loop. Every stage's steps come from a generator (supervised steps from
  `supervised_steps`, RL steps from `grpo.train_rl`); `fit` checks each step's loss, logs it,
  prints progress, evaluates, checkpoints, and stops at the end or on a time budget.
- `ExampleStream`: an endless, reshuffled-each-epoch stream over a list, resumable by position.
"""
from __future__ import annotations

import datetime
import errno
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

try:
    import fcntl  # POSIX; on Windows stage directories are not locked
except ImportError:
    fcntl = None

import tasks
from checkpoint import (RM_MARKER, TRAINER_STATE, WriteError, config_from_hf, has_trainer_state, load_pretrained,
                        load_reward_model, load_trainer_state, read_json, recover_dir, save_model,
                        save_trainer_state)
from data import epochs
from model import Transformer
from optim import lr_at, parameters_finite
from reward_model import RewardModel
from tokenizer import Tokenizer

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROGRESS_LINES = 20  # a stage prints about this many progress lines, plus every eval and the last step


class UserError(Exception):
    """A problem the person running the command can fix; printed as one line, exit code 2."""


# --- processes and devices --------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: float, op: str = "sum") -> float:
        """`x` summed (or maxed) over ranks."""
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(t, op=reduce_op)
        return float(t.item())

    def sum_fn(self):
        """all_reduce as the step functions take it: None on one process."""
        return self.all_reduce if self.world > 1 else None

    def gather(self, rows: list) -> list:
        """Every rank's rows, in rank order, on every rank."""
        if self.world == 1:
            return rows
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, rows)
        return [r for part in parts for r in part]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: str, timeout: float = 300.0) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: gloo on CPU, NCCL on GPU. `device` is auto, cpu or cuda.
    `timeout` (seconds, --dist_timeout): a collective that waits longer for a stopped rank fails
    instead of hanging for gloo's default 30 minutes."""
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: use {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if want_cuda else "gloo",
                                             timeout=datetime.timedelta(seconds=timeout))
    return Dist(rank, world, dev)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: use auto, {' or '.join(DTYPES)}")
    return DTYPES[name]


def shard(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """FSDP2: shard each block, then the root (embeddings, final norm, head). No-op on one rank.
    A RewardModel is sharded the same way through its backbone's blocks."""
    if d.world == 1:
        return model
    from torch.distributed.fsdp import fully_shard
    for block in (model.backbone if isinstance(model, RewardModel) else model).layers:
        fully_shard(block)
    fully_shard(model)
    return model


# --- checkpoints a stage starts from ------------------------------------------------------------------

# `run` below is the run's RunConfig (settings.py): its out, dtype, task and reward_model.

def find_model(run, given: str, flag: str, stage: str, previous: str, what: str = "checkpoint") -> Path:
    """`given` if set, else <out>/<previous>/model: the model a stage starts from, checked to exist."""
    path = Path(given) if given else Path(run.out) / previous / "model"
    if not (path / "config.json").is_file():
        hint = (f"run --stage {previous} first, or pass {flag}" if not given
                else "pass a directory holding config.json, *.safetensors and tokenizer.json")
        raise UserError(f"stage {stage}: no {what} at {path}; {hint}")
    return path


def load_model(path: Path, run, d: Dist) -> tuple[Transformer, Tokenizer]:
    """A checkpoint's model (on this rank's device, in --dtype) and its tokenizer."""
    try:
        model = load_pretrained(path, dtype=resolve_dtype(run.dtype, d.device), device=d.device)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    tok = read_tokenizer(path)
    if not parameters_finite(model):
        raise UserError(f"{path}: the weights hold NaN or inf (a run that blew up?); it is not a usable "
                        "model: train it again or pass another checkpoint")
    return model, tok


def read_tokenizer(path: Path) -> Tokenizer:
    """A checkpoint directory's tokenizer; a missing or garbled file is a UserError naming it."""
    try:
        return Tokenizer.from_dir(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # the tokenizers library raises a bare Exception for a garbled file
        raise UserError(f"{path}: its tokenizer files cannot be read ({str(e).splitlines()[0][:100]}); "
                        "restore tokenizer.json from the checkpoint's source") from None


def load_frozen_rm(run, d: Dist, stage: str) -> tuple[RewardModel, Tokenizer]:
    """The reward model at --reward_model (default <out>/rm/model), unsharded on every rank and
    frozen: it only scores."""
    path = Path(run.reward_model) if run.reward_model else Path(run.out) / "rm" / "model"
    if not (path / RM_MARKER).is_file():
        hint = ("run --stage rm first, or pass --reward_model DIR" if not run.reward_model
                else "pass a directory written by --stage rm")
        raise UserError(f"stage {stage}: no reward model at {path}; {hint}")
    read_tokenizer(path)  # a garbled tokenizer file: one line naming it
    try:
        rm, tok = load_reward_model(path, dtype=resolve_dtype(run.dtype, d.device), device=d.device)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if not parameters_finite(rm):
        raise UserError(f"{path}: the reward model's weights hold NaN or inf; train it again (--stage rm --restart)")
    return rm.requires_grad_(False), tok


def check_prompts(task, model_dir: Path, max_new_tokens: int) -> None:
    """A task read from a file (tasks._FileTask) checked against the model at `model_dir`: a prompt
    too long for its context is a DataError naming the file:line now, not when it is drawn."""
    if hasattr(task, "check_prompts"):
        tok = read_tokenizer(model_dir)
        try:
            ctx = config_from_hf(read_json(Path(model_dir) / "config.json"), str(model_dir)).max_seq_len
        except ValueError as e:
            raise UserError(str(e)) from None
        task.check_prompts(tok.encode, max_new_tokens, ctx)


def get_task(run, toy_cfg, model_dir: Path | None = None):
    """The task named by --task (tasks.get_task), with the toy's settings for the toy. With
    --template chat its prompts are rendered by the chat template of the checkpoint `model_dir` (the
    model the stage prompts; every checkpoint of a run carries the same template)."""
    task = tasks.get_task(run.task, **({"cfg": toy_cfg} if run.task == "toy" else {}))
    if getattr(run, "template", "r1zero") != "chat":
        return task
    if model_dir is None:
        raise UserError("--template chat: this stage has no checkpoint to read the chat template from; "
                        "use --template r1zero")
    try:
        return tasks.ChatPrompts(task, Tokenizer.from_dir(model_dir))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--template chat: {e}") from None


# --- data -------------------------------------------------------------------------------------------

class ExampleStream:
    """An endless stream over `examples`, reshuffled every epoch (data.epochs); `position` (examples
    handed out so far) is all a resumed run needs to continue the same order."""

    def __init__(self, examples: list, seed: int, position: int = 0):
        if not examples:
            raise UserError("the training data is empty; check the data file or the filter that built it")
        self.position = position
        self._items = epochs(examples, seed, position)

    def take(self, n: int) -> list:
        self.position += n
        return list(itertools.islice(self._items, n))


# --- one stage's directory ----------------------------------------------------------------------------

LOCK_FILE = ".lock"
_LOCKS: dict[str, object] = {}  # stage directory -> its open, locked lock file (this process)


def lock_dir(path: Path) -> bool:
    """Take `path`/.lock (fcntl.flock, exclusive) for this process's life: False if another process
    holds it. The kernel drops the lock when the process ends, killed or not; `release_locks` drops
    it earlier (train.main, on its way out). Taking it again in the same process is a no-op."""
    key = str(Path(path).resolve())
    if key in _LOCKS or fcntl is None:
        return True
    Path(path).mkdir(parents=True, exist_ok=True)
    f = open(Path(path) / LOCK_FILE, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return False
    _LOCKS[key] = f
    return True


def release_locks() -> None:
    while _LOCKS:
        _LOCKS.popitem()[1].close()


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's (line, row) pairs. A last line cut short (a kill or a full disk mid-write) is
    dropped; a bad line anywhere else is a UserError naming path:line."""
    lines = path.read_bytes().decode("utf-8", "replace").split("\n")
    out = []
    for i, ln in enumerate(lines, start=1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except (json.JSONDecodeError, RecursionError) as e:
            if i == len(lines):  # no newline after it: the write never finished
                continue
            raise UserError(f"{path}:{i}: not a JSON line ({str(e)[:80]}); delete that line (or the file) "
                            "and rerun") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: not a JSON object; delete that line (or the file) and rerun")
        out.append((ln, row))
    return out


class Metrics:
    """metrics.jsonl, one JSON object a step, written by rank 0. On resume, rows past the resumed
    step (and a last line cut short) are dropped, so the file reads as if the run had never stopped."""

    def __init__(self, path: Path, d: Dist, resume_step: int):
        self.path, self.d = path, d
        if d.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = []
            if resume_step and path.exists():
                rows = [ln for ln, row in read_metrics(path) if row.get("step", 0) <= resume_step]
            path.write_text("".join(r + "\n" for r in rows))

    def log(self, row: dict) -> None:
        if self.d.main:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise UserError(f"writing {self.path} failed, the disk is full; free some space and rerun "
                                "the same command: it resumes from the last checkpoint") from None


def setting_changes(saved: dict, now: dict, most: int = 4) -> str:
    """'--lr 0.0001 -> 5e-05, --loss 'grpo' -> 'dapo'': the settings that differ, at most `most` named."""
    keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    text = ", ".join(f"--{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys[:most])
    return text + (f" (+{len(keys) - most} more)" if len(keys) > most else "")


class StageRun:
    """<out>/<name>: run_config.json, metrics.jsonl, ckpt/ and model/ of one stage.

    `resume(model, optimizer)` locks the directory, recovers a checkpoint swap a kill cut short,
    restores ckpt/ if a killed (or finished) run left one (else starts at step 0), writes
    run_config.json and opens metrics.jsonl; `start` is then the first step to run, and `finished`
    says the stage is already done. `settings` ({flag: value}, the settings that shape the result;
    None: not checked) are saved with every checkpoint, and a checkpoint saved with other settings
    is refused, naming them. `restart` deletes ckpt/ first (model/ stays until a new one replaces it)."""

    def __init__(self, out: str | Path, name: str, d: Dist, ckpt_every: int, config: dict,
                 settings: dict | None = None, restart: bool = False):
        self.name, self.d, self.ckpt_every, self.config = name, d, ckpt_every, config
        self.settings = None if settings is None else json.loads(json.dumps(settings))  # as saved
        self.restart = restart
        self.dir = Path(out) / name
        self.ckpt = self.dir / "ckpt"
        self.start, self.state, self.saved_step = 0, {}, None

    def _lock(self) -> None:
        """Every rank stops when rank 0 cannot take the lock (another run writes this directory)."""
        mine = 0.0
        if self.d.main:
            try:
                mine = 0.0 if lock_dir(self.dir) else 1.0
            except OSError as e:
                mine = 2.0 if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM) else 3.0
        failed = self.d.all_reduce(mine, "max")
        if failed == 1.0:
            raise UserError(f"another run is writing {self.dir} (it holds {self.dir / LOCK_FILE}); wait for it "
                            "to end, or pass another --out")
        if failed:
            raise UserError(f"cannot write {self.dir}; pass an --out you can write to")

    def resume(self, model, optimizer) -> dict:
        self._lock()
        if self.d.main:
            for path in (self.ckpt, self.dir / "model"):
                recover_dir(path)
            if self.restart:
                shutil.rmtree(self.ckpt, ignore_errors=True)
        self.d.barrier()
        state = {"step": 0}
        if has_trainer_state(self.ckpt):
            try:
                state = load_trainer_state(self.ckpt, model, optimizer)
            except ValueError as e:
                raise UserError(str(e)) from None
            self._check_settings(state)
            self.saved_step = state["step"]
        self.start, self.state = state["step"], state
        if self.finished:
            self._say_done()
        elif self.start:
            self.print(f"resuming from {self.ckpt} at step {self.start}")
        if self.d.main and not self.finished:
            blob = {k: asdict(v) for k, v in self.config.items()}
            blob["world_size"] = self.d.world
            (self.dir / "run_config.json").write_text(json.dumps(blob, indent=2) + "\n")
        self.metrics = Metrics(self.dir / "metrics.jsonl", self.d, self.start)
        return state

    def _check_settings(self, state: dict) -> None:
        saved = state.get("settings")
        if self.settings is not None and saved is not None and saved != self.settings:
            what = "finished" if state.get("done") else "stopped"
            raise UserError(f"stage {self.name}: {self.ckpt} is a {what} run with other settings "
                            f"({setting_changes(saved, self.settings)}); rerun with its settings, pass "
                            "another --out, or pass --restart to start the stage over")

    def _say_done(self) -> None:
        self.print(f"already done: {self.dir / 'model'} ({self.start} steps); nothing to run "
                   "(--restart runs it again)")

    def peek(self) -> bool:
        """Before a stage prepares (samples its data, loads teachers): refuse a checkpoint of other
        settings, and return whether the stage is already done, from the saved loop state alone (the
        tensors are memory-mapped, not read). `resume` checks again, under the lock."""
        if self.restart or not has_trainer_state(self.ckpt):
            return False
        try:
            state = torch.load(self.ckpt / TRAINER_STATE, map_location="cpu", mmap=True, weights_only=False)["state"]
        except Exception:  # an unreadable checkpoint: `resume` says what is wrong with it
            return False
        self._check_settings(state)
        self.start, self.state = state["step"], state
        if self.finished:
            self._say_done()
        return self.finished

    @property
    def finished(self) -> bool:
        """The checkpoint is a finished run's and its model was written: the stage is done."""
        return bool(self.state.get("done")) and (self.dir / "model" / "config.json").is_file()

    def result(self) -> dict:
        """runtime.fit's {steps, seconds} of a finished stage."""
        return {"steps": self.start, "seconds": self.state.get("seconds", 0.0)}

    def print(self, text: str) -> None:
        if self.d.main:
            print(f"[{self.name}] {text}", flush=True)

    def _write(self, write, path: Path) -> None:
        """`write()` (every rank calls it, rank 0 writes); a full disk stops every rank with one line."""
        failed = ""
        try:
            write()
        except WriteError as e:
            failed = str(e)
        if self.d.all_reduce(1.0 if failed else 0.0, "max"):
            raise UserError(failed or f"rank 0 could not write {path} (the disk is full); free some space "
                                      "and rerun")

    def save_state(self, model, optimizer, tok, state: dict) -> None:
        if self.settings is not None:
            state = {**state, "settings": self.settings}
        self._write(lambda: save_trainer_state(self.ckpt, model, optimizer, state, tok, main=self.d.main), self.ckpt)
        self.saved_step = state["step"]

    def save_model(self, model, tok) -> Path:
        """The stage's result, <dir>/model (a reward model's directory for a RewardModel)."""
        path = self.dir / "model"
        self._write(lambda: save_model(model, tok, path, main=self.d.main), path)
        self.print(f"wrote {path}")
        return path

    def non_finite(self, what: str, step: int) -> UserError:
        last = (f"the last checkpoint with finite weights is {self.ckpt} (step {self.saved_step})" if self.saved_step
                else "no checkpoint was saved yet")
        return UserError(f"step {step}: {what} (non-finite); stopped without saving it, {last} -- lower "
                         "--lr (or check the data) and rerun with --restart")


def _fmt(v) -> str:
    """4 significant digits for rates and losses, whole numbers for throughputs."""
    if not isinstance(v, float):
        return str(v)
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def progress_line(step: int, total: int, seconds: float, row: dict, keys: Sequence[str]) -> str:
    left = seconds / max(step, 1) * (total - step)
    parts = [f"{k} {_fmt(row[k])}" for k in keys if k in row]
    return f"step {step}/{total}  " + "  ".join(parts) + f"  ({seconds:.0f}s, {left:.0f}s left)"


# --- the loop -------------------------------------------------------------------------------------------

def supervised_steps(step_fn: Callable, stream: ExampleStream, batch_size: int, start: int, total: int,
                     lr: Callable[[int], float]) -> Iterator[dict]:
    """The steps of a supervised stage: `step_fn(batch, lr)` (sft.sft_step or reward_model.rm_step,
    with the model and optimizer bound) on the stream's next global batch, from step `start`."""
    for step in range(start, total):
        yield step_fn(stream.take(batch_size), lr(step))


def cosine_lr(cfg) -> Callable[[int], float]:
    """The supervised schedule of an SFTConfig or RMConfig (optim.lr_at)."""
    return lambda step: lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)


def fit(run: StageRun, model, optimizer, tok, steps: Iterator[dict], total: int, *,
        loop_state: Callable[[], dict], keys: Sequence[str], evaluate: Callable[[], dict] | None = None,
        eval_every: int = 0, time_budget: float = 0.0, token_budget: float = 0.0) -> dict:
    """Run `steps` (one metrics row per optimizer step, from step `run.start` on) to `total` steps.

    After each step: stop on a non-finite loss, or a step `clip_and_step` refused (a non-finite
    gradient, or parameters the step made non-finite; nothing is saved, the last checkpoint stays), log
    the row, evaluate every `eval_every` steps and at the end (`evaluate() -> {name: value}`, also
    at step 0 of a fresh run), print about PROGRESS_LINES lines, and save the trainer state (model,
    optimizer, `loop_state()`) every `run.ckpt_every` steps and at the end. `time_budget` > 0 stops
    once the steps themselves (evaluations and saving not counted) have taken that many seconds, on
    the slowest rank's clock so every rank stops at the same step; `token_budget` > 0 stops once
    the rows' "sampled_tokens" (summed over ranks by the step) reach it. Returns {steps, seconds,
    tokens}, over every step run, before a resume too (they are part of the saved state).
    """
    d = run.d
    if evaluate is not None and run.start == 0:
        ev = evaluate()
        run.metrics.log({"step": 0, **{f"eval/{k}": v for k, v in ev.items()}})
        run.print("step 0 held-out " + "  ".join(f"{k} {v:.3f}" for k, v in ev.items()))
    every = max(1, total // PROGRESS_LINES)
    t0, step_time, step = time.perf_counter(), run.state.get("seconds", 0.0), run.start
    tokens = run.state.get("tokens", 0.0)
    steps = iter(steps)
    while step < total and not (token_budget > 0 and tokens >= token_budget):  # (a resumed, spent run)
        ts = time.perf_counter()
        try:
            row = next(steps)
        except FloatingPointError as e:  # clip_and_step refused a non-finite step, or sampling NaN logits
            raise run.non_finite(str(e), step + 1) from None
        step_time += time.perf_counter() - ts
        tokens += row.get("sampled_tokens", 0.0)
        step += 1
        if not math.isfinite(row["loss"]):
            raise run.non_finite(f"loss {row['loss']}", step)
        done = (step == total or (time_budget > 0 and d.all_reduce(step_time, "max") >= time_budget)
                or (token_budget > 0 and tokens >= token_budget))
        row = {"step": step, **row}
        if evaluate is not None and ((eval_every and step % eval_every == 0) or done):
            row.update({f"eval/{k}": v for k, v in evaluate().items()})
        run.metrics.log(row)
        if step % every == 0 or done or "eval/accuracy" in row:
            run.print(progress_line(step, total, time.perf_counter() - t0, row, keys))
        if step % run.ckpt_every == 0 or done:
            run.save_state(model, optimizer, tok, {**loop_state(), "step": step, "seconds": step_time,
                                                   "tokens": tokens, "done": done})
        if done:
            break
    return {"steps": step, "seconds": step_time, "tokens": tokens}
