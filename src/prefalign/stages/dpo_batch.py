"""A pair batch through a causal LM: every pair's summed completion log-probs, one forward pass.

The batch is ``pair_batch.collate_pairs``'s, padded or packed; sequence i is pair i's chosen and
B + i its rejected (rows when padded, segment ids when packed), so per-sequence sums (2B,) split
into (chosen (B,), rejected (B,)) with ``split_pairs`` whatever the layout.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from prefalign.models.attention import packed_kwargs
from prefalign.ops import masked_sum, segment_sum, token_logps
from prefalign.stages.batching import label_mask
from prefalign.stages.pair_batch import split_pairs


class PairLogps(NamedTuple):
    """Per pair (B,) float32: summed completion log-probs (differentiable) and the number of
    completion tokens they sum over."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def pair_logps(model, batch: dict) -> PairLogps:
    """Summed completion log-probs of every pair's chosen and rejected, from one forward pass."""
    shared = batch.get("shared_prefix")
    extra = packed_kwargs(model, batch.get("segment_ids"), shared)
    if shared is not None and not extra:
        raise ValueError("rows with shared prompts need a model loaded with prefalign_packed attention "
                         "(prefalign.models.attention.use_packed_attention)")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch["position_ids"], use_cache=False, **extra).logits  # (R, T, V)
    logps = token_logps(logits[:, :-1], batch["input_ids"][:, 1:])  # (R, T-1): logits[t] predicts token t+1
    mask = label_mask(batch)  # (R, T-1)
    if "segment_ids" in batch:
        sums, counts = _segment_sums(logits, logps, mask, batch)
    else:
        sums = masked_sum(logps, mask, dim=-1)  # (2B,): one row per sequence
        counts = mask.sum(-1).to(sums.dtype)
    chosen, rejected = split_pairs(sums)
    chosen_tokens, rejected_tokens = split_pairs(counts)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)


def _segment_sums(logits: torch.Tensor, logps: torch.Tensor, mask: torch.Tensor,
                  batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows: per-sequence summed log-probs and counted tokens, (2B,) each, by segment id.

    logits (R, T, V), logps and mask (R, T-1) aligned with the targets input_ids[:, 1:].
    """
    n = 2 * batch["n_pairs"]
    seg = batch["segment_ids"][:, 1:].masked_fill(~mask, -1)  # (R, T-1): the sequence each target scores
    sums = segment_sum(logps, seg, n)  # (2B,)
    counts = segment_sum(mask.to(logps.dtype), seg, n)
    shared = batch.get("shared_prefix")
    if shared is not None and len(shared):
        # A shared pair's first rejected token follows the prompt, not the chosen completion
        # before it in the row: it is predicted by the logits at the prompt's last token.
        rows, last, first = shared[:, 0], shared[:, 1] + shared[:, 2] - 1, shared[:, 3]
        first_logps = token_logps(logits[rows, last][None], batch["input_ids"][rows, first][None])[0]  # (K,)
        counted = batch["completion_mask"][rows, first].to(logps.dtype)
        sums = sums.index_add(0, shared[:, 4], first_logps * counted)
        counts = counts.index_add(0, shared[:, 4], counted)
    return sums, counts
