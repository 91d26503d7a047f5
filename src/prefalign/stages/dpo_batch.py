"""A pair batch through a causal LM: every pair's summed completion log-probs, one forward pass.

The batch is ``pair_batch.collate_pairs``'s, padded or packed; sequence i is pair i's chosen and
B + i its rejected (rows when padded, segment ids when packed), so per-sequence sums (2B,) split
into (chosen (B,), rejected (B,)) with ``split_pairs`` whatever the layout.

The head runs chunk by chunk on the final hidden states of the positions whose target counts
(``logits.head_logps``), so no (R, T, V) logits exist; models that post-process their logits take
the full path (``_full_logits_sums``), which every chunked result is tested against.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from prefalign.logits import head_logps
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


class ScoredTokens(NamedTuple):
    """The N completion tokens a pair batch sums over, each predicted by one state of the rows."""
    before: torch.Tensor  # (N,) long: flat index row * T + column of the state that predicts it
    targets: torch.Tensor  # (N,) long: the token
    sequence: torch.Tensor  # (N,) long: the sequence (0..2B-1) whose sum it joins


def scored_tokens(batch: dict) -> ScoredTokens:
    """Every counted target of a padded or packed pair batch: the label mask's, in row-major order,
    then (shared prompts) each pair's first rejected token, predicted by the prompt's last state."""
    ids = batch["input_ids"]  # (R, T)
    T = ids.shape[1]
    mask = label_mask(batch)  # (R, T-1): position t predicts token t + 1
    before = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1).flatten().nonzero().squeeze(-1)  # (N,)
    targets = ids[:, 1:][mask]
    if "segment_ids" in batch:
        sequence = batch["segment_ids"][:, 1:][mask]
    else:  # one row per sequence
        sequence = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(mask)[mask]
    shared = batch.get("shared_prefix")
    if shared is not None and len(shared):
        # The first rejected token follows the prompt, not the chosen completion before it in the row.
        # The prompt's last state also predicts the chosen's first token: its index appears twice.
        shared = shared[batch["completion_mask"][shared[:, 0], shared[:, 3]]]  # (K', 5) whose first token counts
        rows, last, first = shared[:, 0], shared[:, 1] + shared[:, 2] - 1, shared[:, 3]
        before = torch.cat([before, rows * T + last])
        targets = torch.cat([targets, ids[rows, first]])
        sequence = torch.cat([sequence, shared[:, 4]])
    return ScoredTokens(before, targets, sequence)


def pair_logps(model, batch: dict) -> PairLogps:
    """Summed completion log-probs of every pair's chosen and rejected, from one forward pass."""
    shared = batch.get("shared_prefix")
    extra = packed_kwargs(model, batch.get("segment_ids"), shared)
    if shared is not None and not extra:
        raise ValueError("rows with shared prompts need a model loaded with prefalign_packed attention "
                         "(prefalign.models.attention.use_packed_attention)")
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                  position_ids=batch["position_ids"], use_cache=False, **extra)
    scored = scored_tokens(batch)
    chunked = head_logps(model, inputs, scored.before, scored.targets)
    if chunked is None:
        sums, counts = _full_logits_sums(model, inputs, batch)
    else:
        n = 2 * batch["n_pairs"]
        sums = chunked.logps.new_zeros(n).index_add(0, scored.sequence, chunked.logps)  # (2B,)
        counts = torch.zeros_like(sums).index_add(0, scored.sequence, torch.ones_like(chunked.logps))
    chosen, rejected = split_pairs(sums)
    chosen_tokens, rejected_tokens = split_pairs(counts)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)


def _full_logits_sums(model, inputs: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probs and counted tokens (2B,) each, from the model's full logits."""
    logits = model(**inputs).logits  # (R, T, V)
    logps = token_logps(logits[:, :-1], batch["input_ids"][:, 1:])  # (R, T-1): logits[t] predicts token t+1
    mask = label_mask(batch)  # (R, T-1)
    if "segment_ids" in batch:
        return _segment_sums(logits, logps, mask, batch)
    sums = masked_sum(logps, mask, dim=-1)  # (2B,): one row per sequence
    return sums, mask.sum(-1).to(sums.dtype)


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
