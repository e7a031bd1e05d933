"""The trunk's seams: runtime.fit (the one loop), atomic checkpoint directories, grpo.train_rl with
any reward function, and the import tree (no cycles; `import grpo` pulls in no recipe code)."""
import ast
import datetime
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import grpo
import runtime
from checkpoint import atomic_dir, has_trainer_state
from model import Transformer, preset
from optim import make_optimizer
from tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def stage(tmp_path, ckpt_every=2):
    torch.manual_seed(0)
    model = Transformer(preset("micro"))
    opt = make_optimizer(model, 1e-3, 0.0)
    run = runtime.StageRun(tmp_path, "s", runtime.Dist(), ckpt_every, {})
    run.resume(model, opt)
    return run, model, opt


def rows(run) -> list[dict]:
    return [json.loads(ln) for ln in (run.dir / "metrics.jsonl").read_text().splitlines()]


def saved_step(run) -> int:
    return torch.load(run.ckpt / "trainer_state.pt", weights_only=False)["state"]["step"]


def test_fit_logs_evaluates_and_checkpoints_on_schedule(tmp_path):
    run, model, opt = stage(tmp_path, ckpt_every=2)
    evals, saves = [], []
    real_save = run.save_state
    run.save_state = lambda *a: (saves.append(a[3]["step"]), real_save(*a))

    def steps():
        for i in range(run.start, 5):
            yield {"loss": 1.0 / (i + 1)}
    out = runtime.fit(run, model, opt, None, steps(), 5, loop_state=lambda: {"pos": 42}, keys=["loss"],
                      evaluate=lambda: evals.append(1) or {"accuracy": 0.5}, eval_every=2)
    assert out["steps"] == 5
    logged = rows(run)
    assert [r["step"] for r in logged] == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in logged if "eval/accuracy" in r] == [0, 2, 4, 5]
    assert len(evals) == 4 and saves == [2, 4, 5]
    state = torch.load(run.ckpt / "trainer_state.pt", weights_only=False)["state"]
    assert state["pos"] == 42 and state["step"] == 5 and state["seconds"] == out["seconds"] > 0
    resumed = runtime.StageRun(tmp_path, "s", runtime.Dist(), 2, {})
    assert resumed.resume(model, opt)["step"] == 5 and resumed.start == 5
    # a finished stage run again: no step runs, and its time is the first run's (distill's budget)
    again = runtime.fit(resumed, model, opt, None, steps(), 5, loop_state=dict, keys=["loss"])
    assert again == out


@pytest.mark.parametrize("fault", ["nan_loss", "refused_step"])
def test_fit_stops_on_a_non_finite_step_without_saving_it(tmp_path, fault):
    run, model, opt = stage(tmp_path, ckpt_every=1)

    def steps():
        yield {"loss": 1.0}
        if fault == "refused_step":
            raise FloatingPointError("loss nan, gradient norm inf")
        yield {"loss": math.nan}
    with pytest.raises(runtime.UserError, match="step 2: .*non-finite.*last checkpoint with finite weights"):
        runtime.fit(run, model, opt, None, steps(), 5, loop_state=dict, keys=["loss"])
    assert saved_step(run) == 1 and [r["step"] for r in rows(run)] == [1]


def test_fit_stops_on_the_time_budget(tmp_path):
    run, model, opt = stage(tmp_path, ckpt_every=100)

    def steps():
        while True:
            time.sleep(0.05)
            yield {"loss": 1.0}
    out = runtime.fit(run, model, opt, None, steps(), 1000, loop_state=dict, keys=["loss"], time_budget=0.12)
    assert 2 <= out["steps"] <= 3 and out["seconds"] >= 0.12
    assert saved_step(run) == out["steps"]  # the last step is checkpointed like the end of a run


def test_fit_stops_on_the_token_budget_and_a_resumed_spent_run_stays_stopped(tmp_path):
    run, model, opt = stage(tmp_path, ckpt_every=100)

    def steps():
        while True:
            yield {"loss": 1.0, "sampled_tokens": 100.0}
    out = runtime.fit(run, model, opt, None, steps(), 1000, loop_state=dict, keys=["loss"], token_budget=250)
    assert out["steps"] == 3 and out["tokens"] == 300.0
    assert saved_step(run) == 3
    resumed = runtime.StageRun(tmp_path, "s", runtime.Dist(), 100, {})
    resumed.resume(model, opt)
    again = runtime.fit(resumed, model, opt, None, steps(), 1000, loop_state=dict, keys=["loss"], token_budget=250)
    assert again == out  # the budget was spent: no step runs


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind
    assert not has_trainer_state(target)


# --- grpo.train_rl with a reward function of the user's -------------------------------------------

def test_train_rl_learns_from_a_stub_reward_and_resumes_by_step():
    """A reward that pays the share of 'x' characters in a completion: GRPO raises it. The reward
    function gets one sample per completion, prompt-major, and nothing from rewards.py."""
    tok = build_char_tokenizer("abcx")
    torch.manual_seed(0)
    policy = Transformer(preset("micro", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    samples = [{"prompt": p, "id": i} for i, p in enumerate(["ab", "ba", "abc", "cab"])]
    seen = []

    def share_of_x(completions, per_completion):
        seen.append([s["id"] for s in per_completion])
        values = [c.count("x") / max(len(c), 1) for c in completions]
        return values, {"x": values}
    cfg = grpo.GRPOConfig(steps=30, prompts_per_step=4, group_size=6, max_new_tokens=8, lr=1e-2, warmup=1)
    lcfg = grpo.loss_preset("grpo", kl_coef=0.0)
    opt = make_optimizer(policy, cfg.lr, 0.0)
    stream = iter(samples * 100)
    out = list(grpo.train_rl(policy, None, tok, lambda n: [next(stream) for _ in range(n)], share_of_x, cfg, lcfg,
                             opt, seed=1))
    assert len(out) == 30 and seen[0] == [i for i in range(4) for _ in range(6)]
    first, last = sum(r["reward/x"] for r in out[:5]) / 5, sum(r["reward/x"] for r in out[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert len(list(grpo.train_rl(policy, None, tok, lambda n: samples[:n], share_of_x, cfg, lcfg, opt,
                                  start=28))) == 2


def test_sampled_tokens_count_dynamic_samplings_discarded_groups():
    """gen_tokens: the completions trained on; sampled_tokens: every completion sampled, the groups
    dynamic sampling threw away too (the ablations' token budget)."""
    tok = build_char_tokenizer("abcx")
    torch.manual_seed(0)
    policy = Transformer(preset("micro", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    samples = [{"prompt": p} for p in ["ab", "ba", "abc", "cab"] * 10]
    stream = iter(samples)
    flat = lambda completions, _: ([0.0] * len(completions), {})  # every group uninformative: refills
    cfg = grpo.GRPOConfig(prompts_per_step=4, group_size=3, max_new_tokens=6, max_refill=2)
    for dynamic in (False, True):
        lcfg = grpo.loss_preset("dapo", dynamic_sampling=dynamic, overlong_buffer_frac=0.0)
        _, info = grpo.collect(policy, None, tok, lambda n: [next(stream) for _ in range(n)], 4, flat, cfg, lcfg,
                               seed=3)
        assert info["prompts_drawn"] == (12 if dynamic else 4)
        if dynamic:  # three rounds of 4 groups sampled, the last round's kept
            assert info["sampled_tokens"] > info["gen_tokens"] > 0
        else:
            assert info["sampled_tokens"] == info["gen_tokens"] > 0


# --- the import tree --------------------------------------------------------------------------------

def project_modules() -> dict[str, Path]:
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    mods.update({f"kernels.{p.stem}": p for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__"})
    mods["kernels"] = ROOT / "kernels" / "__init__.py"
    return mods


def imports_of(path: Path, mods: dict) -> set[str]:
    """Project modules `path` imports anywhere in the file (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.module in mods and not node.level:
            # `from kernels import attention` imports the submodule; `from kernels import x` the package
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(mods)
            out |= subs if len(subs) == len(node.names) else subs | {node.module}
    return out


def test_project_imports_form_a_tree():
    mods = project_modules()
    graph = {m: imports_of(p, mods) - {m} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in graph[m]:
            visit(n, path + [m])
        state[m] = 2
    for m in graph:
        visit(m, [])


def test_grpo_imports_only_torch_and_the_sampler_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import model, rollout, grpo\n"
            "bad = {'rewards', 'answers', 'sft', 'tasks', 'toy', 'data', 'runtime', 'recipe', 'checkpoint', "
            "'reward_model', 'tokenizer', 'settings', 'sweep'} & set(sys.modules)\n"
            "assert not bad, bad\n"
            "m = model.Transformer(model.preset('micro'))\n"
            "r = rollout.generate(m, [[1, 2, 3]], 4, num_samples=2, seed=0)\n"
            "assert len(r.tokens) == 2\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# --- the run contract's pieces (end to end: tests/test_train.py) -------------------------------------

def test_recover_dir_undoes_every_state_a_kill_leaves(tmp_path):
    from checkpoint import recover_dir
    ckpt = tmp_path / "ckpt"

    def make(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)

    def names():
        return sorted(p.name for p in tmp_path.iterdir())
    make("ckpt.tmp-7", "partial")           # killed while writing the first checkpoint
    recover_dir(ckpt)
    assert names() == []
    make("ckpt.old-7", "old")               # killed between the two renames: the old one goes back
    make("ckpt.tmp-7", "new")
    recover_dir(ckpt)
    assert names() == ["ckpt"] and (ckpt / "f").read_text() == "old"
    make("ckpt.old-8", "older")             # killed after the swap, before the old copy was deleted
    recover_dir(ckpt)
    assert names() == ["ckpt"] and (ckpt / "f").read_text() == "old"


def test_metrics_drop_a_cut_short_last_line_and_name_a_bad_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [row["step"] for _, row in runtime.read_metrics(path)] == [1, 2]
    runtime.Metrics(path, runtime.Dist(), 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(runtime.UserError, match=f"{path}:2: not a JSON line"):
        runtime.Metrics(path, runtime.Dist(), 3)


def test_init_distributed_passes_the_timeout(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: seen.update(
        backend=backend, timeout=timeout))
    d = runtime.init_distributed("cpu", timeout=42.0)
    assert (d.rank, d.world) == (1, 2) and seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=42)}


def test_a_lock_is_held_until_released(tmp_path):
    assert runtime.lock_dir(tmp_path) and runtime.lock_dir(tmp_path)  # again in the same process: fine
    code = ("import fcntl, sys; f = open(sys.argv[1], 'a')\n"
            "try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError: sys.exit(3)")
    other = [sys.executable, "-c", code, str(tmp_path / runtime.LOCK_FILE)]
    assert subprocess.run(other).returncode == 3  # another process cannot take it
    runtime.release_locks()
    assert subprocess.run(other).returncode == 0
