"""The tasks: prompts and gold answers for every stage of the recipe to train or evaluate on.

Every sample is a plain dict, so it goes to JSONL unchanged and to `rewards.combine_rewards`:

    {"task": "math" | "countdown" | "general",
     "prompt": full templated prompt text (the response starts right after it),
     "question": the raw question,
     "answer": gold string                      (math),
     "numbers": [int, ...], "target": int,      (countdown; plus "expression", the generating one)
     "answers": [str, ...]                      (general: acceptable concise answers)
     "lang": "en" | "zh",
     "source": "toy" | "countdown" | "gsm8k" | "jsonl" | "toy-general"}

Four tasks, each an object with `name`, `train_samples(seed, start=0)` (an infinite iterator;
`start` skips that many samples, so a resumed run sees the same stream) and `eval_samples(n)`;
`get_task(name, **settings)` builds one:

- "toy": `toy.ToyArithmetic`, a + b with its own pretraining corpus (see toy.py).
- "countdown": TinyZero's task (Pan et al. 2025, github.com/Jiayi-Pan/TinyZero): reach a target
  from 3-4 numbers with + - * /, each number used once.
- "gsm8k": grade-school math word problems (Cobbe et al. 2021, arXiv:2110.14168); the gold is
  the text after `####`.
- "jsonl:PATH": your own {prompt, answer} lines.

Real-checkpoint prompts use the R1-Zero template (DeepSeek-R1 report, §2.2.1, Table 1) through
`tokenizer.r1_zero_prompt`; with `--template chat`, `ChatPrompts` re-renders every prompt from its
"question" through the checkpoint's own chat template (`tokenizer.chat_prompt`). Files are read through data.py, which checks every line at load; the
loaders here also refuse a gold answer that `rewards.parse_gold` cannot read, with the same one-line
`path:line: what is wrong; how to fix it` `data.DataError`.

Departures:
- Countdown: TinyZero reads a pre-generated dataset (Jiayi-Pan/Countdown-Tasks-3to4), split by
  index, and prefills "Let me solve this step by step.\n<think>". Here problems are generated on the
  fly by a random expression over all the numbers with exact integer intermediates (so every
  target is reachable; the expression is kept), held out by a hash of (sorted numbers, target),
  and prompted with Table 1's template and no prefill. The question is TinyZero's wording without
  its final period, because the template appends one.
"""
from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import data
import toy
from answers import parse_gold
from tokenizer import chat_prompt, r1_zero_prompt


# --- Countdown (TinyZero) -------------------------------------------------------------------------

# TinyZero's examples/data_preprocess/countdown.py, verbatim except the final period (see Departures).
COUNTDOWN_QUESTION = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
    "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
    "<answer> (1 + 2) / 3 </answer>"
)


@dataclass
class CountdownConfig:
    min_numbers: int = 3     # TinyZero's Countdown-Tasks-3to4: 3 or 4 numbers
    max_numbers: int = 4
    max_number: int = 99     # each number is drawn from 1..max_number
    min_target: int = 1      # targets outside [min_target, max_target] are redrawn
    max_target: int = 999
    eval_frac: float = 0.1   # fraction of (numbers, target) problems held out for eval_samples
    eval_seed: int = 0       # seed of the fixed eval list

    def __post_init__(self):
        if not (2 <= self.min_numbers <= self.max_numbers and self.max_number >= 1
                and self.min_target <= self.max_target and 0.0 < self.eval_frac < 1.0):
            raise ValueError(f"CountdownConfig: inconsistent settings {self}; need 2 <= min_numbers <= "
                             "max_numbers, max_number >= 1, min_target <= max_target, 0 < eval_frac < 1")


def _combine(x: tuple[int, str, bool], y: tuple[int, str, bool], op: str) -> tuple[int, str, bool] | None:
    """x op y on (value, text, is_compound) with exact, non-negative integer results, else None."""
    (vx, tx, cx), (vy, ty, cy) = x, y
    if op == "-" and vx < vy:  # keep intermediates non-negative: subtract the smaller one
        (vx, tx, cx), (vy, ty, cy) = (vy, ty, cy), (vx, tx, cx)
    if op == "/" and (vy == 0 or vx % vy):
        return None  # exact division only
    value = vx + vy if op == "+" else vx - vy if op == "-" else vx * vy if op == "*" else vx // vy
    # Compound operands get parentheses: the expression reads (and evaluates) unambiguously.
    return value, f"{f'({tx})' if cx else tx} {op} {f'({ty})' if cy else ty}", True


class Countdown:
    """Reach `target` from `numbers` with + - * /, each number used exactly once."""

    name = "countdown"

    def __init__(self, config: CountdownConfig | None = None):
        self.cfg = config or CountdownConfig()

    def is_heldout(self, numbers: list[int], target: int) -> bool:
        return data.stable_fraction(f"countdown:{sorted(numbers)}:{target}") < self.cfg.eval_frac

    def _problem(self, rng: random.Random) -> tuple[list[int], int, str]:
        """Draw numbers, combine them in a random order with random ops until the value is a valid target."""
        cfg = self.cfg
        count = rng.randint(cfg.min_numbers, cfg.max_numbers)  # drawn once, so retries keep 3s and 4s even
        while True:  # most draws land in range; retries are cheap
            numbers = [rng.randint(1, cfg.max_number) for _ in range(count)]
            items = [(v, str(v), False) for v in numbers]
            while len(items) > 1:
                i, j = rng.sample(range(len(items)), 2)
                combined = _combine(items[i], items[j], rng.choice("+-*/"))
                if combined is None:
                    break
                items = [it for k, it in enumerate(items) if k not in (i, j)] + [combined]
            if len(items) == 1 and cfg.min_target <= items[0][0] <= cfg.max_target:
                return numbers, items[0][0], items[0][1]

    def sample(self, numbers: list[int], target: int, expression: str) -> dict:
        q = COUNTDOWN_QUESTION.format(numbers=numbers, target=target)
        return {"task": "countdown", "prompt": r1_zero_prompt(q), "question": q, "numbers": numbers,
                "target": target, "expression": expression, "lang": "en", "source": "countdown"}

    def _stream(self, rng: random.Random, heldout: bool) -> dict:
        while True:
            numbers, target, expr = self._problem(rng)
            if self.is_heldout(numbers, target) == heldout:
                return self.sample(numbers, target, expr)

    def train_samples(self, seed: int, start: int = 0) -> Iterator[dict]:
        i = start
        while True:
            yield self._stream(data.seeded_rng("countdown-train", seed, i), heldout=False)
            i += 1

    def eval_samples(self, n: int = 256) -> list[dict]:
        rng = data.seeded_rng("countdown-eval", self.cfg.eval_seed)
        return [self._stream(rng, heldout=True) for _ in range(n)]


# --- math problems read from files ----------------------------------------------------------------

def _check_gold(gold: str, where: str) -> str:
    """`gold` unchanged if the math reward can read it; otherwise a DataError naming `where` ('path:line')."""
    if parse_gold(gold) is None:
        raise data.DataError(f"{where}: gold answer {gold[:60]!r} cannot be parsed by answers.parse_gold; "
                             "write a plain number or expression such as 42, -3.5 or 3/4")
    return gold


def gsm8k_gold(answer: str) -> str | None:
    """The text after the last '####', stripped, thousands commas removed; None if there is no '####'."""
    if "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(path: str | os.PathLike) -> list[dict]:
    """GSM8K lines {"question", "answer": "...#### 42"} -> math samples with the R1-Zero prompt. Every
    column of the line is kept (reward plug-ins read them); "answer" becomes the gold after '####'
    and the line's worked answer is kept as "solution"."""
    out = []
    for lineno, row in data.read_jsonl(path):
        where = f"{path}:{lineno}"
        question = data.text_field(row, "question", where)
        gold = gsm8k_gold(data.text_field(row, "answer", where))
        if not gold:
            raise data.DataError(f"{where}: answer has no '#### <number>' line; "
                                 "end it with '#### 42' as GSM8K does")
        out.append({**row, "task": "math", "prompt": r1_zero_prompt(question), "question": question,
                    "answer": _check_gold(gold, where), "solution": row["answer"], "lang": "en", "source": "gsm8k"})
    return out


def load_jsonl_samples(path: str | os.PathLike) -> list[dict]:
    """Lines {"prompt", "answer"} -> math samples. The prompt is wrapped in the R1-Zero template
    unless the line says "raw_prompt": true (then it is used verbatim; the response follows it).
    Optional "lang": "en" | "zh" (default "en"). Every other column of the line is kept as it is
    (reward plug-ins read them, `rewards.RewardSum`); the line's own prompt is also "question"."""
    out = []
    for lineno, row in data.read_jsonl(path):
        where = f"{path}:{lineno}"
        question = data.text_field(row, "prompt", where)
        gold = _check_gold(data.text_field(row, "answer", where).strip(), where)
        raw = row.get("raw_prompt", False)
        if not isinstance(raw, bool):
            raise data.DataError(f"{where}: field 'raw_prompt' is {raw!r}; use true or false (or drop it)")
        out.append({**row, "task": "math", "prompt": question if raw else r1_zero_prompt(question),
                    "question": question, "answer": gold, "lang": data.check_lang(row, where),
                    "source": "jsonl"})
    return out


# --- tasks read from files ------------------------------------------------------------------------

def _cycle(rows: list[dict], seed: int, start: int) -> Iterator[dict]:
    """data.epochs over the rows, each sample a copy (callers may annotate samples)."""
    return (dict(r) for r in data.epochs(rows, seed, start))


class _FileTask:
    """Train lines cycled in shuffled epochs; eval = the first n lines of the eval file, in file order."""

    name = ""

    def __init__(self, train_path: Path, eval_path: Path, loader):
        self.train_path, self.eval_path, self._loader, self._cache = train_path, eval_path, loader, {}

    def _load(self, path: Path) -> list[dict]:
        if path not in self._cache:  # lazy: constructing a task never touches the disk
            rows = self._loader(path)
            if not rows:
                raise data.DataError(f"{path}: no samples (only blank lines); "
                                     "add lines or point at another file")
            self._cache[path] = rows
        return self._cache[path]

    def check_prompts(self, encode, budget: int, limit: int, render=None) -> None:
        """Every train and eval prompt leaves `budget` new tokens within `limit` (the model's
        context): the first that does not is a DataError naming its path:line, before a run starts
        rather than when the row is drawn. `render` (sample -> sample) is the prompt's last form
        (ChatPrompts.render); the sample's own prompt without it."""
        for path in dict.fromkeys((self.train_path, self.eval_path)):
            for i, row in enumerate(self._load(path)):
                n = len(encode((render(row) if render else row)["prompt"]))
                if n + budget > limit:
                    # row i is the file's i-th non-blank line (the loaders keep every line, in order)
                    lineno = next(itertools.islice(data.read_jsonl(path), i, None))[0]
                    raise data.DataError(f"{path}:{lineno}: the prompt has {n} tokens; with --max_new_tokens {budget} "
                                         f"that exceeds the model's context of {limit}; shorten or drop the "
                                         "line, or lower --max_new_tokens")

    def train_samples(self, seed: int, start: int = 0) -> Iterator[dict]:
        return _cycle(self._load(self.train_path), seed, start)

    def eval_samples(self, n: int | None = None) -> list[dict]:
        return [dict(r) for r in self._load(self.eval_path)[:n]]


GSM8K_DIR = Path(__file__).resolve().parent.parent / "shared" / "data" / "gsm8k"


class GSM8K(_FileTask):
    name = "gsm8k"

    def __init__(self, data_dir: str | os.PathLike | None = None):
        d = Path(data_dir) if data_dir is not None else GSM8K_DIR
        super().__init__(d / "train.jsonl", d / "test.jsonl", load_gsm8k)


class JsonlTask(_FileTask):
    """Your own {prompt, answer} file. Without `eval_path`, eval reads the same file (not held out)."""

    def __init__(self, path: str | os.PathLike, eval_path: str | os.PathLike | None = None):
        self.name = f"jsonl:{path}"
        super().__init__(Path(path), Path(eval_path or path), load_jsonl_samples)


# --- chat-template prompts (--template chat) ------------------------------------------------------

class ChatPrompts:
    """`task` with every sample's prompt rendered by the checkpoint's chat template: the R1
    instruction as the system message, the sample's "question" as the user message, the assistant's
    turn opened (tokenizer.chat_prompt). Everything else in a sample (gold answers, language) is
    unchanged, and rewards see only the completion text. The sample streams are the wrapped task's;
    any other attribute is the task's own, except preference pairs, whose prompts have no question."""

    SAMPLE_STREAMS = ("train_samples", "general_samples")

    def __init__(self, task, tok):
        if not tok.chat_template:
            raise ValueError("the checkpoint has no chat template (tokenizer_config.json chat_template); "
                             "use --template r1zero for a base model")
        self.task, self.tok = task, tok
        self.name = getattr(task, "name", "")

    def render(self, s: dict) -> dict:
        return {**s, "prompt": chat_prompt(self.tok, s["question"])}

    def eval_samples(self, *args, **kw) -> list[dict]:
        return [self.render(s) for s in self.task.eval_samples(*args, **kw)]

    def __getattr__(self, name):
        if name == "preference_pairs":
            raise AttributeError(name)  # stage rm: --data FILE instead
        attr = getattr(self.task, name)
        if name in self.SAMPLE_STREAMS:
            return lambda *args, **kw: map(self.render, attr(*args, **kw))
        if name == "check_prompts":  # a file task's check, on the prompts as rendered here
            return lambda encode, budget, limit: attr(encode, budget, limit, render=self.render)
        return attr


# --- registry -------------------------------------------------------------------------------------

TASK_NAMES = ("toy", "countdown", "gsm8k", "jsonl:PATH")


def _check_settings(name: str, kw: dict, valid: list[str]) -> dict:
    if unknown := sorted(set(kw) - set(valid)):
        raise data.DataError(f"task {name!r}: unknown setting(s) {unknown}; valid: {sorted(valid)}")
    return kw


def _config(name: str, config_cls, kw: dict):
    """Either a ready config (`cfg=ToyConfig(...)`) or its fields as keywords, not both."""
    if "cfg" in kw:
        if len(kw) > 1 or not isinstance(kw["cfg"], config_cls):
            raise data.DataError(f"task {name!r}: pass cfg={config_cls.__name__}(...) alone, "
                                 "or its fields as keywords")
        return kw["cfg"]
    return config_cls(**_check_settings(name, kw, [f.name for f in fields(config_cls)]))


def get_task(name: str, **kw):
    """'toy' | 'countdown' | 'gsm8k' | 'jsonl:PATH'; keyword arguments are the task's settings."""
    if name == "toy":
        return toy.ToyArithmetic(_config(name, toy.ToyConfig, kw))
    if name == "countdown":
        return Countdown(_config(name, CountdownConfig, kw))
    if name == "gsm8k":
        return GSM8K(**_check_settings(name, kw, ["data_dir"]))
    if name.startswith("jsonl:") and len(name) > len("jsonl:"):
        return JsonlTask(name[len("jsonl:"):], **_check_settings(name, kw, ["eval_path"]))
    raise data.DataError(f"unknown task {name!r}; valid: {', '.join(TASK_NAMES)}")


if __name__ == "__main__":
    print(next(get_task("countdown").train_samples(0))["prompt"])
    print(get_task("toy").eval_samples(1)[0]["prompt"])
