"""Seeds and ablations: the same stages over several seeds and settings, one table and one plot.

    python train.py --stage pretrain,zero --seeds 0,1,2 --out runs/seeds
    python train.py --stage zero --init 'runs/seeds/seed{seed}/pretrain/model' --seeds 0,1,2 \\
        --sweep loss=grpo,dr_grpo,dapo --token_budget 2000000 --steps 400 --out runs/loss

One finding from one seed is one data point: on the toy, the base model's accuracy moved from 0.15
to 0.73 with the seed alone. `run_sweep` runs the command once per seed (`--seeds`) and, for an
ablation, once per value of one setting (`--sweep NAME=V1,V2`), each run a separate `train.py`
process in its own run directory:

    <out>/seed<S>/<stage>/...              --seeds only
    <out>/<NAME>=<V>/seed<S>/<stage>/...   --sweep (with --seeds, or --seed's one seed)

"{seed}" in a flag's value is the run's seed (--init runs/seeds/seed{seed}/pretrain/model: each
seed's own base model). `--parallel N` runs N processes at once, each with cores / N torch threads
(unless --threads says).
A finished stage is not rerun: a run directory whose stages all hold a model is skipped, and a
killed run resumes from its checkpoints. Then `sweep_table` writes <out>/sweep.json and prints one
table, each cell the mean over seeds with the lowest and highest seed's value, "mean (min..max)",
and `evaluation.plot_groups` draws <out>/accuracy.png and length.png: each group's mean with a
band from the lowest to the highest seed.

A budget-matched ablation: --token_budget (GRPOConfig) stops each RL run once it has sampled that
many completion tokens (dynamic sampling's discarded groups included); --steps is then a cap. The
table gives each group's steps and sampled tokens, so the match can be checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from evaluation import STAGE_TITLES, SUMMARY_STAGES, format_table, plot_groups, read_metrics
from runtime import UserError


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class SweepConfig:
    seeds: str = _setting("", "comma-separated seeds: run the stages once per seed, into <out>/seed<S> "
                              "(empty: --seed's one run, into <out>)")
    sweep: str = _setting("", "an ablation, NAME=V1,V2,...: one flag and its values (e.g. loss=grpo,dapo), "
                              "each into <out>/NAME=V/seed<S>")
    parallel: int = _setting(1, "seeds / sweep: runs at once, separate processes with cores / parallel "
                                "threads each (unless --threads)")

    def __post_init__(self):
        if self.parallel < 1:
            raise ValueError(f"--parallel {self.parallel}: run at least 1 process at once")
        try:
            [int(s) for s in self.seed_list()]
        except ValueError:
            raise ValueError(f"--seeds {self.seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
        if self.sweep:
            name, eq, values = self.sweep.partition("=")
            if not (eq and name and all(v.strip() for v in values.split(","))):
                raise ValueError(f"--sweep {self.sweep!r}: write NAME=V1,V2,... (e.g. loss=grpo,dr_grpo)")
        if len(set(self.seed_list())) != len(self.seed_list()):
            raise ValueError(f"--seeds {self.seeds!r}: a seed is listed twice; list each once")

    def seed_list(self) -> list[str]:
        return [s.strip() for s in self.seeds.split(",")] if self.seeds else []

    def active(self) -> bool:
        return bool(self.seeds or self.sweep)


def sweep_config(values: dict) -> SweepConfig:
    try:
        return SweepConfig(**values)
    except ValueError as e:
        raise UserError(str(e)) from None


def plan_runs(sc: SweepConfig, out: Path, seed: int) -> list[tuple[str, str, Path, dict]]:
    """(group, seed, run directory, {flag: value} set for it) for every run of the sweep."""
    seeds = sc.seed_list() or [str(seed)]
    if not sc.sweep:
        return [("", s, out / f"seed{s}", {"seed": s}) for s in seeds]
    name, _, values = sc.sweep.partition("=")
    runs = []
    for v in (v.strip() for v in values.split(",")):
        group = f"{name}={v}"
        for s in seeds:
            base = out / group
            runs.append((group, s, base / f"seed{s}" if sc.seeds else base, {"seed": s, name: v}))
    return runs


def finished(run_dir: Path, stages: list[str]) -> bool:
    """Every training stage of `stages` holds its final model in `run_dir` (summary: summary.json)."""
    need = [s for s in stages if s not in ("eval", "plot")]
    return bool(need) and all((run_dir / ("summary.json" if s == "summary" else f"{s}/model/config.json")).is_file()
                              for s in need)


def launch_all(jobs: list[tuple[Path, list[str]]], parallel: int) -> list[tuple[Path, int]]:
    """Run each (run directory, argv) as `python train.py argv`, `parallel` at a time, output to
    <run directory>/train.log. Returns (run directory, exit code) for each, in order."""
    train = Path(__file__).with_name("train.py")
    pending, running, codes = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            run_dir, argv = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "a")
            proc = subprocess.Popen([sys.executable, str(train), *argv], stdout=log, stderr=subprocess.STDOUT)
            print(f"[sweep] started {run_dir} (pid {proc.pid}, log {run_dir / 'train.log'})", flush=True)
            running.append((run_dir, proc, log))
        time.sleep(0.5)
        for item in [r for r in running if r[1].poll() is not None]:
            run_dir, proc, log = item
            log.close()
            running.remove(item)
            codes[run_dir] = proc.returncode
            print(f"[sweep] {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}: {run_dir}",
                  flush=True)
    return [(run_dir, codes[run_dir]) for run_dir, _ in jobs]


def run_sweep(args: dict[str, dict], sc: SweepConfig, stages: list[str], to_argv) -> None:
    """Run `stages` once per planned run (see the module docstring), then the table and the plots.
    `args` is train.parse_args's {config key: {field: value}}; to_argv turns it back into flags."""
    run = args["run"]
    out, seed = Path(run.get("out", "runs/toy")), int(run.get("seed", 0))
    threads = run.get("threads") or max(1, (os.cpu_count() or 1) // sc.parallel)
    jobs = []
    for group, s, run_dir, sets in plan_runs(sc, out, seed):
        if finished(run_dir, stages):
            print(f"[sweep] {run_dir}: every stage done, skipped", flush=True)
            continue
        argv = to_argv(args, {**sets, "out": str(run_dir), "threads": str(threads)})
        jobs.append((run_dir, [a.replace("{seed}", s) for a in argv]))
    failed = [str(p) for p, code in launch_all(jobs, sc.parallel) if code != 0]
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {', '.join(failed)}; read their train.log, fix, and "
                        "run the same command again (finished runs are skipped, killed ones resume)")
    only_rl = all(s in RL_STAGE_DIRS for s in stages)
    sweep_report(sc, out, seed, stages, args["grpo"].get("steps", 0) if only_rl else 0)


# --- the table and the plots -----------------------------------------------------------------------

RL_STAGE_DIRS = ("zero", "grpo", "rl", "distill_zero")
RL_START = {"zero": "pretrain", "grpo": "sft", "rl": "rs", "distill_zero": "student_base"}  # by default
TABLE_COLS = ("accuracy", "format", "language", "think", "cot_language", "rm_score", "response_length", "steps",
              "sampled_tokens")


def run_results(run_dir: Path, max_step: int = 0) -> dict[str, dict]:
    """{model: its held-out numbers} of one run directory: summary.json's rows where the run has
    one, else each RL stage's first (the model it started from) and last held-out evaluation, with
    the RL stages' steps and sampled tokens. `max_step` > 0 reads the RL stages up to that step
    only (and not summary.json): a longer run of the same seed and settings stands in for a
    shorter one, as its first steps are the shorter run's (the RL learning rate is constant)."""
    results: dict[str, dict] = {}
    summary = run_dir / "summary.json"
    if summary.is_file() and not max_step:
        for row in json.loads(summary.read_text()):
            results[row["stage"]] = {k: v for k, v in row.items() if k != "stage"}
    for st in RL_STAGE_DIRS:
        if not (run_dir / st / "metrics.jsonl").is_file():
            continue
        rows = [r for r in read_metrics(run_dir / st) if not max_step or r["step"] <= max_step]
        evals = [r for r in rows if "eval/accuracy" in r]
        steps = [r for r in rows if "loss" in r]
        if not evals or not steps:
            continue
        last = {k.removeprefix("eval/"): v for k, v in evals[-1].items() if k.startswith("eval/")}
        results.setdefault(st, last)
        results[st].update(steps=float(steps[-1]["step"]),
                           sampled_tokens=sum(r.get("sampled_tokens", r.get("gen_tokens", 0.0)) for r in steps))
        if evals[0]["step"] == 0:  # the model the stage started from
            results.setdefault(RL_START[st], {k.removeprefix("eval/"): v for k, v in evals[0].items()
                                               if k.startswith("eval/")})
    return results


def mean_spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def model_order(name: str) -> int:
    return SUMMARY_STAGES.index(name) if name in SUMMARY_STAGES else len(SUMMARY_STAGES)


def sweep_table(groups: dict[str, list[Path]], max_step: int = 0) -> list[dict]:
    """One row per (group, model): each column's {mean, min, max, n} over the group's runs, over the
    runs that have the model and the column (RL stages read up to `max_step`, see run_results)."""
    rows = []
    for group, dirs in groups.items():
        per_run = [run_results(p, max_step) for p in dirs]
        models = sorted({m for r in per_run for m in r}, key=model_order)
        for m in models:
            row = {"group": group, "model": m, "runs": sum(m in r for r in per_run)}
            for col in TABLE_COLS:
                vals = [r[m][col] for r in per_run if m in r and r[m].get(col) is not None]
                if vals:
                    row[col] = mean_spread([float(v) for v in vals])
            rows.append(row)
    return rows


def cell(stat: dict | None, col: str) -> str:
    """mean (min..max), at the column's precision."""
    if stat is None:
        return "-"
    fmt = "{:.0f}" if col in ("steps", "sampled_tokens") else ("{:.1f}" if col == "response_length" else "{:.3f}")
    if stat["n"] == 1:
        return fmt.format(stat["mean"])
    return f"{fmt.format(stat['mean'])} ({fmt.format(stat['min'])}..{fmt.format(stat['max'])})"


def sweep_report(sc: SweepConfig, out: Path, seed: int, stages: list[str], max_step: int = 0) -> list[dict]:
    """<out>/sweep.json, the table on stdout, and <out>/accuracy.png and length.png when the runs
    have RL curves; with `max_step` (a sweep of RL stages only, --steps given) the RL runs are read
    and drawn up to that step, so a run directory linked in from a longer run counts as its prefix."""
    groups: dict[str, list[Path]] = {}
    for group, _, run_dir, _ in plan_runs(sc, out, seed):
        groups.setdefault(group, []).append(run_dir)
    rows = sweep_table(groups, max_step)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = [c for c in TABLE_COLS if any(c in r for r in rows)]
    table = [{"group": r["group"] or "-", "model": r["model"], "runs": r["runs"],
              **{c: cell(r.get(c), c) for c in cols}} for r in rows]
    print(format_table(table, "group", ["model", "runs", *cols]), flush=True)
    print(f"[sweep] mean (lowest..highest) over seeds {','.join(sc.seed_list() or [str(seed)])}; "
          f"wrote {out / 'sweep.json'}", flush=True)
    curves = {}
    for group, dirs in groups.items():
        for st in RL_STAGE_DIRS:
            have = [p / st for p in dirs if (p / st / "metrics.jsonl").is_file()]
            if have:
                curves[", ".join(x for x in (STAGE_TITLES.get(st, st), group) if x)] = have
    if curves:
        try:
            for path in plot_groups(curves, out, max_step):
                print(f"[sweep] wrote {path}", flush=True)
        except ImportError:
            print("[sweep] no plots: matplotlib is missing (pip install -e '.[plot]')", flush=True)
    return rows

