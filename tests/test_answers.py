"""Tests for answers.py called directly: golds it reads, golds it refuses, and its caps.

How a response's answer is paid (tables of hard cases, Fraction arithmetic on random expressions,
the Countdown reader against Python's own parser) is tested through the rewards in test_rewards.py.
"""
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

import answers as A

GOLDS = [("42", Fraction(42)), ("-3.5", Fraction(-7, 2)), ("3/4", Fraction(3, 4)), ("1,450,000", Fraction(1450000)),
         ("10\\%", Fraction(10)), ("\\$18.90", Fraction(189, 10)), ("5\\text{ cm}", Fraction(5)), (18, Fraction(18))]


@pytest.mark.parametrize("gold, value", GOLDS)
def test_parse_gold_reads_plain_golds(gold, value):
    assert A.parse_gold(gold) == ("num", (((1, 0), value),))


def test_parse_gold_choices_and_caps():
    assert A.parse_gold("\\text{(C)}") == A.parse_gold("C") == ("choice", "C")
    assert A.parse_answer("1" * A.MAX_DIGITS) is not None and A.parse_answer("1" * (A.MAX_DIGITS + 1)) is None
    assert A.parse_answer("(" * 10 + "1" + ")" * 10) is not None
    assert A.parse_answer("-" * (A.MAX_DEPTH + 1) + "1") is None
    assert A.parse_answer("2^{2000}") is not None and A.parse_answer("2^{5000}") is None
    assert A.parse_answer("9^9^9") is None and A.parse_answer("1" + " " * A.MAX_ANSWER_CHARS) is None


def test_answers_imports_only_the_standard_library():
    code = "import sys, answers; assert not {'torch', 'numpy'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(A.__file__).parent)
