"""Tests for rewards.py (the parser's own golds and caps are in test_answers.py).

- Every GSM8K test gold, written back as a model would write it, is paid; perturbed values are not.
- Tables of hard cases for each reward, in both directions (paid / not paid).
- Slow references beside the fast code: a Python-`ast` evaluator for Countdown, a backtracking regex
  for the format, Fraction arithmetic on random expression trees for the math parser.
- Property tests: no input raises, every call is fast, every reward is a float in [0, 1].
- `rule_reward`, the RL loop's reward function, against `combine_rewards` called per completion.
- The benchmark line (`python rewards.py` prints the same numbers).

Timing asserts use FAST, far above what a typical call takes (`python rewards.py` measures it),
because the CPU is shared.
"""
import ast
import itertools
import json
import operator
import re
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import answers as A
import rewards as R

GSM8K_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
# Seconds: the most any single call may take, hostile 1 MB inputs included. A linear scan of 1 MB
# takes a few ms; a quadratic or backtracking regex takes minutes, so 0.5 s tells them apart with
# room for a CPU shared with other jobs.
FAST = 0.5


def box(answer: str, think: str = "She sells 16 - 3 - 4 = 9 eggs at $2 each.") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


# --- GSM8K -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not (GSM8K_DIR / "test.jsonl").is_file(), reason="GSM8K data not present")
def test_every_gsm8k_gold_is_paid_as_a_model_writes_it_and_a_perturbed_one_is_not():
    lines = (GSM8K_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines()
    golds = [json.loads(line)["answer"].split("####")[-1].strip() for line in lines if line.strip()]
    assert len(golds) == 1319
    for gold in golds:
        assert R.parse_gold(gold) is not None, gold
        v = int(gold.replace(",", ""))
        for written in (f"{v}", f"${v}", f"{v:,}", f"\\boxed{{{v}}}", f"The answer is {v}.",
                        f"She makes ${v:,} every day.", f"{v}.0", f"{v:,}.00 dollars", f"\\boxed{{{v:,}}}",
                        f"\\${v}", f"x = {v}", f"{v}\\text{{ dollars}}"):
            assert R.math_reward(box(written), gold) == 1.0, (gold, written)
        for wrong in (f"{v + 1}", f"{v - 1}", f"{v * 10}", f"{v}5", f"{-v or 1}", f"{v}.5", f"{v} or {v + 1}",
                      f"{v + 1} or {v}", f"{v}, {v + 1}", f"\\boxed{{{v}}} \\boxed{{{v + 1}}}"):
            assert R.math_reward(box(wrong), gold) == 0.0, (gold, wrong)


# --- math: hard cases in both directions ------------------------------------------------------------

PAID, UNPAID = 1.0, 0.0
MATH_CASES = [
    # integers, signs, decimals, trailing zeros
    ("18", "18", PAID), ("18", "18.00", PAID), ("18", "18.", PAID), ("18", "**18**", PAID), ("18", "-18", UNPAID),
    ("-3", "\u22123", PAID), ("-3", "- 3", PAID), ("-5", "The answer is -5.", PAID), ("0", "-0", PAID),
    ("0.1", "0.10", PAID), ("0.5", ".5", PAID), ("5", "The answer is - 5.", UNPAID), ("18", "18.5", UNPAID),
    # thousands separators: valid groups only
    ("1080", "1,080", PAID), ("1080", "$1,080.00", PAID), ("11111", "11,\\!111", PAID), ("14916", "14{,}916", PAID),
    ("1450000", "1,450,000", PAID), ("108", "1,08", UNPAID), ("1080", "1,0800", UNPAID), ("1080", "1 080", UNPAID),
    ("1234567", "12,34,567", UNPAID),
    # currency, units, sentences, %, degrees
    ("18", "$18", PAID), ("18", "\\$18", PAID), ("18", "18 dollars", PAID), ("18", "\\text{18 dollars}", PAID),
    ("18", "18\\text{ dollars}", PAID), ("18", "Janet makes $18 every day.", PAID), ("1.5", "1.5 hours", PAID),
    ("18", "18 km/h", PAID), ("18", "I think it's 18", PAID), ("50", "50%", PAID), ("50", "50\\%", PAID),
    ("0.5", "50%", UNPAID), ("50", "0.5", UNPAID), ("30", "30^\\circ", PAID), ("30", "30^{\\circ}", PAID),
    ("30", "30\u00b0", PAID), ("18", "#### 18", PAID),
    # fractions, mixed numbers, surds, pi, infinity
    ("0.5", "\\frac{1}{2}", PAID), ("0.5", "\\dfrac12", PAID), ("0.5", "\\tfrac{1}{2}", PAID), ("0.5", "1/2", PAID),
    ("3/4", "\\frac{6}{8}", PAID), ("3/4", "\\frac{3}{5}", UNPAID), ("2.5", "2\\frac{1}{2}", PAID),
    ("2.5", "2 1/2", PAID), ("-2.5", "-2\\frac12", PAID), ("1", "2\\frac{1}{2}", UNPAID),
    ("2\\sqrt{2}", "\\sqrt{8}", PAID), ("2\\sqrt{2}", "\\sqrt8", PAID), ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", PAID),
    ("\\sqrt2", "\\frac{2}{\\sqrt{2}}", PAID), ("\\sqrt{2}", "1.414", UNPAID), ("2", "\\sqrt[3]{8}", PAID),
    ("2\\pi", "\\pi \\cdot 2", UNPAID), ("\\frac{\\pi}{2}", "0.5\\pi", PAID), ("\\pi", "3.14", UNPAID),
    ("\\pi", "\u03c0", PAID), ("\\infty", "\\infty", PAID), ("\\infty", "-\\infty", UNPAID),
    ("1024", "2^{10}", PAID), ("100000", "10^5", PAID), ("0.001", "10^{-3}", PAID), ("100000", "1e5", UNPAID),
    ("72", "3 \\times 24", UNPAID),
    # a gold that is a number wants a number, not arithmetic (the toy's question echoed); a gold that
    # is itself a sum may be answered by one
    ("112", "68+44", UNPAID), ("112", "68 + 44 = 112", PAID), ("112", "\\boxed{68+44}", UNPAID),
    ("5", "8 - 3", UNPAID), ("5", "10 \\div 2", UNPAID), ("2+\\sqrt{2}", "\\sqrt{2}+2", PAID),
    # tuples and intervals: order and openness matter; bare lists are unordered
    ("(1,2)", "(1, 2)", PAID), ("(1,2)", "(2, 1)", UNPAID), ("(1,2]", "(1,2)", UNPAID), ("(1,2)", "[1,2]", UNPAID),
    ("[0,\\infty)", "[0, \\infty)", PAID), ("(1,2)", "\\left(1,2\\right)", PAID), ("(1,234)", "(1, 234)", PAID),
    ("1, -2", "-2,1", PAID), ("1, -2", "1", UNPAID),
    # multiple choice
    ("B", "(B)", PAID), ("B", "\\text{(B)}", PAID), ("B", "The answer is B.", PAID), ("B", "\\boxed{B}", PAID),
    ("\\text{(B)}", "B", PAID), ("B", "B or C", UNPAID), ("B", "C", UNPAID), ("B", "\\boxed{A} \\boxed{B}", UNPAID),
    # '=': the value after the final '=' counts, and every value before it must agree
    ("72", "3 * 24 = 72", PAID), ("72", "x = 72", PAID), ("5", "x=5", PAID), ("72", "3*24 = 70", UNPAID),
    ("70", "3*24 = 70", UNPAID), ("5", "5 = x", UNPAID), ("20", "x = 18 or x = 20", UNPAID),
    # hedges, lists, words that change the value, symbols we do not read
    ("18", "18 or 20", UNPAID), ("20", "18 or 20", UNPAID), ("18", "18, 20", UNPAID), ("18", "18 20", UNPAID),
    ("18", "18 and 20", UNPAID), ("18", "between 18 and 20", UNPAID), ("18", "not 18", UNPAID),
    ("18", "approximately 18", UNPAID), ("18", "about 18", UNPAID), ("18", "18 or twenty", UNPAID),
    ("18000", "18 thousand", UNPAID), ("18", "18 thousand", UNPAID), ("18", "18k", UNPAID), ("18", "eighteen", UNPAID),
    ("18", "\\boxed{18} or \\boxed{20}", UNPAID), ("20", "\\boxed{18} or \\boxed{20}", UNPAID), ("18", "18!", UNPAID),
    ("18", "\\approx 18", UNPAID), ("18", "18 \\pm 2", UNPAID), ("18", "~18", UNPAID), ("1", "x+1", UNPAID),
    ("3", "f(3)", UNPAID), ("18", "", UNPAID), ("18", "9**9**9", UNPAID), ("18", "18\u201320", UNPAID),
]


@pytest.mark.parametrize("gold, written, expected", MATH_CASES)
def test_math_hard_cases(gold, written, expected):
    assert R.math_reward(box(written), gold) == expected


def test_math_reads_only_the_single_answer_block_after_the_reasoning():
    assert R.math_reward("<think>the answer is <answer>18</answer></think><answer>20</answer>", "18") == 0.0
    assert R.math_reward("<think>try 18</think><answer>18</answer><answer>20</answer>", "18") == 0.0
    assert R.math_reward("<think>try 18</think><answer>18</answer><answer>18</answer>", "18") == 0.0
    assert R.math_reward("<think>still thinking <answer>18</answer>", "18") == 0.0  # truncated
    assert R.math_reward("<answer>18</answer>", "18") == 1.0  # no reasoning at all: a direct answer
    assert R.math_reward(" <think>ok</think>  <answer> 18 </answer> ", "18") == 1.0


BAD_GOLDS = ["banana", "x+1", "2x", "5 cm", "", "   ", "1,08", "08", "1e5", "\\sin(x)", "18 or 20", "1" * 101,
             "2^{5000}", "(" * 40 + "1" + ")" * 40, None, 1.5, ["18"], "\\frac{1}{0}", "\\sqrt{-4}", "1/(1+\\sqrt{2})"]


@pytest.mark.parametrize("gold", BAD_GOLDS)
def test_parse_gold_refuses_what_it_cannot_read_exactly(gold):
    assert A.parse_gold(gold) is None
    assert R.math_reward(box("18"), gold) == 0.0


# --- math: the parser against Fraction arithmetic on random expressions ------------------------------


@st.composite
def expressions(draw, depth=3):
    """(LaTeX text, plain text, exact value) of a random expression over small integers."""
    if depth == 0 or draw(st.booleans()):
        n = draw(st.integers(0, 60))
        return str(n), str(n), Fraction(n)
    op = draw(st.sampled_from("+-*/^"))
    (la, pa, a), (lb, pb, b) = draw(expressions(depth=depth - 1)), draw(expressions(depth=depth - 1))
    if op == "/" and b == 0 or op == "^":
        k = draw(st.integers(0, 3))
        return f"\\left({la}\\right)^{{{k}}}", f"({pa})^{k}", a ** k
    if op == "/":
        return f"\\frac{{{la}}}{{{lb}}}", f"({pa})/({pb})", a / b
    value = a + b if op == "+" else a - b if op == "-" else a * b
    times = draw(st.sampled_from([" \\cdot ", " \\times ", "*"])) if op == "*" else f" {op} "
    return f"({la}){times}({lb})", f"({pa}) {op} ({pb})", value


@settings(max_examples=200, deadline=None)
@given(expressions())
def test_parser_matches_fraction_arithmetic(expr):
    latex, plain, value = expr
    gold = f"{value.numerator}/{value.denominator}"
    # the parser reads the arithmetic; the reward pays its value only after '=' (a number for a number)
    assert R.parse_answer(latex) == R.parse_answer(plain) == R.parse_gold(gold), (latex, plain, gold)
    assert R.math_reward(box(f"{plain} = {gold}"), gold) == 1.0
    assert R.math_reward(box(latex), f"{value.numerator + 1}/{value.denominator}") == 0.0


@settings(max_examples=200, deadline=None)
@given(st.fractions(max_denominator=400), st.integers(1, 100), st.integers(1, 900))
def test_every_rendering_of_a_number_is_paid_and_a_neighbour_is_not(q, n, m):
    p, d = q.numerator, q.denominator
    sign, whole, rest = ("-" if q < 0 else ""), abs(p) // d, abs(p) % d
    written = [f"{p}/{d}", f"{sign}\\frac{{{abs(p)}}}{{{d}}}", f"{sign}\\dfrac{{{abs(p)}}}{{{d}}}",
               f"\\boxed{{{p}/{d}}}", f"{sign}{whole}\\frac{{{rest}}}{{{d}}}" if whole and rest else f"{p}/{d}"]
    k = next((k for k in range(12) if 10 ** k % d == 0), None)  # d divides 10^k: a terminating decimal
    if k is not None:
        digits = str(abs(p) * 10 ** (k + 2) // d).rjust(k + 3, "0")  # two trailing zeros, exactly
        written.append(f"{sign}{digits[:-k - 2]}.{digits[-k - 2:]}")
    for w in written:
        assert R.math_reward(box(w), f"{p}/{d}") == 1.0, (w, q)
        assert R.math_reward(box(w), f"{p + 1}/{d}") == 0.0, (w, q)
    # surds: n sqrt(m) three ways
    assert R.parse_answer(f"\\sqrt{{{n * n * m}}}") == R.parse_answer(f"{n}\\sqrt{{{m}}}") \
        == R.parse_answer(f"\\frac{{{n * m}}}{{\\sqrt{{{m}}}}}") is not None
    assert R.parse_answer(f"\\sqrt{{{n * n * m + 1}}}") != R.parse_answer(f"{n}\\sqrt{{{m}}}")


@settings(max_examples=100, deadline=None)
@given(st.integers(-10 ** 6, 10 ** 6), st.integers(-10 ** 6, 10 ** 6))
def test_hedges_pay_neither_value(a, b):
    if a == b:
        return
    for hedge in (f"{a} or {b}", f"{a}, {b}", f"{a} {b}", f"\\boxed{{{a}}} \\boxed{{{b}}}", f"x = {a} or x = {b}",
                  f"{a} = {b}"):
        assert R.math_reward(box(hedge), str(a)) == R.math_reward(box(hedge), str(b)) == 0.0, hedge
    two_blocks = f"<think>t</think><answer>{a}</answer><answer>{b}</answer>"
    assert R.math_reward(two_blocks, str(a)) == R.math_reward(two_blocks, str(b)) == 0.0


# --- Countdown --------------------------------------------------------------------------------------

COUNTDOWN_CASES = [
    ("(3 + 5) * 4 - 7", [3, 5, 4, 7], 25, PAID), ("3 + 5 * 4 - 7", [3, 5, 4, 7], 16, PAID),
    ("(3 + 5) * 4 - 7 = 25", [3, 5, 4, 7], 25, PAID), ("(3 + 5) * 4 - 7 = 24", [3, 5, 4, 7], 25, UNPAID),
    ("6 / 2", [6, 2], 3, PAID), ("3 / 2 * 2", [3, 2, 2], 3, PAID), ("1/3 + 1/3 + 1/3", [1, 3, 1, 3, 1, 3], 1, PAID),
    ("((((3))))", [3], 3, PAID), ("5 - 3", [3, 5], 2, PAID), ("7 / 2", [7, 2], 3, UNPAID),
    ("35 * 4 - 7", [3, 5, 4, 7], 133, UNPAID),  # digit gluing
    ("2 3", [2, 3], 23, UNPAID), ("(2)(3)", [2, 3], 6, UNPAID), ("3**2", [3, 2], 9, UNPAID), ("3^2", [3, 2], 9, UNPAID),
    ("6//2", [6, 2], 3, UNPAID), ("-3 + 5", [3, 5], 2, UNPAID), ("1.5 * 2", [1, 2], 3, UNPAID),
    ("x * 2", [2], 2, UNPAID), ("abs(3)", [3], 3, UNPAID), ("4 / (2 - 2)", [4, 2, 2], 0, UNPAID),
    ("3 + 3", [3], 6, UNPAID), ("3 + 5", [3, 5, 5], 8, UNPAID), ("03 + 5", [3, 5], 8, UNPAID), ("", [3], 3, UNPAID),
    ("3 + 5 = 8 = 8", [3, 5], 8, UNPAID), ("(" * 40 + "3" + ")" * 40, [3], 3, UNPAID), ("1234567890", [1234567890], 1234567890, UNPAID),
    ("3 + 5", [3, 5], 8.0, UNPAID), ("3 + 5", None, 8, UNPAID), ("3 + 5", ["3", "5"], 8, UNPAID),
    ("3 \u00d7 5", [3, 5], 15, UNPAID), ("3 + 5", [3, 5], 8, PAID),
]


@pytest.mark.parametrize("expr, numbers, target, expected", COUNTDOWN_CASES)
def test_countdown_hard_cases(expr, numbers, target, expected):
    assert R.countdown_reward(box(expr), numbers, target) == expected


_AST_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def reference_countdown(text: str) -> tuple[Fraction | None, list[int]]:
    """The slow reference: Python's own parser, then exact evaluation of + - * / on int literals."""
    depth = max(itertools.accumulate((c == "(") - (c == ")") for c in text), default=0)
    if len(text) > R.MAX_COUNTDOWN_CHARS or re.search(r"(?<!\d)0\d|\d{10}", text) or depth > R.MAX_DEPTH:
        return None, []  # the documented caps: leading zeros, 10+ digits, deep nesting
    used: list[int] = []

    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return _AST_OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError(node)

    try:
        return ev(ast.parse(text.strip(), mode="eval").body), used
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None, []


COUNTDOWN_FRAGMENTS = ["1", "2", "3", "7", "12", "25", "0", " ", "+", "-", "*", "/", "(", ")", "**", "//", ".", "x"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(COUNTDOWN_FRAGMENTS), max_size=30).map("".join), st.integers(-50, 50))
def test_countdown_matches_the_ast_reference(text, other_target):
    value, used = reference_countdown(text)
    numbers = [int(x) for x in re.findall(r"\d+", text)]
    for target in {other_target, int(value) if value is not None and value.denominator == 1 else 0}:
        expected = float(value is not None and value == target and sorted(used) == sorted(numbers)
                         and len(numbers) <= R.MAX_COUNTDOWN_NUMBERS)
        assert R.countdown_reward(box(text), numbers, target) == expected, (text, target)


@st.composite
def countdown_trees(draw, depth=3):
    if depth == 0 or draw(st.booleans()):
        n = draw(st.integers(1, 99))
        return str(n), Fraction(n), [n]
    (ta, a, na), (tb, b, nb) = draw(countdown_trees(depth=depth - 1)), draw(countdown_trees(depth=depth - 1))
    op = draw(st.sampled_from("+-*/"))
    if op == "/" and b == 0:
        op = "+"
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0}[op]
    return f"({ta}) {op} ({tb})", value, na + nb


@settings(max_examples=200, deadline=None)
@given(countdown_trees(), st.randoms(use_true_random=False))
def test_countdown_pays_every_exact_solution_in_any_number_order(tree, rnd):
    text, value, numbers = tree
    rnd.shuffle(numbers)
    if value.denominator == 1 and len(text) <= R.MAX_COUNTDOWN_CHARS:
        assert R.countdown_reward(box(text), numbers, int(value)) == 1.0, text
        assert R.countdown_reward(box(text), numbers, int(value) + 1) == 0.0
        assert R.countdown_reward(box(text), numbers + [1], int(value)) == 0.0  # a number left unused


# --- format ----------------------------------------------------------------------------------------

FORMAT_CASES = [
    ("<think>a</think><answer>1</answer>", PAID), ("  \n<think>a</think>\n<answer>1</answer>\n", PAID),
    ("<think>汉 x<y </think> <answer>1</answer>", PAID),
    ("<think> </think><answer>1</answer>", UNPAID), ("<think>a</think><answer> </answer>", UNPAID),
    ("<think>a</think>x<answer>1</answer>", UNPAID), ("x<think>a</think><answer>1</answer>", UNPAID),
    ("<think>a</think><answer>1</answer>x", UNPAID), ("<think>a<think>b</think></think><answer>1</answer>", UNPAID),
    ("<think>a</THINK></think><answer>1</answer>", UNPAID), ("<THINK>a</THINK><ANSWER>1</ANSWER>", UNPAID),
    ("<think>a</think><answer>1</answer><answer>2</answer>", UNPAID), ("<think>a</think><answer>1", UNPAID),
    ("<think>a", UNPAID), ("<answer>1</answer>", UNPAID), ("<answer>1</answer><think>a</think>", UNPAID),
    ("<think>a<answer>1</answer></think><answer>1</answer>", UNPAID),
    ("<think>汉<Think></think><answer>1</answer>", UNPAID), ("<think>a</think><Answer>1</answer>", UNPAID),
    ("<think>a</think><answer><answer>1</answer></answer>", UNPAID), ("", UNPAID),
    # invisible-only thinking or answer: zero-width space, word joiner, BOM, Hangul filler, soft hyphen
    ("<think>\u200b</think><answer>\u200b</answer>", UNPAID), ("<think>\u2060 \ufeff</think><answer>1</answer>", UNPAID),
    ("<think>a</think><answer>\u3164</answer>", UNPAID), ("<think>\u00ad\u200d</think><answer>1</answer>", UNPAID),
    ("<think>a\u200b</think><answer>1</answer>", PAID),
]


@pytest.mark.parametrize("completion, expected", FORMAT_CASES)
def test_format_hard_cases(completion, expected):
    assert R.format_reward(completion) == expected


_ANY_CASE_TAG = re.compile(r"</?(?:think|answer)>", re.IGNORECASE | re.ASCII)


def reference_format(s: str) -> float:
    """The slow reference: one backtracking regex over the whole response."""
    m = re.fullmatch(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", s, re.DOTALL)
    if m is None or any(_ANY_CASE_TAG.search(part) for part in m.groups()):
        return 0.0
    return float(bool(m[1].strip()) and bool(m[2].strip()))


FORMAT_FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<THINK>", "</Think>", "<ANSWER>", "</answeR>",
                    " ", "\n", "\u3000", "a", "1", "<", ">", "/", "汉", "\u0130", "\u212a", "think", "<think"]


FRAGMENT_TEXT = st.lists(st.sampled_from(FORMAT_FRAGMENTS), max_size=12).map("".join)
SPACE = st.sampled_from(["", " ", "\n", "\t ", "\u3000", "x"])


@settings(max_examples=400, deadline=None)
@given(FRAGMENT_TEXT, FRAGMENT_TEXT, st.lists(SPACE, min_size=3, max_size=3))
def test_format_matches_the_regex_reference(think, answer, spaces):
    skeleton = f"{spaces[0]}<think>{think}</think>{spaces[1]}<answer>{answer}</answer>{spaces[2]}"
    for s in (skeleton, think + answer, "<think>" + think, "<think>a" + think + "1</answer>"):
        assert R.format_reward(s) == reference_format(s), repr(s)


EXTRACT_CASES = [
    ("<think>a</think><answer>1</answer>", "1"), ("<answer>1</answer>", "1"), ("a</think> <answer> 7 </answer>", "7"),
    ("<think>a<answer>2</answer></think><answer>1</answer>", "1"), ("<think>a<answer>2</answer>", None),
    ("<think>a</think><answer>1</answer><answer>2</answer>", None), ("a</think></think><answer>1</answer>", None),
    ("<think>a</think><answer></answer>", None), ("<think>a</think></answer><answer>", None), (None, None),
]


@pytest.mark.parametrize("completion, expected", EXTRACT_CASES)
def test_extract_answer(completion, expected):
    assert R.extract_answer(completion) == expected


# --- language consistency ---------------------------------------------------------------------------

ZH_Q = "一共有多少个鸡蛋？"
LANGUAGE_CASES = [
    ("we add the numbers", "How many eggs?", 1.0), ("我们把数字加起来", ZH_Q, 1.0),
    ("我们 add 数字", ZH_Q, 0.8),  # 4 ideographs and 1 English word
    ("we add the numbers", ZH_Q, 0.0), ("Мы считаем", "How many eggs?", 0.0),
    ("先计算 $x^2 + y$ 然后 \\frac{a}{b}", ZH_Q, 1.0),  # math and LaTeX are not words
    ("日本語でかんがえる", "これは何ですか", 1.0),  # Japanese: kana and kanji
    ("한국어로 생각", "무엇입니까", 1.0),
    ("8+6=14 carry 1. 7+5+1=13 carry 1.", "User: 478+56=? Assistant:", 1.0),  # the toy task, both languages
    (" 8+6=14 进1。 7+5+1=13 进1。", "用户: 478+56=? 助手:", 1.0),
    (" 8+6=14 进1。 7+5+1=13 进1。", "User: 478+56=? Assistant:", 0.0),
    ("2+3=5, x = 5", "How many?", R.NEUTRAL_LANGUAGE), ("we add", "2+3=?", R.NEUTRAL_LANGUAGE),
    ("nous ajoutons les nombres", "How many eggs?", 1.0),  # the documented limit: scripts, not languages
    # English hidden in markup or in other letter forms is still English
    ("$we add the numbers$", ZH_Q, 0.0), ("`we add the numbers`", ZH_Q, 0.0),
    ("\\text{we add the numbers}", ZH_Q, 0.0), ("\\we \\add \\the \\numbers", ZH_Q, 0.0),
    ("\U0001d430\U0001d41e \U0001d41a\U0001d41d\U0001d41d", ZH_Q, 0.0),  # math-bold "we add"
    ("\uff57\uff45 \uff41\uff44\uff44", ZH_Q, 0.0),  # fullwidth "we add"
    ("我们 $\\text{加}$ 数字", ZH_Q, 1.0),
]


@pytest.mark.parametrize("cot, prompt, expected", LANGUAGE_CASES)
def test_language_hard_cases(cot, prompt, expected):
    assert R.language_reward(f"<think>{cot}</think><answer>1</answer>", prompt) == pytest.approx(expected)


def test_language_scores_long_cots_over_their_whole_length():
    english, chinese = "we add the numbers " * 2000, "我们把数字加起来 " * 1000
    assert len(english) > R.MAX_LANGUAGE_CHARS
    mixed = R.language_reward("<think>" + english + chinese + "</think>", "How many eggs?")
    assert 0.05 < mixed < 0.95  # a drift at the end is seen, though the head is all English
    assert R.language_reward("<think>" + english * 3 + "</think>", "How many eggs?") == 1.0
    assert R.language_reward("<think>" + english, "How many eggs?") == 1.0  # unclosed: all of it is the CoT


# --- combining --------------------------------------------------------------------------------------


def test_combine_rewards_weights_components_and_keeps_each_for_the_logs():
    sample = {"task": "math", "answer": "5", "question": "2+3 eggs?"}
    total, parts = R.combine_rewards(box("5", "we add"), "User: 2+3 eggs? Assistant:", sample)
    assert parts == {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    assert total == pytest.approx(sum(R.DEFAULT_WEIGHTS[k] * v for k, v in parts.items()))
    total, parts = R.combine_rewards("<answer>4</answer>", "p", sample, R.STAGE2_WEIGHTS)
    assert parts["accuracy"] == parts["format"] == 0.0 and total == pytest.approx(R.STAGE2_WEIGHTS["language"])
    countdown = {"task": "countdown", "numbers": [3, 5], "target": 8}
    assert R.combine_rewards(box("3 + 5"), "p", countdown, {"accuracy": 2.0})[0] == 2.0
    general = {"task": "general", "answers": ["Red", "blue"], "question": "name a color"}
    assert R.accuracy_reward(box("  red "), general) == 1.0 and R.accuracy_reward(box("red, red"), general) == 0.0
    # The toy's question has no words: the language comes from its template.
    zh = {"task": "math", "answer": "3", "question": "1+2=?"}
    assert R.combine_rewards(box("3", "1+2=3 进0。"), "用户: 1+2=? 助手:", zh)[1]["language"] == 1.0


def test_combine_rewards_says_what_is_wrong_with_a_config_or_sample():
    with pytest.raises(ValueError, match="unknown reward weights"):
        R.combine_rewards(box("5"), "p", {"task": "math", "answer": "5"}, {"acc": 1.0})
    with pytest.raises(ValueError, match="no field 'answer'"):
        R.combine_rewards(box("5"), "p", {"task": "math"})
    with pytest.raises(ValueError, match="use 'math', 'countdown'"):
        R.accuracy_reward(box("5"), {"task": "chess"})


def test_rule_reward_scores_each_completion_as_combine_rewards_does():
    add = {"task": "math", "prompt": "User: 47+38=? Assistant:", "question": "47+38=?", "answer": "85", "lang": "en"}
    add_zh = {"task": "math", "prompt": "用户: 47+38=? 助手:", "question": "47+38=?", "answer": "85", "lang": "zh"}
    countdown = {"task": "countdown", "prompt": "User: make 8 from 3 5. Assistant:", "question": "make 8 from 3 5",
                 "numbers": [3, 5], "target": 8}
    completions = [box("85", "7+8=15 carry 1. 4+3+1=8."), "<answer>85</answer>", box("84", "we add"),
                   box("85", "7+8=15 进1。 4+3+1=8。"), box("3 + 5", "we add"), box("85", "7+8=15 进1。")]
    samples = [add, add, add, add_zh, countdown, add]
    for weights in (R.DEFAULT_WEIGHTS, R.STAGE2_WEIGHTS, {"accuracy": 2.0, "language": 0.5}):
        totals, parts = R.rule_reward(weights)(completions, samples)
        expected = [R.combine_rewards(c, s["prompt"], s, weights) for c, s in zip(completions, samples)]
        assert totals == [total for total, _ in expected]
        assert parts == {k: [p[k] for _, p in expected] for k in R.REWARD_NAMES}
        assert len(set(totals)) >= 3  # the toy samples tell completions, and so their order, apart
    assert R.rule_reward(R.STAGE2_WEIGHTS)([], []) == ([], {k: [] for k in R.REWARD_NAMES})


def test_rule_reward_says_what_is_wrong_with_its_weights_or_samples():
    with pytest.raises(ValueError, match="unknown reward weights"):
        R.rule_reward({"acc": 1.0})  # before any completion is scored
    score = R.rule_reward(R.DEFAULT_WEIGHTS)
    with pytest.raises(ValueError, match="2 completions but 1 samples"):
        score([box("5"), box("6")], [{"task": "math", "prompt": "p", "answer": "5"}])
    with pytest.raises(ValueError, match="no field 'prompt'"):
        score([box("5")], [{"task": "math", "answer": "5"}])


# --- no input raises, stalls or leaves [0, 1] -------------------------------------------------------

MATH_FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "{", "}", "(", ")", "[", "]", "\\frac",
                  "\\dfrac12", "\\sqrt", "\\sqrt[3]{", "\\pi", "\\infty", "^", "**", "*", "/", "+", "-", "\u2212", "=",
                  ",", ".", "$", "%", "\\%", "\\text{", "\\left(", "\\right)", "\\!", "{,}", " or ", " ", "0", "1",
                  "9", "12", "1,000", "4097", "x", "B", "dollars", "\\cdot", "汉", "é", "\\", "e", "\\in"]
ANY_TEXT = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(MATH_FRAGMENTS), max_size=60).map("".join))


def timed(f, *args):
    """f(*args), asserting it is fast; a slow call is timed again, as the CPU is shared."""
    t0 = time.perf_counter()
    out = f(*args)
    assert time.perf_counter() - t0 < FAST or _seconds(f, *args) < FAST, (f.__name__, args)
    return out


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT, ANY_TEXT)
def test_no_input_raises_stalls_or_leaves_the_unit_interval(a, b):
    samples = [{"task": "math", "answer": b}, {"task": "countdown", "numbers": [1, 2, 12], "target": 13}]
    for completion in (a, box(a), f"<think>{b}</think><answer>{a}</answer>"):
        rewards = [timed(R.math_reward, completion, b), timed(R.math_reward, completion, a),
                   timed(R.countdown_reward, completion, [1, 2, 12], 13), timed(R.format_reward, completion),
                   timed(R.language_reward, completion, b)]
        for sample in samples:
            total, parts = timed(R.combine_rewards, completion, b, sample)
            rewards += list(parts.values())
        assert all(type(r) is float and 0.0 <= r <= 1.0 for r in rewards), rewards
        timed(R.extract_answer, completion)
    timed(R.parse_gold, a), timed(R.parse_answer, a)


@pytest.mark.parametrize("name", list(R.hostile_inputs()))
def test_hostile_inputs_return_fast(name):
    h = R.hostile_inputs()[name]
    for f, args in ((R.math_reward, (h, "18")), (R.countdown_reward, (h, [1, 9], 9)), (R.format_reward, (h,)),
                    (R.language_reward, (h, "How many?")), (R.parse_gold, (R.extract_answer(h),))):
        best = min(_seconds(f, *args) for _ in range(2))  # best of two: the CPU is shared
        assert best < FAST, (name, f.__name__, best)
        assert f(*args) in (0.0, 1.0, None) or f is R.parse_gold or f is R.language_reward


def _seconds(f, *args) -> float:
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


def test_benchmark_line():
    rate, worst, name = R.benchmark(rounds=100)
    print(f"\nrewards: {rate:,.0f} calls/s on realistic responses; worst hostile call {worst * 1e3:.2f} ms ({name})")
    assert rate > 1000 and worst < FAST


# --- reward plug-ins -------------------------------------------------------------------------------

def test_reward_sum_none_adds_nothing_and_is_kept_in_the_components():
    def half(completions, samples):
        return [0.5 if s.get("bonus") else None for s in samples]
    score = R.RewardSum([("format", R.score_format, 0.1), ("half", half, 2.0)])
    good = "<think> x </think> <answer> 1 </answer>"
    totals, comps = score([good, good, "nothing"], [{"bonus": True}, {}, {"bonus": True}])
    assert totals == [pytest.approx(0.1 + 1.0), pytest.approx(0.1), pytest.approx(1.0)]
    assert comps == {"format": [1.0, 1.0, 0.0], "half": [0.5, None, 0.5]}
    assert score.weights == {"format": 0.1, "half": 2.0}


@pytest.mark.parametrize("bad,match", [(lambda c, s: [1.0], "returned 1 values for 2"),
                                       (lambda c, s: 1.0, "returned a float"),
                                       (lambda c, s: ["1", 0.0], "returned '1'"),
                                       (lambda c, s: [float("nan"), 0.0], "finite"),
                                       (lambda c, s: [True, 0.0], "returned True")])
def test_reward_sum_refuses_a_wrong_return_value(bad, match):
    with pytest.raises(R.RewardError, match=match):
        R.RewardSum([("bad", bad, 1.0)])(["a", "b"], [{}, {}])


def test_rule_reward_with_plugins_adds_them():
    def one(completions, samples):
        return [1.0] * len(completions)
    s = {"task": "math", "prompt": "1+1=?", "answer": "2"}
    c = "<think> two </think> <answer> 2 </answer>"
    base, _ = R.rule_reward(R.DEFAULT_WEIGHTS)([c], [s])
    totals, comps = R.rule_reward(R.DEFAULT_WEIGHTS, [("one", one, 0.25)])([c], [s])
    assert totals[0] == pytest.approx(base[0] + 0.25) and comps["one"] == [1.0]
    with pytest.raises(R.RewardError, match="clashes with a built-in"):
        R.rule_reward(R.DEFAULT_WEIGHTS, [("format", one, 1.0)])


def test_load_reward_from_a_file_or_a_module(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("def short(completions, samples):\n    return [-len(c) for c in completions]\n")
    name, fn, w = R.load_reward(f"{f}:short=0.5")
    assert (name, w) == ("short", 0.5) and fn(["ab"], [{}]) == [-2]
    assert R.load_reward(f"{f}:short")[2] == 1.0
    name, fn, w = R.load_reward("rewards:score_format=2")  # a module on the path
    assert fn is R.score_format and w == 2.0
    assert [n for n, _, _ in R.load_rewards(f"{f}:short, rewards:score_format")] == ["short", "score_format"]


def test_load_reward_errors_are_one_line(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("def short(completions, samples):\n    return []\nVALUE = 3\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    cases = [(f"{tmp_path}/nope.py:f", "not found"), (f"{f}:long", "has no function 'long'.*short"),
             (f"{f}:VALUE", "has no function 'VALUE'"), (f"{f}", "write path/to/file.py:function"),
             ("no_such_module_x:f", "cannot import module"), (f"{f}:short=heavy", "weight 'heavy'"),
             (f"{broken}:f", "loading .*broken.py failed: SyntaxError")]
    for spec, match in cases:
        with pytest.raises(R.RewardError, match=match) as e:
            R.load_reward(spec)
        assert "\n" not in str(e.value)
