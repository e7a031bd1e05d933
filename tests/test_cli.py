"""train.py's command line: every flag once with its description and the default that runs, the
flag spellings users type, booleans, and one-line errors."""
import dataclasses
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import recipe
import settings
import train
from grpo import LOSS_PRESETS
from runtime import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def help_text():
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def flag_lines(text: str) -> dict[str, str]:
    """--flag -> its help text (continuation lines joined)."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.match(r"  (--\w+)(?: \[?[A-Z]+\]?)?(.*)", line)
        if m:
            current = m[1]
            assert current not in out, f"{current} listed twice"
            out[current] = m[2].strip()
        elif current and line.startswith(" " * 10) and line.strip():
            out[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return out


def test_help_lists_every_setting_once_with_a_description(help_text):
    lines = flag_lines(help_text)
    names = set()
    for key, prefix, _ in train.GROUPS:
        for f in dataclasses.fields(settings.CONFIGS[key]):
            names.add(prefix + f.name)
    assert set(lines) == {f"--{n}" for n in names}
    for flag, text in lines.items():
        assert len(text) > 10, f"{flag} has no description"


def test_help_defaults_are_the_ones_that_run(help_text):
    lines = flag_lines(help_text)
    for stage, value in (("pretrain", 600), ("sft", 150), ("rs", 100), ("distill", 300), ("rl", 20)):
        key = train.PRIMARY[stage]
        assert getattr(settings.stage_configs({}, stage)[key], "steps") == value
        assert re.search(rf"\b{stage}\b[^,]* {value}\b", lines["--steps"]), lines["--steps"]
    assert "zero/grpo 80" in lines["--steps"]
    assert "default 40" in lines["--rm_steps"]
    for name, preset in LOSS_PRESETS.items():
        assert re.search(rf"\b{name}\b[^,]* {preset.clip_high}\b", lines["--clip_high"]), lines["--clip_high"]
    assert "default 0.05" in lines["--general_doc_frac"] and "default 0.25" in lines["--general_frac"]


def test_shared_name_sets_both_configs_and_each_stage_reads_its_own():
    args = train.parse_args(["--steps", "7", "--lr", "0.5"])
    for stage in ("pretrain", "zero"):
        c = settings.stage_configs(args, stage)
        assert c["sft"].steps == c["grpo"].steps == 7 and c["sft"].lr == c["grpo"].lr == 0.5
    assert settings.stage_configs(args, "rm")["rm"].steps == 40  # the reward model has its own --rm_steps


def test_flag_spellings_and_booleans():
    a = train.parse_args(["--max-new-tokens=5", "--dynamic_sampling", "--group_size", "3"])
    assert a["grpo"]["max_new_tokens"] == 5 and a["loss"]["dynamic_sampling"] is True
    assert a["grpo"]["group_size"] == 3
    assert train.parse_args(["--dynamic_sampling", "false"])["loss"]["dynamic_sampling"] is False
    assert train.parse_args(["--dynamic_sampling=no"])["loss"]["dynamic_sampling"] is False
    assert settings.stage_configs(train.parse_args(["--loss", "dapo"]), "zero")["loss"].dynamic_sampling is True
    c = settings.stage_configs(train.parse_args(["--loss", "dapo", "--dynamic_sampling", "0"]), "zero")
    assert c["loss"].dynamic_sampling is False and c["loss"].clip_high == 0.28
    assert train.parse_args(["--rm_lr", "0.01"])["rm"] == {"lr": 0.01}
    assert train.parse_args(["--clip_low", "-0.5"])["loss"]["clip_low"] == -0.5  # refused later, by LossConfig


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "1"], "unknown flag --learning_rate"),
    (["--steps", "many"], "--steps 'many': expected a int"),
    (["--dynamic_sampling", "maybe"], "--dynamic_sampling 'maybe': expected a bool"),
    (["zero"], "unexpected argument 'zero'"),
    (["--steps"], "expected one argument"),
])
def test_parse_errors_are_user_errors(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        train.parse_args(argv)


@pytest.mark.parametrize("argv, message", [
    (["--stage", "zero", "--clip_low", "1.5"], "clip_low"),
    (["--stage", "zero", "--agg", "mean"], "agg='mean'"),
    (["--stage", "zero", "--device", "tpu"], "--device 'tpu'"),
    (["--stage", "zero", "--threads", "-1"], "--threads -1"),
    (["--stage", "zero", "--ckpt_every", "0"], "--ckpt_every 0"),
    (["--stage", "zero", "--group_size", "0"], "group_size=0"),
    (["--stage", "sft", "--max_len", "1"], "max_len=1"),
    (["--stage", "zero,,grpo"], "unknown stage ''"),
    (["--stage", "pretrain", "--model", "gpt5"], "unknown model preset 'gpt5'"),
    # silent no-ops before: refused at parse time, before any stage runs
    (["--stage", "pretrain,zero", "--group_size", "1"], "--group_size 1: GRPO scores each sample against its group"),
    (["--stage", "pretrain,grpo", "--temperature", "0"], "--temperature 0.0: greedy sampling"),
    (["--stage", "pretrain", "--steps", "0"], "--steps 0: stage pretrain would train nothing"),
    (["--stage", "rm", "--rm_steps", "0"], "--rm_steps 0: stage rm would train nothing"),
    (["--stage", "pretrain", "--batch_size", "0"], "batch_size=0"),
    (["--stage", "zero", "--minibatches", "0"], "minibatches=0"),
    (["--stage", "zero", "--mu", "0"], "mu=0"),
    (["--stage", "eval", "--eval_n", "0"], "--eval_n 0"),
    (["--stage", ""], "unknown stage ''"),
    (["--stage", "pretrain", "--lr", "inf"], "--lr 'inf': expected a finite number"),
    (["--stage", "pretrain", "--max_grad_norm", "nan"], "--max_grad_norm 'nan': expected a finite number"),
    (["--stage", "zero", "--dist_timeout", "0"], "--dist_timeout 0.0: give the seconds a rank waits"),
    (["--stage", "pretrain", "--dtype", "float16"], "--dtype 'float16': use auto, float32, bfloat16"),
    (["--stage", "pretrain", "--device", "tpu"], "--device 'tpu': use auto, cpu, cuda"),
])
def test_main_answers_bad_settings_in_one_line(argv, message, capsys, tmp_path):
    assert train.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_out_must_be_a_writable_directory(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    assert train.main(["--stage", "pretrain", "--out", str(tmp_path / "f")]) == 2
    assert "a file, not a directory" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    if os.access(ro, os.W_OK):  # root writes past the mode bits; /proc refuses even root
        ro = Path("/proc")
    assert train.main(["--stage", "pretrain", "--out", str(ro / "run"), "--model", "micro", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--out you can write to" in err, err


def test_a_bug_is_not_swallowed(monkeypatch, tmp_path):
    """main catches the user's mistakes only; an internal error keeps its traceback."""
    def broken(c, d):
        raise ValueError("an internal bug")
    monkeypatch.setitem(recipe.RUNNERS, "pretrain", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        train.main(["--stage", "pretrain", "--out", str(tmp_path)])


def test_a_full_disk_anywhere_is_one_line(monkeypatch, tmp_path, capsys):
    """Besides checkpoints (tests/test_train.py), any write that meets a full disk ends in one line."""
    def full(c, d):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.jsonl"))
    monkeypatch.setitem(recipe.RUNNERS, "pretrain", full)
    assert train.main(["--stage", "pretrain", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: writing {tmp_path / 'x.jsonl'} failed: the disk is full; rerun the same command after "
                   "fixing it: the run resumes from its last checkpoint")
