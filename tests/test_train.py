"""train.py end to end at micro size: every stage, resume, micro-batch and 2-rank invariance, bad input.
(The command line itself: tests/test_cli.py.)"""
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import grpo
import recipe
import runtime
import train
from checkpoint import load_pretrained
from tokenizer import Tokenizer
from model import Transformer, preset
from optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
# micro model, few steps: every stage runs in the CPU suite
TINY = ["--model", "micro", "--eval_n", "8", "--eval_every", "2", "--prompts_per_step", "4",
        "--group_size", "4", "--max_new_tokens", "24", "--micro_batch", "8", "--batch_size", "8",
        "--sft_prompts", "16", "--sft_samples", "2", "--threads", "1"]


def run(*args) -> int:
    return train.main([*args, *TINY])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run("--stage", "pretrain", "--out", str(out), "--steps", "6", "--ckpt_every", "3") == 0
    return out


def metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_pretrain_writes_hf_checkpoint(pretrained):
    mdir = pretrained / "pretrain" / "model"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (mdir / f).is_file(), f
    rows = metrics(pretrained / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    cfg = json.loads((pretrained / "pretrain" / "run_config.json").read_text())
    assert cfg["sft"]["steps"] == 6 and cfg["run"]["model"] == "micro"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(mdir)
    ours = load_pretrained(mdir)
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo", "cispo"])
def test_zero_stage_each_loss_preset(pretrained, tmp_path, loss, capsys):
    out = tmp_path / "r"
    (out / "pretrain").mkdir(parents=True)
    os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
    assert run("--stage", "zero", "--out", str(out), "--steps", "2", "--loss", loss) == 0
    rows = metrics(out / "zero" / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0]
    assert [r["step"] for r in rows[1:]] == [1, 2]
    for key in ("reward", "reward/accuracy", "reward/format", "response_length", "clip_frac", "loss", "entropy",
                "is_logw_abs_mean", "is_w_max", "is_capped_frac"):
        assert key in rows[1], key
    # sampler vs trainer on CPU in float32: rounding only; a micro model's entropy is near log(V)
    assert rows[1]["is_logw_abs_mean"] < 1e-3 and rows[1]["entropy"] > 0.1
    assert (out / "zero" / "model" / "model.safetensors").is_file()
    resolved = json.loads((out / "zero" / "run_config.json").read_text())
    assert resolved["loss"] == dataclasses.asdict(grpo.LOSS_PRESETS[loss])
    assert "[zero] step 2/2" in capsys.readouterr().out


def test_zero_stage_importance_correction_ignore_eos_mask_truncated(pretrained, tmp_path):
    """--is_correction token_tis with --ignore_eos: every completion runs to max_new_tokens, so with
    --mask_truncated none of them has a loss (num_tokens is 0 and so is the policy loss)."""
    out = tmp_path / "r"
    (out / "pretrain").mkdir(parents=True)
    os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
    assert run("--stage", "zero", "--out", str(out), "--steps", "1", "--is_correction", "token_tis",
               "--ignore_eos", "--mask_truncated", "--kl_coef", "0", "--reward_norm", "per_component",
               "--adv_baseline", "rloo", "--adv_scale", "batch") == 0
    row = metrics(out / "zero" / "metrics.jsonl")[1]
    assert row["response_length"] == 24 and row["finish_eos"] == 0  # TINY's max_new_tokens
    assert row["pg_loss"] == 0 and row["grad_norm"] == 0
    resolved = json.loads((out / "zero" / "run_config.json").read_text())
    assert resolved["loss"]["is_correction"] == "token_tis" and resolved["grpo"]["ignore_eos"] is True


def readme_plugin() -> str:
    """The reward plug-in file shown in README.md ("# brevity.py" block): the test runs that text."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n# brevity.py\n") + len("```python\n")
    return text[start:text.index("```", start)]


def test_reward_plugin_end_to_end(pretrained, tmp_path):
    """README's brevity.py on a JSONL task through train.main: the plug-in sees the line's own column
    (max_chars), its mean is logged, and the step's reward is the weighted sum."""
    from data import write_jsonl
    from toy import ToyArithmetic
    rows = [{"prompt": s["prompt"], "answer": s["answer"], "raw_prompt": True, "max_chars": 5}
            for s in ToyArithmetic().eval_samples(8)]
    write_jsonl(tmp_path / "problems.jsonl", rows)
    (tmp_path / "brevity.py").write_text(readme_plugin())
    out = tmp_path / "r"
    (out / "pretrain").mkdir(parents=True)
    os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
    assert run("--stage", "zero", "--out", str(out), "--steps", "2", "--task", f"jsonl:{tmp_path / 'problems.jsonl'}",
               "--reward", f"{tmp_path / 'brevity.py'}:brevity=0.5", "--reward", "rewards:score_format=0") == 0
    for row in metrics(out / "zero" / "metrics.jsonl")[1:]:
        assert row["reward/brevity"] < 0  # the micro model's completions run past 5 characters
        want = row["reward/accuracy"] + 0.1 * row["reward/format"] + 0.5 * row["reward/brevity"]
        assert row["reward"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert "reward/score_format" in row
    resolved = json.loads((out / "zero" / "run_config.json").read_text())
    assert resolved["run"]["reward"].endswith("brevity.py:brevity=0.5,rewards:score_format=0")


def test_reward_plugin_errors(pretrained, tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def short(completions, samples):\n    return [0.0]\n")
    assert train.main(["--stage", "zero", "--reward", f"{tmp_path}/missing.py:f"]) == 2
    assert "not found" in _err(capsys)
    assert train.main(["--stage", "zero", "--reward", f"{bad}:long"]) == 2
    assert "has no function 'long'" in _err(capsys)
    out = tmp_path / "r"
    (out / "pretrain").mkdir(parents=True)
    os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
    assert run("--stage", "zero", "--out", str(out), "--steps", "1", "--reward", f"{bad}:short") == 2
    assert "reward 'short' returned 1 values for 16 completions" in _err(capsys)
    assert not (out / "zero" / "model").exists()


def test_full_chain_sft_grpo_eval_plot(pretrained, tmp_path, capsys):
    out = tmp_path / "r"
    (out / "pretrain").mkdir(parents=True)
    os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
    assert run("--stage", "zero", "--out", str(out), "--steps", "1") == 0
    # cold-start data from a file (a micro model rarely produces verified samples)
    from data import write_jsonl
    from toy import ToyArithmetic
    toy = ToyArithmetic()
    stream = toy.train_samples(5)
    rows = [{"prompt": s["prompt"], "response": toy.sft_response(s)} for s in (next(stream) for _ in range(16))]
    write_jsonl(tmp_path / "cold.jsonl", rows)
    assert run("--stage", "sft", "--out", str(out), "--steps", "2", "--data", str(tmp_path / "cold.jsonl")) == 0
    assert run("--stage", "grpo", "--out", str(out), "--steps", "2") == 0
    g = metrics(out / "grpo" / "metrics.jsonl")
    assert "reward/language" in g[1]
    capsys.readouterr()
    assert run("--stage", "eval", "--out", str(out), "--k", "2") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ev = json.loads(last)
    for key in ("accuracy", "format", "response_length", "language", "pass@2", "maj@2"):
        assert key in ev
    assert ev["checkpoint"].endswith("grpo/model")
    pytest.importorskip("matplotlib")
    assert run("--stage", "plot", "--out", str(out), "--runs", f"{out / 'zero'},{out / 'grpo'}") == 0
    assert (out / "accuracy.png").is_file() and (out / "length.png").is_file()


def test_sft_stage_samples_from_zero_model(pretrained, tmp_path):
    """Without --data, sft samples the R1-Zero model and keeps only verified samples (maybe none)."""
    out = tmp_path / "r"
    (out / "pretrain").mkdir(parents=True)
    os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
    (out / "zero").mkdir()
    os.symlink(pretrained / "pretrain" / "model", out / "zero" / "model")  # stands in for R1-Zero
    code = run("--stage", "sft", "--out", str(out), "--steps", "1")
    jl = out / "sft" / "cold_start.jsonl"
    assert jl.is_file()
    from rewards import accuracy_reward, format_reward
    for r in (json.loads(x) for x in jl.read_text().splitlines() if x.strip()):
        assert format_reward(r["response"]) == 1.0
        q = r["prompt"].split(": ", 1)[1].rsplit(" ", 1)[0]
        a, b = map(int, q.rstrip("=?").split("+"))
        assert accuracy_reward(r["response"], {"task": "math", "answer": str(a + b)}) == 1.0
    assert code in (0, 2)  # 2 when nothing passed the filter: a clear error, not a crash


class Killed(BaseException):
    """kill -9 in-process: raised right after a checkpoint is written, nothing after it runs (train.main
    catches only Exceptions; its lock release is what the kernel does for a killed process)."""


def kill_after_checkpoint(monkeypatch, at_step: int) -> None:
    real = runtime.StageRun.save_state

    def save_state(self, model, optimizer, tok, state):
        real(self, model, optimizer, tok, state)
        if state["step"] == at_step:
            raise Killed
    monkeypatch.setattr(runtime.StageRun, "save_state", save_state)


# grpo_loss's std of the advantages is over each rank's own sequences, then averaged: it depends on
# how the batch is split (a logged statistic; the update does not)
PER_RANK_STATS = ("adv_std",)
TIMING = ("gen_time", "train_time", "gen_tok_per_s", "train_tok_per_s", "tok_per_s")


def strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def with_base(pretrained, out: Path) -> Path:
    (out / "pretrain").mkdir(parents=True)
    os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
    return out


def test_resume_repeats_uninterrupted_run(pretrained, tmp_path, monkeypatch, capsys):
    a, b = with_base(pretrained, tmp_path / "a"), with_base(pretrained, tmp_path / "b")
    args = ("--stage", "zero", "--steps", "4", "--ckpt_every", "2")
    assert run(*args, "--out", str(a)) == 0
    kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Killed):
        run(*args, "--out", str(b))
    monkeypatch.undo()
    # what kills leave: a temporary of an interrupted checkpoint write, half a metrics line
    (b / "zero" / "ckpt.tmp-999").mkdir()
    with open(b / "zero" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    capsys.readouterr()
    assert run(*args, "--out", str(b)) == 0
    assert f"resuming from {b / 'zero' / 'ckpt'} at step 2" in capsys.readouterr().out
    ra, rb = strip_timing(metrics(a / "zero" / "metrics.jsonl")), strip_timing(metrics(b / "zero" / "metrics.jsonl"))
    assert [r["step"] for r in rb] == [0, 1, 2, 3, 4]
    assert rb == ra
    wa = load_pretrained(a / "zero" / "model").state_dict()
    wb = load_pretrained(b / "zero" / "model").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in (b / "zero").iterdir() if p.name.startswith("ckpt")) == ["ckpt"]


PRETRAIN4 = ("--stage", "pretrain", "--steps", "4", "--ckpt_every", "2")


@pytest.fixture(scope="module")
def pretrain4(tmp_path_factory):
    """An uninterrupted 4-step pretraining, checkpointed every 2 steps: what every resume must give."""
    out = tmp_path_factory.mktemp("ref")
    assert run(*PRETRAIN4, "--out", str(out)) == 0
    return out / "pretrain"


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_pretrained(a).state_dict(), load_pretrained(b).state_dict()
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_continues_the_saved_state_not_a_fresh_start(pretrain4, tmp_path, monkeypatch):
    """A deterministic fresh rerun repeats the uninterrupted run too; a checkpoint whose data position
    was moved must continue from the moved position, so only a real resume passes."""
    out = tmp_path / "r"
    kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Killed):
        run(*PRETRAIN4, "--out", str(out))
    monkeypatch.undo()
    f = out / "pretrain" / "ckpt" / "trainer_state.pt"
    blob = torch.load(f, weights_only=False)
    blob["state"]["pos"] += 3  # three examples further along the stream than the run got
    torch.save(blob, f)
    assert run(*PRETRAIN4, "--out", str(out)) == 0
    ref = strip_timing(metrics(pretrain4 / "metrics.jsonl"))
    got = strip_timing(metrics(out / "pretrain" / "metrics.jsonl"))
    assert got[:2] == ref[:2]                # steps 1-2: the killed run's rows, kept
    assert got[2]["loss"] != ref[2]["loss"]  # step 3: other examples than a fresh start would take
    assert not same_weights(out / "pretrain" / "model", pretrain4 / "model")


def test_kill_between_the_two_renames_of_a_checkpoint_swap(pretrain4, tmp_path, capsys):
    """A real SIGKILL (checkpoint.KILL_BETWEEN_RENAMES) after ckpt/ was moved aside and before the new
    one took its place: the rerun puts the old one back, resumes from it, and cleans up."""
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", checkpoint.KILL_BETWEEN_RENAMES: "ckpt"}
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *PRETRAIN4, "--out", str(out), *TINY],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == -9, res.stderr[-2000:]
    left = sorted(p.name.split("-")[0] for p in (out / "pretrain").iterdir() if p.name.startswith("ckpt"))
    assert left == ["ckpt.old", "ckpt.tmp"]  # the window: no ckpt/ at all
    capsys.readouterr()
    assert run(*PRETRAIN4, "--out", str(out)) == 0
    assert "at step 2" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "pretrain").iterdir() if p.name.startswith("ckpt")) == ["ckpt"]
    assert same_weights(out / "pretrain" / "model", pretrain4 / "model")


def poison_parameters_at(monkeypatch, at_step: int) -> None:
    """The optimizer step number `at_step` leaves a NaN in the first parameter."""
    real, count = torch.optim.AdamW.step, [0]

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        count[0] += 1
        if count[0] == at_step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("at_step", [2, 4])
def test_nan_at_a_checkpoint_step_is_never_saved(pretrain4, tmp_path, monkeypatch, capsys, at_step):
    out = tmp_path / "r"
    poison_parameters_at(monkeypatch, at_step)
    assert run(*PRETRAIN4, "--out", str(out)) == 2
    monkeypatch.undo()
    err = _err(capsys)
    assert f"step {at_step}: parameters non-finite" in err and "--restart" in err
    ckpt = out / "pretrain" / "ckpt"
    if at_step == 2:
        assert "no checkpoint was saved yet" in err and not ckpt.exists()
    else:
        assert f"the last checkpoint with finite weights is {ckpt} (step 2)" in err
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        assert state["state"]["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "pretrain" / "model").exists()
    assert run(*PRETRAIN4, "--out", str(out)) == 0  # the same command again: the blow-up was injected
    assert same_weights(out / "pretrain" / "model", pretrain4 / "model")


def test_eval_of_a_non_finite_checkpoint_is_an_error(pretrain4, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(pretrain4 / "model", bad)
    m = load_pretrained(bad)
    with torch.no_grad():
        m.embed_tokens.weight[0, 0] = float("nan")
    checkpoint.save_pretrained(m, bad, Tokenizer.from_dir(pretrain4 / "model"))
    assert train.main(["--stage", "eval", "--init", str(bad), *TINY]) == 2
    assert "the weights hold NaN or inf" in _err(capsys)


@pytest.mark.parametrize("fault", ["torch_writer", "enospc"])
def test_full_disk_keeps_the_previous_checkpoint(pretrain4, tmp_path, monkeypatch, capsys, fault):
    out = tmp_path / "r"
    real, count = torch.save, [0]

    def save(obj, f, *a, **kw):
        count[0] += 1
        if count[0] == 2:  # the second checkpoint, step 4
            if fault == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1408 vs 1302")
        return real(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", save)
    assert run(*PRETRAIN4, "--out", str(out)) == 2
    monkeypatch.undo()
    assert "the disk is full" in _err(capsys)
    state = torch.load(out / "pretrain" / "ckpt" / "trainer_state.pt", weights_only=False)["state"]
    assert state["step"] == 2
    assert sorted(p.name for p in (out / "pretrain").iterdir() if p.name.startswith("ckpt")) == ["ckpt"]
    assert run(*PRETRAIN4, "--out", str(out)) == 0
    assert same_weights(out / "pretrain" / "model", pretrain4 / "model")


def test_changed_settings_are_refused_a_finished_stage_is_done(pretrain4, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    shutil.copytree(pretrain4, out / "pretrain")
    weights = (out / "pretrain" / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    # the same settings (threads and checkpoint interval do not shape the result): done, nothing runs
    assert run(*PRETRAIN4, "--out", str(out), "--threads", "2", "--ckpt_every", "3") == 0
    assert "already done" in capsys.readouterr().out
    assert (out / "pretrain" / "model" / "model.safetensors").read_bytes() == weights
    # another learning rate: refused, the finished run untouched
    assert run(*PRETRAIN4, "--out", str(out), "--lr", "1e-3") == 2
    err = _err(capsys)
    assert "finished run with other settings (--lr 0.003 -> 0.001)" in err and "--restart" in err
    assert json.loads((out / "pretrain" / "run_config.json").read_text())["sft"]["lr"] == 3e-3
    # a stopped run with another --seed is refused too
    killed = tmp_path / "k"
    kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Killed):
        run(*PRETRAIN4, "--out", str(killed))
    monkeypatch.undo()
    assert run(*PRETRAIN4, "--out", str(killed), "--seed", "1") == 2
    assert "stopped run with other settings (--seed 0 -> 1)" in _err(capsys)
    # --restart starts over with the new settings
    assert run(*PRETRAIN4, "--out", str(out), "--lr", "1e-3", "--restart") == 0
    assert (out / "pretrain" / "model" / "model.safetensors").read_bytes() != weights
    assert json.loads((out / "pretrain" / "run_config.json").read_text())["sft"]["lr"] == 1e-3


def test_a_second_run_of_the_same_stage_is_refused(tmp_path, capsys):
    d = tmp_path / "pretrain"
    d.mkdir()
    with open(d / runtime.LOCK_FILE, "a") as held:  # another process's run, holding its lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run("--stage", "pretrain", "--out", str(tmp_path), "--steps", "1") == 2
        assert "another run is writing" in _err(capsys)
    assert not (d / "metrics.jsonl").exists()
    assert run("--stage", "pretrain", "--out", str(tmp_path), "--steps", "1") == 0  # once it is gone


# --- the update does not depend on micro-batches or ranks ---------------------------------------

def _fixed_batch(seed=0, N=8, L=14, V=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N, L), generator=g)
    start = torch.randint(0, 4, (N,), generator=g)
    mask = torch.zeros(N, L)
    for i in range(N):
        mask[i, 6:6 + int(torch.randint(1, L - 6, (1,), generator=g))] = 1
    old = -torch.rand(N, L, generator=g) * 3 * mask
    ref = -torch.rand(N, L, generator=g) * 3 * mask
    adv = torch.randn(N, generator=g)
    return grpo.Batch(ids, start, mask, old, ref, adv)


def _update(batch, micro_batch, loss="grpo", minibatches=1, model_seed=0):
    torch.manual_seed(model_seed)
    model = Transformer(preset("micro"))
    # plain SGD: the update is the gradient itself (Adam's first step, g / |g|, would amplify
    # float rounding in near-zero gradients and hide what is being compared)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    cfg = grpo.GRPOConfig(micro_batch=micro_batch, minibatches=minibatches, max_new_tokens=8)
    stats = grpo.policy_update(model, batch, cfg, grpo.loss_preset(loss), opt, 1e-2)
    return model, stats


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_update_independent_of_micro_batch(loss):
    b = _fixed_batch()
    m1, s1 = _update(b, micro_batch=8, loss=loss)
    m2, s2 = _update(b, micro_batch=3, loss=loss)
    for (k, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6, rtol=1e-5), k
    assert abs(s1["loss"] - s2["loss"]) < 1e-5


def test_on_policy_update_takes_pi_old_from_its_own_forward():
    """old_logprobs=None (one pass, one minibatch) == the same batch with pi_old recomputed first;
    the mismatch stats compare that pi_old with the sampler's (behavior) logprobs."""
    b = _fixed_batch()
    torch.manual_seed(0)
    model = Transformer(preset("micro"))
    with torch.no_grad():
        old = grpo.sequence_logprobs(model, b.input_ids, b.kv_start, 1.0, 8) * b.mask
    noise = 0.01 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1)) * b.mask
    explicit = dataclasses.replace(b, old_logprobs=old, behavior_logprobs=old + noise)
    implicit = dataclasses.replace(b, old_logprobs=None, behavior_logprobs=old + noise)
    m1, s1 = _update(explicit, micro_batch=3)
    m2, s2 = _update(implicit, micro_batch=3)
    for (k, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6, rtol=1e-5), k
    assert s2["ratio_min"] == s2["ratio_max"] == 1.0  # exactly: pi_old is the forward's own
    m = b.mask.bool()
    assert s2["is_logw_abs_mean"] == pytest.approx(float(noise[m].abs().mean()), rel=1e-3)
    assert s2["is_w_max"] == pytest.approx(float((-noise[m]).exp().max()), rel=1e-4)  # the max over micro-batches
    torch.manual_seed(0)
    fresh = Transformer(preset("micro"))
    with torch.no_grad():
        logp = fresh(b.input_ids, kv_start=b.kv_start).log_softmax(-1)  # (N, L, V)
    ent = -(logp.exp() * logp).sum(-1)[:, :-1]  # (N, L-1): entropy of the distribution of token t+1
    assert s2["entropy"] == pytest.approx(float(ent[m[:, 1:]].mean()), rel=1e-4)
    with pytest.raises(ValueError, match="on-policy"):
        _update(implicit, micro_batch=3, minibatches=2)


def test_sft_step_independent_of_micro_batch():
    """sft_step groups examples into micro-batches by length (less padding); the update is the
    whole batch's either way, ragged lengths and loss masks included."""
    import sft
    gen = torch.Generator().manual_seed(0)
    batch = []
    for n in (3, 11, 5, 9, 2, 7):  # ragged, out of length order
        ids = torch.randint(0, 50, (n,), generator=gen).tolist()
        batch.append((ids, [0] * (n // 3) + [1] * (n - n // 3)))
    torch.manual_seed(0)
    m0 = Transformer(preset("micro", vocab_size=50))  # the reference: one padded batch, in order
    ids, mask = sft.collate(batch, 0)
    loss = sft.sft_loss(m0(ids), ids, mask)
    loss.backward()
    with torch.no_grad():
        for p in m0.parameters():
            p -= 1e-1 * p.grad
    l0, models = loss.item(), []
    for micro in (6, 2, 1):
        torch.manual_seed(0)
        model = Transformer(preset("micro", vocab_size=50))
        opt = torch.optim.SGD(model.parameters(), lr=1e-1)
        row = sft.sft_step(model, opt, batch, 0, sft.SFTConfig(micro_batch=micro, max_grad_norm=1e9), 1e-1)
        models.append((model, row["loss"]))
    rest = models
    for m, loss in rest:
        assert abs(loss - l0) < 1e-5
        for (k, p0), p in zip(m0.named_parameters(), m.parameters()):
            assert torch.allclose(p0, p, atol=1e-6, rtol=1e-5), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import checkpoint, grpo, runtime
from model import Transformer, preset
from tests.test_train import _fixed_batch
d = runtime.init_distributed("cpu")
b = _fixed_batch()
n = b.input_ids.shape[0] // d.world
sl = slice(d.rank * n, (d.rank + 1) * n)
mine = grpo.Batch(b.input_ids[sl], b.kv_start[sl], b.mask[sl], b.old_logprobs[sl], b.ref_logprobs[sl], b.advantages[sl])
torch.manual_seed(0)
model = runtime.shard(Transformer(preset("micro")), d)
opt = torch.optim.SGD(model.parameters(), lr=1e-2)
cfg = grpo.GRPOConfig(micro_batch=3, max_new_tokens=8)
stats = grpo.policy_update(model, mine, cfg, grpo.loss_preset(sys.argv[3]), opt, 1e-2, d.world, d.all_reduce)
state = checkpoint.full_state(model)
loss = d.all_reduce(stats["loss"])
if d.main:
    torch.save({"state": state, "loss": loss}, sys.argv[2])
torch.distributed.barrier()  # both ranks done before gloo tears its connections down
torch.distributed.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # see train.main: a gloo thread can abort the interpreter's exit (torch 2.13)
"""


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_two_ranks_give_the_single_process_update(tmp_path, loss):
    """FSDP2 over 2 gloo ranks, each with half of the global batch == one process with all of it."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(script), str(ROOT), str(tmp_path / "out.pt"), loss]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    ref_model, ref_stats = _update(_fixed_batch(), micro_batch=8, loss=loss)
    for k, v in ref_model.state_dict().items():
        assert torch.allclose(got["state"][k], v, atol=1e-6, rtol=1e-5), k
    assert abs(got["loss"] - ref_stats["loss"]) < 1e-5


def test_torchrun_zero_stage_two_ranks(pretrained, tmp_path):
    out = tmp_path / "r"
    (out / "pretrain").mkdir(parents=True)
    os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "train.py"), "--stage", "zero", "--out", str(out), "--steps", "2", *TINY]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "zero" / "model" / "model.safetensors").is_file()
    rows = metrics(out / "zero" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert json.loads((out / "zero" / "run_config.json").read_text())["world_size"] == 2
    # the same run in one process: each prompt's rollout is seeded by its index in the global batch,
    # not by the rank, so the two ranks sample what one process does
    one = with_base(pretrained, tmp_path / "one")
    assert run("--stage", "zero", "--out", str(one), "--steps", "2") == 0
    for r1, r2 in zip(strip_timing(metrics(one / "zero" / "metrics.jsonl")), strip_timing(rows)):
        assert r1.keys() == r2.keys()
        for k in set(r1) - set(PER_RANK_STATS):
            assert r1[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-5), (r1["step"], k)


# --- bad input: one line, exit code 2, nothing half-written ----------------------------------------

def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_unknown_flag(capsys):
    assert train.main(["--stage", "zero", "--learning_rate", "1"]) == 2
    assert "unknown flag --learning_rate" in _err(capsys)


def test_bad_value(capsys):
    assert train.main(["--stage", "zero", "--steps", "many"]) == 2
    assert "--steps 'many': expected a int" in _err(capsys)


def test_unknown_stage_and_later_stage(capsys):
    assert train.main(["--stage", "finetune"]) == 2
    assert "unknown stage 'finetune'" in _err(capsys)


def test_unknown_loss_preset(capsys, tmp_path):
    assert train.main(["--stage", "zero", "--out", str(tmp_path), "--loss", "ppo"]) == 2
    assert "unknown loss preset 'ppo'" in _err(capsys)


def test_missing_init(capsys, tmp_path):
    assert train.main(["--stage", "zero", "--out", str(tmp_path)]) == 2
    err = _err(capsys)
    assert "no checkpoint at" in err and "run --stage pretrain first" in err
    assert train.main(["--stage", "eval", "--init", str(tmp_path / "nope")]) == 2
    assert "no checkpoint at" in _err(capsys)


def test_budget_beyond_the_context(capsys, pretrained, tmp_path):
    """--max_new_tokens that leaves a prompt no room in the model's context is the user's to fix."""
    assert train.main(["--stage", "eval", "--init", str(pretrained / "pretrain" / "model"), *TINY,
                       "--max_new_tokens", "300"]) == 2
    assert "exceeds the model's context of 256; shorten it or lower max_new_tokens" in _err(capsys)


def test_malformed_sft_jsonl(capsys, pretrained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "respon\n')
    assert run("--stage", "sft", "--out", str(tmp_path), "--init", str(pretrained / "pretrain" / "model"),
               "--data", str(bad)) == 2
    assert f"{bad}:2:" in _err(capsys)


def test_nan_loss_stops_without_overwriting(capsys, pretrained, tmp_path):
    from data import write_jsonl
    from toy import ToyArithmetic
    toy = ToyArithmetic()
    stream = toy.train_samples(1)
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"prompt": s["prompt"], "response": toy.sft_response(s)}
                       for s in (next(stream) for _ in range(8))])
    out = tmp_path / "r"
    args = ["--stage", "sft", "--out", str(out), "--init", str(pretrained / "pretrain" / "model"), "--data", str(data)]
    assert run(*args, "--steps", "1") == 0
    before = (out / "sft" / "model" / "model.safetensors").read_bytes()
    # an absurd learning rate: the first step blows the weights up, the next loss is not finite
    assert run(*args, "--steps", "6", "--lr", "1e30", "--warmup", "1", "--ckpt_every", "100", "--restart") == 2
    err = _err(capsys)
    assert "step 2: " in err and "non-finite" in err and "no checkpoint was saved yet" in err
    assert (out / "sft" / "model" / "model.safetensors").read_bytes() == before
    assert not (out / "sft" / "ckpt").exists()


def test_checkpoint_from_one_process_resumes_on_two_ranks(pretrained, tmp_path, monkeypatch):
    """Checkpoints hold full, name-keyed model and optimizer state: any rank count can resume."""
    out = with_base(pretrained, tmp_path / "r")
    args = ("--stage", "zero", "--out", str(out), "--steps", "3", "--ckpt_every", "2")
    kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Killed):
        run(*args)
    monkeypatch.undo()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "train.py"), *args, *TINY]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 2" in res.stdout
    assert [r["step"] for r in metrics(out / "zero" / "metrics.jsonl")] == [0, 1, 2, 3]


def test_checkpoint_of_another_layout_is_refused(tmp_path):
    """A ckpt whose tensor names differ from the model's (say, written before a layout change) gives
    a one-line error instead of loading with the missing tensors left at their initial values."""
    m = Transformer(preset("micro"))
    opt = make_optimizer(m, 1e-3, 0.0)
    state = {k.replace("qkv_proj", "q_proj"): v for k, v in m.state_dict().items()}
    (tmp_path / "zero" / "ckpt").mkdir(parents=True)
    torch.save({"model": state, "optimizer": {}, "state": {}}, tmp_path / "zero" / "ckpt" / "trainer_state.pt")
    with pytest.raises(runtime.UserError, match="different model layout.*delete that ckpt"):
        runtime.StageRun(tmp_path, "zero", runtime.Dist(), 1, {}).resume(m, opt)


@pytest.mark.parametrize("name, message", [
    ("config_list", "config.json: a JSON list, not an object"),
    ("config_no_hidden_size", "config.json: no 'hidden_size'"),
    ("truncated_safetensors", "model.safetensors: not a readable safetensors file"),
    ("garbled_tokenizer", "its tokenizer files cannot be read"),
])
def test_broken_checkpoint_files_are_one_line_errors(pretrain4, tmp_path, capsys, name, message):
    bad = tmp_path / "m"
    shutil.copytree(pretrain4 / "model", bad)
    cfg = json.loads((bad / "config.json").read_text())
    if name == "config_list":
        (bad / "config.json").write_text("[1, 2]")
    elif name == "config_no_hidden_size":
        (bad / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    elif name == "truncated_safetensors":
        blob = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    else:
        (bad / "tokenizer.json").write_text("garbage{")
    assert train.main(["--stage", "eval", "--init", str(bad), *TINY]) == 2
    assert message in _err(capsys)


def test_data_lines_too_deep_or_too_long_name_their_line(pretrain4, tmp_path, capsys):
    model = str(pretrain4 / "model")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": "a", "response": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    assert run("--stage", "sft", "--out", str(tmp_path / "r"), "--init", model, "--data", str(deep)) == 2
    assert f"{deep}:2: JSON nested too deeply" in _err(capsys)
    # a prompt longer than the model's context: found when the stage starts, not when the row is drawn
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1+1=", "answer": "2", "raw_prompt": True}) + "\n"
                    + json.dumps({"prompt": "1+" * 200 + "1=", "answer": "201", "raw_prompt": True}) + "\n")
    assert run("--stage", "zero", "--out", str(tmp_path / "r"), "--init", model, "--task", f"jsonl:{long}") == 2
    assert f"{long}:2: the prompt has 402 tokens" in _err(capsys)
    assert not (tmp_path / "r" / "zero").exists()
    # the stages that sample a teacher check before sampling too
    os.makedirs(tmp_path / "r" / "zero")
    os.symlink(model, tmp_path / "r" / "zero" / "model")
    for stage, flags in (("sft", []), ("rs", ["--teacher", model, "--rs_reasoning_frac", "1"]),
                         ("distill", ["--teacher", model])):
        assert run("--stage", stage, "--out", str(tmp_path / "r"), "--init", model, "--task", f"jsonl:{long}",
                   *flags) == 2, stage
        assert f"{long}:2: the prompt has 402 tokens" in _err(capsys), stage
        assert not (tmp_path / "r" / stage).exists() and not (tmp_path / "r" / "student_base").exists()


def test_a_done_or_changed_stage_is_answered_before_it_prepares(pretrained, tmp_path, monkeypatch, capsys):
    """A finished stage says so, and a changed one is refused, before the stage reads its data (or
    samples a teacher)."""
    from data import write_jsonl
    from toy import ToyArithmetic
    toy = ToyArithmetic()
    stream = toy.train_samples(1)
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"prompt": s["prompt"], "response": toy.sft_response(s)}
                       for s in (next(stream) for _ in range(8))])
    args = ("--stage", "sft", "--out", str(tmp_path / "r"), "--init", str(pretrained / "pretrain" / "model"),
            "--data", str(data), "--steps", "1")
    assert run(*args) == 0

    def no_data(path):
        raise AssertionError("the stage prepared its data")
    monkeypatch.setattr(recipe, "load_sft_jsonl", no_data)
    capsys.readouterr()
    assert run(*args) == 0
    assert "[sft] already done" in capsys.readouterr().out
    assert run(*args, "--lr", "1e-3") == 2
    assert "finished run with other settings (--lr 0.0005 -> 0.001)" in _err(capsys)


def test_sft_examples_beyond_the_context_are_refused_at_the_start(pretrained, tmp_path, capsys):
    from data import write_jsonl
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"prompt": "1+1=", "response": "2"}, {"prompt": "1+" * 150, "response": "2"}])
    assert run("--stage", "sft", "--out", str(tmp_path / "r"), "--init", str(pretrained / "pretrain" / "model"),
               "--data", str(data), "--max_len", "400") == 2
    assert "--max_len 400: an example keeps 302 tokens, more than the model's context of 256" in _err(capsys)
    assert not (tmp_path / "r" / "sft" / "ckpt").exists()
