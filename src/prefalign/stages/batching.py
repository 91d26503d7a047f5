"""Batches of single sequences for the stages: padded rows, or packed rows (several examples per
row). Preference pairs have their own layout on top of these (``pair_batch.py``)."""
from __future__ import annotations

import torch

from prefalign.data import pack_batch, pad_batch
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
    out = stack_packed_rows(rows, pad_id)
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
    out = stack_packed_rows(rows, pad_id)
    out["n_segments"] = len(seqs)
    return out


def stack_packed_rows(rows: list[dict], pad_id: int) -> dict:
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
