"""Benchmarks, one subcommand each.

    python bench.py rollout      # our sampler vs transformers' generate vs naive, + batch scaling
    python bench.py linear       # kernels.cpu_decode.linear (oneDNN) vs F.linear (MKL) on the decode matmuls (CPU)
    python bench.py attention    # the Triton attention kernel vs torch SDPA (needs a GPU)

Each prints the machine it ran on, so a figure is never quoted without its hardware.
"""
from __future__ import annotations

import os

# OpenMP threads that spin while they wait turn a busy neighbour on a shared 2-core machine into
# ~40x slower steps (measured here: 500 ms instead of 12 ms per decode step, for both samplers);
# sleeping waiters avoid it. It must be set before torch loads its OpenMP runtime (as in train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def machine() -> str:
    """CPU model (from /proc/cpuinfo), torch threads, GPU if any, library versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    try:
        import transformers
        hf = f", transformers {transformers.__version__}"
    except ImportError:
        hf = ""
    return (f"{cpu}, {torch.get_num_threads()} torch threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
            f"{gpu}, torch {torch.__version__}{hf}")


def median_times(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median wall seconds of each function over `repeats` rounds. Rounds interleave the functions
    (a, b, c, a, b, c, ...), so load from other jobs on a shared machine hits them alike and the
    ratios stay meaningful; the median drops the rounds a burst of load landed on."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --- rollout ------------------------------------------------------------------------------------

# The issue's benchmark shape: a Qwen2-style model of hidden 256, 4 layers, 8 heads, 4 kv heads,
# vocab 2048. intermediate_size 688 = 8/3 * 256 rounded up to a multiple of 16 (the Llama/SwiGLU
# sizing rule, which keeps the MLP's parameter count equal to a 4x GELU MLP's).
ROLLOUT_MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                     rope_theta=1e6)


def rollout_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """n random prompts of ragged lengths in [lo, hi], ids in [1, vocab) (0 is the pad id)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (k,), generator=g).tolist() for k in lens]


def hf_generate_inputs(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask (P, Tp) for transformers' generate."""
    Tp = max(map(len, prompts))
    ids = torch.tensor([[pad] * (Tp - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (Tp - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def bench_rollout(args) -> None:
    """The rollout benchmark with our two CPU switches (kernels/cpu_decode.py) set from the flags,
    restored after."""
    from kernels import cpu_decode
    saved = cpu_decode.ONEDNN, cpu_decode.SERIAL
    cpu_decode.ONEDNN, cpu_decode.SERIAL = args.linear == "onednn", args.decode_threads == "serial"
    try:
        _bench_rollout(args)
    finally:
        cpu_decode.ONEDNN, cpu_decode.SERIAL = saved


def _bench_rollout(args) -> None:
    import transformers

    from checkpoint import load_pretrained
    from rollout import generate, generate_naive

    P, G, T = args.prompts, args.samples, args.new_tokens
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        cfg = transformers.Qwen2Config(**ROLLOUT_MODEL, pad_token_id=0, eos_token_id=None, bos_token_id=None)
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
        ours = load_pretrained(d, device=args.device).eval()
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).to(args.device).eval()
    prompts = rollout_prompts(P, ROLLOUT_MODEL["vocab_size"], args.min_prompt, args.max_prompt)
    ids, mask = (x.to(args.device) for x in hf_generate_inputs(prompts, pad=0))
    n_tokens = P * G * T

    def run_ours():
        r = generate(ours, prompts, T, num_samples=G, seed=0)
        assert sum(map(len, r.tokens)) == n_tokens

    def run_hf():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                              temperature=1.0, num_return_sequences=G, max_new_tokens=T, min_new_tokens=T,
                              pad_token_id=0)
        assert out.shape == (P * G, ids.shape[1] + T)

    def run_naive():
        r = generate_naive(ours, prompts, T, num_samples=G, seed=0)
        assert sum(map(len, r.tokens)) == n_tokens

    def run_batch1():
        generate(ours, prompts[:1], T, num_samples=1, seed=0)

    print(f"machine: {machine()}")
    print(f"model: Qwen2-style, {ROLLOUT_MODEL}, {ours.num_params() / 1e6:.2f}M params, fp32, "
          f"same weights (one save_pretrained dir)")
    print(f"workload: {P} prompts (lengths {args.min_prompt}..{args.max_prompt}) x {G} samples x {T} new "
          f"tokens, plain sampling (temperature 1, no top-k/top-p); median of {args.repeats} runs")
    print(f"ours: --linear {args.linear} --decode-threads {args.decode_threads}")
    t = median_times({"ours": run_ours, "hf": run_hf, "batch1": run_batch1}, args.repeats)
    t_ours, t_hf, t_b1 = t["ours"], t["hf"], t["batch1"]
    # the no-cache baseline is tens of times slower: a single run without warm-up shows the gap
    rows = [("ours (KV cache, rollout.generate)", t_ours), ("transformers generate", t_hf)]
    if args.naive:
        rows.append(("naive, no cache (rollout.generate_naive, 1 run)",
                     median_times({"naive": run_naive}, 1, warmup=0)["naive"]))
    print(f"\n{'sampler':<50} {'seconds':>8} {'tokens/s':>9} {'ms/step':>8} {'vs HF':>6}")
    for name, t in rows:
        print(f"{name:<50} {t:8.3f} {n_tokens / t:9.0f} {1e3 * t / T:8.2f} {t_hf / t:6.2f}x")
    b1, b64 = T / t_b1, n_tokens / t_ours
    print(f"\nbatch scaling (ours): batch 1 {b1:.0f} tokens/s ({1e3 * t_b1 / T:.2f} ms/step), "
          f"batch {P * G} {b64:.0f} tokens/s -> {b64 / b1:.1f}x")
    print(f"ours vs transformers generate: {t_hf / t_ours:.2f}x (goal >= 2.0x on CPU, >= 3x on a GPU)")
    if torch.device(args.device).type == "cuda":
        # batch-1 decode reads every weight once per token: weight bytes per step / step time
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        achieved, peak = weight_bytes / (t_b1 / T), copy_bandwidth(args.device)
        print(f"batch-1 weight bandwidth: {achieved / 1e9:.1f} GB/s = {achieved / peak:.0%} of the measured "
              f"copy bandwidth {peak / 1e9:.0f} GB/s (goal >= 60%)")


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    t = median_times({"copy": lambda: y.copy_(x)}, repeats=10, warmup=2)["copy"]
    return 2 * nbytes / t


def bench_linear(args) -> None:
    """GFLOP/s of F.linear (MKL) and kernels.cpu_decode.linear (oneDNN where it applies) on the rollout
    benchmark's decode matmuls: 64 rows (8 prompts x 8 samples) times each weight of its model."""
    from kernels.cpu_decode import linear, uses_onednn

    m = ROLLOUT_MODEL
    C, I, V = m["hidden_size"], m["intermediate_size"], m["vocab_size"]
    D = C // m["num_attention_heads"]
    weights = {"qkv_proj": ((m["num_attention_heads"] + 2 * m["num_key_value_heads"]) * D, C),
               "o_proj": (C, C), "gate_up_proj": (2 * I, C), "down_proj": (C, I), "lm_head": (V, C)}
    print(f"machine: {machine()}")
    print(f"{'weight':<13} {'(rows, in) x (in, out)':<24} {'F.linear GFLOP/s':>17} {'linear GFLOP/s':>15} {'ratio':>6}")
    with torch.no_grad():
        for name, (out_f, in_f) in weights.items():
            x, w = torch.randn(64, in_f), torch.randn(out_f, in_f)
            t = median_times({"ref": lambda: torch.nn.functional.linear(x, w), "ours": lambda: linear(x, w)},
                             args.repeats, warmup=10)
            flop = 2 * x.shape[0] * out_f * in_f
            shape = f"(64, {in_f}) x ({in_f}, {out_f})"
            print(f"{name:<13} {shape:<24} {flop / t['ref'] / 1e9:17.0f} {flop / t['ours'] / 1e9:15.0f} "
                  f"{t['ref'] / t['ours']:5.2f}x")
        print(f"oneDNN path taken: {uses_onednn(x, w)}")


def bench_attention(args) -> None:
    try:
        from kernels.flash_attention import bench as _bench
    except ImportError:
        raise SystemExit("bench.py attention needs the triton package, which is not installed: pip install triton")
    print(f"machine: {machine()}")
    _bench()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rollout", help="sampler throughput vs transformers' generate and naive generation")
    r.add_argument("--prompts", type=int, default=8)
    r.add_argument("--samples", type=int, default=8)
    r.add_argument("--new-tokens", type=int, default=64)
    r.add_argument("--min-prompt", type=int, default=16)
    r.add_argument("--max-prompt", type=int, default=48)
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--device", default="cpu", help="cpu or cuda (the GPU path is untested here)")
    r.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    r.add_argument("--no-naive", dest="naive", action="store_false", help="skip the slow no-cache baseline")
    r.add_argument("--linear", choices=["onednn", "mkl"], default="onednn",
                   help="our CPU decode matmuls: oneDNN (kernels/cpu_decode.py, default) or F.linear (MKL)")
    r.add_argument("--decode-threads", choices=["serial", "all"], default="serial",
                   help="our CPU decode loop: one thread except matmuls and long attention "
                        "(kernels/cpu_decode.py, default), or all ops on all threads")
    r.set_defaults(fn=bench_rollout)
    lin = sub.add_parser("linear", help="kernels.cpu_decode.linear vs F.linear on the rollout model's decode "
                                        "matmuls (CPU)")
    lin.add_argument("--repeats", type=int, default=200)
    lin.set_defaults(fn=bench_linear)
    a = sub.add_parser("attention", help="Triton attention vs torch SDPA (GPU only)")
    a.set_defaults(fn=bench_attention)
    args = parser.parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    args.fn(args)


if __name__ == "__main__":
    main()
