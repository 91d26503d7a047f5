"""Batches for the stages: padded rows, or packed rows (several examples per row)."""
from __future__ import annotations

import torch

from prefalign.data import pack_batch, pad_batch, pair_pack_batch, pair_pack_shared, shared_prompt_len
from prefalign.data.collate import balanced_groups


def collate_padded(seqs, pad_id: int, side: str = "right") -> dict:
    return pad_batch(seqs, pad_id, side=side)


def collate_packed_rows(groups, pad_id: int) -> dict:
    """Each group (a list of Tokenized) becomes one packed row; rows are right-padded to the
    longest (see ``pad_packed_rows``)."""
    return pad_packed_rows([pack_batch(g) for g in groups], pad_id)


def pad_packed_rows(rows: list[dict], pad_id: int) -> dict:
    """Stack packed rows (each from pack_batch / pair_pack_batch, shape (1, T_i)) into (B, T),
    right-padded to the longest. Padding gets segment id -1, position id 0 and no completion mask.

    Returns input_ids, position_ids, completion_mask, segment_ids (B, T) and n_segments (B,).
    """
    out = _stack_rows(rows, pad_id)
    out["n_segments"] = torch.tensor([int(r["n_segments"]) for r in rows])
    return out


def collate_packed_flat(seqs, pad_id: int, max_tokens: int) -> dict:
    """All sequences of one batch packed padding-free into a few rows of near-equal length
    (about ``max_tokens`` each). Segment ids are global: segment i is ``seqs[i]``, whichever row
    holds it, so per-sequence outputs come back in input order.

    Returns input_ids, position_ids, completion_mask, segment_ids (R, T) and n_segments (int).
    """
    groups = balanced_groups([len(s.input_ids) for s in seqs], max_tokens)
    rows = [pack_batch([seqs[i] for i in g]) for g in groups]
    for g, r in zip(groups, rows):  # row-local segment j -> global id g[j]
        r["segment_ids"] = torch.tensor(g, dtype=torch.long)[r["segment_ids"]]
    out = _stack_rows(rows, pad_id)
    out["n_segments"] = len(seqs)
    return out


def collate_pairs_shared(chosen, rejected, pad_id: int, max_tokens: int) -> dict:
    """B pairs packed padding-free with each pair's prompt once (``data.pair_pack_shared``) into
    rows of about ``max_tokens``; a pair never straddles two rows. Segment i is chosen i (with its
    prompt), segment B + i rejected i, whichever row holds them, so per-sequence outputs come back
    as chosen 0..B-1 then rejected 0..B-1. Needs attention that follows ``shared_prefix``
    (``prefalign.models.attention``).

    Returns input_ids, position_ids, completion_mask, segment_ids (R, T), n_segments (2B) and
    shared_prefix (K, 5): row, prompt start, prompt length, first rejected column, segment id.
    """
    B = len(chosen)
    lengths = [len(c.input_ids) + len(r.input_ids) - shared_prompt_len(c, r) for c, r in zip(chosen, rejected)]
    return pack_pair_rows(chosen, rejected, balanced_groups(lengths, max_tokens), pad_id, share_prompt=True,
                          segment_ids_of=lambda i: (i, B + i))


def pack_pair_rows(chosen, rejected, groups: list[list[int]], pad_id: int, share_prompt: bool,
                   segment_ids_of) -> dict:
    """Pairs packed into one row per group of pair indices, each pair's chosen then rejected
    (``data.pair_pack_batch``), or prompt, chosen, rejected with ``share_prompt``
    (``data.pair_pack_shared``). ``segment_ids_of(i)`` gives pair i's (chosen, rejected) segment
    ids in the batch, whichever row holds it.

    Returns input_ids, position_ids, completion_mask, segment_ids (R, T), n_segments (2 x pairs)
    and, with ``share_prompt``, shared_prefix (K, 5): row, prompt start, prompt length, first
    rejected column, segment id.
    """
    pack = pair_pack_shared if share_prompt else pair_pack_batch
    rows, shared = [], []
    for r, g in enumerate(groups):
        row = pack([chosen[i] for i in g], [rejected[i] for i in g])
        ids = torch.tensor([s for i in g for s in segment_ids_of(i)], dtype=torch.long)  # row-local 2j, 2j+1 -> ids
        row["segment_ids"] = ids[row["segment_ids"]]
        if share_prompt:
            s = row["shared_prefix"].clone()
            s[:, 0], s[:, 4] = r, ids[s[:, 4]]
            shared.append(s)
        rows.append(row)
    out = _stack_rows(rows, pad_id)
    out["n_segments"] = 2 * sum(len(g) for g in groups)
    if share_prompt:
        out["shared_prefix"] = torch.cat(shared)
    return out


def _stack_rows(rows: list[dict], pad_id: int) -> dict:
    """Right-pad packed (1, T_i) rows into (R, T) tensors; padding is segment -1, position 0."""
    T = max(r["input_ids"].shape[1] for r in rows)
    R = len(rows)
    out = {"input_ids": torch.full((R, T), pad_id, dtype=torch.long),
           "position_ids": torch.zeros(R, T, dtype=torch.long),
           "completion_mask": torch.zeros(R, T, dtype=torch.bool),
           "segment_ids": torch.full((R, T), -1, dtype=torch.long)}
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        for k in out:
            out[k][i, :n] = r[k][0]
    return out


def label_mask(batch: dict) -> torch.Tensor:
    """(B, T-1) bool: next-token targets that count. A target must be a completion token and,
    in packed rows, belong to the same example as the token that predicts it."""
    mask = batch["completion_mask"][:, 1:]
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        mask = mask & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
    return mask
