"""DPO's reference: one object, one call, ``reference.logps(batch) -> (ref_chosen, ref_rejected)``.

``make_reference`` picks one of four variants from the options:

- ``CachedReference`` (the default): log-probs computed once before training (ref_cache.py, on
  disk) ride along with each pair; ``logps`` reads them from the batch;
- ``ModelReference`` (--live-reference): a frozen model scores each batch, the --ref-model or a
  frozen copy of the initial policy;
- ``AdapterOffReference`` (--lora, with --live-reference or for the precompute): the LoRA policy
  itself with its adapters switched off, the base weights without a second copy;
- ``NoReference`` (--reference-free): log pi_ref = 0.

Each carries ``info``, what summary.json records under ``reference`` (``mode``: none, live or
cached; for cached, the cache file, hit and seconds per data set).
"""
from __future__ import annotations

import contextlib
import copy
from functools import partial
from typing import Iterator, Protocol

import torch

from prefalign.data import source_digest
from prefalign.models import check_same_vocab, disabled_adapter, load_causal_lm, resolve_dtype
from prefalign.stages.dpo_batch import pair_logps
from prefalign.stages.pair_batch import ChosenRejected, TokenizedPair, collate_pairs
from prefalign.stages.ref_cache import (Scorer, default_cache_dir, fill_reference_logps,
                                        model_fingerprint, sequences_digest)


class Reference(Protocol):
    info: dict  # summary.json's "reference"

    def logps(self, batch: dict) -> ChosenRejected:
        """The reference's summed completion log-probs of each pair, chosen (B,) and rejected (B,)."""
        ...


class CachedReference:
    """Values precomputed once (``make_reference`` fills every pair); they ride with the batch."""

    def __init__(self, info: dict | None = None):
        self.info = {"mode": "cached", **(info or {})}

    def logps(self, batch: dict) -> ChosenRejected:
        return ChosenRejected(batch["ref_chosen_logps"], batch["ref_rejected_logps"])


class ModelReference:
    """A frozen causal LM that scores each batch (it is not modified: freeze it before)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.info = model, {"mode": "live"}

    @torch.no_grad()
    def logps(self, batch: dict) -> ChosenRejected:
        out = pair_logps(self.model, batch)
        return ChosenRejected(out.chosen, out.rejected)


class AdapterOffReference:
    """The LoRA policy with its adapters switched off: the base weights, no second copy."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.info = model, {"mode": "live"}

    @torch.no_grad()
    def logps(self, batch: dict) -> ChosenRejected:
        with disabled_adapter(self.model):
            out = pair_logps(self.model, batch)
        return ChosenRejected(out.chosen, out.rejected)


class NoReference:
    """--reference-free: log pi_ref = 0 for every completion."""

    def __init__(self):
        self.info = {"mode": "none"}

    def logps(self, batch: dict) -> ChosenRejected:
        zeros = torch.zeros(batch["n_pairs"], device=batch["input_ids"].device)  # (B,)
        return ChosenRejected(zeros, zeros)


def make_reference(cfg, model, tokenizer, pairs: list[TokenizedPair], eval_pairs, dist) -> Reference:
    """The reference the options ask for. Cached: every pair of ``pairs`` and ``eval_pairs`` gets
    its reference log-probs now (from the cache, or computed once and cached)."""
    if cfg.reference_free:
        return NoReference()
    if cfg.live_reference:
        return model_reference(cfg, model, tokenizer, dist.device, live=True)
    return CachedReference(precompute(cfg, model, tokenizer, pairs, eval_pairs, dist))


def model_reference(cfg, model, tokenizer, device, live: bool) -> ModelReference | AdapterOffReference:
    """--ref-model (loaded now), the policy with adapters off (--lora), else the policy itself:
    a frozen copy of it when ``live`` (the policy trains under it), as is for the precompute."""
    if cfg.ref_model:
        return ModelReference(load_ref_model(cfg, tokenizer, device))
    if cfg.lora:
        return AdapterOffReference(model)
    return ModelReference(frozen_copy(model) if live else model)


def load_ref_model(cfg, tokenizer, device) -> torch.nn.Module:
    """The frozen --ref-model; its tokenizer must be the policy's (the ids are shared)."""
    ref, ref_tokenizer = load_causal_lm(cfg.ref_model, dtype=cfg.dtype, device=device,
                                        attn_implementation=cfg.attn_implementation, trainable=False)
    check_same_vocab(tokenizer, ref_tokenizer, cfg.model, cfg.ref_model, role="reference")
    return ref


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """--live-reference without --ref-model or --lora: a frozen copy of the initial policy."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def precompute(cfg, model, tokenizer, pairs: list[TokenizedPair], eval_pairs, dist) -> dict:
    """Fill every pair's reference log-probs from the cache, or compute them once (ref_cache.py);
    returns {"train": info, "eval": info} (cache file, hit, seconds). Always from padded batches,
    whatever --packing says: the cache is shared by packed and padded runs."""
    jobs = {"train": (pairs, reference_settings(cfg, cfg.data, pairs, dist.device))}
    if eval_pairs:
        jobs["eval"] = (eval_pairs, reference_settings(cfg, cfg.eval_data, eval_pairs, dist.device))
    return fill_reference_logps(jobs, partial(_open_scorer, cfg, model, tokenizer, dist.device),
                                partial(collate_pairs, pad_id=tokenizer.pad_token_id), 2 * cfg.batch_size,
                                cfg.ref_cache_dir or default_cache_dir(), dist, cfg.progress, dtype=cfg.dtype)


@contextlib.contextmanager
def _open_scorer(cfg, model, tokenizer, device) -> Iterator[Scorer]:
    """The precompute's scorer: the policy in eval mode (with --lora, adapters off), or --ref-model,
    loaded now (only on a cache miss) and freed after."""
    was_training = model.training
    model.eval()
    try:
        reference = model_reference(cfg, model, tokenizer, device, live=False)
        yield reference.logps
        del reference
    finally:
        model.train(was_training)


# Bumped when the way reference log-probs are computed changes their rounding (2: chunked log-probs
# from the final hidden states), so entries computed the old way are not mixed with new policy log-probs.
REF_LOGPS_METHOD = 2


def reference_settings(cfg, data_path: str, pairs: list[TokenizedPair], device) -> dict:
    """What the cached reference log-probs depend on (ref_cache.py hashes these into the key)."""
    return {"method": REF_LOGPS_METHOD, "reference": model_fingerprint(cfg.ref_model or cfg.model),
            "dtype": str(resolve_dtype(cfg.dtype, device, trainable=not cfg.ref_model)),
            "data": source_digest(data_path), "data_format": cfg.data_format, "max_length": cfg.max_length,
            "max_prompt_length": cfg.max_prompt_length, "attn": cfg.attn_implementation,
            "sequences": sequences_digest(pairs)}
