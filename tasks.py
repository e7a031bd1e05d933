"""The tasks: prompts, gold answers, and the data every stage of the recipe trains or evaluates on.

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
`start` skips that many samples, so a resumed run sees the same stream) and `eval_samples(n)`:

- `ToyArithmetic` ("toy"): a + b, small enough that the whole recipe shows its R1-Zero curves on a
  2-core CPU with a ~1M-parameter character-level model pretrained on `pretrain_corpus()`. The
  corpus mixes worked (chain-of-thought) answers, direct answers, wrong answers and worked answers
  in the other language, so the base model mostly answers directly (and often wrongly) under greedy
  decoding but sometimes thinks when sampled; GRPO with accuracy + format rewards then raises
  accuracy and response length together (DeepSeek-R1 report, §2.2.4, Figures 2 and 3).
  `general_samples()` and `preference_pairs()` give the non-verifiable prompts of stages 3-4.
- `Countdown` ("countdown"): TinyZero's task (Pan et al. 2025, github.com/Jiayi-Pan/TinyZero):
  reach a target from 3-4 numbers with + - * /, each number used once.
- `GSM8K` ("gsm8k"): grade-school math word problems (Cobbe et al. 2021, arXiv:2110.14168);
  the gold is the text after `####`.
- `JsonlTask` ("jsonl:PATH"): your own {prompt, answer} lines.

Real-checkpoint prompts use the R1-Zero template (DeepSeek-R1 report, §2.2.1, Table 1) through
`tokenizer.r1_zero_prompt`. Every line read from a file is validated at load; a bad line raises
`DataError` with a one-line `path:line: what is wrong; how to fix it` message.

Departures:
- The toy prompt is a compressed R1-Zero template (`User: 478+56=? Assistant:`): a character-level
  model pays one token per character, and Table 1's 400-character preamble would be 90% of every
  sequence. The tags and the think-then-answer structure are kept.
- The toy's chain of thought always states the carry ("carry 0" / "进0"), one step per digit; a
  regular, local step is easier for a tiny model to learn, and every step carries a word of its
  language, so the language-consistency reward (R1 report §2.3.2) has something to read.
- The toy's held-out split hashes the unordered pair {a, b}, so b + a of a held-out a + b is held
  out too.
- Countdown: TinyZero reads a pre-generated dataset (Jiayi-Pan/Countdown-Tasks-3to4), split by
  index, and prefills "Let me solve this step by step.\n<think>". Here problems are generated on the
  fly by a random expression over all the numbers with exact integer intermediates (so every
  target is reachable; the expression is kept), held out by a hash of (sorted numbers, target),
  and prompted with Table 1's template and no prefill. The question is TinyZero's wording without
  its final period, because the template appends one.
- General (non-verifiable) prompts are tiny templated requests ("name a color"), not the report's
  human-written data; they exist so stages 3-4 (rejection sampling, a preference reward model)
  run end to end on the toy.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

from tokenizer import TOY_EOS, r1_zero_prompt

EOS_TEXT = TOY_EOS  # ends every pretraining document: "<|endoftext|>"


class DataError(ValueError):
    """A data problem a person can fix: a missing file, a malformed line, an unknown task name."""


def _bucket(key: str) -> float:
    """A stable number in [0, 1) for `key`: the same on every machine and run (unlike hash())."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def _rng(*parts) -> random.Random:
    """An RNG seeded from a string: sample i of a stream is a pure function of (seed, i)."""
    return random.Random("/".join(str(p) for p in parts))


# --- the toy task: text ---------------------------------------------------------------------------

# Compressed R1-Zero template (see Departures); `q` is the question, the response follows the colon.
TOY_TEMPLATES = {"en": "User: {q} Assistant:", "zh": "用户: {q} 助手:"}
# One digit step: "7+5+1=13 carry 1, so 34." / "7+5+1=13 进1，得34。" ("+1" only when a carry comes
# in). "so" is the answer's digits written so far (the last step includes the final carry), so the
# answer is a copy of the last step's result: each step reads only nearby text, which a 1M-parameter
# character model learns in minutes; assembling the digits in reverse at the end, it did not.
STEP_TEMPLATES = {"en": "{x}+{y}{c_in}={s} carry {c}, so {r}.", "zh": "{x}+{y}{c_in}={s} 进{c}，得{r}。"}

# General requests for stages 3-4: {lang: (request, acceptable answers)}. Aligned across languages so
# a wrong-language response answers the same request.
GENERAL_TEMPLATES = [
    {"en": ("say hello", ["hello", "hi"]), "zh": ("说你好", ["你好"])},
    {"en": ("say goodbye", ["goodbye", "bye"]), "zh": ("说再见", ["再见"])},
    {"en": ("say thanks", ["thank you", "thanks"]), "zh": ("说谢谢", ["谢谢"])},
    {"en": ("say good morning", ["good morning"]), "zh": ("说早上好", ["早上好"])},
    {"en": ("say ok", ["ok"]), "zh": ("说好的", ["好的"])},
    {"en": ("name a color", ["red", "blue", "green"]), "zh": ("说一个颜色", ["红色", "蓝色", "绿色"])},
    {"en": ("name an animal", ["cat", "dog", "horse"]), "zh": ("说一种动物", ["猫", "狗", "马"])},
    {"en": ("name a fruit", ["apple", "pear", "peach"]), "zh": ("说一种水果", ["苹果", "梨", "桃子"])},
    {"en": ("name a drink", ["water", "tea", "milk"]), "zh": ("说一种饮料", ["水", "茶", "牛奶"])},
    {"en": ("name a shape", ["circle", "square", "triangle"]), "zh": ("说一个形状", ["圆形", "方形", "三角形"])},
    {"en": ("name a season", ["spring", "summer", "autumn", "winter"]), "zh": ("说一个季节", ["春天", "夏天", "秋天", "冬天"])},
    {"en": ("name a day", ["monday", "friday", "sunday"]), "zh": ("说一个星期几", ["星期一", "星期五", "星期日"])},
    {"en": ("name a month", ["january", "may", "june"]), "zh": ("说一个月份", ["一月", "五月", "六月"])},
    {"en": ("name a planet", ["earth", "mars"]), "zh": ("说一个行星", ["地球", "火星"])},
    {"en": ("name a number", ["one", "seven", "ten"]), "zh": ("说一个数字", ["一", "七", "十"])},
    {"en": ("count to three", ["1 2 3", "one two three"]), "zh": ("从一数到三", ["一二三"])},
]
GENERAL_THINK = {"en": "<think> they want me to {r}. </think>", "zh": "<think> 要{r}。 </think>"}
FILLERS = {"en": ["you know", "well", "and so on", "again"], "zh": ["你知道", "嗯", "等等", "再说一遍"]}
COMMA = {"en": ", ", "zh": "，"}
OTHER_LANG = {"en": "zh", "zh": "en"}


def toy_prompt(question: str, lang: str) -> str:
    return TOY_TEMPLATES[lang].format(q=question)


def addition_steps(a: int, b: int) -> list[tuple[int, int, int, int, int]]:
    """Schoolbook addition from the least significant digit: (x, y, carry_in, sum, carry_out) per digit."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        steps.append((x, y, carry, s, s // 10))
        carry = s // 10
    return steps


def think_text(a: int, b: int, lang: str) -> str:
    """The chain of thought for a + b, one step per digit: '<think> 8+6=14 carry 1. ... </think>'."""
    steps, digits = [], ""
    plan = addition_steps(a, b)
    for i, (x, y, c_in, s, c) in enumerate(plan):
        digits = str(s % 10) + digits
        r = (str(c) + digits) if (i == len(plan) - 1 and c) else digits  # the last step adds the carry
        steps.append(STEP_TEMPLATES[lang].format(x=x, y=y, c_in="+1" if c_in else "", s=s, c=c, r=r))
    return "<think> " + " ".join(steps) + " </think>"


def worked_response(a: int, b: int, lang: str, answer: int | None = None) -> str:
    """Think, then answer. `answer` overrides the (correct) final answer, for the corpus's wrong docs."""
    return think_text(a, b, lang) + f"<answer>{a + b if answer is None else answer}</answer>"


def direct_response(answer: int) -> str:
    """No think: the format reward pays 0, so RL has to find out that thinking pays."""
    return f"<answer>{answer}</answer>"


def general_response(request: str, answer: str, lang: str) -> str:
    """A concise answer to a general request, with a short think: the preferred response."""
    return GENERAL_THINK[lang].format(r=request) + f"<answer>{answer}</answer>"


def rambling_response(request: str, answer: str, lang: str, rng: random.Random) -> str:
    """The right answer in the right language, repeated and padded with filler: dispreferred."""
    parts = [answer]
    for _ in range(rng.randint(2, 4)):  # 2-4 extra rounds: clearly longer, never unbounded
        parts += [rng.choice(FILLERS[lang]), answer]
    return GENERAL_THINK[lang].format(r=request) + f"<answer>{COMMA[lang].join(parts)}</answer>"


REJECTED_KINDS = ("wrong_lang", "rambling", "no_format")


def _rejected_response(t: dict, lang: str, kind: str, rng: random.Random) -> str:
    """One of the three dispreferred kinds: wrong language, rambling, or no think/answer format."""
    request, answers = t[lang]
    if kind == "wrong_lang":
        other_req, other_ans = t[OTHER_LANG[lang]]
        return general_response(other_req, rng.choice(other_ans), OTHER_LANG[lang])
    if kind == "rambling":
        return rambling_response(request, rng.choice(answers), lang, rng)
    if kind == "no_format":
        return rng.choice(answers)
    raise ValueError(f"unknown rejected kind {kind!r}; use wrong_lang, rambling or no_format")


# --- the toy task: problems, corpus, samples ------------------------------------------------------

@dataclass
class ToyConfig:
    min_digits: int = 2            # fewest digits in an operand (1 allows 0..9)
    max_digits: int = 2            # most digits in an operand (2: the 2.5-minute base thinks right
                                   # 82% of the time when made to think, answers directly right 7%)
    zh_frac: float = 0.3           # fraction of prompts written in Chinese
    eval_frac: float = 0.1         # fraction of problems held out (by hash) for eval_samples
    eval_seed: int = 0             # seed of the fixed eval list
    # Pretraining corpus mix over arithmetic documents (sums to 1):
    worked_frac: float = 0.30      # think + answer, steps in the prompt's language, right answer
    direct_frac: float = 0.45      # answer only, right answer: what greedy decoding mostly picks
    wrong_frac: float = 0.15       # final answer off (steps kept right), half worked, half direct
    cross_lang_frac: float = 0.10  # worked, right answer, steps in the other language
    wrong_max_delta: int = 9       # a wrong answer is off by 1..wrong_max_delta
    general_frac: float = 0.05     # fraction of all documents that are general requests
    general_good_frac: float = 0.4 # of those, concise + right language; the rest split over REJECTED_KINDS

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"ToyConfig: need 1 <= min_digits <= max_digits, got {self.min_digits}, "
                             f"{self.max_digits}; fix the digit settings")
        mix = self.worked_frac + self.direct_frac + self.wrong_frac + self.cross_lang_frac
        if abs(mix - 1.0) > 1e-6:
            raise ValueError(f"ToyConfig: worked/direct/wrong/cross_lang fractions sum to {mix:.3f}; "
                             "make them sum to 1")
        for name in ("zh_frac", "general_frac", "general_good_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ToyConfig: {name}={getattr(self, name)} is not in [0, 1]; use a fraction")
        if not 0.0 < self.eval_frac < 1.0:
            raise ValueError(f"ToyConfig: eval_frac={self.eval_frac}; use a fraction strictly between 0 and 1 "
                             "(both splits need problems)")


class ToyArithmetic:
    """a + b in English and Chinese, with a generated pretraining corpus (see the module docstring)."""

    name = "toy"

    def __init__(self, config: ToyConfig | None = None):
        self.cfg = config or ToyConfig()

    # problems
    def _lang(self, rng: random.Random) -> str:
        return "zh" if rng.random() < self.cfg.zh_frac else "en"

    def is_heldout(self, a: int, b: int) -> bool:
        return _bucket(f"toy:{min(a, b)}+{max(a, b)}") < self.cfg.eval_frac

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.cfg.min_digits, self.cfg.max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)

    def _problem(self, rng: random.Random, heldout: bool) -> tuple[int, int, str]:
        while True:  # rejection: ~1/eval_frac draws for a held-out problem, ~1 for a train one
            a, b = self._operand(rng), self._operand(rng)
            if self.is_heldout(a, b) == heldout:
                return a, b, self._lang(rng)

    def sample(self, a: int, b: int, lang: str) -> dict:
        q = f"{a}+{b}=?"
        return {"task": "math", "prompt": toy_prompt(q, lang), "question": q, "answer": str(a + b),
                "lang": lang, "source": "toy"}

    def train_samples(self, seed: int, start: int = 0) -> Iterator[dict]:
        """Training problems forever (held-out ones never appear); sample i depends only on (seed, i)."""
        i = start
        while True:
            yield self.sample(*self._problem(_rng("toy-train", seed, i), heldout=False))
            i += 1

    def eval_samples(self, n: int = 256) -> list[dict]:
        """n distinct held-out problems from a fixed seed; eval_samples(k) is a prefix of eval_samples(n)."""
        rng, seen, out, misses = _rng("toy-eval", self.cfg.eval_seed), set(), [], 0
        while len(out) < n and misses < 1000:  # 1000 repeats in a row: the held-out pool is used up
            a, b, lang = self._problem(rng, heldout=True)
            if (a, b) in seen:
                misses += 1
                continue
            seen.add((a, b))
            out.append(self.sample(a, b, lang))
            misses = 0
        if len(out) == n:
            return out
        raise ValueError(f"only {len(out)} distinct held-out toy problems found, asked for {n}; "
                         "ask for fewer or raise max_digits / eval_frac")

    def sft_response(self, sample: dict) -> str:
        """The ideal response: worked steps in the prompt's language (math), or concise (general)."""
        if sample["task"] == "general":
            return general_response(sample["question"], sample["answers"][0], sample["lang"])
        m = re.fullmatch(r"(\d+)\+(\d+)=\?", sample["question"])
        if m is None:
            raise ValueError(f"not a toy question: {sample['question']!r}; use a sample from ToyArithmetic")
        return worked_response(int(m[1]), int(m[2]), sample["lang"])

    # pretraining corpus
    def _arith_doc(self, rng: random.Random) -> str:
        cfg = self.cfg
        a, b, lang = self._problem(rng, heldout=False)
        r = rng.random()
        if r < cfg.worked_frac:
            resp = worked_response(a, b, lang)
        elif r < cfg.worked_frac + cfg.direct_frac:
            resp = direct_response(a + b)
        elif r < cfg.worked_frac + cfg.direct_frac + cfg.wrong_frac:
            delta = rng.randint(1, cfg.wrong_max_delta)
            wrong = a + b + delta if (rng.random() < 0.5 or a + b < delta) else a + b - delta
            resp = worked_response(a, b, lang, wrong) if rng.random() < 0.5 else direct_response(wrong)
        else:
            resp = worked_response(a, b, OTHER_LANG[lang])
        return toy_prompt(f"{a}+{b}=?", lang) + resp

    def _general_doc(self, rng: random.Random) -> str:
        t = rng.choice(GENERAL_TEMPLATES)
        lang = self._lang(rng)
        request, answers = t[lang]
        if rng.random() < self.cfg.general_good_frac:
            resp = general_response(request, rng.choice(answers), lang)
        else:
            resp = _rejected_response(t, lang, rng.choice(REJECTED_KINDS), rng)
        return toy_prompt(request, lang) + resp

    def pretrain_corpus(self, n_docs: int, seed: int = 0) -> list[str]:
        """n_docs documents `prompt + response + <|endoftext|>`, mixed as ToyConfig says."""
        rng = _rng("toy-corpus", seed)
        docs = []
        for _ in range(n_docs):
            doc = self._general_doc(rng) if rng.random() < self.cfg.general_frac else self._arith_doc(rng)
            docs.append(doc + EOS_TEXT)
        return docs

    def alphabet(self) -> str:
        """Every character the toy can produce, tags and <|endoftext|> excluded (they are single tokens)."""
        pieces = ["0123456789+=?", *TOY_TEMPLATES.values(), *STEP_TEMPLATES.values(), *COMMA.values()]
        for t in GENERAL_TEMPLATES:
            pieces += [piece for request, answers in t.values() for piece in (request, *answers)]
        pieces += [t.replace("<think>", "").replace("</think>", "") for t in GENERAL_THINK.values()]
        pieces += [w for ws in FILLERS.values() for w in ws]
        text = "".join(pieces).replace("{q}", "").replace("{r}", "")
        text = re.sub(r"\{\w+\}", "", text)  # format fields of the step templates
        return "".join(sorted(set(text)))

    # general prompts (stages 3-4)
    def general_samples(self, seed: int, start: int = 0) -> Iterator[dict]:
        """General requests forever, each with its acceptable concise answers in the prompt's language."""
        i = start
        while True:
            rng = _rng("toy-general", seed, i)
            lang = self._lang(rng)
            request, answers = rng.choice(GENERAL_TEMPLATES)[lang]
            yield {"task": "general", "prompt": toy_prompt(request, lang), "question": request,
                   "answers": list(answers), "lang": lang, "source": "toy-general"}
            i += 1

    def preference_pairs(self, n: int, seed: int = 0) -> list[dict]:
        """n {prompt, chosen, rejected}: chosen is concise and in the prompt's language; rejected is
        in the wrong language, rambling, or missing the think/answer format (a third each)."""
        rng, out = _rng("toy-pref", seed), []
        for _ in range(n):
            t = rng.choice(GENERAL_TEMPLATES)
            lang = self._lang(rng)
            request, answers = t[lang]
            out.append({"prompt": toy_prompt(request, lang),
                        "chosen": general_response(request, rng.choice(answers), lang),
                        "rejected": _rejected_response(t, lang, rng.choice(REJECTED_KINDS), rng)})
        return out


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
        return _bucket(f"countdown:{sorted(numbers)}:{target}") < self.cfg.eval_frac

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
            yield self._stream(_rng("countdown-train", seed, i), heldout=False)
            i += 1

    def eval_samples(self, n: int = 256) -> list[dict]:
        rng = _rng("countdown-eval", self.cfg.eval_seed)
        return [self._stream(rng, heldout=True) for _ in range(n)]


# --- reading and writing JSONL --------------------------------------------------------------------

def _read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; any malformed line raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path (JSONL, one object per line)")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8; re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                "write one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}; "
                                'write {"key": value, ...} per line')
            yield lineno, row


def _text_field(row: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in row:
        if not required:
            return None
        raise DataError(f"{where}: missing field {key!r}; add it (fields present: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is {type(value).__name__}, not a string; "
                        f'write it as a JSON string, e.g. "{key}": "{str(value)[:40]}"')
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty; give it a non-empty string or drop the line")
    return value


def _check_gold(gold: str, where: str) -> str:
    from rewards import parse_gold  # lazy: the toy and Countdown work without rewards.py
    if parse_gold(gold) is None:
        raise DataError(f"{where}: gold answer {gold[:60]!r} cannot be parsed by rewards.parse_gold; "
                        "write a plain number or expression such as 42, -3.5 or 3/4")
    return gold


def _check_lang(row: dict, where: str) -> str:
    lang = row.get("lang", "en")
    if lang not in ("en", "zh"):
        raise DataError(f"{where}: field 'lang' is {lang!r}; use \"en\" or \"zh\" (or drop it for en)")
    return lang


def gsm8k_gold(answer: str) -> str | None:
    """The text after the last '####', stripped, thousands commas removed; None if there is no '####'."""
    if "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(path: str | os.PathLike) -> list[dict]:
    """GSM8K lines {"question", "answer": "...#### 42"} -> math samples with the R1-Zero prompt."""
    out = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        question = _text_field(row, "question", where)
        gold = gsm8k_gold(_text_field(row, "answer", where))
        if not gold:
            raise DataError(f"{where}: answer has no '#### <number>' line; end it with '#### 42' as GSM8K does")
        out.append({"task": "math", "prompt": r1_zero_prompt(question), "question": question,
                    "answer": _check_gold(gold, where), "lang": "en", "source": "gsm8k"})
    return out


def load_jsonl_samples(path: str | os.PathLike) -> list[dict]:
    """Lines {"prompt", "answer"} -> math samples. The prompt is wrapped in the R1-Zero template
    unless the line says "raw_prompt": true (then it is used verbatim; the response follows it).
    Optional "lang": "en" | "zh" (default "en")."""
    out = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        question = _text_field(row, "prompt", where)
        gold = _check_gold(_text_field(row, "answer", where).strip(), where)
        raw = row.get("raw_prompt", False)
        if not isinstance(raw, bool):
            raise DataError(f"{where}: field 'raw_prompt' is {raw!r}; use true or false (or drop it)")
        out.append({"task": "math", "prompt": question if raw else r1_zero_prompt(question),
                    "question": question, "answer": gold, "lang": _check_lang(row, where), "source": "jsonl"})
    return out


def load_sft_jsonl(path: str | os.PathLike) -> list[dict]:
    """Lines {"prompt", "response", optional "source"} -> SFT examples; the prompt is used verbatim."""
    out = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        out.append({"prompt": _text_field(row, "prompt", where), "response": _text_field(row, "response", where),
                    "source": _text_field(row, "source", where, required=False) or "jsonl"})
    return out


def load_pref_jsonl(path: str | os.PathLike) -> list[dict]:
    """Lines {"prompt", "chosen", "rejected"} -> preference pairs for the reward model."""
    out = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        out.append({k: _text_field(row, k, where) for k in ("prompt", "chosen", "rejected")})
    return out


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically (temp file in the same directory, then os.replace); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        n = 0
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


# --- tasks read from files ------------------------------------------------------------------------

def _cycle(rows: list[dict], seed: int, start: int) -> Iterator[dict]:
    """Epoch after epoch, each in its own shuffled order from (seed, epoch); starts at sample `start`."""
    epoch, offset = divmod(start, len(rows))
    while True:
        order = list(range(len(rows)))
        _rng("epoch", seed, epoch).shuffle(order)
        for k in order[offset:]:
            yield dict(rows[k])  # a copy: callers may annotate samples
        epoch, offset = epoch + 1, 0


class _FileTask:
    """Train lines cycled in shuffled epochs; eval = the first n lines of the eval file, in file order."""

    name = ""

    def __init__(self, train_path: Path, eval_path: Path, loader):
        self.train_path, self.eval_path, self._loader, self._cache = train_path, eval_path, loader, {}

    def _load(self, path: Path) -> list[dict]:
        if path not in self._cache:  # lazy: constructing a task never touches the disk
            rows = self._loader(path)
            if not rows:
                raise DataError(f"{path}: no samples (only blank lines); add lines or point at another file")
            self._cache[path] = rows
        return self._cache[path]

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


# --- registry -------------------------------------------------------------------------------------

TASK_NAMES = ("toy", "countdown", "gsm8k", "jsonl:PATH")


def _check_settings(name: str, kw: dict, valid: list[str]) -> dict:
    if unknown := sorted(set(kw) - set(valid)):
        raise DataError(f"task {name!r}: unknown setting(s) {unknown}; valid: {sorted(valid)}")
    return kw


def _config(name: str, config_cls, kw: dict):
    """Either a ready config (`cfg=ToyConfig(...)`) or its fields as keywords, not both."""
    if "cfg" in kw:
        if len(kw) > 1 or not isinstance(kw["cfg"], config_cls):
            raise DataError(f"task {name!r}: pass cfg={config_cls.__name__}(...) alone, or its fields as keywords")
        return kw["cfg"]
    return config_cls(**_check_settings(name, kw, [f.name for f in fields(config_cls)]))


def get_task(name: str, **kw):
    """'toy' | 'countdown' | 'gsm8k' | 'jsonl:PATH'; keyword arguments are the task's settings."""
    if name == "toy":
        return ToyArithmetic(_config(name, ToyConfig, kw))
    if name == "countdown":
        return Countdown(_config(name, CountdownConfig, kw))
    if name == "gsm8k":
        return GSM8K(**_check_settings(name, kw, ["data_dir"]))
    if name.startswith("jsonl:") and len(name) > len("jsonl:"):
        return JsonlTask(name[len("jsonl:"):], **_check_settings(name, kw, ["eval_path"]))
    raise DataError(f"unknown task {name!r}; valid: {', '.join(TASK_NAMES)}")


if __name__ == "__main__":
    toy = ToyArithmetic()
    for doc in toy.pretrain_corpus(8, seed=0):
        print(doc)
    print(toy.alphabet())
    print(next(Countdown().train_samples(0))["prompt"])
