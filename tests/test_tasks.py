"""Tests for toy.py (the toy task's arithmetic, split and corpus mix), tasks.py (Countdown, GSM8K,
the registry) and data.py (JSONL loading and writing)."""
import json
import re
from itertools import islice

import pytest
from hypothesis import given, settings, strategies as st

import tasks
from data import DataError, load_pref_jsonl, load_sft_jsonl, write_jsonl
from tasks import Countdown, get_task, load_gsm8k, load_jsonl_samples
from tokenizer import TOY_EOS, TOY_TAGS, build_char_tokenizer, r1_zero_prompt
from toy import (ToyArithmetic, ToyConfig, addition_steps, direct_response, general_response,
                 worked_response)

TOY = ToyArithmetic()
CJK = re.compile(r"[\u4e00-\u9fff\u3002\uff0c]")  # CJK ideographs, 。 and ，
DOC = re.compile(r"(?:User|用户): (\d+)\+(\d+)=\? (?:Assistant|助手):(.*)" + re.escape(TOY_EOS))


def _rewards():
    rewards = pytest.importorskip("rewards")
    return rewards


def _answer(resp: str) -> int:
    return int(re.search(r"<answer>(\d+)</answer>", resp)[1])


def _step_lang(resp: str) -> str:
    return "zh" if "进" in resp else "en"


# --- toy arithmetic -------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10 ** 6), st.integers(0, 10 ** 6), st.sampled_from(["en", "zh"]))
def test_worked_response_is_right(a, b, lang):
    steps = addition_steps(a, b)
    assert len(steps) == max(len(str(a)), len(str(b)))
    total = sum((s % 10) * 10 ** i for i, (_, _, _, s, _) in enumerate(steps)) + steps[-1][4] * 10 ** len(steps)
    assert total == a + b
    for (x, y, c_in, s, c), prev in zip(steps, [(0, 0, 0, 0, 0)] + steps):
        assert c_in == prev[4] and s == x + y + c_in and c == s // 10
    resp = worked_response(a, b, lang)
    assert _answer(resp) == a + b
    assert resp.startswith("<think> ") and "</think><answer>" in resp
    assert resp.count("carry" if lang == "en" else "进") == len(steps)


def test_worked_example_matches_brief():
    assert worked_response(478, 56, "en") == ("<think> 8+6=14 carry 1, so 4. 7+5+1=13 carry 1, so 34. "
                                              "4+0+1=5 carry 0, so 534. </think><answer>534</answer>")
    assert worked_response(478, 56, "zh") == ("<think> 8+6=14 进1，得4。 7+5+1=13 进1，得34。 4+0+1=5 进0，得534。 "
                                              "</think><answer>534</answer>")
    assert worked_response(95, 85, "en").endswith("9+8+1=18 carry 1, so 180. </think><answer>180</answer>")
    assert TOY.sample(478, 56, "en")["prompt"] == "User: 478+56=? Assistant:"
    assert TOY.sample(478, 56, "zh")["prompt"] == "用户: 478+56=? 助手:"


def test_worked_responses_are_paid_and_direct_fail_format():
    rewards = _rewards()
    samples = TOY.eval_samples(100) + list(islice(TOY.train_samples(0), 100))
    for s in samples:
        resp = TOY.sft_response(s)
        assert _step_lang(resp) == s["lang"]
        assert rewards.math_reward(resp, s["answer"]) == 1.0
        assert rewards.format_reward(resp) == 1.0
        direct = direct_response(int(s["answer"]))
        assert rewards.format_reward(direct) == 0.0
        assert rewards.math_reward(direct, s["answer"]) == 1.0  # right, but unformatted
        assert rewards.math_reward(direct_response(int(s["answer"]) + 1), s["answer"]) == 0.0


def test_heldout_never_in_train_or_corpus():
    train = list(islice(TOY.train_samples(3), 4000))
    for s in train:
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=\?", s["question"]).groups())
        assert not TOY.is_heldout(a, b) and s["answer"] == str(a + b)
    for doc in TOY.pretrain_corpus(4000, seed=3):
        if m := DOC.fullmatch(doc):
            assert not TOY.is_heldout(int(m[1]), int(m[2]))
    ev = TOY.eval_samples(300)
    pairs = [tuple(map(int, s["question"][:-2].split("+"))) for s in ev]
    assert all(TOY.is_heldout(a, b) for a, b in pairs) and len(set(pairs)) == 300
    # the hash split is about eval_frac of all problems, and b+a is held out with a+b
    import random
    rng = random.Random(0)
    draws = [(rng.randint(10, 9999), rng.randint(10, 9999)) for _ in range(5000)]
    assert 0.07 < sum(TOY.is_heldout(a, b) for a, b in draws) / 5000 < 0.13
    assert all(TOY.is_heldout(a, b) == TOY.is_heldout(b, a) for a, b in draws[:500])


def test_eval_samples_fixed_and_prefix():
    assert TOY.eval_samples(50) == ToyArithmetic().eval_samples(200)[:50]
    with pytest.raises(ValueError, match="held-out"):
        ToyArithmetic(ToyConfig(min_digits=1, max_digits=1)).eval_samples(1000)


def _classify(doc: str) -> str:
    m = DOC.fullmatch(doc)
    if m is None:
        return "general"
    a, b, resp = int(m[1]), int(m[2]), m[3]
    lang = "zh" if doc.startswith("用户") else "en"
    if _answer(resp) != a + b:
        return "wrong"
    if "<think>" not in resp:
        return "direct"
    return "worked" if _step_lang(resp) == lang else "cross_lang"


def test_corpus_mix_matches_config():
    toy = ToyArithmetic(ToyConfig(min_digits=2, max_digits=2))  # one difficulty: the shares are the settings'
    cfg = toy.cfg
    docs = toy.pretrain_corpus(20000, seed=1)
    kinds = [_classify(d) for d in docs]
    frac = lambda k: kinds.count(k) / len(kinds)
    arith = 1 - cfg.general_doc_frac
    assert abs(frac("general") - cfg.general_doc_frac) < 0.01
    for kind in ("worked", "direct", "wrong", "cross_lang"):
        assert abs(frac(kind) - getattr(cfg, f"{kind}_frac") * arith) < 0.015, kind
    wrong = [d for d, k in zip(docs, kinds) if k == "wrong"]
    assert 0.4 < sum("<think>" in d for d in wrong) / len(wrong) < 0.6  # both kinds of wrong
    for d in wrong:
        m = DOC.fullmatch(d)
        assert 1 <= abs(_answer(m[3]) - int(m[1]) - int(m[2])) <= cfg.wrong_max_delta
    zh = sum(d.startswith("用户") for d in docs) / len(docs)
    assert abs(zh - cfg.zh_frac) < 0.015


def test_corpus_hard_problems_rarely_worked_and_worked_in_english():
    cfg = TOY.cfg  # the default: operands of 1..3 digits
    docs = [d for d in TOY.pretrain_corpus(30000, seed=2) if DOC.fullmatch(d)]
    by_digits: dict[int, list[str]] = {}
    for d in docs:
        m = DOC.fullmatch(d)
        by_digits.setdefault(max(len(m[1]), len(m[2])), []).append(d)
    assert sorted(by_digits) == list(range(cfg.min_digits, cfg.max_digits + 1)) and cfg.max_digits > 2
    for n, ds in by_digits.items():
        right_worked = [d for d in ds if _classify(d) in ("worked", "cross_lang")]
        keep = cfg.worked_decay ** (n - cfg.min_digits)
        expect = (cfg.worked_frac + cfg.cross_lang_frac) * keep
        assert abs(len(right_worked) / len(ds) - expect) < 0.02, (n, len(right_worked) / len(ds), expect)
        thought = [d for d in ds if "<think>" in d]
        zh_chains = [d for d in thought if _step_lang(DOC.fullmatch(d)[3]) == "zh"]
        if n <= cfg.zh_think_max_digits:
            assert any(d.startswith("用户") for d in zh_chains)  # Chinese prompts, Chinese steps
        else:
            assert not zh_chains  # hard problems are worked in English only, whatever the prompt


def test_corpus_deterministic_and_seeded():
    assert TOY.pretrain_corpus(300, seed=7) == ToyArithmetic().pretrain_corpus(300, seed=7)
    assert TOY.pretrain_corpus(300, seed=7) != TOY.pretrain_corpus(300, seed=8)
    assert list(islice(TOY.train_samples(5), 50)) == list(islice(ToyArithmetic().train_samples(5), 50))
    assert list(islice(TOY.train_samples(5), 50)) != list(islice(TOY.train_samples(6), 50))


def test_corpus_characters_are_in_alphabet_and_tokenize_losslessly():
    alphabet = set(TOY.alphabet())
    assert not alphabet & set("<>/{}")  # tags are single tokens, never spelled out
    docs = TOY.pretrain_corpus(3000, seed=2) + [p["chosen"] + p["rejected"] for p in TOY.preference_pairs(300)]
    tok = build_char_tokenizer(TOY.alphabet())
    unk = tok.tok.token_to_id("<unk>")
    for doc in docs:
        bare = doc.replace(TOY_EOS, "")
        for tag in TOY_TAGS:
            bare = bare.replace(tag, "")
        assert set(bare) <= alphabet, set(bare) - alphabet
        ids = tok.encode(doc)
        assert unk not in ids and tok.decode(ids) == doc
    assert tok.encode("<think>") == [tok.tok.token_to_id("<think>")]


def test_general_samples_and_preference_pairs():
    gen = list(islice(TOY.general_samples(0), 400))
    assert {s["lang"] for s in gen} == {"en", "zh"} and all(s["task"] == "general" for s in gen)
    assert len({s["question"] for s in gen}) >= 20
    assert any(s["prompt"] == "User: say hello Assistant:" for s in gen)
    assert any(s["prompt"] == "用户: 说你好 助手:" for s in gen)
    for s in gen:
        assert all(bool(CJK.search(a)) == (s["lang"] == "zh") or a == "1 2 3" for a in s["answers"])
        assert general_response(s["question"], s["answers"][0], s["lang"]) == TOY.sft_response(s)
    pairs = TOY.preference_pairs(600, seed=0)
    assert pairs == TOY.preference_pairs(600, seed=0)
    counts = {"wrong_lang": 0, "rambling": 0, "no_format": 0}
    for p in pairs:
        zh = p["prompt"].startswith("用户")
        assert bool(CJK.search(p["chosen"])) == zh
        assert re.fullmatch(r"<think> [^<]+ </think><answer>[^<]+</answer>", p["chosen"])
        rej = p["rejected"]
        if "<think>" not in rej:
            counts["no_format"] += 1
        elif bool(CJK.search(rej)) != zh:
            counts["wrong_lang"] += 1
        else:
            assert len(rej) > len(p["chosen"]) + 4
            counts["rambling"] += 1
    assert all(c > 120 for c in counts.values()), counts


# --- Countdown ------------------------------------------------------------------------------------

def test_countdown_targets_reachable():
    cd = Countdown()
    samples = list(islice(cd.train_samples(0), 300)) + cd.eval_samples(100)
    for s in samples:
        assert 3 <= len(s["numbers"]) <= 4 and all(1 <= x <= 99 for x in s["numbers"])
        assert 1 <= s["target"] <= 999
        assert re.fullmatch(r"[\d+\-*/() ]+", s["expression"])
        assert sorted(int(x) for x in re.findall(r"\d+", s["expression"])) == sorted(s["numbers"])
        assert eval(s["expression"], {"__builtins__": {}}) == s["target"]
        assert str(s["numbers"]) in s["prompt"] and s["prompt"].endswith("</answer>. Assistant:")
    assert all(cd.is_heldout(s["numbers"], s["target"]) for s in cd.eval_samples(100))
    assert not any(cd.is_heldout(s["numbers"], s["target"]) for s in samples[:300])
    assert cd.eval_samples(20) == Countdown().eval_samples(20)


def test_countdown_reward_pays_the_expression():
    rewards = _rewards()
    for s in Countdown().eval_samples(50):
        good = f"<think> try it </think><answer>{s['expression']}</answer>"
        bad = f"<think> try it </think><answer>{' + '.join(map(str, s['numbers']))} + 1000</answer>"
        assert rewards.countdown_reward(good, s["numbers"], s["target"]) > 0
        assert rewards.countdown_reward(good, s["numbers"], s["target"]) > \
            rewards.countdown_reward(bad, s["numbers"], s["target"])


# --- GSM8K and JSONL ------------------------------------------------------------------------------

@pytest.mark.skipif(not (tasks.GSM8K_DIR / "test.jsonl").is_file(), reason="GSM8K data not present")
def test_gsm8k_test_loads():
    rewards = _rewards()
    test = load_gsm8k(tasks.GSM8K_DIR / "test.jsonl")
    assert len(test) == 1319
    assert all(rewards.parse_gold(s["answer"]) is not None and "," not in s["answer"] for s in test)
    assert test[0]["answer"] == "18" and test[0]["prompt"].endswith("farmers' market?. Assistant:")
    task = get_task("gsm8k")
    assert len(task.eval_samples()) == 1319 and task.eval_samples(5) == test[:5]


def test_gsm8k_lines_keep_their_columns(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text('{"question": "Two and two?", "answer": "2+2=4\\n#### 4", "level": 1}\n')
    s = load_gsm8k(p)[0]
    assert s["answer"] == "4" and s["solution"] == "2+2=4\n#### 4" and s["level"] == 1


def test_gsm8k_gold():
    assert tasks.gsm8k_gold("So 2+2=4\n#### 1,450,000") == "1450000"
    assert tasks.gsm8k_gold("no marker") is None


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def _one_line_error(exc, path, lineno):
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}:{lineno}: ") and "; " in msg, msg
    return msg


def test_malformed_lines_name_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"})
    p = _write(tmp_path, [good, "", '{"prompt": "p", "response": '])
    with pytest.raises(DataError) as e:
        load_sft_jsonl(p)
    assert "invalid JSON" in _one_line_error(e, p, 3)
    p = _write(tmp_path, [good, json.dumps({"prompt": "p"})])
    with pytest.raises(DataError) as e:
        load_sft_jsonl(p)
    assert "missing field 'response'" in _one_line_error(e, p, 2)
    p = _write(tmp_path, [json.dumps({"prompt": "p", "chosen": "", "rejected": "r"})])
    with pytest.raises(DataError) as e:
        load_pref_jsonl(p)
    assert "'chosen' is empty" in _one_line_error(e, p, 1)
    p = _write(tmp_path, [json.dumps({"prompt": "p", "answer": 42})])
    with pytest.raises(DataError) as e:
        load_jsonl_samples(p)
    assert "not a string" in _one_line_error(e, p, 1)
    p = _write(tmp_path, ["[1, 2]"])
    with pytest.raises(DataError) as e:
        load_sft_jsonl(p)
    _one_line_error(e, p, 1)
    with pytest.raises(DataError, match="file not found"):
        load_jsonl_samples(tmp_path / "nope.jsonl")


def test_bad_gold_names_file_and_line(tmp_path):
    _rewards()
    p = _write(tmp_path, [json.dumps({"prompt": "1+1?", "answer": "2"}), json.dumps({"prompt": "q", "answer": "banana"})])
    with pytest.raises(DataError) as e:
        load_jsonl_samples(p)
    assert "parse_gold" in _one_line_error(e, p, 2)
    p = _write(tmp_path, [json.dumps({"question": "q", "answer": "no marker here"})])
    with pytest.raises(DataError) as e:
        load_gsm8k(p)
    _one_line_error(e, p, 1)


def test_jsonl_samples_and_write_roundtrip(tmp_path):
    _rewards()
    rows = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(5)]
    rows.append({"prompt": "RAW: 2+2=", "answer": "4", "raw_prompt": True, "lang": "zh"})
    p = tmp_path / "sub" / "mine.jsonl"
    assert write_jsonl(p, rows) == 6
    assert [x.name for x in p.parent.iterdir()] == ["mine.jsonl"]  # no temp file left behind
    samples = load_jsonl_samples(p)
    assert samples[0]["prompt"] == r1_zero_prompt("What is 0+1?") and samples[0]["answer"] == "1"
    assert samples[5]["prompt"] == "RAW: 2+2=" and samples[5]["lang"] == "zh"
    assert all(s["task"] == "math" and s["source"] == "jsonl" for s in samples)
    rows[1]["difficulty"], rows[1]["tags"] = 3, ["easy"]  # any other column reaches the reward functions
    write_jsonl(p, rows)
    extra = load_jsonl_samples(p)[1]
    assert extra["difficulty"] == 3 and extra["tags"] == ["easy"] and extra["question"] == "What is 1+1?"
    sft = [{"prompt": "用户: 说你好 助手:", "response": "<answer>你好</answer>", "source": "toy"}]
    write_jsonl(tmp_path / "sft.jsonl", sft)
    assert load_sft_jsonl(tmp_path / "sft.jsonl") == sft
    write_jsonl(tmp_path / "pref.jsonl", TOY.preference_pairs(10))
    assert load_pref_jsonl(tmp_path / "pref.jsonl") == TOY.preference_pairs(10)


# --- registry and resume --------------------------------------------------------------------------

def test_get_task_names_and_errors():
    assert get_task("toy").name == "toy" and get_task("countdown").name == "countdown"
    assert get_task("toy", max_digits=3).cfg.max_digits == 3
    cfg = ToyConfig(zh_frac=0.5)
    assert get_task("toy", cfg=cfg).cfg is cfg
    with pytest.raises(DataError, match="alone"):
        get_task("toy", cfg=cfg, max_digits=3)
    assert get_task("gsm8k", data_dir="/x").train_path.as_posix() == "/x/train.jsonl"
    assert get_task("jsonl:a.jsonl").name == "jsonl:a.jsonl"
    with pytest.raises(DataError, match="valid: toy, countdown, gsm8k, jsonl:PATH"):
        get_task("gsm9k")
    with pytest.raises(DataError, match="unknown setting"):
        get_task("toy", max_digit=3)
    with pytest.raises(DataError, match="file not found"):
        next(get_task("jsonl:/nonexistent/x.jsonl").train_samples(0))
    with pytest.raises(ValueError, match="sum to"):
        ToyConfig(worked_frac=0.5)


def test_resume_equals_skipping(tmp_path):
    p = tmp_path / "seven.jsonl"
    write_jsonl(p, [{"prompt": f"q{i}", "response": "r"} for i in range(7)])
    # a file task with a loader that needs no gold parsing, so this test runs without rewards.py
    file_task = tasks._FileTask(p, p, load_sft_jsonl)
    for task in (TOY, Countdown(), file_task):
        full = list(islice(task.train_samples(11), 30))
        for start in (0, 1, 6, 7, 13):
            assert list(islice(task.train_samples(11, start=start), 30 - start)) == full[start:]
    stream = [s["prompt"] for s in islice(file_task.train_samples(11), 21)]
    assert all(sorted(stream[e * 7:(e + 1) * 7]) == sorted(f"q{i}" for i in range(7)) for e in range(3))
    assert stream[:7] != stream[7:14]  # each epoch reshuffled
