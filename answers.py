"""Reading an answer as a value: the exact-number parser behind the accuracy reward.

DeepSeek-R1 (arXiv:2501.12948) §2.2.2 checks the final answer, given "in a specified format (e.g.,
within a box)", by rules it does not list; these are ours. `parse_answer` reads an answer block,
`parse_gold` a dataset's gold (loaders call it on every gold, so a bad one fails at load time),
`parse_choice` a multiple-choice answer. rewards.py compares the values.
Standard library only. Reading is linear: regexes have no nested quantifiers, and every parse is
capped (length, digits, nesting, bits of every intermediate, exponent) before any arithmetic;
`python rewards.py` measures calls on real and hostile 1 MB responses.

Departures and choices the report does not make:
- Exact equality only. Values are sums of q * sqrt(r) * pi^k with rational q: integers, decimals,
  fractions, mixed numbers, percents (50% == 50: no x100 guessing), surds, multiples of pi,
  +-infinity, tuples and intervals (order and openness matter), unordered bare lists and
  multiple-choice letters. General symbolic equivalence (x+1 == 1+x, sin, log, 1/(1+sqrt 2)) is out
  of scope: such answers parse to None and are not paid. A checker for it (e.g. sympy in a
  subprocess with a wall-clock limit) would be called only where `parse_answer` returns None.
- Unit and sentence words in a response are dropped ("She makes $18."); words that hedge or change
  a value ("or", "not", "about", "thousand", number words) and words touching an operator ("x+1")
  make it unreadable. A gold may hold words only inside \\text{}, so "banana" fails at load time.
- Several \\boxed{} that disagree are a hedge, like two answer blocks: no value.
"""
from __future__ import annotations

import itertools
import math
import re
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

# Caps, checked before any arithmetic. Each is far above what a real answer needs.
MAX_ANSWER_CHARS = 1000   # an answer block holds a value, not a solution
MAX_DIGITS = 100          # per number literal (CPython refuses int() of > 4300 digits anyway)
MAX_BITS = 4096           # numerator and denominator of every intermediate value
MAX_DEPTH = 32            # nesting of brackets, signs and exponents
MAX_TERMS = 16            # distinct sqrt(r) * pi^k terms in one value
MAX_PI_POWER = 16
MAX_RADICAND = 10 ** 8    # sqrt(n) is reduced by trial division up to cbrt(n): <= 464 steps

# --- exact numbers: a value is {(r, k): q}, the sum of q * sqrt(r) * pi**k ---------------------------
# r is square-free and q a nonzero Fraction. The sqrt(r) * pi**k are linearly independent over the
# rationals (pi is transcendental), so two values are equal exactly when their dicts are.


class _Reject(Exception):
    """Internal: not a value we read exactly. Caught in this module, never raised to a caller."""


def _check(v: dict) -> dict:
    if len(v) > MAX_TERMS:
        raise _Reject
    for (r, k), q in v.items():
        if max(q.numerator.bit_length(), q.denominator.bit_length()) > MAX_BITS or abs(k) > MAX_PI_POWER \
                or r > MAX_RADICAND ** 2:
            raise _Reject
    return v


def _num(v) -> dict:
    if not isinstance(v, dict):  # infinity takes part in no arithmetic
        raise _Reject
    return v


def _rational(q: Fraction) -> dict:
    return {(1, 0): q} if q else {}


def _add(a, b) -> dict:
    out = dict(_num(a))
    for key, q in _num(b).items():
        s = out.get(key, 0) + q
        if s:
            out[key] = s
        else:
            out.pop(key, None)
    return _check(out)


def _neg(a):
    if isinstance(a, tuple):  # ("inf", sign)
        return ("inf", -a[1])
    return {key: -q for key, q in a.items()}


def _mul(a, b) -> dict:
    out = {}
    for ((r1, k1), q1), ((r2, k2), q2) in itertools.product(_num(a).items(), _num(b).items()):
        g = math.gcd(r1, r2)  # sqrt(g*x) * sqrt(g*y) = g * sqrt(x*y), and x*y is square-free
        out = _add(out, {((r1 // g) * (r2 // g), k1 + k2): q1 * q2 * g})
    return out


def _inv(a) -> dict:
    if len(_num(a)) != 1:  # zero, or a sum: 1/(1+sqrt 2) would need rationalising (out of scope)
        raise _Reject
    ((r, k), q), = a.items()
    return _check({(r, -k): 1 / (q * r)})  # 1/(q sqrt(r) pi^k) = sqrt(r)/(q r) pi^-k


def _as_rational(a) -> Fraction:
    if not _num(a):
        return Fraction(0)
    if list(a) != [(1, 0)]:
        raise _Reject
    return a[(1, 0)]


def _pow(a, e) -> dict:
    a, e = _num(a), _as_rational(e)
    if e.denominator != 1 or abs(e) > MAX_BITS:
        raise _Reject
    e = int(e)
    if e < 0:
        return _inv(_pow(a, {(1, 0): Fraction(-e)}))
    if e and any(max(q.numerator.bit_length(), q.denominator.bit_length()) * e > MAX_BITS
                 for q in a.values()):
        raise _Reject  # refuse before computing: 9^(9^9) never runs
    out, base = _rational(Fraction(1)), a
    while e:  # square and multiply, every step capped by _check
        if e & 1:
            out = _mul(out, base)
        e >>= 1
        if e:
            base = _mul(base, base)
    return out


@lru_cache(maxsize=4096)
def _split_square(n: int) -> tuple[int, int]:
    """n = s*s*r with r square-free, for 0 < n <= MAX_RADICAND."""
    s, r, p = 1, 1, 2
    while p * p * p <= n:
        while n % (p * p) == 0:
            n //= p * p
            s *= p
        if n % p == 0:
            n //= p
            r *= p
        p += 1 if p == 2 else 2
    t = math.isqrt(n)  # what is left has at most two prime factors, all >= p: a square or square-free
    return (s * t, r) if t * t == n else (s, r * n)


def _root(a, index) -> dict:
    q, k = _as_rational(a), _as_rational(index)
    if k.denominator != 1 or not 2 <= k <= 64 or (q < 0 and k % 2 == 0):
        raise _Reject
    if not q:
        return {}
    if k == 2:
        n, d = q.numerator, q.denominator
        rn, rd = math.isqrt(n), math.isqrt(d)
        if rn * rn == n and rd * rd == d:
            return _rational(Fraction(rn, rd))
        if n * d > MAX_RADICAND:
            raise _Reject
        s, r = _split_square(n * d)  # sqrt(n/d) = sqrt(n*d)/d
        return {(r, 0): Fraction(s, d)}
    parts = []
    for x in (abs(q.numerator), q.denominator):  # higher roots: exact rational results only
        if x.bit_length() > 1000:
            raise _Reject
        guess = round(x ** (1 / int(k)))
        parts.append(next((g for g in (guess - 1, guess, guess + 1) if g >= 0 and g ** int(k) == x), None))
    if None in parts:
        raise _Reject
    return _rational(Fraction(parts[0], parts[1]) * (1 if q > 0 else -1))


def _canon(v):
    """A hashable canonical form: ("num", sorted terms) or ("inf", +-1)."""
    return v if isinstance(v, tuple) else ("num", tuple(sorted(v.items())))


# --- tokens ----------------------------------------------------------------------------------------


class _Tok(NamedTuple):
    kind: str              # num op open close comma eq frac sqrt pi inf word
    text: str
    space: bool            # whitespace right before it: tells "is -5" from "x-5"
    in_text: bool          # inside \text{...}: a unit word, allowed even in a gold
    value: Fraction | None = None
    is_int: bool = False


_UNICODE = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-", "\u00d7": "*", "\u22c5": "*",
                          "\u00b7": "*", "\u00f7": "/", "\u03c0": "\\pi ", "\u221e": "\\infty ",
                          "\u221a": "\\sqrt", "\u00b0": " ", "\u20ac": " ", "\u00a3": " ", "\u00a5": " ",
                          "\u20b9": " ", "\u00a0": " ", "\u2009": " ", "\u202f": " "})
# Plain replacements, each one linear: LaTeX thousands separators, degrees, markdown bold.
_REPLACE = (("{,}", ","), ("\\!", ""), ("^{\\circ}", " "), ("^\\circ", " "), ("**", " "))
_COMMANDS = {"frac": ("frac", "frac"), "dfrac": ("frac", "frac"), "tfrac": ("frac", "frac"),
             "cfrac": ("frac", "frac"), "sqrt": ("sqrt", "sqrt"), "pi": ("pi", "pi"), "infty": ("inf", "inf"),
             "cdot": ("op", "*"), "times": ("op", "*"), "div": ("op", "/"), "in": ("eq", "=")}
_TEXT_COMMANDS = {"text", "textbf", "textit", "textrm", "textnormal", "mathrm", "mathbf", "mbox"}
_IGNORED_COMMANDS = {"left", "right", "displaystyle", "big", "Big", "bigl", "bigr", "Bigl", "Bigr",
                     "quad", "qquad", "circ", "degree"}
_DROPPED = set("$%#?:\"'`")  # currency, percent (50% == 50), markdown and sentence marks
_ESCAPE_SPACES = set(",;: \\")  # \, \; \: \<space> \\
# Words that change or hedge a value: their presence makes the answer unreadable, never stripped.
_HEDGE_WORDS = set("""or nor not no isn never either neither except minus negative plus times approximately approx about
around roughly nearly almost estimated maybe perhaps between least most less more than over under
above below fewer hundred thousand million billion trillion dozen half quarter twice double triple
squared cubed k zero one two three four five six seven eight nine ten eleven twelve thirteen
fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty
ninety""".split())
_DIGITS = "0123456789"


def _scan_number(s: str, i: int, thousands: bool) -> tuple[int, str, str]:
    """Read digits[,ddd...][.digits] at s[i]: (end, integer digits, fraction digits)."""
    n, j = len(s), i
    while j < n and s[j] in _DIGITS:
        j += 1
    whole = s[i:j]
    if thousands and 1 <= len(whole) <= 3 and whole[0] != "0":
        while j + 3 < n and s[j] == "," and all(c in _DIGITS for c in s[j + 1:j + 4]) \
                and (j + 4 == n or s[j + 4] not in _DIGITS):  # 1,080 yes; 1,08 and 1,0800 no
            whole += s[j + 1:j + 4]
            j += 4
    frac = ""
    if j + 1 < n and s[j] == "." and s[j + 1] in _DIGITS:
        k = j + 1
        while k < n and s[k] in _DIGITS:
            k += 1
        frac, j = s[j + 1:k], k
    if (len(whole) > 1 and whole[0] == "0") or len(whole) + len(frac) > MAX_DIGITS:
        raise _Reject  # 08 is no number; a 101-digit literal is not an answer
    return j, whole, frac


def _tokenize(s: str) -> list[_Tok]:
    toks: list[_Tok] = []
    braces: list[bool] = []  # one per open '{': True for a \text{...} group, which emits nothing
    i, n, space, text_next, single_digits, parens = 0, len(s), False, False, 0, 0

    def emit(kind, text, **kw):
        nonlocal space, single_digits
        toks.append(_Tok(kind, text, space, True in braces, **kw))
        space, single_digits = False, 0

    while i < n:
        c = s[i]
        if c.isspace():
            space, i = True, i + 1
        elif c in _DIGITS or (c == "." and i + 1 < n and s[i + 1] in _DIGITS):
            left = single_digits if c != "." else 0  # \frac12 and \sqrt2 take one digit per argument
            if left:
                j, whole, frac = i + 1, c, ""
            else:  # thousands separators only outside ( and [: (1,234) is a pair
                j, whole, frac = _scan_number(s, i, thousands=parens == 0)
            emit("num", s[i:j], value=Fraction(int(whole + frac or "0"), 10 ** len(frac)), is_int=not frac)
            single_digits, i = max(left - 1, 0), j
        elif c.isalpha():
            j = i + 1
            while j < n and s[j].isalpha():
                j += 1
            emit("word", s[i:j])
            i = j
        elif c == "\\":
            j = i + 1
            while j < n and s[j].isascii() and s[j].isalpha():
                j += 1
            name, i = s[i + 1:j], max(j, i + 2)
            if not name:
                symbol = s[i - 1:i]
                if symbol in _ESCAPE_SPACES:
                    space = True
                elif symbol not in ("$", "%"):
                    raise _Reject  # \{ \_ \& ...
            elif name in _COMMANDS:
                emit(*_COMMANDS[name])
                single_digits = {"frac": 2, "sqrt": 1}.get(_COMMANDS[name][0], 0)
            elif name in _TEXT_COMMANDS:
                text_next = True
            elif name not in _IGNORED_COMMANDS:
                raise _Reject  # \sin, \log, \pm, \le, \approx, \boxed inside a box, ...
            continue
        elif c == "{":
            if text_next:
                braces.append(True)
            else:
                braces.append(False)
                emit("open", c)
            i += 1
        elif c in "([":
            parens += 1
            emit("open", c)
            i += 1
        elif c in ")]}":
            if c == "}" and braces and braces.pop():
                i += 1
                continue
            parens -= c != "}"
            emit("close", c)
            i += 1
        elif c in "+-*/^":
            emit("op", c)
            i += 1
        elif c in ",;":
            emit("comma", ",")
            i += 1
        elif c == "=":
            emit("eq", c)
            i += 1
        elif c == "." or c in _DROPPED:
            i += 1  # a '.' not before a digit ends a sentence
        else:
            raise _Reject  # ! (factorial), ~, <, _, |, emoji, non-ASCII digits, ...
        text_next = text_next and (c == "\\" or c.isspace())  # \text's group comes next
    return toks


def _drop_words(toks: list[_Tok], strict: bool) -> list[_Tok]:
    """Remove unit and sentence words ("$18 in total", "5 cm", "x = 5"); reject words that touch
    an operator ("x+1", "2*y", "f(3)"), hedge or change a value ("18 or 20", "5 thousand"), and,
    in a gold (`strict`), any word outside \\text{}."""
    merged: list[_Tok] = []
    for t in toks:
        if t.kind == "word" and len(merged) > 1 and merged[-1].kind == "op" and merged[-1].text == "/" \
                and merged[-2].kind == "word":
            merged.pop()  # "km/h" is one unit word
        else:
            merged.append(t)
    toks, out = merged, []
    for i, t in enumerate(toks):
        if t.kind != "word":
            out.append(t)
            continue
        prev, nxt = (toks[i - 1] if i else None), (toks[i + 1] if i + 1 < len(toks) else None)
        after = toks[i + 2] if i + 2 < len(toks) else None
        sign = (nxt is not None and nxt.kind == "op" and nxt.text in "+-" and nxt.space and after is not None
                and not after.space and after.kind in ("num", "sqrt", "pi", "frac", "open", "inf"))
        if (t.text.lower() in _HEDGE_WORDS or (strict and not t.in_text)
                or (prev is not None and prev.kind == "op")
                or (nxt is not None and nxt.kind == "op" and not sign)   # "is -5" is a sign
                or (nxt is not None and nxt.text == "(" and not nxt.space)):
            raise _Reject
    return out


# --- the value parser -------------------------------------------------------------------------------


_MIXED_BRACED = [("frac", False), ("open", False), ("num", True), ("close", False),
                 ("open", False), ("num", True), ("close", False)]
_MIXED_BARE = [("frac", False), ("num", True), ("num", True)]


class _Parser:
    """Recursive descent over tokens; every value is exact and every recursion is depth-capped.

    expr := term (('+'|'-') term)*        term := unary (('*'|'/') unary | implicit)*
    unary := ('+'|'-') unary | power      power := primary ('^' unary)?
    primary := number [mixed \\frac] | (expr) | {expr} | \\frac A B | \\sqrt[n] A | \\pi | \\infty
    Juxtaposition multiplies only before \\sqrt, \\pi and \\frac (2\\pi, 3\\sqrt{2}): "18 20" is a list.
    """

    def __init__(self, toks: list[_Tok]):
        self.toks, self.i, self.depth = toks, 0, 0

    def peek(self, k: int = 0) -> _Tok | None:
        return self.toks[self.i + k] if self.i + k < len(self.toks) else None

    def take(self, kind: str | None = None, text: str | None = None) -> _Tok:
        t = self.peek()
        if t is None or (kind and t.kind != kind) or (text and t.text != text):
            raise _Reject
        self.i += 1
        return t

    def at(self, kind: str, texts: str | None = None) -> bool:
        t = self.peek()
        return t is not None and t.kind == kind and (texts is None or t.text in texts)

    def parse(self):
        v = self.expr()
        if self.peek() is not None:
            raise _Reject  # leftovers: "18 20", "3)", ...
        return v

    def expr(self):
        v = self.term()
        while self.at("op", "+-"):
            op, rhs = self.take().text, self.term()
            v = _add(v, rhs if op == "+" else _neg(rhs))
        return v

    def term(self):
        v = self.unary()
        while True:
            if self.at("op", "*/"):
                op, rhs = self.take().text, self.unary()
                v = _mul(v, rhs if op == "*" else _inv(rhs))
            elif self.at("sqrt") or self.at("pi") or self.at("frac"):
                v = _mul(v, self.power())
            else:
                return v

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject

    def unary(self):  # every recursion passes here or through arg(): both count depth
        self.enter()
        if self.at("op", "+-"):
            v = self.unary() if self.take().text == "+" else _neg(self.unary())
        else:
            v = self.power()
        self.depth -= 1
        return v

    def power(self):
        base = self.primary()
        if self.at("op", "^"):
            self.take()
            return _pow(base, self.unary())
        return base

    def arg(self):  # a \frac or \sqrt argument: {expr} or one token (\frac12, \sqrt\pi)
        self.enter()
        if self.at("open", "{"):
            self.take()
            v = self.expr()
            self.take("close", "}")
        else:
            v = self.primary()
        self.depth -= 1
        return v

    def primary(self):
        t = self.take()
        if t.kind == "num":
            # A mixed number: 2\frac{1}{2} (or 2\frac12) is 5/2, not 2 * 1/2.
            after = [(m.kind, m.is_int) for m in self.toks[self.i:self.i + 7]]
            if t.is_int and after == _MIXED_BRACED:
                a, b, self.i = self.toks[self.i + 2].value, self.toks[self.i + 5].value, self.i + 7
            elif t.is_int and after[:3] == _MIXED_BARE:
                a, b, self.i = self.toks[self.i + 1].value, self.toks[self.i + 2].value, self.i + 3
            else:
                return _rational(t.value)
            if not b:
                raise _Reject
            return _rational(t.value + a / b)
        if t.kind == "open" and t.text in "({":
            v = self.expr()
            self.take("close", ")" if t.text == "(" else "}")
            return v
        if t.kind == "frac":
            num = self.arg()
            return _mul(num, _inv(self.arg()))
        if t.kind == "sqrt":
            index = _rational(Fraction(2))
            if self.at("open", "["):
                self.take()
                index = self.expr()
                self.take("close", "]")
            return _root(self.arg(), index)
        if t.kind == "pi":
            return {(1, 1): Fraction(1)}
        if t.kind == "inf":
            return ("inf", 1)
        raise _Reject


def _split(toks: list[_Tok], kind: str) -> list[list[_Tok]]:
    """Split at `kind` tokens outside brackets."""
    parts, depth = [[]], 0
    for t in toks:
        depth += (t.kind == "open") - (t.kind == "close")
        if t.kind == kind and depth == 0:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts


def _expr_value(toks: list[_Tok]):
    signed = bool(toks) and toks[0].kind == "op" and toks[0].text in "+-"
    body = toks[1:] if signed else toks
    if ([(t.kind, t.is_int) for t in body] == [("num", True), ("num", True), ("op", False), ("num", True)]
            and body[1].space and body[2].text == "/" and body[3].value):  # the mixed number "2 1/2"
        v = body[0].value + body[1].value / body[3].value
        return _canon(_rational(-v if signed and toks[0].text == "-" else v))
    return _canon(_Parser(toks).parse())


def _segment_value(toks: list[_Tok]):
    """One '='-separated segment: None for a label ("x", "Total"), else a canonical value."""
    if not toks:
        return None
    inner = _split(toks[1:-1], "comma")
    closes_at_end = all(d > 0 for d in itertools.accumulate(
        (t.kind == "open") - (t.kind == "close") for t in toks[:-1]))
    if (len(inner) > 1 and toks[0].kind == "open" and toks[0].text in "([" and toks[-1].kind == "close"
            and toks[-1].text in ")]" and closes_at_end):  # (1, 2], [0, \infty): order and ends matter
        return ("seq", toks[0].text, tuple(_expr_value(p) for p in inner), toks[-1].text)
    items = _split(toks, "comma")
    if len(items) > 1:  # a bare list "1, -2": unordered
        return ("set", tuple(sorted((_expr_value(p) for p in items), key=repr)))
    return _expr_value(toks)


def _boxed(text: str) -> list[str]:
    """Contents of the outermost balanced \\boxed{...}, in order; one linear pass."""
    spans, stack, in_box = [], [], False  # stack: per open '{', where its box content starts, or -1
    for i, c in enumerate(text):
        if c == "{":
            opens_box = not in_box and text.endswith("\\boxed", 0, i)
            stack.append(i + 1 if opens_box else -1)
            in_box = in_box or opens_box
        elif c == "}" and stack:
            start = stack.pop()
            if start >= 0:
                spans.append(text[start:i])
                in_box = False
    return spans


def _parse_plain(text: str, strict: bool):
    s = text.translate(_UNICODE)
    for old, new in _REPLACE:
        s = s.replace(old, new)
    try:
        segments = [_segment_value(seg) for seg in _split(_drop_words(_tokenize(s), strict), "eq")]
    except _Reject:
        return None
    final = segments[-1]
    if final is None or any(v is not None and v != final for v in segments[:-1]):
        return None  # "3 * 24 = 72" pays 72; "18 = 20" and "x =" pay nothing
    return final


def parse_answer(text: str, strict: bool = False):
    """The canonical value of an answer's text, or None. The last balanced \\boxed{} wins, but boxes
    that disagree are a hedge. `strict` (golds) refuses words outside \\text{}."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    boxes = _boxed(text)
    values = {_parse_plain(b, strict) for b in boxes} if boxes else {_parse_plain(text, strict)}
    return values.pop() if len(values) == 1 else None


_CHOICE_GOLD = re.compile(r"(?:\\text(?:bf)?\{)?\(?([A-J])\)?\}?")  # B, (B), \text{(B)}; no nesting


def parse_choice(text: str):
    """A multiple-choice answer: exactly one standalone capital A-J in the text, no hedge word."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    letters = set()
    for word in re.findall(r"[A-Za-z]+", text):
        if word.lower() in _HEDGE_WORDS:
            return None
        if len(word) == 1 and "A" <= word <= "J":
            letters.add(word)
    return ("choice", letters.pop()) if len(letters) == 1 else None


@lru_cache(maxsize=65536)  # one entry per distinct gold of at most MAX_ANSWER_CHARS
def _parse_gold(gold: str):
    m = _CHOICE_GOLD.fullmatch(gold.strip())
    return ("choice", m[1]) if m else parse_answer(gold, strict=True)


def parse_gold(gold: str):
    """The canonical value of a gold answer, or None when it cannot be read exactly. Dataset loaders
    call it on every gold so that an unreadable one fails at load time with its file and line."""
    if isinstance(gold, int) and not isinstance(gold, bool):
        gold = str(gold)
    return _parse_gold(gold) if isinstance(gold, str) and len(gold) <= MAX_ANSWER_CHARS else None
