"""reward_model.py: the Bradley-Terry loss, the last-token read, learning toy preferences,
micro-batch and rank invariance of a step, and the checkpoint layout (ours and transformers')."""
import copy
import math

import pytest
import torch

from checkpoint import load_reward_model, save_pretrained, save_reward_model
from model import Transformer, preset
from optim import lr_at
from reward_model import (RMConfig, bradley_terry_loss, collate_scores, encode_pair, init_reward_model,
                          pairwise_accuracy, rm_step, score_texts)
from runtime import ExampleStream
from tokenizer import build_char_tokenizer
from toy import GENERAL_TEMPLATES, ToyArithmetic, toy_prompt

torch.set_num_threads(1)  # 2 shared cores: one thread each is faster than two fighting


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(ToyArithmetic().alphabet())


def micro_rm(tok, seed=0, head_std=0.0):
    """A micro reward model; head_std > 0 gives a random head, so the backbone gets gradient at once."""
    torch.manual_seed(seed)
    rm = init_reward_model(Transformer(preset("micro", vocab_size=tok.vocab_size)))
    if head_std:
        torch.nn.init.normal_(rm.score_head.weight, std=head_std)
        torch.nn.init.normal_(rm.score_head.bias, std=head_std)
    return rm


# --- the loss ---------------------------------------------------------------------------------

def test_bradley_terry_loss_hand_value_and_gradient_sign():
    c = torch.tensor([2.0, 0.0], requires_grad=True)
    r = torch.tensor([1.0, 0.5], requires_grad=True)
    loss, acc = bradley_terry_loss(c, r)
    # margins 1 and -0.5: -log sigmoid(m) = log(1 + e^-m)
    want = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)  # 0.643671
    assert acc.item() == 0.5
    loss.backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()  # descent raises chosen, lowers rejected
    # d/dc = -sigmoid(-m) / N
    assert c.grad.tolist() == pytest.approx([-1 / (1 + math.e) / 2, -1 / (1 + math.exp(-0.5)) / 2], abs=1e-6)
    share, _ = bradley_terry_loss(c.detach(), r.detach(), total_pairs=4)  # share of a 4-pair batch
    assert share.item() == pytest.approx(want * 2 / 4, abs=1e-6)
    big, _ = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0]))  # no overflow
    assert big.item() == pytest.approx(200.0)
    tie, tie_acc = bradley_terry_loss(torch.zeros(3), torch.zeros(3))
    assert tie.item() == pytest.approx(math.log(2)) and tie_acc.item() == 0.0  # a tie is not a win


# --- data and the last-token read -------------------------------------------------------------

def test_encode_pair_appends_eos_and_cuts_from_the_left(tok):
    ids = encode_pair(tok, "User: say ok Assistant:", "<answer>ok</answer>", max_len=256)
    assert ids[-1] == tok.eos_id
    assert tok.decode(ids[:-1]) == "User: say ok Assistant:<answer>ok</answer>"
    cut = encode_pair(tok, "User: say ok Assistant:", "<answer>ok</answer>", max_len=5)
    assert cut == ids[-5:] and cut[-1] == tok.eos_id
    ids, lengths = collate_scores([[5, 6, 7], [8]], pad_id=tok.pad_id)
    assert ids.tolist() == [[5, 6, 7], [8, tok.pad_id, tok.pad_id]] and lengths.tolist() == [3, 1]


def test_score_is_read_at_last_token_whatever_the_padding(tok):
    rm = micro_rm(tok, head_std=0.5).eval()
    pairs = ToyArithmetic().preference_pairs(6, seed=3)
    seqs = [encode_pair(tok, p["prompt"], p[k], 256) for p in pairs for k in ("chosen", "rejected")]
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([s])) for s in seqs])          # (N,) no padding at all
        ids, lengths = collate_scores(seqs, tok.pad_id)
        padded = rm(ids, lengths=lengths)                                   # (N,) right-padded
        extra = torch.full((len(seqs), 7), tok.pad_id)
        more = rm(torch.cat([ids, extra], 1), lengths=lengths)              # 7 more pad columns
        T = int(lengths.max())
        left = torch.full((len(seqs), T), tok.pad_id)                       # left-padded, as the sampler pads
        for i, s in enumerate(seqs):
            left[i, T - len(s):] = torch.tensor(s)
        lefty = rm(left, kv_start=T - lengths)
    assert alone.std() > 1e-3  # the scores differ, so reading the wrong token would show
    for got in (padded, more, lefty):
        assert (got - alone).abs().max().item() < 1e-5
    got = score_texts(rm, tok, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], 256, batch_size=4)
    assert (got - alone[0::2]).abs().max().item() < 1e-5


# --- training ---------------------------------------------------------------------------------

def test_reward_model_learns_toy_preferences_on_held_out_requests(tok):
    """Concise, right-language, formatted beats wrong-language / rambling / unformatted: learned from
    scratch at micro size on 13 request templates, scored on 3 templates never seen in training."""
    toy = ToyArithmetic()
    held = {toy_prompt(t[lang][0], lang) for t in GENERAL_TEMPLATES[:3] for lang in ("en", "zh")}
    train = [p for p in toy.preference_pairs(1000, seed=0) if p["prompt"] not in held]
    test = [p for p in toy.preference_pairs(600, seed=99) if p["prompt"] in held]
    assert len(test) > 80
    rm = micro_rm(tok)
    # Measured over 5 seeds: held-out accuracy 1.000 for each.
    cfg = RMConfig(steps=60, batch_size=16, micro_batch=16, lr=3e-3, warmup=5)
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    stream = ExampleStream(train, seed=0)
    first = None
    for step in range(cfg.steps):
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        row = rm_step(rm, opt, stream.take(cfg.batch_size), tok, cfg, lr)
        first = row if first is None else first
    assert first["loss"] == pytest.approx(math.log(2))  # the zero head scores everything 0
    assert row["loss"] < 0.2
    assert pairwise_accuracy(rm, tok, test, cfg.max_len) > 0.9


def _batch(n=8, seed=1):
    return ToyArithmetic().preference_pairs(n, seed=seed)


def _sgd_step(rm, batch, tok, micro_batch, rank=0, world=1):
    # SGD, not Adam: Adam's first step is ~lr * sign(grad), blind to a wrongly scaled gradient.
    cfg = RMConfig(batch_size=len(batch), micro_batch=micro_batch, max_grad_norm=1e9)
    opt = torch.optim.SGD(rm.parameters(), lr=0.1)
    return rm_step(rm, opt, batch, tok, cfg, lr=0.1, rank=rank, world=world)


def test_rm_step_is_micro_batch_and_rank_invariant(tok):
    batch = _batch()
    base = micro_rm(tok, head_std=0.5)
    whole, halves = copy.deepcopy(base), copy.deepcopy(base)
    row = _sgd_step(whole, batch, tok, micro_batch=8)
    _sgd_step(halves, batch, tok, micro_batch=4)
    assert row["pairs"] == 8 and 0.0 <= row["accuracy"] <= 1.0
    p0 = dict(base.named_parameters())
    moved = 0
    for (name, a), b in zip(whole.named_parameters(), halves.parameters()):
        assert (a - b).abs().max().item() < 1e-6, name
        moved += int((a - p0[name]).abs().max().item() > 1e-4)
    assert moved > 10  # the backbone moved too, not just the head
    # Two ranks, each on its own copy: FSDP would average their gradients, so with SGD the mean
    # of the two updates must equal the one-process update.
    r0, r1 = copy.deepcopy(base), copy.deepcopy(base)
    _sgd_step(r0, batch, tok, micro_batch=2, rank=0, world=2)
    _sgd_step(r1, batch, tok, micro_batch=2, rank=1, world=2)
    for (name, a), b0, b1 in zip(whole.named_parameters(), r0.parameters(), r1.parameters()):
        assert ((b0 + b1) / 2 - a).abs().max().item() < 1e-6, name


def test_rm_step_refuses_non_finite_gradient(tok):
    rm = micro_rm(tok, head_std=0.5)
    with torch.no_grad():
        rm.backbone.layers[0].mlp.gate_up_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    with pytest.raises(FloatingPointError):
        _sgd_step(rm, _batch(4), tok, micro_batch=4)
    for k, v in rm.state_dict().items():  # nothing stepped (the planted NaN compares as 0)
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), k
    assert all(p.grad is None for p in rm.parameters())


# --- checkpoints ------------------------------------------------------------------------------

def test_save_load_roundtrip_gives_identical_scores(tok, tmp_path):
    rm = micro_rm(tok, head_std=0.5)
    path = tmp_path / "rm"
    save_reward_model(micro_rm(tok, seed=1), path, tok)  # overwrite an existing one
    save_reward_model(rm, path, tok)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "score_head.safetensors",
              "reward_model.json"):
        assert (path / f).is_file(), f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no temporary directories left
    loaded, ltok = load_reward_model(path)
    pairs = _batch(6)
    args = ([p["prompt"] for p in pairs], [p["rejected"] for p in pairs], 256)
    assert torch.equal(score_texts(rm, tok, *args), score_texts(loaded, ltok, *args))
    assert ltok.eos_id == tok.eos_id and ltok.pad_id == tok.pad_id


def test_saved_backbone_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    rm = micro_rm(tok, head_std=0.5)
    save_reward_model(rm, tmp_path / "rm", tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rm")
    ids = torch.tensor([encode_pair(tok, "User: say ok Assistant:", "ok", 64)])
    with torch.no_grad():
        assert (hf(ids).logits - rm.backbone(ids)).abs().max().item() < 1e-4


def test_plain_checkpoint_is_not_a_reward_model(tok, tmp_path):
    save_pretrained(micro_rm(tok).backbone, tmp_path / "plain", tokenizer=tok)
    with pytest.raises(ValueError) as e:
        load_reward_model(tmp_path / "plain")
    msg = str(e.value)
    assert "not a reward model checkpoint" in msg and "--stage rm" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError):
        load_reward_model(tmp_path / "missing")
