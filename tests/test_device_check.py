"""The GPU check's parts that run on a CPU: scripts/device-check.sh and the benchmarks say "no CUDA
device" and exit 0; the GPU benchmarks' code runs at micro size on CPU tensors (so a lent GPU's one
call does not die on a Python error); the report reads what the steps leave and judges each goal."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench_gpu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import device_report  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the commands run for real")
MICRO = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
             max_seq_len=256)


@no_cuda
def test_device_check_says_no_cuda_and_exits_0(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "scripts" / "device-check.sh"), str(tmp_path / "out")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "no CUDA device" in p.stdout


@no_cuda
@pytest.mark.parametrize("cmd", [["-m", "kernels.attention", "--json", "x.json"], ["bench_gpu.py", "all"]])
def test_gpu_benchmarks_say_no_cuda_and_exit_0(cmd, tmp_path):
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "no CUDA device" in p.stdout, p.stderr


def test_gpu_benchmarks_run_at_micro_size_on_cpu():
    d = bench_gpu.bench_decode(new_tokens=3, prompt_len=4, repeats=1, device="cpu", copy_bytes=1 << 20, **MICRO)
    assert d["decode_b1_weight_GBps"] > 0 and d["copy_GBps"] > 0 and d["weight_bytes"] > 0
    s = bench_gpu.bench_sampler(prompts=2, samples=2, new_tokens=3, repeats=1, device="cpu", **MICRO)
    assert s["sampler_b64_speedup_vs_hf"] > 0 and s["sampler_batch"] == 4
    t = bench_gpu.bench_train(n_seqs=2, prompt_len=8, completion_len=8, micro_batch=1, repeats=1, device="cpu",
                              **MICRO)
    assert t["train_tokens_per_s"] > 0 and t["train_mfu"] is None  # no peak assumed for a CPU


def test_expected_tests_lists_test_cuda():
    ids = device_report.expected_tests()
    assert "tests/test_cuda.py::test_fsdp2_one_process_nccl_step" in ids and len(ids) >= 14


def test_peak_flops_and_update_flops():
    assert bench_gpu.peak_flops("NVIDIA H100 80GB HBM3") == bench_gpu.peak_flops("NVIDIA H200") == 989e12
    assert bench_gpu.peak_flops("NVIDIA H100 PCIe") == 756e12 and bench_gpu.peak_flops("Tesla T4") is None
    model = bench_gpu.random_model("meta")  # the real shape, no memory
    assert round(model.num_params() / 1e6) == 494  # Qwen2.5-0.5B
    # 6 N per token: N = every matmul's weights, the tied 151936 x 896 head counted once
    n_matmul = model.num_params() - sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    attn = 6 * 24 * 1024 * 14 * 64
    assert bench_gpu.update_flops(model, 2, 1024) == 2 * 1024 * (6 * n_matmul + attn)


def test_report_reads_the_steps_and_judges_the_goals(tmp_path):
    ids = ["tests/test_cuda.py::test_a[x]", "tests/test_cuda.py::test_b", "tests/test_cuda.py::test_c"]
    (tmp_path / "collected.txt").write_text("\n".join(ids) + "\n\n3 tests collected\n")  # as the tests step writes
    (tmp_path / "tests-bf16.log").write_text(
        "tests/test_cuda.py::test_a[x] PASSED [ 50%]\ntests/test_cuda.py::test_b FAILED [100%]\n"
        "FAILED tests/test_cuda.py::test_b - AssertionError\n")
    rows = [{"D": 128, "T": 4096, "ours_fwd": 500.0, "ours_bwd": 200.0, "sdpa_flash_fwd": 450.0,
             "sdpa_flash_bwd": 300.0, "sdpa_cudnn_fwd": None, "sdpa_cudnn_bwd": None}]
    (tmp_path / "attention.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "bench_gpu.json").write_text(json.dumps({"decode_b1_frac_of_copy": 0.7,
                                                         "sampler_b64_speedup_vs_hf": 2.0}))
    (tmp_path / "steps.jsonl").write_text('{"step": "tests-bf16", "rc": 1, "seconds": 3, "limit": 200}\n')
    assert device_report.main(str(tmp_path)) == 1  # a test failed
    report = json.loads((tmp_path / "device-check.json").read_text())
    assert report["tests"] == {"tests/test_cuda.py::test_a[x]": "PASSED", "tests/test_cuda.py::test_b": "FAILED"}
    met = {r["measure"].split(",")[0].split(":")[0]: r["met"] for r in report["measures"]}
    assert met["CUDA tests (tests/test_cuda.py)"] == "no"
    assert report["measures"][0]["value"].startswith("1 passed, 1 failed, 0 skipped, 1 not run of 3")
    assert met["attention fwd"] == "yes" and met["attention bwd"] == "no"  # 1.11x >= 1.0, 0.67x < 0.8
    assert met["decode at batch 1"] == "yes" and met["sampler at batch 64 (8 prompts x 8)"] == "no"
    assert met["GRPO update peak memory"] == "not measured"
    md = (tmp_path / "device-check.md").read_text()
    assert "| attention fwd, T=4096 D=128 causal bf16: ours / SDPA-flash | 1.11x" in md
