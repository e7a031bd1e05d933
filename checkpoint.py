"""Checkpoints: Hugging Face layout in and out, trainer state for resume, the reward model's files.

Three kinds of directory, each written whole or not at all (`atomic_dir`: into a temporary sibling,
fsynced, that then takes the place of the old one, so a crash never leaves a half-written checkpoint
where a good one was; `recover_dir` undoes what a kill in the middle of the swap leaves, and a full
disk is a `WriteError` with the old directory untouched):

- a model (`load_pretrained` / `save_pretrained`): the Hugging Face layout, `config.json`,
  `model.safetensors` (or shards `model-0000k-of-0000n.safetensors` with
  `model.safetensors.index.json`), `generation_config.json`, and the tokenizer's files. The tensor
  names are HF's, so transformers loads what we save and we load what it saves. The one renaming:
  our model stores q/k/v and gate/up as one fused matrix each (`FUSED`), split on save and stacked
  on load.
- a reward model (`save_reward_model` / `load_reward_model`): its backbone as a model directory
  (transformers' AutoModelForCausalLM loads it; its unused `lm_head` is included), plus
  `score_head.safetensors` ("weight" (1, C), "bias" (1,)) and `reward_model.json`
  ({"head": ..., "read": "last_token"}), which marks the directory as a reward model.
- a trainer state (`save_trainer_state` / `load_trainer_state`): `trainer_state.pt` with the full,
  name-keyed model and optimizer state dicts and the loop's own state (step, data positions), so a
  run checkpointed on N ranks resumes on any number of ranks.

Under FSDP2 the state is gathered to full tensors first (`full_state`, a collective every rank
calls); only the caller's main rank writes. Problems a person can fix (a missing file, a wrong
shape, another model's checkpoint) raise FileNotFoundError or ValueError with a one-line message.

Departures from transformers' loader: Qwen2 sliding-window attention and rope scaling other than
Llama-3's are refused with an error; weights are cast to the requested dtype on load.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import signal
from dataclasses import asdict
from pathlib import Path

import torch

from model import MODEL_TYPES, ModelConfig, Transformer, rope_frequencies
from reward_model import RewardModel
from tokenizer import Tokenizer

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
SHARD_BYTES = 4 << 30  # safetensors files are split above 4 GiB
RM_MARKER = "reward_model.json"
HEAD_FILE = "score_head.safetensors"
TRAINER_STATE = "trainer_state.pt"


# --- one atomic directory write -------------------------------------------------------------------

# A test hook: when this environment variable names a directory (e.g. "ckpt"), the process kills
# itself (SIGKILL) between the two renames of the next swap that replaces such a directory, so a
# test can check `recover_dir` on exactly what a kill there leaves behind.
KILL_BETWEEN_RENAMES = "R1_TEST_KILL_BETWEEN_RENAMES"


class WriteError(OSError):
    """A checkpoint could not be written (a full disk); the previous one is untouched."""


def _fsync(path: Path) -> None:
    if os.name == "nt" and Path(path).is_dir():  # Windows cannot open a directory to fsync it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file under `root`, then every directory, on disk: a rename after it never points at
    data still in the page cache."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def _write_failed(e: Exception) -> bool:
    """A full disk: ENOSPC from Python, or the RuntimeError torch.save's zip writer raises for it
    ("[enforce fail at inline_container.cc] ... file write failed" / "unexpected pos")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(m in str(e) for m in ("inline_container", "file write failed",
                                                                     "unexpected pos"))


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield an empty temporary sibling `path.tmp-PID` to write into; when the block ends without an
    exception its files are fsynced and it takes the place of `path`: `path` -> `path.old-PID`, then
    the temporary -> `path`, then the old one is deleted. A kill at any point leaves either `path`
    whole or, between the two renames, `path.old-PID` whole; `recover_dir` puts that back. On an
    exception the temporary is deleted and `path` is left as it was; a full disk raises WriteError."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
        except (OSError, RuntimeError) as e:
            if not _write_failed(e):
                raise
            why = str(e).splitlines()[0][:120]
            raise WriteError(errno.ENOSPC, f"writing {path} failed, the disk is full ({why}); free some space "
                                           f"and rerun: the previous {path.name} is untouched") from None
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
            if os.environ.get(KILL_BETWEEN_RENAMES) == path.name:
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
        _fsync(path.parent)  # both renames on disk before the old copy goes
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless the block failed


def recover_dir(path: Path) -> None:
    """Put `path` back in order after a kill inside `atomic_dir`: with `path` missing, the newest
    `path.old-*` (whole: it was moved aside only after its replacement was written) is renamed back;
    then every `path.tmp-*` and `path.old-*` left over is deleted. Call it only while no other process
    writes `path` (runtime.StageRun holds the stage directory's lock)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    pattern = glob.escape(path.name)
    olds = sorted(path.parent.glob(f"{pattern}.old-*"), key=lambda p: p.stat().st_mtime)
    if not path.exists() and olds:
        os.replace(olds.pop(), path)
    for p in olds + list(path.parent.glob(f"{pattern}.tmp-*")):
        shutil.rmtree(p, ignore_errors=True)
    _fsync(path.parent)


# --- HF config.json <-> ModelConfig ---------------------------------------------------------------

def read_json(path: Path) -> dict:
    """A JSON object file, or ValueError naming the file (not JSON, not an object, too deep)."""
    try:
        blob = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:100]
        raise ValueError(f"{path}: not valid JSON ({why}); restore the file from the checkpoint's source") from None
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: a JSON {type(blob).__name__}, not an object; restore the file from the "
                         "checkpoint's source")
    return blob


def config_from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json dict; unsupported features are refused, naming `source`."""
    try:
        return _config_from_hf(cfg, source)
    except KeyError as e:
        raise ValueError(f"{source}: no {e.args[0]!r}; an HF config.json needs vocab_size, hidden_size, "
                         "intermediate_size, num_hidden_layers and num_attention_heads") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"{source}: a value has the wrong type ({e}); compare it with the model's "
                         "original config.json") from None


def _config_from_hf(cfg: dict, source: str) -> ModelConfig:
    mt = cfg.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {mt!r} is not supported; this project loads "
                         f"{', '.join(sorted(MODEL_TYPES))} checkpoints")
    if cfg.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported; set it to false "
                         "(Qwen2.5 checkpoints ship with it off)")
    # transformers>=5 writes rope_parameters; older checkpoints write rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ValueError(f"{source}: rope scaling {kind!r} is not supported; only 'llama3' is")
        else:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise ValueError(f"{source}: only SiLU MLPs without bias are supported")
    qkv_bias = True if mt == "qwen2" else bool(cfg.get("attention_bias", False))
    return ModelConfig(
        model_type=mt, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim"), max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        qkv_bias=qkv_bias, qk_norm=(mt == "qwen3"),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"), init_std=cfg.get("initializer_range", 0.02),
    )


def config_to_hf(c: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json transformers expects for a ModelConfig."""
    cfg = {
        "architectures": [ARCHITECTURES[c.model_type]], "model_type": c.model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id, "use_cache": True,
    }
    if c.rope_scaling:
        cfg["rope_scaling"] = dict(c.rope_scaling)
    if c.model_type == "llama":
        cfg.update(attention_bias=c.qkv_bias, mlp_bias=False)
    if c.model_type == "qwen3":
        cfg.update(attention_bias=c.qkv_bias)
    if c.model_type in ("qwen2", "qwen3"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
    return cfg


# --- tensor names ---------------------------------------------------------------------------------

# Fused projections and the HF tensors they stack along dim 0, in this order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def hf_parts(name: str, cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Our state-dict name -> [(HF checkpoint tensor name, rows along dim 0)]. One entry with rows
    None for a plain tensor; one entry per stacked HF tensor for a fused projection."""
    prefix = "" if name.startswith("lm_head.") else "model."
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            layer, kind = name.split(f".{fused}.")  # "layers.3", "weight" or "bias"
            D, I = cfg.head_dim, cfg.intermediate_size
            rows = ((cfg.num_heads * D, cfg.num_kv_heads * D, cfg.num_kv_heads * D) if fused.endswith("qkv_proj")
                    else (I, I))
            return [(f"{prefix}{layer}.{p}.{kind}", n) for p, n in zip(parts, rows)]
    return [(prefix + name, None)]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded (index.json) safetensors checkpoint."""
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json; "
                                "save the weights in safetensors format (save_pretrained does)")
    out = {}
    for f in files:
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} is listed in the index but missing; re-download the shard")
        try:
            out.update(load_file(str(path / f)))
        except Exception as e:  # safetensors raises its own SafetensorError (truncated, garbled)
            raise ValueError(f"{path / f}: not a readable safetensors file ({str(e).splitlines()[0][:100]}); "
                             "it may be truncated: copy or download it again") from None
    return out


# --- models ---------------------------------------------------------------------------------------

def load_pretrained(path, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    """A Transformer from an HF-layout directory: config.json plus model.safetensors or shards."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist; pass a directory "
                                "with config.json and *.safetensors")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found; an HF-layout checkpoint needs config.json")
    cfg = config_from_hf(read_json(cfg_file), source=str(cfg_file))
    with torch.device("meta"):
        model = Transformer(cfg)
    tensors = read_safetensors(path)
    state = {}
    for name, ref in model.state_dict().items():
        parts = hf_parts(name, cfg)  # [(HF tensor, rows)]: several for a fused projection
        if name == "lm_head.weight" and cfg.tie_embeddings and parts[0][0] not in tensors:
            continue
        pieces = []
        for hf, rows in parts:
            if hf not in tensors:
                raise ValueError(f"{path}: tensor {hf} is missing from the checkpoint; "
                                 f"is it a complete {cfg.model_type} checkpoint?")
            t = tensors.pop(hf)
            want = tuple(ref.shape) if rows is None else (rows, *ref.shape[1:])
            if tuple(t.shape) != want:
                raise ValueError(f"{path}: tensor {hf} has shape {tuple(t.shape)}, config.json implies "
                                 f"{want}; config and weights disagree")
            pieces.append(t)
        state[name] = torch.cat(pieces).to(dtype) if len(pieces) > 1 else pieces[0].to(dtype)
    tensors.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway
    stray = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
    if stray:
        raise ValueError(f"{path}: unexpected tensor {stray[0]} (+{len(stray) - 1} more); "
                         f"the weights do not match a {cfg.model_type} model")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(cfg)  # a non-persistent buffer: not in the file
    return model.to(device)


def write_pretrained(model: Transformer, path: Path, tokenizer: Tokenizer | None = None,
                     max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write an unsharded model's HF-layout files into the existing directory `path` (not atomic:
    `save_pretrained` wraps it)."""
    from safetensors.torch import save_file
    state = {}
    for name, v in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        parts = hf_parts(name, model.cfg)
        chunks = v.detach().cpu().split([rows for _, rows in parts]) if len(parts) > 1 else [v.detach().cpu()]
        state.update({hf: c.contiguous() for (hf, _), c in zip(parts, chunks)})
    dtype = next(iter(state.values())).dtype
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg = model.cfg
    if tokenizer is not None:
        tokenizer.save(path)
        cfg = ModelConfig(**{**asdict(cfg), "eos_token_id": tokenizer.eos_id,
                             "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id})
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def save_pretrained(model: Transformer, path, tokenizer: Tokenizer | None = None,
                    max_shard_bytes: int = SHARD_BYTES) -> None:
    """An unsharded model as an HF-layout directory at `path`, atomically; safetensors files are
    split above max_shard_bytes."""
    with atomic_dir(Path(path)) as tmp:
        write_pretrained(model, tmp, tokenizer, max_shard_bytes)


# --- reward models --------------------------------------------------------------------------------

def save_reward_model(rm: RewardModel, path, tokenizer: Tokenizer) -> None:
    """The reward model's directory (see the module docstring), atomically. `rm` must be unsharded."""
    from safetensors.torch import save_file
    with atomic_dir(Path(path)) as tmp:
        write_pretrained(rm.backbone, tmp, tokenizer)
        head = {k: v.detach().cpu().contiguous() for k, v in rm.score_head.state_dict().items()}
        save_file(head, tmp / HEAD_FILE, metadata={"format": "pt"})
        (tmp / RM_MARKER).write_text(json.dumps({"head": HEAD_FILE, "read": "last_token"}, indent=2) + "\n")


def load_reward_model(path, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[RewardModel, Tokenizer]:
    """(RewardModel, Tokenizer) from a directory `save_reward_model` wrote."""
    from safetensors.torch import load_file
    path = Path(path)
    marker = path / RM_MARKER
    if path.is_dir() and not marker.is_file():
        raise ValueError(f"{path} is not a reward model checkpoint (no {RM_MARKER}); train one with "
                         "`python train.py --stage rm --init SFT_MODEL_DIR`")
    backbone = load_pretrained(path, dtype=dtype, device=device)  # errors on a bad directory
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{marker}: not valid JSON ({e}); re-save the reward model") from None
    if meta.get("read") != "last_token":
        raise ValueError(f"{marker}: read={meta.get('read')!r} is not supported; only 'last_token' is")
    head_file = path / meta.get("head", HEAD_FILE)
    if not head_file.is_file():
        raise FileNotFoundError(f"{head_file} not found; the reward model checkpoint is incomplete, re-save it")
    head = load_file(str(head_file))
    C = backbone.cfg.hidden_size
    shapes = {k: tuple(v.shape) for k, v in head.items()}
    if shapes != {"weight": (1, C), "bias": (1,)}:
        raise ValueError(f"{head_file}: tensors {shapes}, expected weight (1, {C}) and bias (1,) "
                         "for this backbone; the head and the backbone do not belong together")
    rm = RewardModel(backbone)
    rm.score_head.load_state_dict({k: v.to(dtype) for k, v in head.items()})
    return rm.to(device), Tokenizer.from_dir(path)


# --- sharded models: gather, then write on one rank -----------------------------------------------

def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_state(model: torch.nn.Module) -> dict:
    """Unsharded, unwrapped state dict on CPU. Under FSDP2 a collective: every rank calls it and
    rank 0 gets the tensors (the others {})."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _plain_copy(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """An unsharded module of `model`'s kind (Transformer or RewardModel) holding `state`."""
    backbone = model.backbone if isinstance(model, RewardModel) else model
    with torch.device("meta"):
        plain_backbone = Transformer(backbone.cfg)
        plain = RewardModel(plain_backbone) if isinstance(model, RewardModel) else plain_backbone
    plain.load_state_dict(state, assign=True, strict=False)
    if backbone.cfg.tie_embeddings:
        plain_backbone.lm_head.weight = plain_backbone.embed_tokens.weight
    return plain


def save_model(model: torch.nn.Module, tokenizer: Tokenizer, path, main: bool = True) -> None:
    """A Transformer as an HF-layout directory, or a RewardModel as its directory, sharded or not.
    Every rank calls it (gathering is collective); the rank with `main` writes."""
    state = full_state(model) if is_sharded(model) else None  # gathered to the main rank
    if main:
        plain = model if state is None else _plain_copy(model, state)
        (save_reward_model if isinstance(plain, RewardModel) else save_pretrained)(plain, path, tokenizer)


# --- trainer state --------------------------------------------------------------------------------

def save_trainer_state(ckpt: Path, model, optimizer, state: dict, tokenizer: Tokenizer | None = None,
                       main: bool = True) -> None:
    """Model + optimizer + loop state in `ckpt/trainer_state.pt`, atomically (a crash mid-write keeps
    the previous one). Both state dicts are full and keyed by parameter name, not by index and not
    sharded. Every rank calls it; the rank with `main` writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    msd = full_state(model)
    osd = get_optimizer_state_dict(model, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if main:
        with atomic_dir(Path(ckpt)) as tmp:
            torch.save({"model": msd, "optimizer": osd, "state": state}, tmp / TRAINER_STATE)
            if tokenizer is not None:
                tokenizer.save(tmp)


def has_trainer_state(ckpt: Path) -> bool:
    return (Path(ckpt) / TRAINER_STATE).is_file()


def load_trainer_state(ckpt: Path, model, optimizer) -> dict:
    """Restore model and optimizer from `save_trainer_state`'s file (every rank reads it); return
    the loop state saved with them."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    blob = torch.load(Path(ckpt) / TRAINER_STATE, map_location="cpu", weights_only=False)
    # strict=False below only tolerates a tied head; any other name mismatch means the checkpoint
    # holds another model's layout, and loading it would silently keep freshly initialised weights
    diff = (set(blob["model"]) ^ set(model.state_dict())) - {"lm_head.weight"}
    if diff:
        raise ValueError(f"{ckpt} holds a different model layout (e.g. {sorted(diff)[0]}); "
                         f"delete that ckpt directory to start the stage afresh")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, blob["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, blob["optimizer"], options=opts)
    return blob["state"]
