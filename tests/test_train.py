"""train.py end to end at micro size: every stage, resume, micro-batch and 2-rank invariance, bad input.
(The command line itself: tests/test_cli.py.)"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo
import runtime
import train
from checkpoint import load_pretrained
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


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_zero_stage_each_loss_preset(pretrained, tmp_path, loss, capsys):
    out = tmp_path / "r"
    (out / "pretrain").mkdir(parents=True)
    os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
    assert run("--stage", "zero", "--out", str(out), "--steps", "2", "--loss", loss) == 0
    rows = metrics(out / "zero" / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0]
    assert [r["step"] for r in rows[1:]] == [1, 2]
    for key in ("reward", "reward/accuracy", "reward/format", "response_length", "clip_frac", "loss"):
        assert key in rows[1], key
    assert (out / "zero" / "model" / "model.safetensors").is_file()
    resolved = json.loads((out / "zero" / "run_config.json").read_text())
    assert resolved["loss"] == dataclasses.asdict(grpo.LOSS_PRESETS[loss])
    assert "[zero] step 2/2" in capsys.readouterr().out


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


def test_resume_repeats_uninterrupted_run(pretrained, tmp_path):
    def fresh(name):
        out = tmp_path / name
        (out / "pretrain").mkdir(parents=True)
        os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
        return out
    a, b = fresh("a"), fresh("b")
    assert run("--stage", "zero", "--out", str(a), "--steps", "4", "--ckpt_every", "2") == 0
    assert run("--stage", "zero", "--out", str(b), "--steps", "2", "--ckpt_every", "2") == 0
    # "killed" after step 2: a stale temp dir from an interrupted checkpoint write is ignored
    (b / "zero" / "ckpt.tmp-999").mkdir()
    assert run("--stage", "zero", "--out", str(b), "--steps", "4", "--ckpt_every", "2") == 0
    timing = ("gen_time", "train_time", "gen_tok_per_s", "train_tok_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    ra, rb = strip(metrics(a / "zero" / "metrics.jsonl")), strip(metrics(b / "zero" / "metrics.jsonl"))
    assert [r["step"] for r in rb] == [0, 1, 2, 3, 4]
    assert rb == ra
    wa = load_pretrained(a / "zero" / "model").state_dict()
    wb = load_pretrained(b / "zero" / "model").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


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
    write_jsonl(data, [{"prompt": s["prompt"], "response": toy.sft_response(s)} for s in (next(stream) for _ in range(8))])
    out = tmp_path / "r"
    args = ["--stage", "sft", "--out", str(out), "--init", str(pretrained / "pretrain" / "model"), "--data", str(data)]
    assert run(*args, "--steps", "1") == 0
    before = (out / "sft" / "model" / "model.safetensors").read_bytes()
    # an absurd learning rate: the first step blows the weights up, the next loss is not finite
    assert run(*args, "--steps", "6", "--lr", "1e30", "--warmup", "1", "--ckpt_every", "100") == 2
    err = _err(capsys)
    assert "non-finite" in err and "step" in err and "last good checkpoint" in err
    assert (out / "sft" / "model" / "model.safetensors").read_bytes() == before


def test_checkpoint_from_one_process_resumes_on_two_ranks(pretrained, tmp_path):
    """Checkpoints hold full, name-keyed model and optimizer state: any rank count can resume."""
    out = tmp_path / "r"
    (out / "pretrain").mkdir(parents=True)
    os.symlink(pretrained / "pretrain" / "model", out / "pretrain" / "model")
    assert run("--stage", "zero", "--out", str(out), "--steps", "2", "--ckpt_every", "2") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "train.py"), "--stage", "zero", "--out", str(out), "--steps", "3", *TINY]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
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
