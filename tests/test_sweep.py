"""sweep.py: --seeds / --sweep run directories, the command line each run gets, the mean (min..max)
table, the banded plots, and one end-to-end sweep at micro size."""
import json
from pathlib import Path

import pytest

import evaluation
import sweep
import train


def test_plan_runs_layout():
    sc = sweep.SweepConfig(seeds="0,2")
    assert [(g, s, str(p), sets) for g, s, p, sets in sweep.plan_runs(sc, Path("o"), 7)] == [
        ("", "0", "o/seed0", {"seed": "0"}), ("", "2", "o/seed2", {"seed": "2"})]
    sc = sweep.SweepConfig(seeds="1", sweep="loss=grpo,dapo")
    assert [(g, str(p), sets) for g, _, p, sets in sweep.plan_runs(sc, Path("o"), 7)] == [
        ("loss=grpo", "o/loss=grpo/seed1", {"seed": "1", "loss": "grpo"}),
        ("loss=dapo", "o/loss=dapo/seed1", {"seed": "1", "loss": "dapo"})]
    # an ablation without --seeds: --seed's one run per value, no seed directory
    sc = sweep.SweepConfig(sweep="lr=1e-4,3e-4")
    assert [str(p) for _, _, p, _ in sweep.plan_runs(sc, Path("o"), 7)] == ["o/lr=1e-4", "o/lr=3e-4"]


def test_to_argv_gives_back_the_command_without_the_sweep():
    argv = ["--stage", "zero", "--loss", "dapo", "--dynamic_sampling", "false", "--lr", "0.001",
            "--seeds", "0,1", "--parallel", "2", "--max_digits", "3"]
    args = train.parse_args(argv)
    child = train.to_argv(args, {"seed": "4", "out": "x"})
    assert "--seeds" not in child and "--parallel" not in child
    back = train.parse_args(child)
    assert back["run"] == {**args["run"], "seed": 4, "out": "x"}
    for key in ("grpo", "loss", "toy"):
        assert back[key] == args[key]
    assert back["sweep"] == {}


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,x"], "--seeds '0,x': give comma-separated integers"),
    (["--seeds", "1,1"], "listed twice"),
    (["--sweep", "loss"], "write NAME=V1,V2"),
    (["--sweep", "nosuch=1,2"], "no flag --nosuch"),
    (["--seeds", "0", "--parallel", "0"], "--parallel 0"),
])
def test_bad_sweep_flags_are_one_line_errors(argv, message, capsys, tmp_path):
    assert train.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def fake_run(root: Path, acc: list[float], tokens: float) -> None:
    """A zero stage's metrics.jsonl: held-out evaluations at steps 0, 2, 4 with accuracies `acc`."""
    rows = [{"step": 0, "eval/accuracy": acc[0], "eval/language": 1.0}]
    for step in (1, 2, 3, 4):
        row = {"step": step, "loss": 0.1, "reward/accuracy": 0.5, "response_length": 10.0 + step,
               "sampled_tokens": tokens}
        if step % 2 == 0:
            row.update({"eval/accuracy": acc[step // 2], "eval/language": 0.5})
        rows.append(row)
    (root / "zero").mkdir(parents=True)
    (root / "zero" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sweep_table_mean_and_spread_over_seeds(tmp_path):
    fake_run(tmp_path / "s0", [0.1, 0.2, 0.5], 100.0)
    fake_run(tmp_path / "s1", [0.3, 0.4, 0.9], 120.0)
    rows = sweep.sweep_table({"": [tmp_path / "s0", tmp_path / "s1"]})
    by_model = {r["model"]: r for r in rows}
    assert list(by_model) == ["pretrain", "zero"]  # zero's step-0 evaluation is its base model's
    assert by_model["pretrain"]["accuracy"] == {"mean": pytest.approx(0.2), "min": 0.1, "max": 0.3, "n": 2}
    z = by_model["zero"]
    assert z["accuracy"] == {"mean": pytest.approx(0.7), "min": 0.5, "max": 0.9, "n": 2}
    assert z["language"]["mean"] == 0.5 and z["steps"]["mean"] == 4
    assert z["sampled_tokens"] == {"mean": 440.0, "min": 400.0, "max": 480.0, "n": 2}
    assert sweep.cell(z["accuracy"], "accuracy") == "0.700 (0.500..0.900)"
    # read up to step 2: a longer run of the same seed stands in for a 2-step one
    z2 = {r["model"]: r for r in sweep.sweep_table({"": [tmp_path / "s0", tmp_path / "s1"]}, max_step=2)}["zero"]
    assert z2["accuracy"]["mean"] == pytest.approx(0.3) and z2["steps"]["mean"] == 2
    assert z2["sampled_tokens"]["mean"] == 220.0


def test_mean_band_uses_the_steps_every_run_has():
    steps, mean, lo, hi = evaluation.mean_band([[(0, 1.0), (2, 3.0), (4, 5.0)], [(0, 3.0), (2, 1.0)]])
    assert (steps, mean, lo, hi) == ([0, 2], [2.0, 2.0], [1.0, 1.0], [3.0, 3.0])


def test_plot_stage_groups_a_glob_into_one_banded_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for s, acc in (("seed0", [0.1, 0.2, 0.5]), ("seed1", [0.3, 0.4, 0.9])):
        fake_run(tmp_path / "loss=dapo" / s, acc, 100.0)
    assert evaluation.group_label(str(tmp_path / "loss=dapo" / "seed*" / "zero")) == "R1-Zero, loss=dapo"
    assert train.main(["--stage", "plot", "--out", str(tmp_path / "plots"),
                       "--runs", str(tmp_path / "loss=dapo" / "seed*" / "zero")]) == 0
    assert (tmp_path / "plots" / "accuracy.png").is_file() and (tmp_path / "plots" / "length.png").is_file()
    assert train.main(["--stage", "plot", "--out", str(tmp_path), "--runs", str(tmp_path / "none*")]) == 2
    assert "matches no directory" in capsys.readouterr().err


def test_seeds_end_to_end_at_micro_size(tmp_path, capsys):
    """Two seeds in parallel processes: one run directory each with its own seed, then one table and
    the plots; the same command again skips the finished runs."""
    tiny = ["--model", "micro", "--eval_n", "4", "--eval_every", "1", "--prompts_per_step", "2",
            "--group_size", "2", "--max_new_tokens", "8", "--micro_batch", "4", "--batch_size", "4",
            "--steps", "2", "--max_digits", "2"]
    argv = ["--stage", "pretrain,zero", "--seeds", "0,1", "--parallel", "2", "--out", str(tmp_path), *tiny]
    assert train.main(argv) == 0
    for s in (0, 1):
        cfg = json.loads((tmp_path / f"seed{s}" / "zero" / "run_config.json").read_text())
        assert cfg["run"]["seed"] == s and cfg["run"]["threads"] >= 1
        assert (tmp_path / f"seed{s}" / "zero" / "model" / "config.json").is_file()
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["model"] for r in rows} == {"pretrain", "zero"} and all(r["runs"] == 2 for r in rows)
    out = capsys.readouterr().out
    assert "mean (lowest..highest) over seeds 0,1" in out
    assert train.main(argv) == 0
    assert capsys.readouterr().out.count("every stage done, skipped") == 2


def test_evaluate_separates_thinking_from_its_language(monkeypatch):
    """`language` counts a direct answer to a Chinese prompt as inconsistent; `cot_language` is the
    consistency of the answers that think, so a drift of the chains of thought shows there."""
    from types import SimpleNamespace

    import torch

    from tokenizer import build_char_tokenizer
    from toy import ToyArithmetic, direct_response, worked_response
    toy = ToyArithmetic()
    tok = build_char_tokenizer(toy.alphabet())
    zh = toy.sample(12, 34, "zh")
    samples = [zh, zh, zh, toy.sample(12, 34, "en")]
    texts = [direct_response(46), worked_response(12, 34, "en"), worked_response(12, 34, "zh"),
             worked_response(12, 34, "en")]
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: SimpleNamespace(tokens=[tok.encode(t) for t in texts]))
    ev = evaluation.evaluate(torch.nn.Linear(1, 1), tok, samples, 8)
    assert ev["accuracy"] == 1.0 and ev["think"] == 0.75
    assert ev["cot_language"] == pytest.approx(2 / 3)  # of three chains, the English one to a Chinese prompt is off
    assert ev["language"] == pytest.approx(2 / 4)  # the direct Chinese answer counts as off too
