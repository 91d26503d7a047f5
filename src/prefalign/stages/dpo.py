"""prefalign dpo: Direct Preference Optimization and its variants.

One step, top to bottom:
  1. every pair's chosen and rejected go through the policy in ONE forward pass (padded rows, or
     with --packing padding-free rows holding each chosen next to its rejected; dpo_batch.py);
  2. summed completion log-probs per sequence (means with --length-normalize);
  3. the reference's log-probs: computed once before training and cached on disk (ref_cache.py),
     riding along with each pair; with --live-reference a frozen model scores the same batch
     (with --lora: the policy itself with its adapter switched off, never a second copy);
  4. ``dpo_loss`` (sigmoid, ipo, hinge, robust; label smoothing, reference-free, target margin)
     plus nll_weight x the chosen completion's mean NLL (RPO);
  5. the shared loop divides the summed loss by the pairs in the optimizer step.

Dropout is switched off in the policy (as TRL does): with it, the log-ratio of a policy equal to
its reference would be noise, not 0.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional

import torch

from prefalign.data import load_preferences, source_digest, source_options
from prefalign.errors import ConfigError
from prefalign.losses import dpo_loss
from prefalign.models import apply_lora, check_same_vocab, disabled_adapter, load_causal_lm, resolve_dtype
from prefalign.models.attention import uses_packed_attention
from prefalign.stages.common import finish, report, save_model_final, split_eval, start
from prefalign.stages.dpo_batch import collate_pair_rows, collate_pairs, pair_logps, tokenize_pairs
from prefalign.stages.ref_cache import (default_cache_dir, file_digest, fill_reference_logps, model_fingerprint,
                                        sequences_digest)
from prefalign.train.dist import wrap_model
from prefalign.train.loop import LossOutput, fit

Reference = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]  # batch -> ref (chosen, rejected) summed logps (B,)

class DPOObjective:
    """Sum over pairs of the DPO-family loss (+ RPO's NLL term); the unit is one pair.

    ``reference``: None reads the cached reference log-probs that ride with the batch; a callable
    scores the batch live (under no_grad).
    """

    def __init__(self, cfg, reference: Optional[Reference] = None):
        self.beta, self.loss_type, self.label_smoothing = cfg.beta, cfg.loss, cfg.label_smoothing
        self.reference_free, self.target_margin = cfg.reference_free, cfg.target_margin
        self.length_normalize, self.nll_weight = cfg.length_normalize, cfg.nll_weight
        self.reference = reference

    def units(self, batch: dict) -> float:
        return float(batch["n_pairs"])

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is None or self.reference_free:  # reference-free: dpo_loss ignores them
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad():
            return self.reference(batch)

    def __call__(self, model, batch: dict) -> LossOutput:
        chosen_sum, rejected_sum, chosen_tokens, rejected_tokens = pair_logps(model, batch)  # (B,) each
        ref_chosen, ref_rejected = self.reference_logps(batch)
        policy_chosen, policy_rejected = chosen_sum, rejected_sum
        if self.length_normalize:  # mean log-prob per completion token (SimPO-style)
            chosen_n, rejected_n = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
            policy_chosen, policy_rejected = chosen_sum / chosen_n, rejected_sum / rejected_n
            ref_chosen, ref_rejected = ref_chosen / chosen_n, ref_rejected / rejected_n
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, reference_free=self.reference_free, target_margin=self.target_margin)
        nll = -chosen_sum / chosen_tokens.clamp(min=1)  # (B,) mean NLL per chosen completion token
        if self.nll_weight:
            losses = losses + self.nll_weight * nll  # RPO (Pang et al. 2024, eq. 3): NLL of the chosen completion
        n = int(batch["n_pairs"])
        margins = chosen_rewards - rejected_rewards
        metrics = {"rewards/chosen": (chosen_rewards.sum(), n), "rewards/rejected": (rejected_rewards.sum(), n),
                   "rewards/margins": (margins.sum(), n), "rewards/accuracies": ((margins > 0).float().sum(), n),
                   "logps/chosen": (policy_chosen.detach().sum(), n),
                   "logps/rejected": (policy_rejected.detach().sum(), n), "nll": (nll.detach().sum(), n)}
        return LossOutput(losses.sum(), metrics)

def frozen_reference(ref_model) -> Reference:
    return lambda batch: pair_logps(ref_model, batch)[:2]

def adapter_off_reference(model) -> Reference:
    """The LoRA policy with its adapters switched off: the base weights, no second copy."""
    def reference(batch):
        with disabled_adapter(model):
            return pair_logps(model, batch)[:2]
    return reference

def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention modules
            module.attention_dropout = 0.0

def load_reference(cfg, tokenizer, device):
    """The frozen --ref-model; its tokenizer must be the policy's (the ids are shared)."""
    ref, ref_tokenizer = load_causal_lm(cfg.ref_model, dtype=cfg.dtype, device=device,
                                        attn_implementation=cfg.attn_implementation, trainable=False)
    check_same_vocab(tokenizer, ref_tokenizer, cfg.model, cfg.ref_model, role="reference")
    return ref

@contextlib.contextmanager
def open_reference(cfg, model, tokenizer, device):
    """A scorer for the one-off precompute: the policy itself (its initial weights are the default
    reference; with --lora, with adapters off), or --ref-model, loaded now and freed after."""
    was_training = model.training
    model.eval()
    try:
        if cfg.ref_model:
            ref = load_reference(cfg, tokenizer, device)
            yield frozen_reference(ref)
            del ref
        else:
            yield adapter_off_reference(model) if cfg.lora else frozen_reference(model)
    finally:
        model.train(was_training)

def reference_settings(cfg, data_path: str, pairs, device) -> dict:
    """What the cached reference log-probs depend on (ref_cache.py hashes these into the key)."""
    return {"reference": model_fingerprint(cfg.ref_model or cfg.model),
            "dtype": str(resolve_dtype(cfg.dtype, device, trainable=not cfg.ref_model)),
            "data": source_digest(data_path), "data_format": cfg.data_format, "max_length": cfg.max_length,
            "max_prompt_length": cfg.max_prompt_length, "attn": cfg.attn_implementation,
            "sequences": sequences_digest(pairs)}

def check_options(cfg) -> None:
    try:  # dpo_loss validates beta, the loss name and label smoothing; fail before loading anything
        z = torch.zeros(1)
        dpo_loss(z, z, z, z, beta=cfg.beta, loss_type=cfg.loss, label_smoothing=cfg.label_smoothing)
    except ValueError as e:
        raise ConfigError(str(e).replace("dpo_loss: ", "--").replace("loss_type", "loss")) from None
    if cfg.reference_free and (cfg.ref_model or cfg.live_reference):
        raise ConfigError("--reference-free uses no reference model; drop --ref-model / --live-reference.")
    if cfg.nll_weight < 0:
        raise ConfigError(f"--nll-weight must not be negative, got {cfg.nll_weight}.")
    if cfg.lora and cfg.lora_dropout > 0:  # the model's own dropout is switched off (disable_dropout)
        raise ConfigError(f"dpo trains without dropout, so policy and reference log-probs come from the same "
                          f"deterministic forward; drop --lora-dropout {cfg.lora_dropout:g} (LoRA dropout 0).")

def live_reference(cfg, model, tokenizer, device) -> Reference:
    """--live-reference: --ref-model kept in memory, the policy with adapters off (--lora), or a
    frozen copy of the initial policy."""
    if cfg.ref_model:
        return frozen_reference(load_reference(cfg, tokenizer, device))
    return adapter_off_reference(model) if cfg.lora else frozen_reference(_frozen_copy(model))

def precompute_reference(cfg, model, tokenizer, pairs, eval_pairs, dist) -> dict:
    """Fill every pair's reference log-probs from the cache, or compute them once (ref_cache.py).
    Always from padded batches, whatever --packing says: packed rows reorder the pairs of a batch,
    and the cache is shared by packed and padded runs."""
    collate = lambda rows: collate_pairs(rows, tokenizer.pad_token_id)
    jobs = {"train": (pairs, reference_settings(cfg, cfg.data, pairs, dist.device))}
    if eval_pairs:
        jobs["eval"] = (eval_pairs, reference_settings(cfg, cfg.eval_data, eval_pairs, dist.device))
    return fill_reference_logps(jobs, lambda: open_reference(cfg, model, tokenizer, dist.device), collate,
                                2 * cfg.batch_size, cfg.ref_cache_dir or default_cache_dir(), dist, cfg.progress,
                                dtype=cfg.dtype)

def run_dpo(cfg) -> int:
    dist, out, t0 = start(cfg, "model", "data", "output")
    check_options(cfg)
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, device="cpu",
                                      attn_implementation=cfg.attn_implementation)
    disable_dropout(model)
    if cfg.lora:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    model.to(dist.device)
    tokenize = lambda path, eval=False: tokenize_pairs(
        load_preferences(path, cfg.data_format, **source_options(cfg, eval)), tokenizer, cfg.max_length,
        cfg.max_prompt_length)
    pairs = tokenize(cfg.data)
    eval_pairs = tokenize(cfg.eval_data, True) if cfg.eval_data else None
    pad_id = tokenizer.pad_token_id
    if cfg.packing:
        # Each pair's prompt once (prompt, chosen, rejected) where every model that reads the rows
        # follows the layout; a live --ref-model of its own may not.
        share = uses_packed_attention(model) and not (cfg.live_reference and cfg.ref_model)
        collate = lambda rows: collate_pair_rows(rows, pad_id, row_tokens=cfg.max_length, share_prompt=share)
    else:
        collate = lambda rows: collate_pairs(rows, pad_id)
    reference, ref_info = None, {"mode": "none" if cfg.reference_free else "live" if cfg.live_reference else "cached"}
    if ref_info["mode"] == "live":
        reference = live_reference(cfg, model, tokenizer, dist.device)
    elif ref_info["mode"] == "cached":
        ref_info.update(precompute_reference(cfg, model, tokenizer, pairs, eval_pairs, dist))
    pairs, eval_pairs = split_eval(pairs, eval_pairs, cfg.eval_fraction, cfg.seed)
    wrapped = wrap_model(model, dist, cfg.distributed)
    result = fit(cfg, wrapped, DPOObjective(cfg, reference), pairs, collate, out_dir=out, dist=dist,
                 eval_set=eval_pairs or None, desc="dpo", trainable=model)
    save_model_final(out, dist, model, tokenizer)
    summary = finish(cfg, out, dist, "dpo", t0, result, train_pairs=len(pairs), eval_pairs=len(eval_pairs or []),
                     reference=ref_info)
    if dist.is_main:
        report(summary, ["loss", "rewards/margins", "rewards/accuracies", "eval/loss", "eval/rewards/accuracies"])
    return 0

def _frozen_copy(model):
    """--live-reference without --ref-model: a frozen copy of the initial policy."""
    return copy.deepcopy(model).eval().requires_grad_(False)
