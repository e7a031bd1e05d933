"""The embedded toy task: a + b in English and Chinese, small enough to run the whole recipe on a CPU.

`ToyArithmetic` ("toy" in `tasks.get_task`) gives a + b problems, their gold answers and ideal
responses, and a generated pretraining corpus, `pretrain_corpus()`, for a ~1M-parameter
character-level model (`tokenizer.build_char_tokenizer(ToyArithmetic().alphabet())`). With it the
whole recipe shows its R1-Zero curves on a 2-core CPU.

The corpus mixes worked (chain-of-thought) answers, direct answers, wrong answers and worked answers
in the other language (`ToyConfig` sets the shares), so the base model mostly answers directly (and
often wrongly) under greedy decoding but sometimes thinks when sampled; GRPO with accuracy + format
rewards then raises accuracy and response length together (DeepSeek-R1 report, §2.2.4, Figures 2
and 3). Operands have 2 or 3 digits, and the harder the problem the rarer its worked solution in
the corpus (`worked_decay`), so R1-Zero's accuracy climbs over tens of steps instead of saturating
in ten as it did on 2-digit sums alone (`--max_digits 2`, the first toy); 3-digit problems are
worked in English only (`zh_think_max_digits`), so R1-Zero's reasoning on hard Chinese prompts comes
out in English (the report's language mixing) in every seed rather than by chance.

A small share of the corpus is general requests ("name a color"), answered well or in one
of three dispreferred ways; `general_samples()` and `preference_pairs()` give the non-verifiable
prompts of stages 3-4 (rejection sampling, a preference reward model).

Samples follow the dict contract in tasks.py's docstring.

Departures:
- The prompt is a compressed R1-Zero template (`User: 478+56=? Assistant:`): a character-level
  model pays one token per character, and Table 1's 400-character preamble would be 90% of every
  sequence. The tags and the think-then-answer structure are kept.
- The chain of thought always states the carry ("carry 0" / "进0"), one step per digit; a regular,
  local step is easier for a tiny model to learn, and every step carries a word of its language,
  so the language-consistency reward (R1 report §2.3.2) has something to read.
- The held-out split hashes the unordered pair {a, b}, so b + a of a held-out a + b is held out too.
- General (non-verifiable) prompts are tiny templated requests, not the report's human-written
  data; they exist so stages 3-4 run end to end on the toy.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterator

from data import DataError, seeded_rng, stable_fraction
from tokenizer import TOY_EOS

EOS_TEXT = TOY_EOS  # ends every pretraining document: "<|endoftext|>"


# --- text: templates and responses ----------------------------------------------------------------

# Compressed R1-Zero template (see Departures); `q` is the question, the response follows the colon.
TOY_TEMPLATES = {"en": "User: {q} Assistant:", "zh": "用户: {q} 助手:"}
# One digit step: "7+5+1=13 carry 1, so 34." / "7+5+1=13 进1，得34。" ("+1" only when a carry comes
# in). "so" is the answer's digits written so far (the last step includes the final carry), so the
# answer is a copy of the last step's result: each step reads only nearby text, which a 1M-parameter
# character model learns; assembling the digits in reverse at the end, it did not.
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


# --- problems, corpus, samples --------------------------------------------------------------------

def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ToyConfig:
    min_digits: int = _setting(2, "toy: fewest digits in an operand (1 allows 0..9)")
    # 2..3 digits: a range of difficulty. `--max_digits 2` is the first toy (2-digit sums only, on
    # which R1-Zero saturates within ten steps); the two corpus settings below change nothing
    # there. With 2..4 or 1..3 digits, 600 pretraining steps left the base misreading the digits
    # (held-out accuracy 0.00-0.04) and R1-Zero did not move it in 30 steps.
    max_digits: int = _setting(3, "toy: most digits in an operand (each operand's count is uniform in "
                                  "min..max)")
    zh_frac: float = _setting(0.3, "toy: share of prompts written in Chinese")
    eval_frac: float = _setting(0.1, "toy: share of problems held out (by a hash of the pair)")
    eval_seed: int = _setting(0, "toy: seed of the fixed held-out list")
    # Pretraining corpus mix over arithmetic documents (sums to 1):
    worked_frac: float = _setting(0.30, "toy corpus: think + answer, right, in the prompt's language")
    direct_frac: float = _setting(0.45, "toy corpus: answer only, right (what greedy decoding mostly picks)")
    wrong_frac: float = _setting(0.15, "toy corpus: final answer off (steps right), half worked, half direct")
    cross_lang_frac: float = _setting(0.10, "toy corpus: worked and right, steps in the other language")
    worked_decay: float = _setting(0.5, "toy corpus: the worked share is multiplied by this for each digit "
                                        "the longer operand has beyond min_digits (the rest answer directly)")
    zh_think_max_digits: int = _setting(2, "toy corpus: Chinese chains of thought only on problems up to "
                                           "this many digits; longer ones are worked in English")
    wrong_max_delta: int = _setting(9, "toy corpus: a wrong answer is off by 1..wrong_max_delta")
    general_doc_frac: float = _setting(0.05, "toy corpus: share of all documents that are general requests")
    general_good_frac: float = _setting(0.4, "toy corpus: share of general documents answered well (the "
                                             "rest: rambling, wrong language, unformatted)")

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"ToyConfig: need 1 <= min_digits <= max_digits, got {self.min_digits}, "
                             f"{self.max_digits}; fix the digit settings")
        mix = self.worked_frac + self.direct_frac + self.wrong_frac + self.cross_lang_frac
        if abs(mix - 1.0) > 1e-6:
            raise ValueError(f"ToyConfig: worked/direct/wrong/cross_lang fractions sum to {mix:.3f}; "
                             "make them sum to 1")
        if self.zh_think_max_digits < 1:
            raise ValueError(f"ToyConfig: zh_think_max_digits={self.zh_think_max_digits}; use at least 1")
        for name in ("zh_frac", "general_doc_frac", "general_good_frac", "worked_decay"):
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
        return stable_fraction(f"toy:{min(a, b)}+{max(a, b)}") < self.cfg.eval_frac

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
            yield self.sample(*self._problem(seeded_rng("toy-train", seed, i), heldout=False))
            i += 1

    def eval_samples(self, n: int = 256) -> list[dict]:
        """n distinct held-out problems from a fixed seed; eval_samples(k) is a prefix of eval_samples(n)."""
        rng, seen, out, misses = seeded_rng("toy-eval", self.cfg.eval_seed), set(), [], 0
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
        raise DataError(f"only {len(out)} distinct held-out toy problems found, asked for {n}; "
                        "ask for fewer (--eval_n) or raise --max_digits / --eval_frac")

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
        """One arithmetic document. The harder the problem, the rarer its worked solution (the
        worked share decays with the digit count, the rest answer directly), and hard problems are
        worked in English only: the base model seldom thinks on them, and when it learns to, a
        Chinese prompt's reasoning comes out in English (R1 §2.2.4's language mixing)."""
        cfg = self.cfg
        a, b, lang = self._problem(rng, heldout=False)
        digits = max(len(str(a)), len(str(b)))
        keep = cfg.worked_decay ** max(digits - cfg.min_digits, 0)  # of each worked share; the rest: direct
        short = digits <= cfg.zh_think_max_digits
        think, other = (lang, OTHER_LANG[lang]) if short else ("en", "en")
        worked, cross = cfg.worked_frac * keep, cfg.cross_lang_frac * keep
        direct = 1.0 - cfg.wrong_frac - worked - cross
        r = rng.random()
        if r < worked:
            resp = worked_response(a, b, think)
        elif r < worked + direct:
            resp = direct_response(a + b)
        elif r < worked + direct + cfg.wrong_frac:
            delta = rng.randint(1, cfg.wrong_max_delta)
            wrong = a + b + delta if (rng.random() < 0.5 or a + b < delta) else a + b - delta
            resp = worked_response(a, b, think, wrong) if rng.random() < 0.5 * keep else direct_response(wrong)
        else:
            resp = worked_response(a, b, other)
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
        rng = seeded_rng("toy-corpus", seed)
        docs = []
        for _ in range(n_docs):
            doc = self._general_doc(rng) if rng.random() < self.cfg.general_doc_frac else self._arith_doc(rng)
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
            rng = seeded_rng("toy-general", seed, i)
            lang = self._lang(rng)
            request, answers = rng.choice(GENERAL_TEMPLATES)[lang]
            yield {"task": "general", "prompt": toy_prompt(request, lang), "question": request,
                   "answers": list(answers), "lang": lang, "source": "toy-general"}
            i += 1

    def preference_pairs(self, n: int, seed: int = 0) -> list[dict]:
        """n {prompt, chosen, rejected}: chosen is concise and in the prompt's language; rejected is
        in the wrong language, rambling, or missing the think/answer format (a third each)."""
        rng, out = seeded_rng("toy-pref", seed), []
        for _ in range(n):
            t = rng.choice(GENERAL_TEMPLATES)
            lang = self._lang(rng)
            request, answers = t[lang]
            out.append({"prompt": toy_prompt(request, lang),
                        "chosen": general_response(request, rng.choice(answers), lang),
                        "rejected": _rejected_response(t, lang, rng.choice(REJECTED_KINDS), rng)})
        return out


if __name__ == "__main__":
    toy = ToyArithmetic()
    for doc in toy.pretrain_corpus(8, seed=0):
        print(doc)
    print(toy.alphabet())
