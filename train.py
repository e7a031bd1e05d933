"""The command line of the DeepSeek-R1 recipe: every setting is a flag, the stages run in order.

    python train.py --stage pretrain,zero                 # the toy's base model, then R1-Zero
    python train.py --stage sft,grpo                      # R1 stage 1 (cold start) and stage 2
    python train.py --stage rm,rs,rl,distill,summary      # stages 3-4, distillation, one table
    python train.py --stage eval --init runs/toy/grpo/model --k 8
    torchrun --nproc_per_node=2 train.py --stage zero     # the same, sharded with FSDP2

The stages are recipe.py's (eval, summary and plot: evaluation.py); `all` is pretrain, zero, sft,
grpo, rm, rs, rl, distill, summary. Each stage writes <out>/<stage>/model (an HF-layout checkpoint),
metrics.jsonl and run_config.json (every resolved setting); a killed stage resumes from
<out>/<stage>/ckpt when the same command is run again.
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting made a 2-thread training step several times slower than a
# 1-thread one on a busy 2-core machine (README); sleeping waiters fix it. It must be set before
# torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import errno  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from dataclasses import MISSING, fields  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import recipe  # noqa: E402
import settings  # noqa: E402
import sweep  # noqa: E402
from data import DataError  # noqa: E402
from grpo import LOSS_PRESETS  # noqa: E402
from rewards import RewardError  # noqa: E402
from rollout import ContextError  # noqa: E402
from runtime import UserError, init_distributed, release_locks  # noqa: E402

# Flag groups: (key in settings.CONFIGS, prefix of its flags, title). A name in two configs is one
# flag that sets both (--steps sets SFTConfig.steps and GRPOConfig.steps: each stage reads its own).
GROUPS = (("run", "", "the recipe"),
          ("sft", "", "training (every stage that trains; SFT-only ones say so)"),
          ("grpo", "", "reinforcement learning (zero, grpo, rl; max_new_tokens and temperature also sample "
                       "sft, rs, distill and eval)"),
          ("loss", "", "the GRPO loss (defaults: the --loss preset's)"),
          ("rm", "rm_", "the reward model (stage rm)"),
          ("toy", "", "the toy task (--task toy)"),
          ("sweep", "", "seeds and ablations (sweep.py: one process and run directory per seed and setting)"))
# Which config a training stage reads its optimizer settings from.
PRIMARY = {**{s: "sft" for s in settings.SFT_STAGES}, **{s: "grpo" for s in settings.RL_STAGES}, "rm": "rm"}
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")
DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only"}


def _Formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=30, width=120)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; a user error is one line
        raise UserError(f"{message}; run with --help for the list of settings")


def flags() -> dict[str, list[tuple[str, object]]]:
    """--flag name -> [(config key, dataclass field)] it sets, in GROUPS order."""
    out: dict[str, list] = {}
    for key, prefix, _ in GROUPS:
        for f in fields(settings.CONFIGS[key]):
            out.setdefault(prefix + f.name, []).append((key, f))
    return out


def _default(f):
    return f.default if f.default is not MISSING else f.default_factory()


def default_text(owners: list) -> str:
    """The default that runs: one value, or the value per stage (or per --loss preset) where they differ."""
    key, f = owners[0]
    if key == "loss":
        values = {name: getattr(p, f.name) for name, p in LOSS_PRESETS.items()}
    else:
        keys = {k for k, _ in owners}
        values = {stage: getattr(settings.stage_configs({}, stage)[k], f.name)
                  for stage, k in PRIMARY.items() if k in keys}
    if len(set(map(repr, values.values()))) <= 1:
        return f"default {_default(f)!r}" if isinstance(_default(f), str) else f"default {_default(f)}"
    by_value: dict[str, list[str]] = {}
    for name, v in values.items():
        by_value.setdefault(repr(v) if isinstance(v, str) else str(v), []).append(name)
    return "default " + ", ".join(f"{'/'.join(names)} {v}" for v, names in by_value.items())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="train.py", usage="python train.py [--flag value ...]", description=__doc__,
                     add_help=False, allow_abbrev=False, formatter_class=_Formatter)
    parser.add_argument("-h", "--help", action="store_true", help="this list")
    seen = flags()
    groups = {key: parser.add_argument_group(title) for key, _, title in GROUPS}
    for name, owners in seen.items():
        key, f = owners[0]
        kind = type(_default(f))
        text = f.metadata["help"] + ("" if _default(f) == "" else f" ({default_text(owners)})")
        text = text.replace("%", "%%")
        # a boolean alone means true: --dynamic_sampling is --dynamic_sampling true
        extra = dict(nargs="?", const="true", metavar="BOOL") if kind is bool else {"metavar": kind.__name__.upper()}
        if f.metadata.get("repeat"):  # --reward a --reward b: one comma-separated value
            extra["action"] = "append"
        groups[key].add_argument(f"--{name}", dest=name, default=None, help=text, **extra)
    return parser


def convert(val: str, f, flag: str):
    kind = type(_default(f))
    try:
        if kind is bool:
            if val.lower() not in TRUE + FALSE:
                raise ValueError
            return val.lower() in TRUE
        out = kind(val)
    except ValueError:
        raise UserError(f"--{flag} {val!r}: expected a {kind.__name__}") from None
    if kind is float and not math.isfinite(out):
        raise UserError(f"--{flag} {val!r}: expected a finite number")
    return out


def _underscores(arg: str) -> str:
    """--max-new-tokens=5 -> --max_new_tokens=5: a flag's name may be written with dashes."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return f"--{name.replace('-', '_')}{eq}{value}"


def parse_args(argv: list[str]) -> dict[str, dict]:
    """--flag value pairs -> {config key: {field: value}}, typed by the dataclass field. `--name=value`
    and `--name-with-dashes` work too; a boolean flag alone means true."""
    argv = [_underscores(a) for a in argv]
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if ns.help:
        parser.print_help()
        raise SystemExit(0)
    if unknown:
        first = unknown[0]
        if first.startswith("--"):
            raise UserError(f"unknown flag {first.split('=')[0]}; run with --help for the list of settings")
        raise UserError(f"unexpected argument {first!r}; settings are given as --name value (see --help)")
    out: dict[str, dict] = {key: {} for key, _, _ in GROUPS}
    for name, owners in flags().items():
        val = getattr(ns, name)
        if val is not None:
            val = ",".join(val) if isinstance(val, list) else val  # a repeatable flag (metadata "repeat")
            for key, f in owners:
                out[key][f.name] = convert(val, f, name)
    return out


def to_argv(args: dict[str, dict], sets: dict[str, str]) -> list[str]:
    """parse_args's result back into flags, without the sweep's own, with `sets` ({flag: value})
    replacing any flag of the same name: the command line of one run of a sweep."""
    owner = {name: owners[0] for name, owners in flags().items()}
    out = {}
    for name, (key, f) in owner.items():
        if key != "sweep" and f.name in args.get(key, {}):
            v = args[key][f.name]
            out[name] = str(v).lower() if isinstance(v, bool) else str(v)
    unknown = [name for name in sets if name not in owner]
    if unknown:
        raise UserError(f"--sweep {unknown[0]}=...: no flag --{unknown[0]}; sweep one of the flags --help lists")
    out.update(sets)
    return [a for name, v in out.items() for a in (f"--{name}", v)]


def stages_of(spec: str) -> list[str]:
    """`--stage a,b,all` -> the stage names, `all` expanded, each checked."""
    out = []
    for s in (s.strip() for s in spec.split(",")):
        if s not in settings.STAGES + ("all",):
            raise UserError(f"unknown stage {s!r}; choose from {', '.join(settings.STAGES + ('all',))}")
        out += list(settings.ALL_STAGES) if s == "all" else [s]
    return out


def check_out(out: str, stages: list[str]) -> None:
    """--out must be a directory this user can create or write (eval only reads it)."""
    if stages == ["eval"]:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: a file, not a directory; pass a directory for the run")
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not writable; pass an --out you can write to")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        run = settings.stage_configs(args, "eval")["run"]
        stages = stages_of(run.stage)
        configs = [settings.stage_configs(args, s) for s in stages]  # every setting checked before any runs
        check_out(run.out, stages)
        sc = sweep.sweep_config(args["sweep"])
        if sc.active():  # one train.py process per seed and setting, then the table and the plots
            sweep.run_sweep(args, sc, stages, to_argv)
            return 0
        if run.threads:
            torch.set_num_threads(run.threads)
        d = init_distributed(run.device, run.dist_timeout)
        for s, c in zip(stages, configs):
            recipe.run_stage(s, c, d)
    # the person's mistakes (or a blown-up model); anything else is a bug
    except (UserError, DataError, ContextError, RewardError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a directory this user cannot write, wherever it is met
        if e.errno not in DISK_ERRORS:
            raise
        print(f"error: writing {e.filename or 'a file'} failed: {DISK_ERRORS[e.errno]}; rerun the same command "
              "after fixing it: the run resumes from its last checkpoint", file=sys.stderr)
        return 2
    finally:
        release_locks()
    if d.world > 1:
        torch.distributed.barrier()  # every rank done before gloo/NCCL tear down
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        # torch 2.13 + gloo: a communication thread sometimes aborts the interpreter's own exit
        # ("terminate called without an active exception"); everything is written and flushed,
        # so leave without it.
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
