"""Batches of Tokenized sequences: padded (B, T) or packed into one padding-free row.

Masks are bool: ``attention_mask`` True on real tokens, ``completion_mask`` True on completion
tokens (EOS included). Next-token losses shift inside: logits[:, :-1] predict input_ids[:, 1:]
with completion_mask[:, 1:].

Packed rows and transformers. Give the model ``position_ids`` (restarting at 0 per segment),
``attention_mask=None`` and ``use_cache=False``: transformers 5's masking utilities then find
the segments from the position resets and build a block-diagonal causal mask (sdpa, eager;
flash-attention varlen kernels take ``cu_seqlens``). With a cache object present (use_cache
defaults to True in eval mode) the detection is skipped and tokens attend across segments;
tests/test_collate.py checks packed logits against separate runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from prefalign.data.tokenize import Tokenized

__all__ = ["pad_batch", "pack_batch", "pair_pack_batch", "pair_pack_shared", "shared_prompt_len", "pack_groups",
           "balanced_groups"]


def pad_batch(seqs: list[Tokenized], pad_id: int, side: str = "right",
              pad_to_multiple_of: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence (rounded up to ``pad_to_multiple_of``).

    Returns input_ids (B, T) long, attention_mask (B, T) bool, completion_mask (B, T) bool and
    position_ids (B, T) long counting real tokens from 0, so left padding gets the same
    positions as right padding (pad positions hold 0; they are masked out anyway).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    T = max(len(s.input_ids) for s in seqs)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    completion_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        start = 0 if side == "right" else T - n
        input_ids[i, start:start + n] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[i, start:start + n] = True
        completion_mask[i, start + s.prompt_len:start + n] = True
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(~attention_mask, 0)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "position_ids": position_ids}


def _pack(seqs: list[Tokenized]) -> dict:
    """Concatenate sequences into one row; segment i holds seqs[i]."""
    if not seqs:
        raise ValueError("pack_batch needs at least one sequence")
    ids, pos, comp, seg = [], [], [], []
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids += s.input_ids
        pos += range(n)
        comp += [False] * s.prompt_len + [True] * (n - s.prompt_len)
        seg += [i] * n
    lengths = torch.tensor([len(s.input_ids) for s in seqs], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return {"input_ids": torch.tensor([ids], dtype=torch.long),                # (1, T)
            "position_ids": torch.tensor([pos], dtype=torch.long),             # (1, T)
            "completion_mask": torch.tensor([comp], dtype=torch.bool),         # (1, T)
            "segment_ids": torch.tensor([seg], dtype=torch.long),              # (1, T)
            "n_segments": len(seqs),
            "cu_seqlens": cu_seqlens,                                          # (n + 1,) int32
            "max_seqlen": int(lengths.max())}


def pack_batch(seqs: list[Tokenized]) -> dict:
    """One padding-free row: input_ids, position_ids (restart at 0 per segment), completion_mask,
    segment_ids (0..n-1), all (1, T); n_segments; cu_seqlens (n+1,) int32 and max_seqlen for
    flash-attention varlen kernels."""
    return _pack(seqs)


def pair_pack_batch(chosen_seqs: list[Tokenized], rejected_seqs: list[Tokenized]) -> dict:
    """One row for DPO / reward pairs: chosen_0, rejected_0, chosen_1, rejected_1, ...

    Segment 2i is pair i's chosen, 2i+1 its rejected, so a pair never straddles two rows and
    per-segment sums reshape to (n_pairs, 2). Same keys as ``pack_batch``.
    """
    if len(chosen_seqs) != len(rejected_seqs):
        raise ValueError(f"{len(chosen_seqs)} chosen but {len(rejected_seqs)} rejected sequences")
    interleaved = [s for pair in zip(chosen_seqs, rejected_seqs) for s in pair]
    return _pack(interleaved)


def shared_prompt_len(chosen: Tokenized, rejected: Tokenized) -> int:
    """Tokens a pair's chosen and rejected can share: their prompt, when it is the same token for
    token and both completions keep at least one token; 0 otherwise."""
    p = chosen.prompt_len
    if (p == 0 or p != rejected.prompt_len or chosen.input_ids[:p] != rejected.input_ids[:p]
            or len(chosen.input_ids) == p or len(rejected.input_ids) == p):
        return 0
    return p


def pair_pack_shared(chosen_seqs: list[Tokenized], rejected_seqs: list[Tokenized]) -> dict:
    """Like ``pair_pack_batch``, but each pair's prompt appears once: prompt, chosen completion,
    rejected completion. The rejected completion's position ids continue from the prompt's end, as
    if it followed the prompt; it must attend to the prompt and itself only, which needs attention
    that follows the pair layout (``prefalign.models.attention``), not a block-diagonal mask.

    The prompt tokens belong to the chosen segment (2i), the rejected completion to 2i+1. Extra key
    ``shared_prefix`` (K, 5) long, one row per shared pair: (row 0, prompt start, prompt length,
    column of the rejected completion's first token, rejected segment id). Pairs whose prompts
    differ (e.g. cut differently by truncation) are packed whole, as by ``pair_pack_batch``.
    """
    if len(chosen_seqs) != len(rejected_seqs):
        raise ValueError(f"{len(chosen_seqs)} chosen but {len(rejected_seqs)} rejected sequences")
    ids, pos, comp, seg, shared = [], [], [], [], []
    for i, (c, r) in enumerate(zip(chosen_seqs, rejected_seqs)):
        p = shared_prompt_len(c, r)
        start = len(ids)
        ids += c.input_ids
        pos += range(len(c.input_ids))
        comp += [False] * c.prompt_len + [True] * (len(c.input_ids) - c.prompt_len)
        seg += [2 * i] * len(c.input_ids)
        if p:
            shared.append([0, start, p, len(ids), 2 * i + 1])
        rest = r.input_ids[p:]
        ids += rest
        pos += range(p, p + len(rest))
        comp += [k >= r.prompt_len for k in range(p, p + len(rest))]
        seg += [2 * i + 1] * len(rest)
    return {"input_ids": torch.tensor([ids], dtype=torch.long),                # (1, T)
            "position_ids": torch.tensor([pos], dtype=torch.long),             # (1, T)
            "completion_mask": torch.tensor([comp], dtype=torch.bool),         # (1, T)
            "segment_ids": torch.tensor([seg], dtype=torch.long),              # (1, T)
            "n_segments": 2 * len(chosen_seqs),
            "shared_prefix": torch.tensor(shared, dtype=torch.long).reshape(-1, 5)}


def pack_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group item indices into rows of at most ``max_tokens`` tokens (first-fit decreasing).

    Longest items are placed first, each into the first row with room; an item longer than
    ``max_tokens`` gets a row of its own (truncate before packing to avoid that). Deterministic:
    ties keep input order, and indices inside a row are sorted ascending.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(row) for row in rows]


def balanced_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split items into ceil(sum / max_tokens) rows of nearly equal token counts.

    For one batch packed padding-free: rows are padded to the longest, so equal rows waste
    least. Longest items go first, each to the currently shortest row (Graham's LPT rule), so a
    row exceeds ``max_tokens`` by less than one item. Deterministic; indices sorted per row.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    n_rows = max(1, min(len(lengths), -(-sum(lengths) // max_tokens)))
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    load = [0] * n_rows
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = load.index(min(load))
        rows[r].append(i)
        load[r] += lengths[i]
    return [sorted(row) for row in rows if row]
