"""Chat templates (tokenizer.py) against transformers' apply_chat_template; BOS; --template; the HF
round trip of the toy's checkpoints through AutoTokenizer and AutoModelForCausalLM."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

import tasks  # noqa: E402
import toy  # noqa: E402
from checkpoint import save_pretrained  # noqa: E402
from model import Transformer, preset  # noqa: E402
from settings import RunConfig  # noqa: E402
from runtime import UserError, get_task  # noqa: E402
from tokenizer import R1_SYSTEM, Tokenizer, build_char_tokenizer, byte_symbols, chat_prompt  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>",
            "<|start_header_id|>", "<|end_header_id|>"]
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
           "{% endif %}")
# Llama-3's shape: bos_token from the caller, whitespace control, trim_blocks/lstrip_blocks at work,
# raise_exception, a namespace and loop controls
LLAMA3 = """{{- bos_token }}
{%- set ns = namespace(n=0) %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {%- if message['content'] == 'skip me' %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
# block tags on their own lines: trim_blocks / lstrip_blocks decide the newlines and indents kept
BLOCKS = """{% for m in messages %}
  {% if m.role == 'system' %}
<|im_start|>system
{{ m.content }}<|im_end|>
  {% else %}
<|im_start|>{{ m.role }}
{{ m.content | tojson }}<|im_end|>
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CHATS = [
    [{"role": "user", "content": "What is 47+38?"}],
    [{"role": "system", "content": R1_SYSTEM}, {"role": "user", "content": "  用户 \"quoted\" <b> 12 "}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "skip me"},
     {"role": "user", "content": "again\n\n"}],
]


def byte_tokenizer(template: str, add_bos: bool, eos: str = "<|im_end|>") -> Tokenizer:
    """A byte-level BPE (every byte a token, the specials whole) carrying `template`."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HF
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for s in byte_symbols().values():
        vocab[s] = len(vocab)
    tok = HF(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Tokenizer(tok, eos_ids=[vocab[eos]], pad_id=0, bos_id=vocab["<|begin_of_text|>"], add_bos=add_bos,
                     chat_template=template)


def saved(tok: Tokenizer, path, model_type="llama"):
    tok.save(path)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("name,template,add_bos", [("smollm2", SMOLLM2, False), ("llama3", LLAMA3, True),
                                                    ("blocks", BLOCKS, False)],
                         ids=["smollm2", "llama3", "blocks"])
def test_chat_ids_equal_transformers(tmp_path, name, template, add_bos):
    ours = byte_tokenizer(template, add_bos)
    theirs = saved(ours, tmp_path)
    back = Tokenizer.from_dir(tmp_path)  # the template and add_bos survive save -> load
    assert back.chat_template == template and back.add_bos == add_bos
    for chat in CHATS:
        for gen in (True, False):
            want = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want, (name, chat, gen)
            assert back.apply_chat_template(chat, add_generation_prompt=gen) == want
    if name == "llama3":  # the template writes BOS itself: exactly one
        ids = ours.apply_chat_template(CHATS[0])
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1
        with pytest.raises(Exception, match="unknown role tool"):
            ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_bos_where_the_checkpoint_says(tmp_path):
    """encode adds BOS when add_bos_token is set (Llama-3), once, and AutoTokenizer agrees."""
    on, off = byte_tokenizer(LLAMA3, True), byte_tokenizer(LLAMA3, False)
    assert on.encode("hi") == [on.bos_id] + off.encode("hi")
    assert on.encode("<|begin_of_text|>hi") == on.encode("hi")  # a templated prompt: not doubled
    assert on.encode("hi", add_bos=False) == off.encode("hi")  # a response after its prompt
    theirs = saved(on, tmp_path)
    assert theirs.encode("hi there") == on.encode("hi there")
    # no add_bos_token in the config: read from tokenizer.json's post-processor
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(tmp_path).add_bos


def test_chat_prompt_and_errors():
    tok = byte_tokenizer(SMOLLM2, False)
    text = chat_prompt(tok, " 47+38=? ")
    assert text == (f"<|im_start|>system\n{R1_SYSTEM}<|im_end|>\n<|im_start|>user\n47+38=?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert "User:" not in R1_SYSTEM and R1_SYSTEM.endswith("</answer>.")
    plain = build_char_tokenizer(toy.ToyArithmetic().alphabet())
    with pytest.raises(ValueError, match="no chat template"):
        plain.render_chat([{"role": "user", "content": "x"}])


def test_template_flag(tmp_path):
    with pytest.raises(ValueError, match="--template 'jinja'"):
        RunConfig(template="jinja")
    tok = byte_tokenizer(SMOLLM2, False)
    tok.save(tmp_path / "m")
    run = RunConfig(template="chat", task="toy")
    task = get_task(run, toy.ToyConfig(), tmp_path / "m")
    raw = tasks.get_task("toy")
    for a, b in zip(task.eval_samples(5), raw.eval_samples(5)):
        assert a["prompt"] == chat_prompt(tok, b["question"]) and a["answer"] == b["answer"]
    s = next(task.train_samples(0))
    assert s["prompt"].startswith("<|im_start|>system\n" + R1_SYSTEM)
    assert next(task.general_samples(0))["prompt"].endswith("<|im_start|>assistant\n")
    assert not hasattr(task, "preference_pairs") and hasattr(task, "pretrain_corpus")
    assert get_task(RunConfig(task="toy"), toy.ToyConfig()).eval_samples(3) == raw.eval_samples(3)
    build_char_tokenizer(raw.alphabet()).save(tmp_path / "toy")
    with pytest.raises(UserError, match="no chat template"):
        get_task(run, toy.ToyConfig(), tmp_path / "toy")
    with pytest.raises(UserError, match="no checkpoint"):
        get_task(run, toy.ToyConfig())



def test_file_prompts_are_checked_as_the_chat_template_renders_them(tmp_path):
    """--template chat: the start-of-run length check reads the rendered prompt (system message
    and all), so a line that fits only without the template is still named by file:line."""
    tok = byte_tokenizer(SMOLLM2, False)
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=?", "answer": "2"}) + "\n"
                    + json.dumps({"prompt": "1+" * 40 + "1=?", "answer": "41"}) + "\n")
    chat = tasks.ChatPrompts(tasks.get_task(f"jsonl:{rows}"), tok)
    longest = max(len(tok.encode(s["prompt"])) for s in chat.eval_samples())
    raw = max(len(tok.encode(s["prompt"])) for s in tasks.get_task(f"jsonl:{rows}").eval_samples())
    assert raw < longest  # the rendered prompt is the longer one: R1_SYSTEM plus the chat markup
    chat.check_prompts(tok.encode, 4, longest + 4)  # fits exactly
    with pytest.raises(tasks.data.DataError, match=f"{rows}:2: the prompt has {longest} tokens"):
        chat.check_prompts(tok.encode, 4, longest + 3)
    assert not hasattr(tasks.ChatPrompts(tasks.get_task("toy"), tok), "check_prompts")  # generated tasks have none

TOY_TEXTS = ["User: 478+56=? Assistant:", "用户: 47+38=? 助手: <think> 7+8=15 进1，得5。 </think> <answer>85</answer>",
             "say hello  twice<|endoftext|>", "<think> they want me to say hello. </think> <answer>hello</answer>"]


def test_toy_checkpoint_round_trips_through_transformers(tmp_path):
    """A toy checkpoint: AutoTokenizer encodes and decodes the toy's text exactly as ours, and
    AutoModelForCausalLM gives our logits, so the model answers the same through transformers."""
    tok = build_char_tokenizer(toy.ToyArithmetic().alphabet())
    torch.manual_seed(0)
    model = Transformer(preset("toy-small", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                               pad_token_id=tok.pad_id)).eval()
    save_pretrained(model, tmp_path / "m", tok)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    for text in TOY_TEXTS:
        ids = tok.encode(text)
        assert auto.encode(text) == ids and len(ids) == len(text) - sum(
            text.count(t) * (len(t) - 1) for t in ("<think>", "</think>", "<answer>", "</answer>", "<|endoftext|>"))
        assert auto.decode(ids) == tok.decode(ids) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    ids = torch.tensor([tok.encode(TOY_TEXTS[1])])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
