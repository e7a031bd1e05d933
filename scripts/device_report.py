"""The device check's report: OUTDIR/device-check.json and OUTDIR/device-check.md from what the steps of
scripts/device-check.sh left in OUTDIR (pytest logs, attention.json, bench_gpu.json, peak_memory.json,
steps.jsonl). A missing file means its step did not finish: its measures read "not measured".

    python scripts/device_report.py OUTDIR

Exit code 0 when every step finished and every CUDA test passed, 1 otherwise (the files are written
either way). The goals are issue 15's.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_T, GOAL_D = 4096, 128  # the attention goals are read at this length and head dim
OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_outcomes(out: Path) -> dict[str, str]:
    """test id -> outcome, from the pytest -v -rA logs of the test steps (a log cut by a timeout still
    has a line for every test that finished)."""
    found = {}
    for log in sorted(out.glob("tests-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = re.match(r"(tests/test_cuda\.py::\S+) (" + "|".join(OUTCOMES) + r")\b", line)
            m2 = re.match(r"(" + "|".join(OUTCOMES) + r") (tests/test_cuda\.py::\S+)", line)
            if m:
                found.setdefault(m.group(1), m.group(2))
            elif m2:
                found[m2.group(2)] = m2.group(1)  # the -rA summary has the final word (ERROR in teardown)
    return found


def expected_tests(out: Path | None = None) -> list[str]:
    """Every test id in tests/test_cuda.py: OUTDIR/collected.txt (the tests step collects them while the
    tests run), or pytest --collect-only now."""
    collected = out / "collected.txt" if out is not None else None
    if collected is not None and collected.is_file():
        return [ln.strip() for ln in collected.read_text().splitlines() if ln.startswith("tests/test_cuda.py::")]
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                            "tests/test_cuda.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return []
    return [ln.strip() for ln in p.stdout.splitlines() if ln.startswith("tests/test_cuda.py::")]


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt(x, spec=".2f", suffix=""):
    return "not measured" if x is None else f"{x:{spec}}{suffix}"


def verdict(value, ok):
    return "not measured" if value is None else ("yes" if ok else "no")


def measures(tests: dict, expected: list, attn, bench, peak) -> list[dict]:
    rows = []
    ids = sorted(set(expected) | set(tests))
    passed = [t for t in ids if tests.get(t) == "PASSED"]
    bad = [t for t in ids if tests.get(t) in ("FAILED", "ERROR")]
    skipped = [t for t in ids if tests.get(t) == "SKIPPED"]
    missing = [t for t in ids if t not in tests]
    text = f"{len(passed)} passed, {len(bad)} failed, {len(skipped)} skipped, {len(missing)} not run of {len(ids)}"
    if bad:
        text += " (failed: " + ", ".join(t.split("::", 1)[1] for t in bad) + ")"
    rows.append({"measure": "CUDA tests (tests/test_cuda.py)", "value": text, "goal": "all pass",
                 "met": verdict(ids or None, ids and len(passed) == len(ids))})

    at = next((r for r in (attn or {}).get("rows", []) if r["T"] == GOAL_T and r["D"] == GOAL_D), {})
    for kind, goal in (("fwd", 1.0), ("bwd", 0.8)):
        ours, flash, cudnn = at.get(f"ours_{kind}"), at.get(f"sdpa_flash_{kind}"), at.get(f"sdpa_cudnn_{kind}")
        r = ratio(ours, flash)
        rows.append({"measure": f"attention {kind}, T={GOAL_T} D={GOAL_D} causal bf16: ours / SDPA-flash",
                     "value": f"{fmt(r, '.2f', 'x')} ({fmt(ours, '.0f')} vs {fmt(flash, '.0f')} TFLOP/s"
                              f"; cuDNN {fmt(cudnn, '.0f')})",
                     "goal": f">= {goal}x", "met": verdict(r, r is not None and r >= goal), "ratio": r})

    b = bench or {}
    frac = b.get("decode_b1_frac_of_copy")
    rows.append({"measure": "decode at batch 1: weight bytes/s / device copy bandwidth",
                 "value": f"{fmt(frac and 100 * frac, '.0f', '%')} ({fmt(b.get('decode_b1_weight_GBps'), '.0f')} of "
                          f"{fmt(b.get('copy_GBps'), '.0f')} GB/s, {fmt(b.get('decode_b1_ms_per_token'), '.2f')} ms/token)",
                 "goal": ">= 60%", "met": verdict(frac, frac is not None and frac >= 0.6)})
    sp = b.get("sampler_b64_speedup_vs_hf")
    rows.append({"measure": "sampler at batch 64 (8 prompts x 8): ours / transformers generate",
                 "value": f"{fmt(sp, '.2f', 'x')} ({fmt(b.get('sampler_b64_ours_tokens_per_s'), '.0f')} vs "
                          f"{fmt(b.get('sampler_b64_hf_tokens_per_s'), '.0f')} tokens/s)",
                 "goal": ">= 3x", "met": verdict(sp, sp is not None and sp >= 3)})
    mfu, peak_tf = b.get("train_mfu"), b.get("peak_tflops_assumed")
    rows.append({"measure": f"GRPO update ({b.get('train_shape', '16 x 1024 tokens')}): tokens/s, MFU",
                 "value": f"{fmt(b.get('train_tokens_per_s'), '.0f')} tokens/s, MFU {fmt(mfu and 100 * mfu, '.0f', '%')} "
                          f"({fmt(b.get('train_tflops'), '.0f')} TFLOP/s of {fmt(peak_tf, '.0f')} assumed peak)",
                 "goal": "measured (no goal)", "met": "-"})
    pm = (peak or {}).get("grpo_peak_mem_GiB")
    rows.append({"measure": "GRPO update peak memory, Qwen2.5-0.5B shape (tests/test_cuda.py)",
                 "value": fmt(pm, '.1f', " GiB"), "goal": "< 38 GiB", "met": verdict(pm, pm is not None and pm < 38)})
    for key in [k for k in b if k.endswith("_error")]:
        rows.append({"measure": f"bench_gpu.py {key[:-6]}", "value": b[key], "goal": "runs", "met": "no"})
    return rows


def markdown(device: str, date: str, rows: list, attn, steps: list) -> str:
    lines = [f"Device check on **{device}**, {date} (`bash scripts/device-check.sh OUTDIR`).", "",
             "| measure | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {r['measure']} | {r['value']} | {r['goal']} | {r['met']} |" for r in rows]
    if attn and attn.get("rows"):
        impls = [k[:-4] for k in attn["rows"][0] if k.endswith("_fwd")]
        lines += ["", "Attention, causal bf16, B * T = 16384, H * D = 2048 (TFLOP/s, fwd / bwd):", "",
                  "| D | T | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
        for r in attn["rows"]:
            lines.append(f"| {r['D']} | {r['T']} | " + " | ".join(
                f"{fmt(r.get(i + '_fwd'), '.0f')} / {fmt(r.get(i + '_bwd'), '.0f')}" for i in impls) + " |")
    lines += ["", "Steps: " + ", ".join(f"{s['step']} rc {s['rc']} in {s['seconds']}s" for s in steps)]
    return "\n".join(lines) + "\n"


def main(out: str) -> int:
    out = Path(out)
    steps = [json.loads(ln) for ln in (out / "steps.jsonl").read_text().splitlines() if ln.strip()] \
        if (out / "steps.jsonl").is_file() else []
    attn, bench, peak = (read_json(out / f) for f in ("attention.json", "bench_gpu.json", "peak_memory.json"))
    warm = read_json(out / "bench_gpu_warm.json")
    if bench is None and warm is not None:  # the bench step did not finish: the compile run's figures,
        bench = {**warm, "source": "the warm-up run, beside the tests (under load: a lower bound)"}
    try:
        import torch
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    except ImportError:
        device = "unknown"
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    tests, expected = test_outcomes(out), expected_tests(out)
    rows = measures(tests, expected, attn, bench, peak)
    env = (out / "environment.txt").read_text() if (out / "environment.txt").is_file() else ""
    report = {"device": device, "date": date, "environment": env, "steps": steps, "measures": rows,
              "tests": tests, "attention": attn, "bench": bench, "peak_memory": peak}
    (out / "device-check.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(device, date, rows, attn, steps)
    if bench and bench.get("source"):
        md += f"\nThe decode, sampler and GRPO figures are from {bench['source']}.\n"
    (out / "device-check.md").write_text(md)
    print(md)
    ok = all(s["rc"] == 0 for s in steps) and rows[0]["met"] == "yes"
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/device_report.py OUTDIR")
    sys.exit(main(sys.argv[1]))
