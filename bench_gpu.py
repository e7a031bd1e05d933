"""GPU benchmarks at the Qwen2.5-0.5B shape (random weights, bf16), one subcommand each.

    python bench_gpu.py decode   # batch-1 decode: weight bytes moved per second vs the measured copy bandwidth
    python bench_gpu.py sampler  # batch 64 (8 prompts x 8 samples): our sampler vs transformers' generate
    python bench_gpu.py train    # one GRPO update (grpo.policy_update): training tokens/s and MFU
    python bench_gpu.py all --json OUT.json   # the three, one JSON object (scripts/device-check.sh)
    python bench_gpu.py decode sampler --repeats 1   # several, one timed run each

Every figure comes with the device it ran on. Without a CUDA device each command prints "no CUDA
device" and exits 0 (the CPU benchmarks are bench.py's). Goals (issue 15): decode at batch 1 moves
weights at >= 60% of the copy bandwidth; the sampler at batch 64 is >= 3x transformers' generate.

How the figures are computed:
- Batch-1 decode reads every weight once per token, so weight bytes / (seconds per token) is the
  bandwidth it achieves (the KV cache of a few hundred tokens adds < 1% at this shape). The copy
  bandwidth is a device-to-device copy of a 1 GiB tensor, read and written: 2 GiB per copy.
- MFU (Chowdhery et al. 2022, PaLM, appendix B): model FLOPs per second over the device's peak.
  Per trained token, 6 * N (N = the parameters of every matmul, the tied head counted once) plus the
  causal attention scores and values, 6 * layers * T * H * D on average over a T-token sequence
  (forward 2 * T * H * D per token and layer, backward twice that). The logprob chunks' recompute
  and the no-grad forwards of pi_old and pi_ref are not counted: MFU is of the update alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from bench import copy_bandwidth, hf_generate_inputs, machine, median_times, rollout_prompts

SHAPE = "qwen2.5-0.5b"  # model.PRESETS: hidden 896, 24 layers, 14 heads, 2 kv heads, vocab 151936, tied
# Dense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity), matched on the device name in
# this order: H100 PCIe 756 TFLOP/s, H100 SXM 989, H200 989 (the H100 SXM's compute with more memory),
# A100 312. A device not listed gets no MFU.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(name: str) -> float | None:
    """The dense bf16 peak assumed for a device name (torch.cuda.get_device_name()), or None."""
    return next((peak for key, peak in PEAK_BF16 if key.lower() in name.lower()), None)


def random_model(device="cuda", dtype=torch.bfloat16, **overrides):
    """Our Transformer at the Qwen2.5-0.5B shape with random weights (model.init_weights), built on
    the device (initialising 494M parameters on a CPU takes seconds)."""
    from model import Transformer, preset
    torch.manual_seed(0)
    with torch.device(device):
        m = Transformer(preset(SHAPE, **overrides))
    return m.to(dtype).eval()


def weight_bytes(model) -> int:
    """Bytes of the distinct parameters (a tied head counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --- decode at batch 1 --------------------------------------------------------------------------

def bench_decode(new_tokens: int = 256, prompt_len: int = 64, repeats: int = 3, device="cuda",
                 copy_bytes: int = 1 << 30, **shape) -> dict:
    from rollout import generate
    model = random_model(device, **shape)
    prompt = rollout_prompts(1, model.cfg.vocab_size, prompt_len, prompt_len)
    run = lambda: generate(model, prompt, new_tokens, temperature=1.0, seed=0)  # noqa: E731
    t = median_times({"decode": run}, repeats)["decode"]
    per_token = t / new_tokens  # the prefill of 64 tokens is one step among 256: counted in
    achieved, copy = weight_bytes(model) / per_token, copy_bandwidth(device, copy_bytes)
    return {"decode_b1_ms_per_token": 1e3 * per_token, "decode_b1_tokens_per_s": 1 / per_token,
            "decode_b1_weight_GBps": achieved / 1e9, "copy_GBps": copy / 1e9,
            "decode_b1_frac_of_copy": achieved / copy, "weight_bytes": weight_bytes(model),
            "decode_new_tokens": new_tokens}


# --- the sampler at batch 64 against transformers -------------------------------------------------

def bench_sampler(prompts: int = 8, samples: int = 8, new_tokens: int = 128, repeats: int = 3, device="cuda",
                  **shape) -> dict:
    """Same weights in both: ours written by checkpoint.save_pretrained, read back by transformers."""
    import transformers

    from checkpoint import save_pretrained
    from rollout import generate
    ours = random_model(device, **shape)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).to(device=device, dtype=torch.bfloat16).eval()
    batch = rollout_prompts(prompts, ours.cfg.vocab_size, 32, 96)
    ids, mask = (x.to(device) for x in hf_generate_inputs(batch, pad=0))
    n_tokens = prompts * samples * new_tokens

    def run_ours():
        r = generate(ours, batch, new_tokens, num_samples=samples, temperature=1.0, seed=0)
        assert sum(map(len, r.tokens)) == n_tokens

    def run_hf():
        with torch.no_grad():  # plain sampling, as ours: temperature 1, no top-k (HF's default is 50)
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                              temperature=1.0, num_return_sequences=samples, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0)
        assert out.shape == (prompts * samples, ids.shape[1] + new_tokens)

    t = median_times({"ours": run_ours, "hf": run_hf}, repeats)
    return {"sampler_b64_ours_tokens_per_s": n_tokens / t["ours"], "sampler_b64_hf_tokens_per_s": n_tokens / t["hf"],
            "sampler_b64_speedup_vs_hf": t["hf"] / t["ours"], "sampler_batch": prompts * samples,
            "sampler_new_tokens": new_tokens}


# --- a GRPO update --------------------------------------------------------------------------------

def grpo_batch(model, n_seqs: int, prompt_len: int, completion_len: int, seed: int = 0):
    """A grpo.Batch of random sequences (left-padded ragged prompts, full-length completions) with
    pi_old = pi_ref = the model's own logprobs (the first pass of a step) and random advantages."""
    from grpo import Batch, sequence_logprobs
    g, dev = torch.Generator().manual_seed(seed), model.lm_head.weight.device
    L = prompt_len + completion_len
    ids = torch.randint(1, model.cfg.vocab_size, (n_seqs, L), generator=g).to(dev)          # (N, L)
    start = torch.randint(0, prompt_len // 2, (n_seqs,), generator=g).to(dev)               # (N,) left pads
    mask = torch.zeros(n_seqs, L, device=dev)
    mask[:, prompt_len:] = 1.0                                                               # (N, L)
    with torch.no_grad():
        old = sequence_logprobs(model, ids, start, 1.0, 8) * mask                            # (N, L)
    adv = torch.randn(n_seqs, generator=g).to(dev)                                            # (N,)
    return Batch(ids, start, mask, old, old.clone(), adv)


def update_flops(model, n_seqs: int, seq_len: int) -> float:
    """Model FLOPs of one forward+backward over n_seqs sequences of seq_len tokens (module docstring)."""
    c = model.cfg
    matmul_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.dim() == 2 and not n.startswith("embed_tokens"))  # head, projections
    if c.tie_embeddings:
        matmul_params += model.lm_head.weight.numel()  # the tied head is a matmul too (its one copy)
    attn = 6 * c.num_layers * seq_len * c.num_heads * c.head_dim
    return n_seqs * seq_len * (6 * matmul_params + attn)


def bench_train(n_seqs: int = 16, prompt_len: int = 256, completion_len: int = 768, micro_batch: int = 8,
                repeats: int = 3, device="cuda", **shape) -> dict:
    from grpo import GRPOConfig, LossConfig, policy_update
    from optim import make_optimizer
    model = random_model(device, **shape).train()
    cuda = torch.device(device).type == "cuda"
    opt = make_optimizer(model, 1e-6, 0.0)
    b = grpo_batch(model, n_seqs, prompt_len, completion_len)
    cfg = GRPOConfig(micro_batch=micro_batch, max_new_tokens=completion_len)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = median_times({"update": lambda: policy_update(model, b, cfg, LossConfig(), opt, 1e-6)}, repeats)["update"]
    L = prompt_len + completion_len
    flops, peak = update_flops(model, n_seqs, L), peak_flops(torch.cuda.get_device_name() if cuda else "cpu")
    return {"train_tokens_per_s": n_seqs * L / t, "train_step_s": t, "train_tflops": flops / t / 1e12,
            "train_mfu": None if peak is None else flops / t / peak, "peak_tflops_assumed": peak and peak / 1e12,
            "train_peak_mem_GiB": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
            "train_shape": f"{n_seqs} seqs x {L} tokens (prompt {prompt_len}), micro-batch {micro_batch}"}


# --- command line ---------------------------------------------------------------------------------

BENCHES = {"decode": bench_decode, "sampler": bench_sampler, "train": bench_train}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="+", choices=[*BENCHES, "all"])
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measure (median), after one warm-up")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmarks need one (bench.py has the CPU ones)")
        return 0
    out = {"device": torch.cuda.get_device_name(), "machine": machine(), "shape": SHAPE,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"machine: {out['machine']}\nmodel: {SHAPE} shape, random weights, bf16", flush=True)
    for name in BENCHES if "all" in args.what else dict.fromkeys(args.what):
        try:
            res = BENCHES[name](repeats=args.repeats)
        except Exception as e:  # one failing benchmark must not hide the others' figures
            res = {f"{name}_error": f"{type(e).__name__}: {e}"}
        out.update(res)
        for k, v in res.items():
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}", flush=True)
        if args.json:  # rewritten after each benchmark: a timeout keeps what finished
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
