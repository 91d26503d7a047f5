"""prefalign dpo: Direct Preference Optimization and its variants.

One step, top to bottom:
  1. every pair's chosen and rejected go through the policy in ONE forward pass (padding-free
     packed rows holding each chosen next to its rejected by default where the models support
     them (stages/packing.py), else padded rows; pair_batch.py);
  2. summed completion log-probs per sequence (dpo_batch.py; means with --length-normalize);
  3. the reference's log-probs, ``reference.logps(batch)`` (dpo_reference.py): computed once
     before training and cached on disk (ref_cache.py), riding along with each pair; with
     --live-reference a frozen model scores the same batch (with --lora: the policy itself with
     its adapter switched off, never a second copy); none with --reference-free;
  4. ``dpo_loss`` (sigmoid, ipo, hinge, robust; label smoothing, reference-free, target margin)
     plus nll_weight x the chosen completion's mean NLL (RPO);
  5. the shared loop divides the summed loss by the pairs in the optimizer step.

Dropout is switched off in the policy (as TRL does): with it, the log-ratio of a policy equal to
its reference would be noise, not 0.
"""
from __future__ import annotations

from functools import partial

import torch

from prefalign.data import load_preferences, source_options
from prefalign.losses import dpo_loss
from prefalign.models import apply_lora, load_causal_lm
from prefalign.models.attention import uses_packed_attention
from prefalign.stages.common import finish, report, save_model_final, split_eval, start
from prefalign.stages.dpo_batch import pair_logps
from prefalign.stages.dpo_reference import Reference, make_reference
from prefalign.stages.packing import announce, choose_layout
from prefalign.stages.pair_batch import TokenizedPair, collate_pairs, tokenize_pairs
from prefalign.train.dist import wrap_model
from prefalign.train.loop import LossOutput, fit


class DPOObjective:
    """Sum over pairs of the DPO-family loss (+ RPO's NLL term); the unit is one pair.

    ``reference`` gives the reference log-probs of each batch (dpo_reference.py): read from the
    batch (cached), scored live by a frozen model, or zeros (reference-free).
    """

    def __init__(self, cfg, reference: Reference):
        self.beta, self.loss_type, self.label_smoothing = cfg.beta, cfg.loss, cfg.label_smoothing
        self.reference_free, self.target_margin = cfg.reference_free, cfg.target_margin
        self.length_normalize, self.nll_weight = cfg.length_normalize, cfg.nll_weight
        self.reference = reference

    def units(self, batch: dict) -> float:
        return float(batch["n_pairs"])

    def __call__(self, model, batch: dict) -> LossOutput:
        policy = pair_logps(model, batch)  # (B,) each
        ref_chosen, ref_rejected = self.reference.logps(batch)  # (B,) each, no grad
        policy_chosen, policy_rejected = policy.chosen, policy.rejected
        if self.length_normalize:  # mean log-prob per completion token (SimPO-style)
            chosen_n, rejected_n = policy.chosen_tokens.clamp(min=1), policy.rejected_tokens.clamp(min=1)
            policy_chosen, policy_rejected = policy.chosen / chosen_n, policy.rejected / rejected_n
            ref_chosen, ref_rejected = ref_chosen / chosen_n, ref_rejected / rejected_n
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, reference_free=self.reference_free, target_margin=self.target_margin)
        nll = -policy.chosen / policy.chosen_tokens.clamp(min=1)  # (B,) mean NLL per chosen completion token
        if self.nll_weight:
            losses = losses + self.nll_weight * nll  # RPO (Pang et al. 2024, eq. 3): NLL of the chosen completion
        n = int(batch["n_pairs"])
        margins = chosen_rewards - rejected_rewards
        metrics = {"rewards/chosen": (chosen_rewards.sum(), n), "rewards/rejected": (rejected_rewards.sum(), n),
                   "rewards/margins": (margins.sum(), n), "rewards/accuracies": ((margins > 0).float().sum(), n),
                   "logps/chosen": (policy_chosen.detach().sum(), n),
                   "logps/rejected": (policy_rejected.detach().sum(), n), "nll": (nll.detach().sum(), n)}
        return LossOutput(losses.sum(), metrics)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention modules
            module.attention_dropout = 0.0


def read_pairs(cfg, path: str, tokenizer, eval: bool = False) -> list[TokenizedPair]:
    examples = load_preferences(path, cfg.data_format, **source_options(cfg, eval=eval))
    return tokenize_pairs(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)


def run_dpo(cfg) -> int:
    """Options are validated by DPOConfig (config.py) before anything is loaded."""
    dist, out, t0 = start(cfg, "model", "data", "output")
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, device="cpu",
                                      attn_implementation=cfg.attn_implementation)
    disable_dropout(model)
    if cfg.lora:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    model.to(dist.device)
    pairs = read_pairs(cfg, cfg.data, tokenizer)
    eval_pairs = read_pairs(cfg, cfg.eval_data, tokenizer, eval=True) if cfg.eval_data else None
    reference = make_reference(cfg, model, tokenizer, pairs, eval_pairs, dist)
    # Packed: pairs in rows of about --max-length tokens, when the policy and a live reference (which
    # reads the same rows) support them. Each pair's prompt once (prompt, chosen, rejected) where
    # every model that reads the rows follows the layout; a live --ref-model of its own may not.
    layout = choose_layout(cfg.packing, {"policy": model, "reference": getattr(reference, "model", model)})
    announce("dpo", layout, show=dist.is_main)
    share = layout.packed and uses_packed_attention(model) and not (cfg.live_reference and cfg.ref_model)
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id,
                      pack_tokens=cfg.max_length if layout.packed else None, share_prompt=share)
    pairs, eval_pairs = split_eval(pairs, eval_pairs, cfg.eval_fraction, cfg.seed)
    wrapped = wrap_model(model, dist, cfg.distributed)
    result = fit(cfg, wrapped, DPOObjective(cfg, reference), pairs, collate, out_dir=out, dist=dist,
                 eval_set=eval_pairs or None, desc="dpo", trainable=model)
    saved = save_model_final(out, dist, model, tokenizer, base=cfg.model, merge=cfg.merge_lora)
    summary = finish(cfg, out, dist, "dpo", t0, result, train_pairs=len(pairs), eval_pairs=len(eval_pairs or []),
                     reference=reference.info, layout=layout.info(), **saved)
    if dist.is_main:
        report(summary, ["loss", "rewards/margins", "rewards/accuracies", "eval/loss", "eval/rewards/accuracies"])
    return 0
