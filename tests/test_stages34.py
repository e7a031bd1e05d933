"""R1 stages 3 and 4 and distillation end to end at micro size: rm, rs, rl, distill, summary, all.

A micro model trained for a few steps never writes a verified answer, so the tests that need
verified samples replace the sampler (`generate`) or the filter (`collect_verified`) in recipe.py
with canned responses; the stages around them run for real.
"""
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import evaluation
import recipe
import reward_model as rmod
import toy
import train
from checkpoint import load_reward_model
from data import write_jsonl
from rewards import combine_rewards, rule_reward
from tests.test_train import PER_RANK_STATS, ROOT, TINY, Killed, _free_port, kill_after_checkpoint, strip_timing
from tokenizer import Tokenizer

MORE = ["--rm_steps", "3", "--rm_batch_size", "8", "--rm_eval_pairs", "16", "--rs_prompts", "8",
        "--rs_samples", "5", "--distill_prompts", "8", "--student_model", "micro", "--student_steps", "2"]


def run(*args) -> int:
    return train.main([*args, *TINY, *MORE])


def metrics(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def jsonl(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """A run directory with a micro base model and a reward model trained on it."""
    out = tmp_path_factory.mktemp("run34")
    assert run("--stage", "pretrain,rm", "--out", str(out), "--steps", "4") == 0
    return out


def fresh(out, tmp_path, *stages):
    """A new run directory whose `stages` link to the shared run's models (kept if it exists)."""
    new = tmp_path / "r"
    for st in stages:
        if (new / st / "model").exists():
            continue
        (new / st).mkdir(parents=True)
        os.symlink(out / ("pretrain" if st != "rm" else "rm") / "model", new / st / "model")
    return new


# --- rm -------------------------------------------------------------------------------------------

def test_rm_stage_writes_loadable_model_and_logs_accuracy(out):
    rows = metrics(out / "rm" / "metrics.jsonl")
    assert [r["step"] for r in rows[:3]] == [1, 2, 3] and "loss" in rows[0]
    assert 0.0 <= rows[-1]["eval/pairwise_accuracy"] <= 1.0 and rows[-1]["eval/pairs"] == 16
    rm, tok = load_reward_model(out / "rm" / "model")
    s = rmod.score_texts(rm, tok, ["User: say hello Assistant:"], ["<think> hi </think><answer>hi</answer>"], 64)
    assert s.shape == (1,) and torch.isfinite(s).all()
    cfg = json.loads((out / "rm" / "run_config.json").read_text())
    assert cfg["rm"]["steps"] == 3 and cfg["rm"]["batch_size"] == 8


def test_rm_learns_separable_pairs_from_file(out, tmp_path, capsys):
    """--data: the toy's pairs from a file, enough steps to separate them; last 10% held out."""
    data = tmp_path / "pref.jsonl"
    write_jsonl(data, toy.ToyArithmetic().preference_pairs(200, seed=3))
    new = fresh(out, tmp_path, "pretrain")
    assert train.main(["--stage", "rm", "--out", str(new), "--data", str(data), *TINY,
                       "--rm_steps", "30", "--rm_batch_size", "16", "--rm_lr", "3e-3"]) == 0
    acc = metrics(new / "rm" / "metrics.jsonl")[-1]
    assert acc["eval/pairs"] == 20 and acc["eval/pairwise_accuracy"] >= 0.8, acc
    assert "[rm] held-out pairwise accuracy" in capsys.readouterr().out


# --- rs -------------------------------------------------------------------------------------------

def _general_request(prompt):
    m = re.fullmatch(r"(?:User|用户): (.*) (?:Assistant|助手):", prompt)
    for t in toy.GENERAL_TEMPLATES:
        for lang, (request, answers) in t.items():
            if m and request == m[1]:
                return request, answers, lang
    return None


OVERLONG = "<think> and on </think><answer>x"


def canned(prompt):
    """Five (response, finish reason) per prompt: math gets right, duplicate, wrong answer, steps in
    the other language, and cut-off; general gets good, rambling, unformatted, other language, cut-off."""
    m = re.search(r"(\d+)\+(\d+)=\?", prompt)
    if m:
        a, b, lang = int(m[1]), int(m[2]), "zh" if prompt.startswith("用户") else "en"
        right = toy.worked_response(a, b, lang)
        return [(right, "eos"), (right, "eos"), (toy.worked_response(a, b, lang, a + b + 1), "eos"),
                (toy.worked_response(a, b, toy.OTHER_LANG[lang]), "eos"), (right, "length")]
    request, answers, lang = _general_request(prompt)
    return [(toy.general_response(request, answers[0], lang), "eos"),
            (f"<think> {request} </think><answer>{answers[0]}, {answers[0]}, {answers[0]}</answer>", "eos"),
            (answers[0], "eos"), (toy.general_response("say hi", "hi", "en" if lang == "zh" else "zh"), "eos"),
            (OVERLONG, "length")]


@pytest.fixture
def fake_sampler(out, monkeypatch):
    tok = Tokenizer.from_dir(out / "pretrain" / "model")

    def generate(model, prompts, max_new_tokens, num_samples=1, **kw):
        toks, finish = [], []
        for ids in prompts:
            for text, why in canned(tok.decode(ids))[:num_samples]:
                toks.append(tok.encode(text) + ([tok.eos_id] if why == "eos" else []))
                finish.append(why)
        return SimpleNamespace(tokens=toks, finish_reasons=finish)
    monkeypatch.setattr(recipe, "generate", generate)  # collect_verified and best_general


@pytest.mark.parametrize("frac", [0.75, 0.5])
def test_rs_keeps_verified_samples_at_the_ratio(out, tmp_path, fake_sampler, frac):
    new = fresh(out, tmp_path, "pretrain", "grpo", "rm")
    assert run("--stage", "rs", "--out", str(new), "--steps", "2", "--rs_reasoning_frac", str(frac)) == 0
    rows = jsonl(new / "rs" / "rs_data.jsonl")
    reasoning = [r for r in rows if r["source"] == "reasoning"]
    general = [r for r in rows if r["source"] == "general"]
    stream = toy.ToyArithmetic().train_samples(recipe.derive_seed(0, "rs"))  # --seed 0
    prompts = {next(stream)["prompt"] for _ in range(8)}
    # one per prompt: the duplicate, the wrong answer, the other language and the cut-off are dropped
    assert len(reasoning) == len(prompts)
    for r in reasoning:
        assert r["prompt"] in prompts and r["response"] == canned(r["prompt"])[0][0]
    assert len(general) == round(len(reasoning) * (1 - frac) / frac)
    for r in general:
        assert r["response"] in [t for t, why in canned(r["prompt"]) if why == "eos"]
    counts = metrics(new / "rs" / "metrics.jsonl")[0]
    assert counts["step"] == 0 and counts["rs/reasoning"] == len(reasoning) and counts["rs/general"] == len(general)
    assert (new / "rs" / "model" / "model.safetensors").is_file()


def test_mix_at_ratio():
    assert [len(x) for x in recipe.mix_at_ratio(list(range(100)), list(range(50)), 0.75)] == [100, 33]
    assert [len(x) for x in recipe.mix_at_ratio(list(range(30)), list(range(5)), 0.75)] == [15, 5]
    assert [len(x) for x in recipe.mix_at_ratio(list(range(30)), [], 1.0)] == [30, 0]


def test_rs_without_reward_model_says_what_to_do(out, tmp_path, capsys):
    new = fresh(out, tmp_path, "pretrain", "grpo")
    assert run("--stage", "rs", "--out", str(new)) == 2
    err = capsys.readouterr().err
    assert "no reward model at" in err and "run --stage rm first, or pass --reward_model DIR" in err
    assert run("--stage", "rl", "--out", str(new)) == 2
    assert "run --stage rs first" in capsys.readouterr().err


# --- rl -------------------------------------------------------------------------------------------

def test_routed_reward_sends_each_prompt_to_its_reward(out):
    t = toy.ToyArithmetic()
    math_s, gen_s = next(t.train_samples(0)), next(t.general_samples(0))
    a, b = map(int, re.findall(r"\d+", math_s["question"]))
    texts = [toy.worked_response(a, b, math_s["lang"]), "<answer>1</answer>",
             "<think> x </think><answer>hi</answer>", "hello"]
    rm, tok = load_reward_model(out / "rm" / "model")
    rm_score = lambda ps, ts: rmod.score_texts(rm, tok, ps, ts, 256).tolist()  # noqa: E731
    w = {"accuracy": 1.0, "format": 0.1, "language": 1.0}
    rewards, comps = recipe.routed_reward(rule_reward(w), rm_score)(texts, [math_s, math_s, gen_s, gen_s])
    assert len(rewards) == 4
    for i in range(2):  # the math prompt: rule rewards
        assert rewards[i] == pytest.approx(combine_rewards(texts[i], math_s["prompt"], math_s, w)[0])
    expect = rm_score([gen_s["prompt"]] * 2, texts[2:])  # the general prompt: the reward model's score
    assert rewards[2:] == pytest.approx(expect, abs=1e-6)
    assert sum(comps["rm"]) / len(comps["rm"]) == pytest.approx(sum(expect) / 2, abs=1e-6)
    assert sum(comps["accuracy"]) / len(comps["accuracy"]) == 0.5
    assert set(comps) == {"rm", "accuracy", "format", "language"}


def test_rl_stage_mixes_general_and_reasoning_prompts(out, tmp_path, monkeypatch):
    new = fresh(out, tmp_path, "rs", "rm")
    seen = []
    real = recipe.routed_reward

    def spy(rule, rm_scores):
        score = real(rule, rm_scores)

        def wrapped(texts, samples):
            seen.append([s["task"] for s in samples[::4]])  # one per group of --group_size 4
            return score(texts, samples)
        return wrapped
    monkeypatch.setattr(recipe, "routed_reward", spy)
    assert run("--stage", "rl", "--out", str(new), "--steps", "2", "--general_frac", "0.5") == 0
    assert seen == [["math", "math", "general", "general"]] * 2  # round(4 * 0.5) general a step
    rows = metrics(new / "rl" / "metrics.jsonl")
    for key in ("reward/rm", "reward/accuracy", "reward/language", "eval/accuracy"):
        assert key in rows[-1], key
    assert (new / "rl" / "model" / "model.safetensors").is_file()


def test_rl_stage_on_two_ranks_samples_what_one_process_does(out, tmp_path):
    """Stage 4's mixture under torchrun: each rank takes reasoning and general prompts, yet every
    prompt is seeded by its place in the one-process batch (PromptStream.index), so the two runs match."""
    one, two = fresh(out, tmp_path / "one", "rs", "rm"), fresh(out, tmp_path / "two", "rs", "rm")
    args = ("--stage", "rl", "--steps", "2", "--general_frac", "0.5", *TINY, *MORE)
    assert train.main([*args, "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "train.py"), *args, "--out", str(two)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    r1, r2 = strip_timing(metrics(one / "rl" / "metrics.jsonl")), strip_timing(metrics(two / "rl" / "metrics.jsonl"))
    assert [r["step"] for r in r2] == [0, 1, 2]
    bad = []
    for a, b in zip(r1, r2):
        assert a.keys() == b.keys()
        bad += [(a["step"], k, a[k], b[k]) for k in a
                if k not in PER_RANK_STATS and a[k] != pytest.approx(b[k], rel=1e-4, abs=1e-5)]
    assert not bad, bad


def test_rl_resume_repeats_uninterrupted_run(out, tmp_path, monkeypatch, capsys):
    """The checkpoint holds both prompt-stream positions, so a resumed mixed run is the same run."""
    args = ("--stage", "rl", "--steps", "4", "--ckpt_every", "2", "--general_frac", "0.5")
    a, b = fresh(out, tmp_path / "a", "rs", "rm"), fresh(out, tmp_path / "b", "rs", "rm")
    assert run(*args, "--out", str(a)) == 0
    kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Killed):
        run(*args, "--out", str(b))
    monkeypatch.undo()
    capsys.readouterr()
    assert run(*args, "--out", str(b)) == 0
    assert "at step 2" in capsys.readouterr().out
    timing = ("gen_time", "train_time", "gen_tok_per_s", "train_tok_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(metrics(b / "rl" / "metrics.jsonl")) == strip(metrics(a / "rl" / "metrics.jsonl"))


# --- distill, summary, all ------------------------------------------------------------------------

def _perfect_traces(model, tok, task, n_prompts, k, g, seed, d):
    stream = task.train_samples(seed)
    return [{"prompt": s["prompt"], "response": task.sft_response(s), "source": "reasoning"}
            for s in (next(stream) for _ in range(n_prompts))]


def _best_general(model, tok, rm, rm_tok, task, n, k, g, max_len, seed, d):
    stream = task.general_samples(seed)
    return [{"prompt": s["prompt"], "response": task.sft_response(s), "source": "general", "rm_score": 0.0}
            for s in (next(stream) for _ in range(n))]


def test_distill_compares_student_with_equal_time_grpo(out, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipe, "collect_verified", _perfect_traces)
    new = fresh(out, tmp_path, "pretrain", "rl")
    assert run("--stage", "distill", "--out", str(new), "--steps", "3") == 0
    assert (new / "student_base" / "model" / "config.json").is_file()  # made by distill
    student = json.loads((new / "student_base" / "run_config.json").read_text())["sft"]
    assert student["steps"] == 2 and student["batch_size"] == 8  # --student_steps, and TINY's --batch_size
    blob = json.loads((new / "distill" / "comparison.json").read_text())
    assert set(blob["results"]) == {"teacher", "student base", "distilled student", "student + GRPO, same time"}
    assert blob["grpo_steps"] >= 1 and blob["sft_seconds"] > 0
    for ev in blob["results"].values():
        assert {"accuracy", "format", "response_length"} <= set(ev)
    assert len(jsonl(new / "distill" / "distill_data.jsonl")) == 8
    printed = capsys.readouterr().out
    assert "distilled student" in printed and "student + GRPO, same time" in printed


def test_all_runs_every_stage_and_prints_one_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipe, "collect_verified", _perfect_traces)  # sft, rs, distill
    monkeypatch.setattr(recipe, "best_general", _best_general)
    new = tmp_path / "all"
    assert run("--stage", "all", "--out", str(new), "--steps", "2") == 0
    rows = json.loads((new / "summary.json").read_text())
    assert [r["stage"] for r in rows] == list(evaluation.SUMMARY_STAGES)
    for r in rows:
        assert {"accuracy", "format", "language", "rm_score", "response_length"} <= set(r)
        assert math.isfinite(r["rm_score"])
    table = capsys.readouterr().out
    assert "rm_score" in table and "distill_zero" in table


def test_sampled_data_does_not_depend_on_the_rank_count():
    """sft, rs and distill sample their data in rank shares; each prompt is seeded by its index, so
    two ranks' shares hold what one process samples."""
    from model import Transformer, preset
    from runtime import Dist
    from tokenizer import build_char_tokenizer
    task = toy.ToyArithmetic()
    tok = build_char_tokenizer(task.alphabet())
    torch.manual_seed(0)
    model = Transformer(preset("micro", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                               pad_token_id=tok.pad_id))
    stream = task.train_samples(0)
    samples = [next(stream) for _ in range(5)]
    g = recipe.GRPOConfig(max_new_tokens=6)

    def texts(d):
        return {(s["prompt"], j): roll.tokens[p * 2 + j]
                for chunk, roll in recipe.sample_share(model, tok, samples, 2, g, 7, d)
                for p, s in enumerate(chunk) for j in range(2)}
    one = texts(Dist())
    assert one == {**texts(Dist(rank=0, world=2)), **texts(Dist(rank=1, world=2))}
