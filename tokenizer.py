"""Tokenizer and prompt templates.

A thin wrapper over the `tokenizers` library (the Rust tokenizer behind Hugging Face's fast
tokenizers) that reads what a checkpoint directory holds -- `tokenizer.json`, plus the special
token ids from `tokenizer_config.json`, `generation_config.json` and `config.json` -- and the
R1-Zero prompt template (DeepSeek-R1 report, Table 1), used for R1-Zero and every later RL stage.

It also builds the embedded toy task's character-level tokenizer: one token per character of
the toy alphabet plus one token per tag (`<think>`, `</think>`, `<answer>`, `</answer>`), so the
tags the format reward reads are single tokens, as they are (or nearly are) in real BPE vocabularies.
It is written as Qwen2's byte-level BPE pipeline with no merges, so transformers' AutoTokenizer reads
a toy checkpoint's tokenizer exactly as this file does.

Two prompt templates (`--template`): `r1zero`, the report's Table 1 text verbatim, for base models;
and `chat`, the checkpoint's own Jinja chat template (`tokenizer_config.json`'s `chat_template`)
rendered with the R1 instruction as the system message and the question as the user message, for
instruct models. The template runs in jinja2's sandbox, set up as transformers sets it up (same
options and globals), so `Tokenizer.apply_chat_template` gives transformers' token ids.

Departures: the chat renderer supports messages (role, content) only: no tools, documents or
assistant masks; the R1 system instruction is Table 1's text without its "User: ... Assistant:" frame.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import AddedToken, decoders, models, processors

# --- templates --------------------------------------------------------------------------------

# DeepSeek-R1 report, Table 1: the template for DeepSeek-R1-Zero. `prompt` is replaced by the question.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)

THINK_TAGS = ("<think>", "</think>")
ANSWER_TAGS = ("<answer>", "</answer>")


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero prompt for one question; the model's response starts right after 'Assistant:'."""
    return R1_ZERO_TEMPLATE.format(prompt=question.strip())


# Table 1's instruction without its "User: ... Assistant:" frame: the system message of `--template chat`.
R1_SYSTEM = R1_ZERO_TEMPLATE.split(" User:")[0]
TEMPLATES = ("r1zero", "chat")


def chat_prompt(tok: "Tokenizer", question: str) -> str:
    """The `--template chat` prompt text: the checkpoint's chat template with the R1 instruction as
    the system message, the question as the user message, and the assistant's turn opened."""
    return tok.render_chat([{"role": "system", "content": R1_SYSTEM},
                            {"role": "user", "content": question.strip()}], add_generation_prompt=True)


def _jinja_template(source: str):
    """Compile a chat template as transformers does (utils/chat_template_utils.py): an immutable
    sandbox (templates are code from the checkpoint), trim_blocks and lstrip_blocks, the loopcontrols
    extension, and the globals templates call: raise_exception, strftime_now, tojson without HTML
    escaping."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *a, **k: dict(*a, **k))
    return env.from_string(source)


# --- tokenizer --------------------------------------------------------------------------------

def _token_text(tok) -> str | None:
    """tokenizer_config.json writes special tokens either as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-download or re-save the checkpoint") from None


class Tokenizer:
    """Text <-> token ids, and the special ids the sampler and trainer need.

    `eos_ids` is a list because chat checkpoints stop on several tokens (Qwen2.5-Instruct:
    `<|im_end|>` and `<|endoftext|>`); `eos_id` is the first, the one appended to SFT targets.
    """

    def __init__(self, tok: _HFTokenizer, eos_ids: list[int], pad_id: int | None, bos_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None):
        if not eos_ids:
            raise ValueError("tokenizer has no end-of-sequence token; set eos_token in tokenizer_config.json")
        self.tok = tok
        self.eos_ids = list(eos_ids)
        self.eos_id = self.eos_ids[0]
        self.pad_id = pad_id if pad_id is not None else self.eos_id  # pads are masked, any id works
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None  # the checkpoint's add_bos_token (Llama-3: true)
        if self.add_bos and tok.encode("a", add_special_tokens=True).ids[:1] != [bos_id]:
            # transformers' fast tokenizers add BOS through tokenizer.json's post-processor, not the
            # config's flag: write one, so AutoTokenizer encodes as `encode` does
            bos = tok.id_to_token(bos_id)
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        self.chat_template = chat_template
        self._compiled = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when `add_bos` (None: the checkpoint's add_bos_token), unless
        the text already starts with it (a chat template that writes it). Text that continues a
        sequence (a response after its prompt) passes add_bos=False."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template applied to `messages` ([{"role", "content"}]), as text."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json chat_template); "
                             "use --template r1zero, or a checkpoint of an instruct model")
        if self._compiled is None:
            self._compiled = _jinja_template(self.chat_template)
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        specials = {k: self.tok.id_to_token(i) for k, i in names.items() if i is not None}
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (transformers' apply_chat_template(..., tokenize=True)): the
        text is encoded as is, with no BOS added: templates that want one write it."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read tokenizer.json and the special ids from an HF-layout checkpoint directory."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{tj} not found; a checkpoint directory needs a tokenizer.json "
                                    "(save one with the checkpoint, or pass --tokenizer DIR)")
        tok = _HFTokenizer.from_file(str(tj))
        tcfg = _read_json(path / "tokenizer_config.json")
        gcfg = _read_json(path / "generation_config.json")
        mcfg = _read_json(path / "config.json")

        def by_text(key):
            t = _token_text(tcfg.get(key))
            return tok.token_to_id(t) if t else None

        # generation_config.json is what HF generate() stops on; fall back to the tokenizer's token.
        eos = gcfg.get("eos_token_id", mcfg.get("eos_token_id"))
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        t_eos = by_text("eos_token")
        if t_eos is not None and t_eos not in eos_ids:
            eos_ids = [t_eos] + eos_ids  # the tokenizer's own eos first: it ends SFT targets
        pad = by_text("pad_token")
        if pad is None:
            pad = gcfg.get("pad_token_id", mcfg.get("pad_token_id"))
        bos = by_text("bos_token")
        if bos is None and tcfg.get("add_bos_token", False):
            bos = gcfg.get("bos_token_id", mcfg.get("bos_token_id"))
        # add_bos_token when the config says; else what tokenizer.json's post-processor does (Llama-3's
        # TemplateProcessing puts <|begin_of_text|> first)
        add_bos = tcfg.get("add_bos_token")
        if add_bos is None:
            add_bos = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
        template = tcfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():  # transformers>=4.43 writes it apart
            template = (path / "chat_template.jinja").read_text()
        return cls(tok, eos_ids, pad, bos, add_bos=bool(add_bos), chat_template=template)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.tok.id_to_token(self.eos_id),
            "pad_token": self.tok.id_to_token(self.pad_id),
            "bos_token": self.tok.id_to_token(self.bos_id) if self.bos_id is not None else None,
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# --- the toy task's character-level tokenizer ---------------------------------------------------

TOY_EOS = "<|endoftext|>"
TOY_PAD = "<|pad|>"
TOY_TAGS = [*THINK_TAGS, *ANSWER_TAGS]


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table (byte-level BPE's alphabet): printable bytes stand for
    themselves, the rest (space, control bytes) are moved to code points from 256 on (' ' -> 'Ġ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


# Qwen2's split regex (its tokenizer.json): the toy's checkpoints are model_type qwen2, and
# transformers' AutoTokenizer always builds a Qwen2Tokenizer for those -- NFC, this split, byte-level --
# from tokenizer.json's vocabulary, whatever tokenizer_config.json names. The toy tokenizer is that
# pipeline, so AutoTokenizer encodes the toy's text exactly as this file does.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_char_tokenizer(alphabet: str) -> Tokenizer:
    """One token per character of `alphabet`, one per think/answer tag, plus eos and pad.

    Ids: 0 = pad, 1 = eos, then the tags, then the characters in sorted order, so the vocabulary
    is the same on every machine for the same alphabet. A character outside the alphabet maps to
    `<unk>` (id after the characters); the toy corpus never contains one.

    It is written as a byte-level BPE with no merges (Qwen2's pipeline, see QWEN2_SPLIT): a one-byte
    character is its byte symbol in the vocabulary (' ' is 'Ġ'); a character of several UTF-8 bytes
    (Chinese) is an added token matched whole, so every character is still one token. Outside the
    alphabet the two differ: this tokenizer gives `<unk>`, transformers' Qwen2Tokenizer drops it.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers
    sym = byte_symbols()
    chars = sorted(set(alphabet) - {"\r"})
    wide = [c for c in chars if len(c.encode("utf-8")) > 1]
    specials = [TOY_PAD, TOY_EOS, *TOY_TAGS]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in chars:
        vocab.setdefault(c if c in wide else sym[ord(c)], len(vocab))
    vocab["<unk>"] = len(vocab)
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (TOY_PAD, TOY_EOS)])
    # Tags are added (matched whole) but not special: decode(skip_special_tokens=True) keeps them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOY_TAGS])
    tok.add_tokens([AddedToken(c, special=False, normalized=False) for c in wide])
    return Tokenizer(tok, eos_ids=[vocab[TOY_EOS]], pad_id=vocab[TOY_PAD])
