"""DPO batches: pairs, their two layouts, and the per-sequence log-probs of one forward pass.

Both layouts run chosen and rejected through the model in ONE forward pass:

- padded: chosen rows then rejected rows, (2B, T), right-padded;
- packed (--packing): pairs are grouped into padding-free rows (``pair_pack_batch``), each pair's
  chosen right before its rejected in the same row, with position ids restarting per sequence and
  no attention across sequences. Segment ids are made unique over the batch, so the k-th packed
  pair's chosen is segment 2k and its rejected 2k+1. For a model on prefalign_packed attention
  the stage packs each pair's prompt once (prompt, chosen completion, rejected completion;
  ``share_prompt``), the prompt counting as the chosen segment's.

Each pair carries its reference log-probs (filled once before training by ``ref_cache``), so they
travel with the example through shuffling, sharding and resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prefalign.data import Tokenized, encode_preference, shared_prompt_len
from prefalign.data.collate import balanced_groups
from prefalign.models.attention import packed_kwargs
from prefalign.ops import masked_sum, segment_sum, token_logps
from prefalign.stages.batching import collate_padded, label_mask, pack_pair_rows


@dataclass
class DPOPair:
    chosen: Tokenized
    rejected: Tokenized
    ref_chosen_logps: float = math.nan    # summed completion log-probs under the reference
    ref_rejected_logps: float = math.nan

    @property
    def n_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def tokenize_pairs(examples, tokenizer, max_length: int, max_prompt_length=None) -> list[DPOPair]:
    return [DPOPair(*encode_preference(tokenizer, ex, max_length, max_prompt_length)) for ex in examples]


def _with_refs(batch: dict, pairs: list[DPOPair]) -> dict:
    """Add n_pairs and the pairs' reference log-probs (B,), in the batch's pair order."""
    batch["n_pairs"] = len(pairs)
    batch["ref_chosen_logps"] = torch.tensor([p.ref_chosen_logps for p in pairs], dtype=torch.float32)
    batch["ref_rejected_logps"] = torch.tensor([p.ref_rejected_logps for p in pairs], dtype=torch.float32)
    return batch


def collate_pairs(pairs: list[DPOPair], pad_id: int) -> dict:
    """Padded layout: rows 0..B-1 are the chosen, rows B..2B-1 the rejected, (2B, T)."""
    batch = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return _with_refs(batch, pairs)


def collate_pair_rows(pairs: list[DPOPair], pad_id: int, row_tokens: int = 0, share_prompt: bool = False) -> dict:
    """Packed layout: pairs split into balanced rows of about ``row_tokens`` tokens (0: one pair
    per row); a pair never straddles two rows. The stage uses row_tokens = --max-length.

    ``share_prompt``: each pair's prompt appears once (``pair_pack_shared``); only for a model
    whose attention follows the layout (``prefalign.models.attention``), which ``pair_logps``
    checks. Adds ``shared_prefix`` (K, 5): row, prompt start, prompt length, first rejected
    column, rejected segment id.

    Returns input_ids, position_ids, completion_mask, segment_ids (R, T) with segment ids unique
    over the batch (-1 = padding), n_pairs and the reference log-probs in packed order.
    """
    lengths = [p.n_tokens - (shared_prompt_len(p.chosen, p.rejected) if share_prompt else 0) for p in pairs]
    groups = balanced_groups(lengths, row_tokens) if row_tokens else [[i] for i in range(len(pairs))]
    order = [i for g in groups for i in g]
    packed_at = {i: k for k, i in enumerate(order)}  # the k-th packed pair is segments 2k, 2k+1
    batch = pack_pair_rows([p.chosen for p in pairs], [p.rejected for p in pairs], groups, pad_id, share_prompt,
                           segment_ids_of=lambda i: (2 * packed_at[i], 2 * packed_at[i] + 1))
    return _with_refs(batch, [pairs[i] for i in order])


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of every pair's chosen and rejected, from one forward pass.

    Returns (chosen_logps (B,), rejected_logps (B,), chosen_tokens (B,), rejected_tokens (B,)),
    float32, the log-probs differentiable; tokens count the predicted completion tokens.
    """
    shared = batch.get("shared_prefix")
    extra = packed_kwargs(model, batch.get("segment_ids"), shared)
    if shared is not None and not extra:
        raise ValueError("rows with shared prompts need a model loaded with prefalign_packed attention "
                         "(prefalign.models.attention.use_packed_attention)")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch["position_ids"], use_cache=False, **extra).logits  # (R, T, V)
    logps = token_logps(logits[:, :-1], batch["input_ids"][:, 1:])  # (R, T-1): logits[t] predicts token t+1
    mask = label_mask(batch)  # (R, T-1)
    B = batch["n_pairs"]
    if "segment_ids" in batch:
        seg = batch["segment_ids"][:, 1:].masked_fill(~mask, -1)  # (R, T-1): the sequence each target scores
        sums = segment_sum(logps, seg, 2 * B)  # (2B,) ordered chosen_0, rejected_0, chosen_1, ...
        counts = segment_sum(mask.to(logps.dtype), seg, 2 * B)
        if shared is not None and len(shared):
            # A shared pair's first rejected token follows the prompt, not the chosen completion
            # before it in the row: it is predicted by the logits at the prompt's last token.
            rows, last, first = shared[:, 0], shared[:, 1] + shared[:, 2] - 1, shared[:, 3]
            first_logps = token_logps(logits[rows, last][None], batch["input_ids"][rows, first][None])[0]  # (K,)
            counted = batch["completion_mask"][rows, first].to(logps.dtype)
            sums = sums.index_add(0, shared[:, 4], first_logps * counted)
            counts = counts.index_add(0, shared[:, 4], counted)
        return sums[0::2], sums[1::2], counts[0::2], counts[1::2]
    sums = masked_sum(logps, mask, dim=-1)  # (2B,) chosen rows then rejected rows
    counts = mask.sum(-1).to(sums.dtype)
    return sums[:B], sums[B:], counts[:B], counts[B:]
