"""Rule-based rewards: accuracy (math, Countdown), format, language consistency, and their sum.

DeepSeek-R1 (DeepSeek-AI 2025, arXiv:2501.12948):
- §2.2.2 "Reward Modeling": R1-Zero is trained on two rule-based rewards and no neural reward model
  (which "may suffer from reward hacking"): an *accuracy* reward, the final answer given "in a
  specified format (e.g., within a box)" and checked by rules, and a *format* reward, the thinking
  put between '<think>' and '</think>'. The template (§2.2.1, Table 1) asks for
  '<think> reasoning </think> <answer> answer </answer>'.
- §2.3.2: a *language consistency* reward, "the proportion of target language words in the CoT",
  summed directly with the accuracy reward in the reasoning-RL stage.

Public pieces: `math_reward`, `countdown_reward`, `format_reward`, `language_reward` (each a pure
function of strings returning a float in [0, 1], never raising), `accuracy_reward` (dispatch on
sample["task"]), `combine_rewards` with `DEFAULT_WEIGHTS` / `STAGE2_WEIGHTS`, `rule_reward` (the
RL loop's reward function, a `RewardSum` of `score_accuracy`, `score_format`, `score_language` and
any --reward plug-ins, loaded by `load_reward`) and `extract_answer`. Math answers are read as
values by answers.py, whose `parse_answer` and `parse_gold` are importable from here too (dataset
loaders check every gold).

The functions take the assistant's whole response, starting with '<think>': a caller whose prompt
template already emitted '<think>' prepends it. Text handling is linear: tags are found with
str.find/str.count, regexes have no nested quantifiers, and every parse (answers.py, the Countdown
reader here) is capped before any arithmetic. `python rewards.py` measures the time per call on real
and hostile 1 MB responses.

Departures and choices the report does not make (it gives no rules beyond the sentences above):
- How a math answer is read (exact equality, hedge words, \\boxed{}): answers.py.
- A response with neither '<think>' nor '</think>' has no reasoning, so its answer block counts
  (the toy task's direct answers); one with '<think>' but no '</think>' is all reasoning. Two answer
  blocks are a hedge and score 0. Countdown accepts "expr = target" as well as "expr".
- Countdown's expression has binary + - * / and parentheses only (the game has no other moves):
  no unary minus, no '**', '//', decimals or juxtaposition; it is read here, capped by MAX_COUNTDOWN_*.
- Tags are matched case-insensitively for ASCII only when looking for a second, miscased tag.
- Against reward hacking: a gold that is a number is paid only for a number ("68+44" for 112
  echoes the question; "3 * 24 = 72" still pays 72), blocks of invisible characters (zero-width,
  fillers) are blank, and words count in any markup ($...$, `...`, \\text{}) and letter form.
- Language is told by Unicode script (English and French are both Latin); the prompt's language is
  its dominant script; a CoT over MAX_LANGUAGE_CHARS is scored on evenly spaced windows.
- The "general" task (stages 3-4 of the toy) gets a rule reward too: the answer is one of a list.
- Weights: the report gives none. `DEFAULT_WEIGHTS` is R1-Zero (accuracy + a small format term);
  `STAGE2_WEIGHTS` adds the language reward with weight 1, "directly summing" as §2.3.2 says.
"""
from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
import os
import re
import time
import unicodedata
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from answers import MAX_DEPTH, parse_answer, parse_choice, parse_gold

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

MAX_LANGUAGE_CHARS = 16384  # CoT chars scored: all of a shorter CoT, else LANGUAGE_WINDOWS even windows
LANGUAGE_WINDOWS = 8
NEUTRAL_LANGUAGE = 1.0    # a CoT without words (pure arithmetic) mixes no languages

# --- tags ------------------------------------------------------------------------------------------


def extract_answer(completion: str) -> str | None:
    """The stripped text of the single '<answer>...</answer>' after '</think>', else None.

    Answers inside the reasoning do not count; two answer blocks (or two '</think>') are a hedge.
    Only with neither '<think>' nor '</think>' is the whole response searched (no reasoning).
    """
    if not isinstance(completion, str):
        return None
    n_close = completion.count(THINK_CLOSE)
    if n_close > 1 or (n_close == 0 and THINK_OPEN in completion):
        return None
    start = completion.find(THINK_CLOSE) + len(THINK_CLOSE) if n_close else 0
    if completion.count(ANSWER_OPEN, start) != 1 or completion.count(ANSWER_CLOSE, start) != 1:
        return None
    i = completion.find(ANSWER_OPEN, start) + len(ANSWER_OPEN)
    j = completion.find(ANSWER_CLOSE, start)
    return (completion[i:j].strip() or None) if i <= j else None


def format_reward(completion: str) -> float:
    """1.0 for '<think> X </think> <answer> Y </answer>' with X, Y not blank, only whitespace around."""
    if not isinstance(completion, str):
        return 0.0
    s = completion.strip()
    if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return 0.0
    # Each tag exactly once in any ASCII case: '</THINK>' in the reasoning is a second tag. Encoding
    # to ASCII ('?' for the rest) keeps this a few fast C passes; str.lower() is slow on non-ASCII.
    low = s.encode("ascii", "replace").lower()
    if any(low.count(tag.encode()) != 1 for tag in TAGS):
        return 0.0
    t, a = s.find(THINK_CLOSE), s.find(ANSWER_OPEN)
    if not 0 < t < a:  # -1: the only closing tag is miscased
        return 0.0
    think, answer = s[len(THINK_OPEN):t], s[a + len(ANSWER_OPEN):-len(ANSWER_CLOSE)]
    between = s[t + len(THINK_CLOSE):a]
    return 0.0 if _blank(think) or _blank(answer) or not _blank(between) else 1.0


def _blank(text: str) -> bool:
    """Empty, or only characters that show nothing: whitespace, zero-width and other format
    characters (U+200B..U+200F, U+2060..U+206F, U+FEFF, ...), variation selectors, fillers."""
    return not text or _INVISIBLE.fullmatch(text) is not None


_INVISIBLE = re.compile("[\\s\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202f"
                        "\u205f-\u206f\u2800\u3000\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e0fff]+")


# --- accuracy -------------------------------------------------------------------------------------


def math_reward(completion: str, gold: str) -> float:
    """1.0 when the answer block's value equals the gold's exactly, else 0.0 (also for a gold that
    `parse_gold` cannot read). Out of scope: general symbolic equivalence ("x+1" vs "1+x"); a
    checker for it would be called where `parse_answer` returns None (see answers.py)."""
    want = parse_gold(gold)
    text = extract_answer(completion)
    if want is None or text is None:
        return 0.0
    got = parse_choice(text) if want[0] == "choice" else parse_answer(text)
    if got != want:
        return 0.0
    # a gold that is a number wants a number: "68+44" for 112 echoes the question, it answers nothing
    if want[0] != "choice" and not _ARITHMETIC.search(gold) and _ARITHMETIC.search(text.rsplit("=", 1)[-1]):
        return 0.0
    return 1.0


# A plus, minus, times or divide sign between two operands; '/' and '^' are not: 1/2 and 10^5 write a number.
_ARITHMETIC = re.compile(r"(?:[\d)}\]]|\\pi)\s*"                                   # an operand's end
                         r"(?:[-+*\u00d7\u00b7\u22c5\u00f7\u2212]|\\times|\\cdot|\\div)"  # the operator
                         r"\s*[\d(\[{\\.]")                                            # the next operand


MAX_COUNTDOWN_CHARS = 200
MAX_COUNTDOWN_DIGITS = 9  # per number; Countdown numbers are two-digit
MAX_COUNTDOWN_NUMBERS = 16
_DIGITS = "0123456789"  # ASCII only: str.isdigit() is also true of superscripts and other scripts' digits


class _NotAnExpression(Exception):
    """Internal to the Countdown reader: caught in `_countdown_eval`, never raised to a caller."""


def _countdown_tokens(text: str) -> list[str] | None:
    toks, i = [], 0
    while i < len(text):
        c = text[i]
        if c in _DIGITS:
            j = i
            while j < len(text) and text[j] in _DIGITS:
                j += 1
            if j - i > MAX_COUNTDOWN_DIGITS or (j - i > 1 and c == "0"):
                return None
            toks.append(text[i:j])
            i = j
        elif c in "+-*/()":
            toks.append(c)
            i += 1
        elif c.isspace():
            i += 1
        else:
            return None  # '.', '^', '=', letters, ...: decimals, powers and names are not moves
    return toks


def _countdown_eval(toks: list[str]) -> Fraction | None:
    """expr := atom (op atom)* with * / binding tighter; atom := INT | '(' expr ')'. No unary signs,
    no '**' or '//' (an operator where an atom must be), no juxtaposition."""
    pos = 0

    def atom():
        nonlocal pos
        t = toks[pos] if pos < len(toks) else None
        pos += 1
        if t == "(":
            v = expr()
            if pos >= len(toks) or toks[pos] != ")":
                raise _NotAnExpression
            pos += 1
            return v
        if t is None or not t.isdigit():
            raise _NotAnExpression
        return Fraction(int(t))

    def term():
        nonlocal pos
        v = atom()
        while pos < len(toks) and toks[pos] in "*/":
            op = toks[pos]
            pos += 1
            rhs = atom()
            if op == "/" and rhs == 0:
                raise _NotAnExpression
            v = v * rhs if op == "*" else v / rhs
        return v

    def expr():
        nonlocal pos
        v = term()
        while pos < len(toks) and toks[pos] in "+-":
            op = toks[pos]
            pos += 1
            v = v + term() if op == "+" else v - term()
        return v

    try:
        v = expr()
    except _NotAnExpression:
        return None
    return v if pos == len(toks) else None


def _max_depth(toks: list[str]) -> int:
    return max(itertools.accumulate((t == "(") - (t == ")") for t in toks), default=0)


def countdown_reward(completion: str, numbers: list[int], target: int) -> float:
    """1.0 when the answer block is an expression over + - * / and parentheses that uses each of
    `numbers` exactly once and equals `target` exactly; "expr = target" is accepted too."""
    text = extract_answer(completion)
    if (text is None or len(text) > MAX_COUNTDOWN_CHARS or not isinstance(numbers, (list, tuple))
            or len(numbers) > MAX_COUNTDOWN_NUMBERS or not isinstance(target, int)
            or not all(isinstance(x, int) for x in numbers)):
        return 0.0
    expr, eq, rhs = text.partition("=")
    rhs = rhs.strip()
    if eq and not (rhs.isdigit() and rhs.isascii() and len(rhs) <= MAX_COUNTDOWN_DIGITS and int(rhs) == target):
        return 0.0
    toks = _countdown_tokens(expr)
    if toks is None or _max_depth(toks) > MAX_DEPTH:
        return 0.0
    if sorted(int(t) for t in toks if t.isdigit()) != sorted(numbers):
        return 0.0  # checked before any arithmetic; also rules out gluing digits
    return 1.0 if _countdown_eval(toks) == target else 0.0


# --- language consistency ---------------------------------------------------------------------------

# LaTeX's math commands are not words; any other command, and the words inside $...$, `...` and
# \text{...}, are (English hidden in markup is still English).
_NOT_WORDS = re.compile(r"\\(?:[dt]?frac|sqrt|times|cdot|div|pm|mp|leq?|geq?|neq?|approx|equiv|sim|[lc]?dots|"
                        r"q?quad|left|right|[bB]ig[lr]?|text|math[a-z]+|boxed|circ|infty|pi|alpha|beta|gamma|"
                        r"delta|theta|lambda|mu|sigma|phi|omega|sum|prod|int|lim|log|ln|sin|cos|tan|exp|min|max|"
                        r"p?mod|binom|overline|underline|hat|bar|vec|in|notin|subset|cup|cap|to|[rR]ightarrow|"
                        r"implies|iff|because|therefore|angle|triangle|degree|displaystyle)(?![A-Za-z])")
_LETTER_RUN = re.compile(r"[^\W\d_]+")
# Scripts written without spaces count one unit per character (Unicode blocks; kana includes ー).
_PER_CHAR = {"HAN": re.compile("[\u3005\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]"),
             "KANA": re.compile("[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]"),
             "HANGUL": re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")}
_VARIABLE_SCRIPTS = {"LATIN", "GREEK"}  # a single letter there is a variable (x, n, theta), not a word


@lru_cache(maxsize=None)  # bounded by the number of Unicode letters
def _script(ch: str) -> str | None:
    """The script of a letter from its Unicode name: 'LATIN SMALL LETTER A' -> 'LATIN'."""
    name = unicodedata.name(ch, "")
    if not name or name.startswith("MATHEMATICAL"):
        return None
    words = name.split(" ")
    first = words[1] if words[0] in ("FULLWIDTH", "HALFWIDTH") and len(words) > 1 else words[0]
    return first


def _sample_text(text: str) -> str:
    if len(text) <= MAX_LANGUAGE_CHARS:
        return text
    size = MAX_LANGUAGE_CHARS // LANGUAGE_WINDOWS
    step = (len(text) - size) // (LANGUAGE_WINDOWS - 1)
    return " ".join(text[w * step:w * step + size] for w in range(LANGUAGE_WINDOWS))


def script_units(text: str) -> dict[str, int]:
    """Word units per script: one per CJK ideograph, kana or Hangul syllable, one per letter run
    elsewhere (in the script of its first letter). Words count wherever they are, inside math
    ($...$), code (`...`) and markup too, and in any form (math-bold letters are letters); LaTeX's
    math commands, digits and punctuation are ignored, and so are single Latin or Greek letters
    (variables)."""
    counts: dict[str, int] = {}
    # NFKC: mathematical alphanumerics (U+1D400..) and fullwidth letters become the plain letters
    text = _NOT_WORDS.sub(" ", unicodedata.normalize("NFKC", _sample_text(text)))
    for script, pattern in _PER_CHAR.items():
        text, n = pattern.subn(" ", text)
        if n:
            counts[script] = n
    for run in _LETTER_RUN.findall(text):
        script = "LATIN" if run.isascii() else _script(run[0])
        if script is not None and (len(run) > 1 or script not in _VARIABLE_SCRIPTS):
            counts[script] = counts.get(script, 0) + 1
    return counts


def _language(prompt: str) -> set[str] | None:
    """The prompt's scripts: its dominant one, with Han added for Japanese (kana) and Korean."""
    units = script_units(prompt)
    if not units:
        return None
    top = max(units, key=units.get)
    if "KANA" in units and top in ("HAN", "KANA"):
        return {"HAN", "KANA"}
    return {"HANGUL", "HAN"} if top == "HANGUL" else {top}


def language_reward(completion: str, prompt: str) -> float:
    """R1 §2.3.2: the share of the CoT's words written in the prompt's language.

    The CoT is the text between '<think>' and '</think>' (to the end if unclosed). Languages are
    told apart by script only: English and French are both LATIN, Chinese and Japanese share Han.
    A CoT with no words, or a prompt with none, gets NEUTRAL_LANGUAGE. Pass the user's question,
    not a templated prompt: an English template would outvote a short Chinese question. A CoT
    longer than MAX_LANGUAGE_CHARS is scored on LANGUAGE_WINDOWS evenly spaced windows.
    """
    if not isinstance(completion, str) or not isinstance(prompt, str):
        return 0.0
    start = completion.find(THINK_OPEN)
    start = 0 if start < 0 else start + len(THINK_OPEN)
    end = completion.find(THINK_CLOSE, start)
    target, units = _language(prompt), script_units(completion[start:end if end >= 0 else len(completion)])
    total = sum(units.values())
    if target is None or total == 0:
        return NEUTRAL_LANGUAGE
    return sum(units.get(s, 0) for s in target) / total


# --- combining -------------------------------------------------------------------------------------

REWARD_NAMES = ("accuracy", "format", "language")
# R1-Zero (§2.2.2): accuracy + format. The report gives no weights; 0.1 keeps format a shaping
# term, so a right answer in a broken format (1.0) always beats a wrong one in a clean format (0.1).
DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.1, "language": 0.0}
# Reasoning RL (§2.3.2): "directly summing" accuracy and language consistency.
STAGE2_WEIGHTS = {"accuracy": 1.0, "format": 0.1, "language": 1.0}


def _field(sample: dict, key: str):
    if key not in sample:
        raise ValueError(f"sample for task {sample.get('task')!r} has no field {key!r}; "
                         "build samples with tasks.py, which sets it")
    return sample[key]


def general_reward(completion: str, answers: list[str]) -> float:
    """The toy's general requests: 1.0 when the answer block is one of `answers` (case and spacing
    ignored). Stages 3-4 score these with a preference model; this keeps the rule reward defined."""
    text = extract_answer(completion)
    if text is None or not isinstance(answers, (list, tuple)):
        return 0.0
    norm = lambda x: " ".join(str(x).split()).casefold()  # noqa: E731
    return 1.0 if norm(text) in {norm(a) for a in answers} else 0.0


def accuracy_reward(completion: str, sample: dict) -> float:
    """Dispatch on sample["task"]: "math" (toy, GSM8K, JSONL) reads "answer"; "countdown" reads
    "numbers" and "target"; "general" reads "answers"."""
    task = sample.get("task")
    if task == "math":
        return math_reward(completion, _field(sample, "answer"))
    if task == "countdown":
        return countdown_reward(completion, _field(sample, "numbers"), _field(sample, "target"))
    if task == "general":
        return general_reward(completion, _field(sample, "answers"))
    raise ValueError(f"sample task is {task!r}; use 'math', 'countdown' or 'general'")


def _check_weights(weights: dict[str, float]) -> None:
    unknown = set(weights) - set(REWARD_NAMES)
    if unknown:
        raise ValueError(f"unknown reward weights {sorted(unknown)}; use {list(REWARD_NAMES)}")


def _language_source(prompt: str, sample: dict) -> str:
    question = sample.get("question")
    return question if isinstance(question, str) and script_units(question) else prompt


def combine_rewards(completion: str, prompt: str, sample: dict,
                    weights: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """(weighted total, every component) for one response. All components are computed, whatever
    their weight, so the logs always hold them. The target language is read from sample["question"]
    when it has words (a templated prompt's English preamble would outvote a Chinese question),
    else from `prompt` (the toy's "478+56=?" has none; its template "用户: ... 助手:" does)."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    _check_weights(weights)
    components = {"accuracy": accuracy_reward(completion, sample),
                  "format": format_reward(completion),
                  "language": language_reward(completion, _language_source(prompt, sample))}
    return sum(weights.get(k, 0.0) * v for k, v in components.items()), components


# --- reward functions of the RL loop ---------------------------------------------------------------
# A reward function: fn(completions: list[str], samples: list[dict]) -> list[float | None], one
# value per completion; samples[i] is the task sample completions[i] answers (its prompt, gold
# answer, task, and every column of its JSONL line); None means the reward does not apply to that
# sample. The built-in rewards below and every --reward plug-in have this signature.


def score_accuracy(completions: list[str], samples: list[dict]) -> list[float]:
    """`accuracy_reward` of each completion (dispatch on sample["task"])."""
    return [accuracy_reward(c, s) for c, s in zip(completions, samples)]


def score_format(completions: list[str], samples: list[dict]) -> list[float]:
    """`format_reward` of each completion."""
    return [format_reward(c) for c in completions]


def score_language(completions: list[str], samples: list[dict]) -> list[float]:
    """`language_reward` of each completion, in the language of its sample's question (or prompt)."""
    return [language_reward(c, _language_source(_field(s, "prompt"), s)) for c, s in zip(completions, samples)]


BUILTIN_REWARDS = {"accuracy": score_accuracy, "format": score_format, "language": score_language}


class RewardError(ValueError):
    """A reward plug-in that cannot be loaded or returns the wrong thing: one line for the person."""


class RewardSum:
    """The RL loop's reward function: sum_k w_k * r_k over named reward functions `terms`
    [(name, fn, weight)], each fn(completions, samples) -> list[float | None].

    None (the reward does not apply to that sample) adds nothing to the sum: it counts as 0, with
    the other rewards' weights unchanged (TRL's choice; renormalising the weights would put samples
    of one group on different scales). Returns (totals, components): components[name][i] is r_k
    of completion i as returned (None kept), so the loop logs each reward's mean over the samples
    it applies to. Every term is computed, whatever its weight, so the logs always hold it.
    `weights` ({name: weight}) lets the loop normalise components one by one (GDPO).
    """

    def __init__(self, terms: list[tuple[str, Callable, float]]):
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise RewardError(f"two rewards share a name in {names}; rename one function")
        self.terms = list(terms)
        self.weights = {name: float(w) for name, _, w in terms}

    def __call__(self, completions: list[str], samples: list[dict]) -> tuple[list[float], dict[str, list]]:
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions but {len(samples)} samples; "
                             "pass the task sample of each completion, one per completion")
        components = {name: _checked(name, fn(completions, samples), len(completions)) for name, fn, _ in self.terms}
        totals = [sum(self.weights[k] * v[i] for k, v in components.items() if v[i] is not None)
                  for i in range(len(completions))]
        return totals, components


def _checked(name: str, values, n: int) -> list:
    """`values` if it is one finite float (or None) per completion, else a RewardError naming `name`."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
        raise RewardError(f"reward {name!r} returned {got} for {n} completions; return a list with one float "
                          "(or None: does not apply) per completion")
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise RewardError(f"reward {name!r} returned {v!r}; each value must be a finite number or None")
    return [None if v is None else float(v) for v in values]


def rule_reward(weights: dict[str, float], extra: list[tuple[str, Callable, float]] = ()) -> RewardSum:
    """The rule rewards of R1-Zero (§2.2.2) and reasoning RL (§2.3.2) as a reward function, plus
    `extra` terms (name, fn, weight) such as `load_rewards`' plug-ins.

    score(completions, samples) -> (totals, components): samples[i] is the task sample of
    completions[i], totals[i] its weighted sum (what `combine_rewards` gives, plus the extra terms),
    and components[name][i] its value of each of REWARD_NAMES and of each extra term. `weights` is
    checked here, before any scoring, with the error `combine_rewards` gives.
    """
    _check_weights(weights)
    terms = [(k, BUILTIN_REWARDS[k], weights.get(k, 0.0)) for k in REWARD_NAMES]  # a copy of the weights
    clash = sorted({name for name, _, _ in extra} & set(REWARD_NAMES))
    if clash:
        raise RewardError(f"reward plug-in named {clash[0]!r} clashes with a built-in reward; rename the function")
    return RewardSum(terms + list(extra))


def load_reward(spec: str) -> tuple[str, Callable, float]:
    """One --reward value -> (name, function, weight).

    spec: "path/to/file.py:function" or "package.module:function", optionally "=weight" at the end
    (default 1.0), e.g. "rewards/length.py:short=0.5". The name logged (reward/<name>) is the
    function's name. Raises RewardError with one line for a bad spec, file, module or function.
    """
    target, weight = spec.strip(), 1.0
    head, eq, tail = target.rpartition("=")
    if eq:
        try:
            target, weight = head, float(tail)
        except ValueError:
            raise RewardError(f"--reward {spec!r}: weight {tail!r} is not a number; write path.py:function=0.5")
    where, colon, name = target.rpartition(":")
    if not colon or not where or not name.isidentifier():
        raise RewardError(f"--reward {spec!r}: write path/to/file.py:function or module:function (optionally =weight)")
    if where.endswith(".py") or "/" in where or os.sep in where:
        module = _load_file(where, spec)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise RewardError(f"--reward {spec!r}: cannot import module {where!r} ({e}); for a file write "
                              "path/to/file.py:function") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        have = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise RewardError(f"--reward {spec!r}: {where} has no function {name!r} (it has: {', '.join(have) or 'none'})")
    return name, fn, weight


def _load_file(path: str, spec: str):
    if not os.path.isfile(path):
        raise RewardError(f"--reward {spec!r}: file {path!r} not found; check the path")
    module_spec = importlib.util.spec_from_file_location(f"reward_plugin_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the person's file: its error in one line, not our traceback
        raise RewardError(f"--reward {spec!r}: loading {path} failed: {type(e).__name__}: {e}") from None
    return module


def load_rewards(specs: str) -> list[tuple[str, Callable, float]]:
    """The comma-separated --reward values (the flag may be repeated) -> [(name, function, weight)]."""
    return [load_reward(s) for s in specs.split(",") if s.strip()]


# --- benchmark -------------------------------------------------------------------------------------


def hostile_inputs() -> dict[str, str]:
    """Responses built to be slow: megabytes of unclosed tags, towers of powers, deep nesting."""
    mb, box = 1 << 20, lambda a: "<think>x</think><answer>" + a + "</answer>"
    return {"1 MB unclosed <think>": "<think>" + "a" * mb, "1 MB of <answer>": "<answer>" * (mb // 8),
            "1 MB of '{' in the answer": box("{" * mb), "1 MB of digits in the answer": box("9" * mb),
            "9**9**9": box("9**9**9"), "9^9^9^9": box("9^9^9^9"), "2^2^...^2 (300)": box("2^" * 300 + "2"),
            "999 '('": box("(" * 999), "100 nested sqrt": box("\\sqrt{" * 100 + "2" + "}" * 100),
            "140 nested boxed": box("\\boxed{" * 140), "(1+sqrt2)^4000": box("(1+\\sqrt{2})^{4000}"),
            "countdown nesting": box("(" * 95 + "1" + ")" * 95),
            "countdown 9*9*...": box("*".join(["9"] * 99)),
            "1 MB CJK with '<', valid": "<think>" + "\u6c49<" * (mb // 2) + "</think><answer>1</answer>",
            "1 MB dotted I, valid": "<think>" + "\u0130 " * (mb // 2) + "</think><answer>1</answer>"}


def benchmark(rounds: int = 500) -> tuple[float, float, str]:
    """(reward calls per second on realistic responses, worst seconds on a hostile one, its name)."""
    step = "She sells 16 - 3 - 4 = 9 eggs a day at $2 each, so 9 * 2 = 18 dollars. "
    think = "<think> " + step * 12 + "</think>\n"
    math_cases = [(think + "<answer>$1,080</answer>", "1080"), (think + "<answer>18 or 20</answer>", "18"),
                  (think + "<answer>The answer is \\boxed{\\frac{3}{4}}.</answer>", "0.75")]
    countdown = think + "<answer>(3 + 5) * 4 - 7</answer>"
    t0, calls = time.perf_counter(), 0
    for _ in range(rounds):
        for completion, gold in math_cases:
            math_reward(completion, gold), format_reward(completion), language_reward(completion, "How many?")
        countdown_reward(countdown, [3, 5, 4, 7], 25)
        calls += 3 * len(math_cases) + 1
    rate = calls / (time.perf_counter() - t0)
    worst, worst_name = 0.0, ""
    for name, h in hostile_inputs().items():
        for f in (lambda: math_reward(h, "18"), lambda: countdown_reward(h, [1, 9], 9),
                  lambda: format_reward(h), lambda: language_reward(h, "How many?"),
                  lambda: parse_gold(extract_answer(h))):
            t0 = time.perf_counter()
            f()
            seconds = time.perf_counter() - t0
            if seconds > worst:
                worst, worst_name = seconds, name
    return rate, worst, worst_name


if __name__ == "__main__":
    rate, worst, name = benchmark()
    print(f"realistic responses (~900 chars): {rate:,.0f} reward calls/s on one core")
    print(f"hostile responses ({len(hostile_inputs())}, up to 1 MB; 5 functions each): "
          f"worst call {worst * 1e3:.2f} ms ({name})")
