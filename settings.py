"""Every setting of a run in one place: the run's own settings (RunConfig), each stage's defaults
over the config classes' (SFT, GRPO, loss, reward model, toy, sweep), the resolved configs of one
stage (`stage_configs`, what run_config.json records), the combinations a stage refuses, and which
settings shape a stage's result (`shaping`, the fingerprint a checkpoint is compared with on resume).

train.py builds one flag per field from these dataclasses' help metadata; recipe.py's stages read
the resolved configs and nothing else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from grpo import GRPOConfig, LossConfig, loss_preset
from reward_model import RMConfig
from rewards import DEFAULT_WEIGHTS, STAGE2_WEIGHTS, load_rewards
from runtime import UserError
from sft import SFTConfig
from sweep import SweepConfig
from tokenizer import TEMPLATES
from toy import ToyConfig


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """The recipe's own settings; the training settings live in SFTConfig, GRPOConfig, LossConfig,
    RMConfig and the toy's in ToyConfig. Every one is a command-line flag (train.py)."""
    stage: str = _setting("pretrain,zero", "comma-separated stages, run in order (all: the whole recipe)")
    out: str = _setting("runs/toy", "run directory; each stage writes <out>/<stage>/")
    init: str = _setting("", "checkpoint to start from (empty: pretrain's model for zero, sft, rm and rs; sft's "
                             "for grpo; rs's for rl; the latest stage's for eval)")
    task: str = _setting("toy", "toy | countdown | gsm8k | jsonl:PATH")
    template: str = _setting("r1zero", "prompt template: r1zero (the task's own: the report's Table 1 text, "
                                       "for base models) | chat (the checkpoint's chat template, the R1 "
                                       "instruction as the system message, for instruct models)")
    model: str = _setting("toy", "model preset of a model trained from scratch (pretrain)")
    seed: int = _setting(0, "the one seed: data order, initialisation, rollouts")
    device: str = _setting("auto", "auto | cpu | cuda")
    dtype: str = _setting("auto", "auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16")
    threads: int = _setting(0, "torch CPU threads per process (0: torch's default)")
    ckpt_every: int = _setting(20, "steps between resumable checkpoints (<out>/<stage>/ckpt)")
    eval_n: int = _setting(200, "held-out prompts for eval, summary and the RL curves")
    eval_every: int = _setting(10, "RL steps between held-out evaluations (0: only at the start and end)")
    k: int = _setting(1, "eval: samples per prompt for pass@k and maj@k (1: greedy only)")
    data: str = _setting("", "sft: {prompt, response} JSONL instead of sampling R1-Zero; "
                             "rm: {prompt, chosen, rejected} JSONL instead of the toy's pairs")
    runs: str = _setting("", "plot: comma-separated stage directories to draw (empty: <out>/zero)")
    w_accuracy: float = _setting(DEFAULT_WEIGHTS["accuracy"], "weight of the accuracy reward")
    w_format: float = _setting(DEFAULT_WEIGHTS["format"], "weight of the format reward")
    w_language: float = _setting(STAGE2_WEIGHTS["language"], "weight of the language reward (grpo, rl; "
                                                             "R1-Zero has none)")
    # Repeatable: train.py joins repeated --reward flags with commas.
    reward: str = field(default="", metadata={
        "help": "reward plug-in path/to/file.py:function or module:function, optionally =weight (default 1); "
                "repeat the flag for more; added to the rule rewards in zero, grpo and rl (rewards.load_reward)",
        "repeat": True})
    sft_prompts: int = _setting(1024, "sft: R1-Zero prompts sampled for cold-start data")
    sft_samples: int = _setting(4, "sft: samples per prompt before filtering")
    teacher: str = _setting("", "rs / distill: the model sampled (empty: <out>/grpo/model, <out>/rl/model)")
    reward_model: str = _setting("", "rs / rl / summary: reward model directory (empty: <out>/rm/model)")
    rm_eval_pairs: int = _setting(200, "rm: held-out pairs (toy: another seed; --data: the last 10%)")
    rs_prompts: int = _setting(256, "rs: reasoning prompts sampled")
    rs_samples: int = _setting(4, "rs and distill: samples per prompt")
    rs_reasoning_frac: float = _setting(0.75, "rs: reasoning share of the SFT set (R1: 600k of 800k)")
    general_frac: float = _setting(0.25, "rl: share of each step's prompts that are general (reward model)")
    distill_prompts: int = _setting(256, "distill: teacher prompts sampled for traces")
    student_model: str = _setting("toy-small", "distill: the student's model preset")
    student_steps: int = _setting(600, "distill: pretraining steps of the student base, if missing (its "
                                       "other settings: pretrain's defaults, then the training flags given)")
    restart: bool = _setting(False, "start the stages over: their checkpoints (ckpt/) are deleted, even one of "
                                    "other settings or of a finished stage")
    dist_timeout: float = _setting(300.0, "torchrun: seconds a rank waits for the others before the job fails")

    def __post_init__(self):
        counts = ("ckpt_every", "eval_n", "k", "sft_prompts", "sft_samples", "rm_eval_pairs", "rs_prompts",
                  "rs_samples", "distill_prompts", "student_steps")
        bad = [f"--{n} {getattr(self, n)}" for n in counts if getattr(self, n) < 1]
        bad += [f"--{n} {getattr(self, n)}" for n in ("eval_every", "threads") if getattr(self, n) < 0]
        if bad:
            raise ValueError(f"{', '.join(bad)}: counts must be at least 1 (--eval_every and --threads: "
                             "at least 0, 0 meaning never / torch's default)")
        for name, value, choices in (("device", self.device, ("auto", "cpu", "cuda")),
                                     ("dtype", self.dtype, ("auto", "float32", "bfloat16"))):
            if value not in choices:
                raise ValueError(f"--{name} {value!r}: use {', '.join(choices)}")
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist_timeout {self.dist_timeout}: give the seconds a rank waits, above 0 "
                             "(default 300)")
        if self.reward:
            load_rewards(self.reward)  # a bad path or function fails here, before any stage runs
        if self.template not in TEMPLATES:
            raise ValueError(f"--template {self.template!r}: valid: {', '.join(TEMPLATES)}")
        if not 0 <= self.general_frac <= 1 or not 0 < self.rs_reasoning_frac <= 1:
            raise ValueError(f"--general_frac {self.general_frac}, --rs_reasoning_frac {self.rs_reasoning_frac}: "
                             "need 0 <= general_frac <= 1 and 0 < rs_reasoning_frac <= 1")


STAGES = ("pretrain", "zero", "sft", "grpo", "rm", "rs", "rl", "distill", "eval", "summary", "plot")
# rm runs before rs: rejection sampling ranks the general answers with the reward model
ALL_STAGES = ("pretrain", "zero", "sft", "grpo", "rm", "rs", "rl", "distill", "summary")
SFT_STAGES, RL_STAGES = ("pretrain", "sft", "rs", "distill"), ("zero", "grpo", "rl")
# The toy's settings per stage, over the config classes' own defaults (SFTConfig's are the cold
# start's, GRPOConfig's R1-Zero's and stage 2's); a flag on the command line overrides them.
SFT_STAGE_DEFAULTS = {"pretrain": dict(steps=600, batch_size=64, micro_batch=16, lr=3e-3, warmup=30),
                      "rs": dict(steps=100),                # stage 3's SFT, from the base model
                      "distill": dict(steps=300, lr=1e-3)}  # the student is smaller: a larger lr
RL_STAGE_DEFAULTS = {"rl": dict(steps=20)}  # stage 4: a short polish of the rs model
# The configs of a stage, by key in the dict `stage_configs` returns (and run_config.json holds).
CONFIGS = {"run": RunConfig, "sft": SFTConfig, "grpo": GRPOConfig, "loss": LossConfig, "rm": RMConfig,
           "toy": ToyConfig, "sweep": SweepConfig}  # sweep: read by train.main, never by a stage


# --- what shapes a stage's result (runtime.StageRun compares it with a checkpoint's) ------------------

# RunConfig fields that never shape a result: where and how fast it runs, how often it saves.
# --micro_batch (memory only) is left out too; --device and the number of ranks are, so that a
# checkpoint resumes on another machine or rank count (tests/test_train.py).
NOT_SHAPING = ("stage", "out", "device", "threads", "ckpt_every", "runs", "k", "restart", "dist_timeout",
               "micro_batch")
# RunConfig fields only some stages read (by StageRun name); any other field shapes every stage.
RL_RUNS = ("zero", "grpo", "rl", "distill_zero")
RUN_FIELDS_OF = {
    "model": ("pretrain", "student_base"), "eval_n": RL_RUNS, "eval_every": RL_RUNS, "data": ("sft", "rm"),
    "w_accuracy": RL_RUNS, "w_format": RL_RUNS, "w_language": ("grpo", "rl"),
    "sft_prompts": ("sft",), "sft_samples": ("sft",), "teacher": ("rs", "distill"),
    "reward_model": ("rs", "rl"), "rm_eval_pairs": ("rm",), "rs_prompts": ("rs",),
    "rs_samples": ("rs", "distill"), "rs_reasoning_frac": ("rs",), "general_frac": ("rl",),
    "distill_prompts": ("distill",), "student_model": ("distill",), "student_steps": ("distill",)}
SAMPLING = ("max_new_tokens", "temperature", "top_p")  # GRPOConfig fields the SFT stages sample with


def shaping(c: dict, name: str) -> dict:
    """{flag: value} of the settings that shape the result of the StageRun `name` (a stage, or
    distill's student_base / distill_zero): its training config, the loss for RL, the toy's settings
    for the toy, and the RunConfig fields it reads, less NOT_SHAPING."""
    out = {}
    def add(cfg, prefix="", only=None):
        for k, v in asdict(cfg).items():
            if k not in NOT_SHAPING and (only is None or k in only):
                out[prefix + k] = v
    run = c["run"]
    add(run, only=[k for k in asdict(run) if name in RUN_FIELDS_OF.get(k, (name,))])
    if name in RL_RUNS:
        add(c["grpo"])
        add(c["loss"])
    elif name == "rm":
        add(c["rm"], "rm_")
    else:
        add(c["sft"])
        if name in ("sft", "rs", "distill"):
            add(c["grpo"], only=SAMPLING)
    if run.task == "toy":
        add(c["toy"])
    return out


def check_stage(c: dict, stage: str) -> None:
    """The combinations a stage refuses before it runs (a UserError naming the flag and the fix)."""
    primary = c["grpo"] if stage in RL_STAGES else c["rm"] if stage == "rm" else c["sft"]
    trains = stage in RL_STAGES + SFT_STAGES + ("rm",)
    if trains and primary.steps < 1:
        flag = "--rm_steps" if stage == "rm" else "--steps"
        raise UserError(f"{flag} {primary.steps}: stage {stage} would train nothing; give at least 1")
    if stage in RL_STAGES + ("distill",):  # distill's baseline is GRPO too
        g = c["grpo"]
        if g.group_size < 2:
            raise UserError(f"--group_size {g.group_size}: GRPO scores each sample against its group, so a "
                            "group of 1 has no advantage and the model never changes; use at least 2 (default 8)")
        if g.temperature <= 0:
            raise UserError(f"--temperature {g.temperature}: greedy sampling makes a group's samples alike, so "
                            "every advantage is 0; use a temperature above 0 (default 1.0)")


def stage_configs(args: dict[str, dict], stage: str) -> dict:
    """The resolved settings of one stage: class defaults < the stage's defaults < `args` (the
    command line's {config key: {field: value}}). Raises UserError for a value a config refuses."""
    try:
        run = RunConfig(**args.get("run", {}))
        g = GRPOConfig(**{**RL_STAGE_DEFAULTS.get(stage, {}), **args.get("grpo", {})})
        c = {"run": run, "sft": SFTConfig(**{**SFT_STAGE_DEFAULTS.get(stage, {}), **args.get("sft", {})}),
             "grpo": g, "loss": loss_preset(g.loss, **args.get("loss", {})),
             "rm": RMConfig(**args.get("rm", {})), "toy": ToyConfig(**args.get("toy", {}))}
        if stage == "distill":  # the student base, pretrained by distill when missing
            c["student"] = SFTConfig(**{**SFT_STAGE_DEFAULTS["pretrain"], **args.get("sft", {}),
                                        "steps": run.student_steps})
    except ValueError as e:
        raise UserError(str(e)) from None
    check_stage(c, stage)
    return c
