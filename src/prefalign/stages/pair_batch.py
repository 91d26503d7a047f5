"""Preference pairs and their batches, shared by the reward and DPO stages.

One convention for where a pair's sequences sit: in a batch of B pairs, sequence i is pair i's
chosen and sequence B + i its rejected, i = 0..B-1, in the order the pairs were given. In the
padded layout the sequences are the rows, (2B, T); in the packed layout (``pack_tokens``) they are
the segment ids, whichever row holds them. Every per-sequence output of a model, (2B,), therefore
splits the same way, with ``split_pairs``.

Both layouts run chosen and rejected through the model in ONE forward pass:

- padded: rows 0..B-1 the chosen, rows B..2B-1 the rejected, right-padded;
- packed: pairs balanced over padding-free rows of about ``pack_tokens`` tokens, a pair never
  straddling two rows, its chosen right before its rejected (``data.pair_pack_batch``); position
  ids restart per sequence and no token attends across sequences. With ``share_prompt`` each
  pair's prompt is packed once: prompt, chosen completion, rejected completion
  (``data.pair_pack_shared``), the prompt counting as the chosen segment's; only for a model whose
  attention follows that layout (``prefalign.models.attention``).

Each pair carries its own margin (reward) and reference log-probs (DPO, filled once before
training by ``ref_cache``), so they travel with the pair through shuffling, sharding and resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from prefalign.data import Tokenized, encode_preference, pad_batch, pair_pack_batch, pair_pack_shared, shared_prompt_len
from prefalign.data.collate import balanced_groups
from prefalign.stages.batching import stack_packed_rows


@dataclass
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized
    margin: Optional[float] = None        # the record's preference strength (reward: subtracted inside the loss)
    ref_chosen_logps: float = math.nan    # summed completion log-probs under the DPO reference
    ref_rejected_logps: float = math.nan

    @property
    def n_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


class ChosenRejected(NamedTuple):
    """Per-pair values (B,) of a batch: pair i's chosen and rejected."""
    chosen: torch.Tensor
    rejected: torch.Tensor


def tokenize_pairs(examples, tokenizer, max_length: int,
                   max_prompt_length: Optional[int] = None) -> list[TokenizedPair]:
    """PreferenceExamples -> TokenizedPairs (prompt + completion + EOS each; ``encode_preference``)."""
    return [TokenizedPair(*encode_preference(tokenizer, ex, max_length, max_prompt_length), margin=ex.margin)
            for ex in examples]


def pair_sequences(pairs: list[TokenizedPair]) -> list[Tokenized]:
    """The 2B sequences of B pairs in batch order: chosen 0..B-1, then rejected 0..B-1."""
    return [p.chosen for p in pairs] + [p.rejected for p in pairs]


def split_pairs(per_sequence: torch.Tensor) -> ChosenRejected:
    """(2B, ...) per-sequence values in batch order -> chosen (B, ...), rejected (B, ...)."""
    B = per_sequence.shape[0] // 2
    return ChosenRejected(per_sequence[:B], per_sequence[B:])


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, pack_tokens: Optional[int] = None,
                  share_prompt: bool = False) -> dict:
    """A batch of B pairs, padded (``pack_tokens`` None) or packed into rows of about
    ``pack_tokens`` tokens (1: one pair per row), each pair's prompt once with ``share_prompt``.

    Returns input_ids, position_ids, completion_mask and either attention_mask (2B, T) (padded)
    or segment_ids (R, T) (packed, -1 = padding), n_segments (= 2B) and, with ``share_prompt``,
    shared_prefix (K, 5); plus, per pair in the given order, n_pairs (B), margin (B,) float32
    (0 where the record has none), ref_chosen_logps and ref_rejected_logps (B,) float32.
    """
    if pack_tokens is None:
        batch = pad_batch(pair_sequences(pairs), pad_id)
    else:
        batch = pack_pairs(pairs, pad_id, pack_tokens, share_prompt)
    batch["n_pairs"] = len(pairs)
    batch["margin"] = torch.tensor([0.0 if p.margin is None else p.margin for p in pairs], dtype=torch.float32)
    batch["ref_chosen_logps"] = torch.tensor([p.ref_chosen_logps for p in pairs], dtype=torch.float32)
    batch["ref_rejected_logps"] = torch.tensor([p.ref_rejected_logps for p in pairs], dtype=torch.float32)
    return batch


def pack_pairs(pairs: list[TokenizedPair], pad_id: int, pack_tokens: int, share_prompt: bool = False) -> dict:
    """Pairs balanced over padding-free rows of about ``pack_tokens`` tokens, a pair never
    straddling two rows. Segment i is pair i's chosen (with its prompt when shared), B + i its
    rejected (its completion only when shared).

    Returns input_ids, position_ids, completion_mask, segment_ids (R, T), n_segments (2B) and, with
    ``share_prompt``, shared_prefix (K, 5) long: row, prompt start, prompt length, first rejected
    column, rejected segment id, one line per pair whose prompt is shared.
    """
    B = len(pairs)
    lengths = [p.n_tokens - (shared_prompt_len(p.chosen, p.rejected) if share_prompt else 0) for p in pairs]
    pack = pair_pack_shared if share_prompt else pair_pack_batch
    rows, shared = [], []
    for r, group in enumerate(balanced_groups(lengths, pack_tokens)):
        row = pack([pairs[i].chosen for i in group], [pairs[i].rejected for i in group])
        # The row numbers its j-th pair's sequences 2j, 2j+1; the batch numbers pair i's i, B + i.
        ids = torch.tensor([s for i in group for s in (i, B + i)], dtype=torch.long)
        row["segment_ids"] = ids[row["segment_ids"]]  # (1, T_r)
        if share_prompt:
            s = row["shared_prefix"].clone()  # (K_r, 5)
            s[:, 0], s[:, 4] = r, ids[s[:, 4]]
            shared.append(s)
        rows.append(row)
    out = stack_packed_rows(rows, pad_id)
    out["n_segments"] = 2 * B
    if share_prompt:
        out["shared_prefix"] = torch.cat(shared)
    return out
