"""Batches for the stages: padded rows, or packed rows (several examples per row)."""
from __future__ import annotations

import torch

from prefalign.data import pack_batch, pad_batch


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
    T = max(r["input_ids"].shape[1] for r in rows)
    B = len(rows)
    out = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
           "position_ids": torch.zeros(B, T, dtype=torch.long),
           "completion_mask": torch.zeros(B, T, dtype=torch.bool),
           "segment_ids": torch.full((B, T), -1, dtype=torch.long),
           "n_segments": torch.tensor([int(r["n_segments"]) for r in rows])}
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        for k in ("input_ids", "position_ids", "completion_mask", "segment_ids"):
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
