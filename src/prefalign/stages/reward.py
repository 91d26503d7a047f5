"""prefalign reward: a Bradley-Terry reward model.

The model is the causal LM's backbone plus a linear head giving one scalar at the last real
token (saved as a standard HF sequence-classification checkpoint). Loss per pair:
-log sigma(r(x, y_w) - r(x, y_l) - margin). Chosen and rejected go through the model in one
forward pass (padding-free packed rows by default where the model supports them, else padded:
same loss, no compute on padding, each pair's prompt packed once when the model runs
prefalign_packed attention; stages/packing.py). After training,
rewards are shifted (and with --normalize std scaled) so that E[r] = 0 over the training
completions; shift and scale are stored in config.json and every later scoring applies them.
"""
from __future__ import annotations

import math
from functools import partial

import torch

from prefalign.data import load_preferences, load_sft, source_options
from prefalign.losses import bradley_terry_loss
from prefalign.models import ScalarModel, apply_lora, load_scalar_model
from prefalign.models.attention import uses_packed_attention
from prefalign.stages.batching import collate_padded
from prefalign.stages.common import finish, report, save_model_final, split_eval, start
from prefalign.stages.packing import announce, choose_layout
from prefalign.stages.pair_batch import TokenizedPair, collate_pairs, pair_sequences, split_pairs, tokenize_pairs
from prefalign.train.dist import sharded_map, wrap_model
from prefalign.train.logger import iter_progress
from prefalign.train.loop import LossOutput, fit, to_device


class RewardObjective:
    """Bradley-Terry negative log-likelihood summed over pairs; the unit is one pair."""

    def __init__(self, center_coef: float = 0.0):
        self.center_coef = center_coef

    def units(self, batch: dict) -> float:
        return float(batch["n_pairs"])

    def __call__(self, model, batch: dict) -> LossOutput:
        n = batch["n_pairs"]
        if "segment_ids" in batch:  # packed rows
            scores = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           segment_ids=batch["segment_ids"], n_segments=2 * n,
                           shared_prefix=batch.get("shared_prefix"))  # (2B,)
        else:
            scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (2B,)
        chosen, rejected = split_pairs(scores.float())  # (B,) each
        losses, _ = bradley_terry_loss(chosen, rejected, batch["margin"])
        if self.center_coef:
            losses = losses + self.center_coef * (chosen + rejected) ** 2  # keeps E[r] near 0 while training
        d = (chosen - rejected).detach()
        r = scores.detach().float()
        return LossOutput(losses.sum(), {
            "accuracy": ((d > 0).float().sum(), n), "margin": (d.sum(), n),
            "rewards/chosen": (chosen.detach().sum(), n), "rewards/rejected": (rejected.detach().sum(), n),
            "rewards/mean": (r.sum(), 2 * n), "rewards/sq_mean": ((r ** 2).sum(), 2 * n)})

    @staticmethod
    def finalize(m: dict) -> dict:
        if "rewards/sq_mean" in m:
            m = dict(m)
            m["rewards/std"] = math.sqrt(max(0.0, m.pop("rewards/sq_mean") - m["rewards/mean"] ** 2))
        return m


@torch.no_grad()
def score_sequences(model: ScalarModel, seqs, pad_id: int, batch_size: int, device, desc="scoring",
                    progress=True) -> torch.Tensor:
    """Raw scores (N,) of Tokenized sequences, in order."""
    model.eval()
    out = []
    batches = range(0, len(seqs), batch_size)
    for i in iter_progress(batches, len(batches), desc, enabled=progress):
        b = to_device(collate_padded(seqs[i:i + batch_size], pad_id), device)
        out.append(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def normalization_sequences(cfg, tokenizer, train_pairs: list[TokenizedPair]):
    """The completions E[r] = 0 is taken over: the training completions, or --normalize-data."""
    if not cfg.normalize_data:
        return pair_sequences(train_pairs)
    from prefalign.stages.sft import tokenize_sft
    return tokenize_sft(load_sft(cfg.normalize_data), tokenizer, cfg.max_length, cfg.max_prompt_length)


def run_reward(cfg) -> int:
    dist, out, t0 = start(cfg, "model", "data", "output")
    examples = load_preferences(cfg.data, cfg.data_format, **source_options(cfg))
    eval_examples = (load_preferences(cfg.eval_data, cfg.data_format, **source_options(cfg, eval=True))
                     if cfg.eval_data else None)
    model, tokenizer = load_scalar_model(cfg.model, dtype=cfg.dtype, seed=cfg.seed,
                                                  attn_implementation=cfg.attn_implementation)
    if cfg.lora:  # adapters on the backbone; the scalar head trains in full
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    pairs = tokenize_pairs(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    eval_pairs = tokenize_pairs(eval_examples, tokenizer, cfg.max_length, cfg.max_prompt_length) if eval_examples \
        else None
    pairs, eval_pairs = split_eval(pairs, eval_pairs, cfg.eval_fraction, cfg.seed)
    pad_id = tokenizer.pad_token_id
    # Packed: each micro-batch's pairs go padding-free into rows of about max_length tokens,
    # each pair's prompt once where the model's attention follows that layout.
    layout = choose_layout(cfg.packing, {"reward model": model})
    announce("reward", layout, show=dist.is_main)
    collate = partial(collate_pairs, pad_id=pad_id, pack_tokens=cfg.max_length if layout.packed else None,
                      share_prompt=uses_packed_attention(model))
    wrapped = wrap_model(model, dist, cfg.distributed)
    result = fit(cfg, wrapped, RewardObjective(cfg.center_coef), pairs, collate, out_dir=out, dist=dist,
                 eval_set=eval_pairs or None, desc="reward", trainable=model)
    norm = {"mode": cfg.normalize, "shift": 0.0, "scale": 1.0}
    if cfg.normalize != "none":
        seqs, bs = normalization_sequences(cfg, tokenizer, pairs), cfg.batch_size * 2
        if dist.distributed:  # each completion scored once in the world, gathered on every rank
            scores = torch.tensor(sharded_map(lambda c: score_sequences(model, c, pad_id, bs, dist.device,
                                                                        progress=False).tolist(), seqs, dist, bs))
        else:
            scores = score_sequences(model, seqs, pad_id, bs, dist.device, "normalising", cfg.progress)
        scores = scores.double()
        norm["shift"] = float(scores.mean())
        if cfg.normalize == "std":
            norm["scale"] = float(scores.std()) or 1.0
        norm["over"] = cfg.normalize_data or "training completions"
        norm["n_completions"] = int(scores.numel())
    model.set_normalization(norm["shift"], norm["scale"])
    saved = save_model_final(out, dist, model, tokenizer, base=cfg.model, merge=cfg.merge_lora)
    summary = finish(cfg, out, dist, "reward", t0, result, normalization=norm, train_pairs=len(pairs),
                     eval_pairs=len(eval_pairs or []), layout=layout.info(), **saved)
    if dist.is_main:
        report(summary, ["loss", "accuracy", "eval/loss", "eval/accuracy"])
        if cfg.normalize != "none":
            print(f"prefalign reward: rewards normalised: r = (raw - {norm['shift']:.4g}) / {norm['scale']:.4g} "
                  f"over {norm['n_completions']} {norm['over']}; stored in config.json.")
    return 0
