"""The four models of `prefalign ppo`: the trainable policy, its frozen reference, the reward sources
(frozen reward models and/or reward functions, or a Python hook instead) and the trainable value
model (or a value head on the policy's backbone); how they are loaded, packed for, and saved."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from prefalign.errors import ModelError
from prefalign.models import (apply_lora, check_same_vocab, load_causal_lm, load_scalar_model, prepare_checkpointing,
                              save_pretrained)
from prefalign.rl.reward_functions import RewardModel
from prefalign.rl.reward_scoring import same_tokenizer
from prefalign.stages.online_rewards import RewardPlan, load_sources, plan_rewards
from prefalign.stages.policy_rollout import pack_for
from prefalign.rl.value_head import load_value_head, new_value_head, save_value_head
from prefalign.rollout import PackedSequences, Rollout
from prefalign.train import checkpoint as ckpt
from prefalign.train import diskio

# reward_fn(prompts, completions, rollout) -> scores (B,): replaces --reward-model and --reward-fn (tests, the lab).
RewardFn = Callable[[list, list[str], Rollout], torch.Tensor]


@dataclass
class Models:
    policy: nn.Module
    tokenizer: object
    ref: Optional[nn.Module]  # None with --lora and no --ref-model: the policy with adapters off
    sources: list  # reward models (rl.reward_functions.RewardModel), then functions; [] with a reward_fn hook
    weights: list[float]  # one per source (--reward-weights)
    reward_model: Optional[nn.Module]  # the first reward model (the value model's default start), or None
    rm_tokenizer: object
    retokenize: bool  # the first reward model's tokenizer differs from the policy's
    value_model: Optional[nn.Module]  # a ScalarModel, or None with --shared-value-head
    value_head: Optional[nn.Module]  # a linear head on the policy's hidden states, or None
    trainable: nn.ModuleDict  # what the optimizer updates and checkpoints hold


def load_models(cfg, device, reward_fn: Optional[RewardFn], plan: Optional[RewardPlan] = None) -> Models:
    """Policy (trainable, from --model), frozen reference, the reward sources of ``plan`` (default: the
    options' plan_rewards; none with a ``reward_fn`` hook), trainable value model. With
    --gradient-checkpointing the trainable models are checkpointed in the update (models.prepare_checkpointing)."""
    kw = {"dtype": cfg.dtype, "device": device, "attn_implementation": cfg.attn_implementation}
    policy, tok = load_causal_lm(cfg.model, **kw)
    if cfg.lora:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if cfg.gradient_checkpointing:  # the shared value head reads this backbone too
        prepare_checkpointing(policy, "policy", cfg.model)
    ref = None
    if cfg.ref_model or not cfg.lora:
        ref, ref_tok = load_causal_lm(cfg.ref_model or cfg.model, trainable=False, **kw)
        check_same_vocab(tok, ref_tok, cfg.model, cfg.ref_model or cfg.model, role="reference")
    plan = RewardPlan([], [], []) if reward_fn else plan or plan_rewards(cfg)
    sources = load_sources(plan, tok, cfg, device)
    first = sources[0] if plan.rm_paths else None  # reward models come first
    rm, rm_tok, retokenize = (first.model, first.tokenizer, first.retokenize) if first else (None, None, False)
    value_model = value_head = None
    if cfg.shared_value_head:
        value_head = new_value_head(policy.config.hidden_size, cfg.seed).to(device)
        if cfg.value_model:
            value_head.load_state_dict(load_value_head(cfg.value_model, policy.config.hidden_size))
    else:
        # Values are per policy token, so the value model must share the policy's tokenizer.
        path = cfg.value_model or (plan.rm_paths[0] if rm is not None and not retokenize else None)
        if path is None:
            path = cfg.model
            print(f"prefalign ppo: value model: a new value head on the policy's backbone ({cfg.model}), "
                  f"since the reward model's tokenizer differs or no reward model was given.", file=sys.stderr)
        value_model, value_tok = load_scalar_model(path, seed=cfg.seed, **kw)
        if not same_tokenizer(tok, value_tok):
            raise ModelError(f"--value-model {path} has a different tokenizer from the policy ({cfg.model}); "
                             f"values are per policy token. Leave --value-model out, or use --shared-value-head.")
        # Values estimate returns of PPO's rewards, the reward model's *normalised* scores: a value model
        # read from a normalised reward model (or an earlier run's value_model) predicts on that scale.
        value_model.fold_normalization()
        if cfg.gradient_checkpointing:
            prepare_checkpointing(value_model, "value model", path)
    trainable = nn.ModuleDict({"policy": policy, "value": value_model if value_model is not None else value_head})
    trainable.eval()  # no dropout: the recorded log-probs must equal the recomputed ones
    return Models(policy, tok, ref, sources, plan.weights, rm, rm_tok, retokenize, value_model, value_head, trainable)


def row_readers(m: Models) -> dict[str, nn.Module]:
    """The models that read packed rollout rows, by role (what decides packing: stages/packing.py)."""
    readers = {"policy": m.policy, "reference": m.ref, "value model": m.value_model}
    for i, rm in enumerate(s for s in m.sources if isinstance(s, RewardModel)):
        readers["reward model" if i == 0 else f"reward model {rm.name}"] = rm.model
    return {role: x for role, x in readers.items() if x is not None}


def pack_rows(m: Models, seq: tuple) -> PackedSequences:
    """The rollout's sequences packed for the scoring and training forwards (packed layout):
    policy_rollout.pack_for every model that reads them."""
    return pack_for(list(row_readers(m).values()), seq)


def save_models(m: Models, out_dir, base: Optional[str] = None, merge: bool = True) -> None:
    """The policy in HF format in OUTPUT (with --lora also its adapter in OUTPUT/adapter, recording
    ``base``; ``merge=False``: the adapter alone), the value model (or the shared head, with its
    checksum) in OUTPUT/value_model. save_final removes the folder when a write fails; the guard here
    gives the message the space the models need."""
    with diskio.guarded(out_dir, ckpt.nbytes(m.trainable.state_dict()), ckpt.resume_hint(out_dir.parent),
                        what=f"the final models into {out_dir.parent}"):
        save_pretrained(m.policy, m.tokenizer, out_dir, merge=merge, adapter_base=base)
        if m.value_model is not None:
            save_pretrained(m.value_model, m.tokenizer, out_dir / "value_model")
        else:
            save_value_head(m.value_head, out_dir / "value_model")
