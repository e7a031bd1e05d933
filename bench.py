"""Benchmarks, one subcommand each.

    python bench.py rollout      # our sampler vs transformers' generate vs naive, + batch scaling
    python bench.py rollout --init DIR   # the same on a real checkpoint, R1 prompts; + one GRPO update
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


def real_prompts(path, n: int, template: str) -> tuple[list[list[int]], int]:
    """(ids of the toy's first n held-out questions in the R1 prompt the runs use, pad id): the
    checkpoint's chat template with the R1 system message (--template chat), or Table 1's text."""
    import tasks
    from tokenizer import Tokenizer, chat_prompt, r1_zero_prompt
    tok = Tokenizer.from_dir(path)
    render = (lambda q: chat_prompt(tok, q)) if template == "chat" else r1_zero_prompt
    return [tok.encode(render(s["question"])) for s in tasks.get_task("toy").eval_samples(n)], tok.pad_id


def _bench_rollout(args) -> None:
    import transformers

    from checkpoint import load_pretrained
    from rollout import generate, generate_naive

    P, G, T = args.prompts, args.samples, args.new_tokens
    torch.manual_seed(0)
    if args.init:  # a real checkpoint: both sides load the same directory
        ours = load_pretrained(args.init, device=args.device).eval()
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32).to(args.device).eval()
        prompts, pad = real_prompts(args.init, P, args.template)
        desc = f"{args.init} ({ours.cfg.model_type}, {ours.cfg.num_layers} layers, vocab {ours.cfg.vocab_size})"
        shape = f"R1 prompts, --template {args.template}, lengths {min(map(len, prompts))}..{max(map(len, prompts))}"
    else:
        with tempfile.TemporaryDirectory() as d:
            cfg = transformers.Qwen2Config(**ROLLOUT_MODEL, pad_token_id=0, eos_token_id=None, bos_token_id=None)
            transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
            ours = load_pretrained(d, device=args.device).eval()
            hf = transformers.AutoModelForCausalLM.from_pretrained(d).to(args.device).eval()
        prompts, pad = rollout_prompts(P, ROLLOUT_MODEL["vocab_size"], args.min_prompt, args.max_prompt), 0
        desc = f"Qwen2-style, {ROLLOUT_MODEL}"
        shape = f"lengths {args.min_prompt}..{args.max_prompt}"
    ids, mask = (x.to(args.device) for x in hf_generate_inputs(prompts, pad=pad))
    n_tokens = P * G * T

    def run_ours():
        r = generate(ours, prompts, T, num_samples=G, seed=0, pad_token_id=pad)  # no eos: full length
        assert sum(map(len, r.tokens)) == n_tokens

    def run_hf():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                              temperature=1.0, num_return_sequences=G, max_new_tokens=T, min_new_tokens=T,
                              pad_token_id=pad)
        assert out.shape == (P * G, ids.shape[1] + T)

    def run_naive():
        r = generate_naive(ours, prompts, T, num_samples=G, seed=0, pad_token_id=pad)
        assert sum(map(len, r.tokens)) == n_tokens

    def run_batch1():
        generate(ours, prompts[:1], T, num_samples=1, seed=0)

    print(f"machine: {machine()}")
    print(f"model: {desc}, {ours.num_params() / 1e6:.2f}M params, fp32, same weights (one directory)")
    print(f"workload: {P} prompts ({shape}) x {G} samples x {T} new "
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
    if args.init:
        bench_update(ours, generate(ours, prompts, T, num_samples=G, seed=0, pad_token_id=pad), args)
    if args.profile:
        profile_sampler(lambda: generate(ours, prompts, T, num_samples=G, seed=0, pad_token_id=pad))


def bench_update(model, roll, args) -> None:
    """Seconds and tokens/s of one GRPO policy update (grpo.policy_update: forward, loss, backward,
    AdamW step; R1-Zero's loss with its KL term) on the rollout just sampled, random advantages."""
    import grpo
    from optim import make_optimizer
    model.train()
    cfg = grpo.GRPOConfig(micro_batch=args.train_micro_batch)
    lcfg = grpo.loss_preset("grpo")
    N = roll.input_ids.shape[0]
    with torch.no_grad():
        ref = grpo.sequence_logprobs(model, roll.input_ids, roll.kv_start, 1.0, cfg.micro_batch)
    batch = grpo.Batch(roll.input_ids, roll.kv_start, roll.completion_mask.float(), roll.old_logprobs, ref,
                       torch.randn(N, generator=torch.Generator().manual_seed(0)))
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    t = median_times({"update": lambda: grpo.policy_update(model, batch, cfg, lcfg, opt, cfg.lr)},
                     repeats=1, warmup=1)["update"]
    seq_tokens = int((roll.input_ids.shape[1] - roll.kv_start).sum())
    print(f"\none GRPO update ({N} sequences, micro-batch {cfg.micro_batch}, fp32): {t:.1f} s, "
          f"{seq_tokens / t:.0f} trained tokens/s (prompt + completion), "
          f"{int(roll.completion_mask.sum()) / t:.0f} completion tokens/s")


def profile_sampler(fn, rows: int = 12) -> None:
    """torch.profiler's top ops by CPU time over one call of `fn` (what limits the sampler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print("\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


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
    r.add_argument("--init", default="", help="a real checkpoint directory (e.g. gguf_convert.py's SmolLM2) "
                                              "instead of the random Qwen2-style model; also times one GRPO update")
    r.add_argument("--template", choices=["chat", "r1zero"], default="chat",
                   help="with --init: the prompts' template (the toy's held-out questions)")
    r.add_argument("--train-micro-batch", type=int, default=16, help="with --init: sequences per forward/backward")
    r.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one sampler call")
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
