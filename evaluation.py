"""Measuring a model: held-out accuracy and the rest of the R1 report's numbers, tables and plots.

- `evaluate`: greedy accuracy, format rate, language consistency and mean response length on
  held-out samples; with k > 1 also pass@k (any of k sampled answers right) and maj@k (the most
  common answer right, "cons@64" in the R1 report's Table 2 when k = 64).
- `rm_score`: the reward model's mean score of a model's greedy answers to general prompts.
- `format_table`, `plot_groups`: the summary table and the accuracy / response-length curves
  against RL step (the report's Figures 2 and 3), a mean and a band for a group of seeds.
- The recipe's measuring stages: `stage_eval` (one checkpoint, one JSON line), `stage_summary`
  (every stage's model of a run directory, one table) and `stage_plot`.

Evaluation splits the samples over ranks and sums the counts, so every rank gets the same numbers.
Departures: the report samples 64 responses at temperature 0.6 for pass@1; here accuracy is
greedy and pass@k / maj@k use the RL sampling temperature.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import torch

import reward_model as rmod
from rewards import THINK_OPEN, accuracy_reward, extract_answer, format_reward, language_reward
from rollout import completion_text, derive_seed, gathered_weights, generate
from runtime import Dist, UserError, find_model, get_task, load_frozen_rm, load_model


def evaluate(model, tok, samples: list[dict], max_new_tokens: int, k: int = 1, seed: int = 0,
             d: Dist | None = None, temperature: float = 1.0) -> dict:
    """Greedy accuracy, format and language rates and mean length on `samples`; with k > 1 also
    pass@k and maj@k over k samples at `temperature`. `think` is the share of answers that open a
    <think>, `cot_language` the language consistency over those answers only (1.0 when none
    thinks): `language` also counts a direct answer to a Chinese prompt as inconsistent (its
    <answer> tags are Latin letters), so a model that learns to think can raise `language` while its
    chains of thought drift to the other language."""
    d = d or Dist()
    mine = samples[d.rank::d.world]
    prompts = [tok.encode(s["prompt"]) for s in mine]
    sums = {"n": 0.0, "accuracy": 0.0, "format": 0.0, "language": 0.0, "response_length": 0.0, "think": 0.0,
            "cot_language": 0.0}
    if k > 1:
        sums.update({f"pass@{k}": 0.0, f"maj@{k}": 0.0})
    with torch.no_grad(), gathered_weights(model):
        greedy = generate(model, prompts, max_new_tokens, temperature=0.0, eos_token_id=tok.eos_ids,
                          pad_token_id=tok.pad_id) if prompts else None
        seeds = [derive_seed(seed, d.rank + j * d.world) for j in range(len(mine))]  # by global index: any rank count
        sampled = (generate(model, prompts, max_new_tokens, temperature=temperature, num_samples=k,
                            eos_token_id=tok.eos_ids, seed=seeds, pad_token_id=tok.pad_id)
                   if prompts and k > 1 else None)
    for i, s in enumerate(mine):
        text = completion_text(tok, greedy.tokens[i])
        sums["n"] += 1
        sums["accuracy"] += accuracy_reward(text, s)
        sums["format"] += format_reward(text)
        sums["language"] += language_reward(text, s["prompt"])
        sums["response_length"] += len(greedy.tokens[i])
        if THINK_OPEN in text:
            sums["think"] += 1.0
            sums["cot_language"] += language_reward(text, s["prompt"])
        if sampled is not None:
            texts = [completion_text(tok, t) for t in sampled.tokens[i * k:(i + 1) * k]]
            rights = [accuracy_reward(t, s) for t in texts]
            sums[f"pass@{k}"] += float(max(rights))
            sums[f"maj@{k}"] += majority_right(texts, rights)
    tot = {key: d.all_reduce(v) for key, v in sums.items()}
    n, thinking = max(tot.pop("n"), 1.0), tot["think"]
    out = {key: v / n for key, v in tot.items()}
    out["cot_language"] = tot["cot_language"] / thinking if thinking else 1.0
    return out


def majority_right(texts: list[str], rights: list[float]) -> float:
    """maj@k: whether the most common extracted answer (first seen wins a tie) is right."""
    votes: dict[str, list[float]] = {}
    for text, right in zip(texts, rights):
        answer = extract_answer(text)
        if answer is not None:
            votes.setdefault(answer.strip(), []).append(right)
    return float(max(votes.values(), key=len)[0]) if votes else 0.0


def rm_score(model, tok, rm, rm_tok, samples: list[dict], max_new_tokens: int, max_len: int, d: Dist) -> float:
    """Mean reward-model score of the model's greedy answers to `samples` (general prompts)."""
    mine = samples[d.rank::d.world]
    total = 0.0
    if mine:
        with torch.no_grad(), gathered_weights(model):
            roll = generate(model, [tok.encode(s["prompt"]) for s in mine], max_new_tokens, temperature=0.0,
                            eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
        texts = [completion_text(tok, ids) for ids in roll.tokens]
        total = float(rmod.score_texts(rm, rm_tok, [s["prompt"] for s in mine], texts, max_len).sum())
    return d.all_reduce(total) / max(d.all_reduce(float(len(mine))), 1.0)


def format_table(rows: list[dict], key: str, cols: list[str]) -> str:
    """A plain-text table: one row per dict, `key` first, then `cols` (floats to 3 decimals)."""
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
    table = [[key, *cols]] + [[cell(r.get(key)), *(cell(r.get(c)) for c in cols)] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table)


# Stage directory names as a reader knows them (plot legends).
STAGE_TITLES = {"zero": "R1-Zero", "grpo": "stage 2 reasoning RL", "rl": "stage 4 RL",
                "distill_zero": "student + GRPO"}


def group_label(pattern: str) -> str:
    """A legend label for a group of stage directories: the stage's name, then any `name=value`
    part of the path (an ablation's setting, as sweep.py names its directories)."""
    parts = Path(pattern).parts
    settings = [p for p in parts[:-1] if "=" in p]
    return ", ".join([STAGE_TITLES.get(parts[-1], parts[-1]), *settings]) if parts else pattern


def mean_band(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over the runs' (step, value) curves, at the steps every run has."""
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
    by_run = [dict(c) for c in curves]
    vals = [[r[s] for r in by_run] for s in common]
    return common, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def read_metrics(stage_dir: Path) -> list[dict]:
    mfile = stage_dir / "metrics.jsonl"
    if not mfile.is_file():
        raise FileNotFoundError(f"{mfile} not found; pass --runs with stage directories that hold "
                                "metrics.jsonl")
    return [json.loads(ln) for ln in mfile.read_text().splitlines() if ln.strip()]


def plot_groups(groups: dict[str, list[Path]], out: Path, max_step: int = 0) -> list[Path]:
    """accuracy.png and length.png in `out`: for each group of runs (label -> stage directories,
    e.g. one stage over seeds), the mean over its runs with a band from the lowest to the highest
    run: held-out greedy accuracy (solid, markers) and sampled training accuracy (dashed, the same
    colour) against RL step; mean sampled response length against RL step; up to `max_step` if > 0. Raises
    FileNotFoundError for a directory without metrics and ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = {name: plt.subplots(figsize=(6.4, 4.2)) for name in ("accuracy", "length")}
    n_runs = sorted({len(dirs) for dirs in groups.values()})
    for i, (label, dirs) in enumerate(groups.items()):
        colour = f"C{i % 10}"
        rows = [[r for r in read_metrics(p) if not max_step or r["step"] <= max_step] for p in dirs]
        curves = {key: [[(r["step"], r[key]) for r in rs if key in r] for rs in rows]
                  for key in ("eval/accuracy", "reward/accuracy", "response_length")}
        for key, fig, style, text in (("eval/accuracy", "accuracy", dict(marker="o", ms=3), "held-out"),
                                      ("reward/accuracy", "accuracy", dict(ls="--"), "train, sampled"),
                                      ("response_length", "length", {}, "")):
            if not all(curves[key]):
                continue
            steps, mean, lo, hi = mean_band(curves[key])
            ax = figs[fig][1]
            ax.plot(steps, mean, color=colour, label=f"{label} {text}".strip(), **style)
            if len(dirs) > 1:
                ax.fill_between(steps, lo, hi, color=colour, alpha=0.15, linewidth=0)
    seeds = ("one run" if n_runs == [1] else
             f"mean of {'/'.join(map(str, n_runs))} seeds, band: lowest to highest seed")
    titles = {"accuracy": ("Accuracy against RL step", "accuracy (held-out: greedy; train: sampled)"),
              "length": ("Response length against RL step", "mean sampled response length (tokens)")}
    written = []
    for name, (fig, ax) in figs.items():
        ax.set_title(f"{titles[name][0]} ({seeds})", fontsize=9)
        ax.set_xlabel("RL step")
        ax.set_ylabel(titles[name][1])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        written.append(path)
    return written


# --- the measuring stages (recipe.RUNNERS) ---------------------------------------------------------

def stage_eval(c: dict, d: Dist) -> dict:
    """Held-out accuracy, format, language and length of --init (default: the run's latest model);
    pass@k and maj@k with --k. One JSON line."""
    run, g = c["run"], c["grpo"]
    path = Path(run.init) if run.init else last_model(Path(run.out))
    path = find_model(run, str(path), "--init DIR", "eval", "zero")
    model, tok = load_model(path, run, d)
    ev = evaluate(model, tok, get_task(run, c["toy"], path).eval_samples(run.eval_n), g.max_new_tokens, k=run.k,
                  seed=run.seed, d=d, temperature=g.temperature)
    if d.main:
        print(json.dumps({"checkpoint": str(path), "n": run.eval_n, **ev}), flush=True)
    return ev


def last_model(out: Path) -> Path:
    for stage in ("rl", "rs", "grpo", "sft", "zero", "pretrain"):
        if (out / stage / "model" / "config.json").is_file():
            return out / stage / "model"
    raise UserError(f"stage eval: no trained model under {out}; pass --init DIR")


SUMMARY_STAGES = ("pretrain", "zero", "sft", "grpo", "rs", "rl", "student_base", "distill", "distill_zero")
GENERAL_EVAL_SEED = derive_seed("summary", "general")  # one list for every run (the toy has 32 prompts)


def general_prompts(task, n: int) -> list[dict]:
    """The distinct prompts among the task's first n general samples ([] for a task without any)."""
    if not hasattr(task, "general_samples"):
        return []
    stream, seen, out = task.general_samples(GENERAL_EVAL_SEED), set(), []
    for s in (next(stream) for _ in range(n)):
        if s["prompt"] not in seen:
            seen.add(s["prompt"])
            out.append(s)
    return out


def stage_summary(c: dict, d: Dist) -> list[dict]:
    """One table over every stage's model in <out>: held-out accuracy, format rate, language
    consistency, reward-model score (greedy answers to general prompts; needs <out>/rm/model or
    --reward_model) and mean response length. Written to <out>/summary.json."""
    run, g = c["run"], c["grpo"]
    out = Path(run.out)
    # --template chat: the template of the run's latest model (every model of a run carries the same one)
    task = get_task(run, c["toy"], last_model(out) if run.template == "chat" else None)
    have_rm = (Path(run.reward_model) if run.reward_model else out / "rm" / "model").is_dir()
    rm, rm_tok = load_frozen_rm(run, d, "summary") if have_rm else (None, None)
    general = general_prompts(task, run.eval_n)
    rows = []
    for st in SUMMARY_STAGES:
        path = out / st / "model"
        if not (path / "config.json").is_file():
            continue
        model, tok = load_model(path, run, d)
        ev = evaluate(model, tok, task.eval_samples(run.eval_n), g.max_new_tokens, d=d)
        if rm is not None and general:
            ev["rm_score"] = rm_score(model, tok, rm, rm_tok, general, g.max_new_tokens, c["rm"].max_len, d)
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


def stage_plot(c: dict, d: Dist) -> None:
    """accuracy.png and length.png in <out>: held-out accuracy and mean response length against RL
    step, one line per --runs entry. An entry may be a glob (runs/toy/seed*/zero): its directories
    are one group, drawn as their mean with a band (seeds); ablations: one entry per setting."""
    run = c["run"]
    if not d.main:
        return
    patterns = run.runs.split(",") if run.runs else [str(Path(run.out) / "zero")]
    groups = {}
    for pat in patterns:
        dirs = sorted(Path(p) for p in glob.glob(pat)) if glob.has_magic(pat) else [Path(pat)]
        if not dirs:
            raise UserError(f"stage plot: --runs entry {pat!r} matches no directory; check the path")
        label = group_label(pat)
        groups[label if label not in groups else pat] = dirs  # two entries of one stage: their paths
    try:
        written = plot_groups(groups, Path(run.out))
    except ImportError:
        raise UserError("stage plot needs matplotlib: pip install -e '.[plot]'") from None
    except FileNotFoundError as e:
        raise UserError(f"stage plot: {e}") from None
    for path in written:
        print(f"[plot] wrote {path}", flush=True)
