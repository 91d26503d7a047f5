"""Attention for packed rows that costs what the examples cost, not what the row costs.

A packed row holds several examples; transformers keeps them apart with a block-diagonal causal
mask derived from the restarting position ids, and SDPA then computes the whole (row x row)
score matrix, masked. On a GPU flash-attention's variable-length kernels avoid that; on a CPU
nothing does, and attention grows with the square of the row: a 1024-token row of 30-token
examples spends about 30 times the attention FLOPs the examples need.

``prefalign_packed`` is an attention function registered with transformers' AttentionInterface.
Given a ``PackedLayout`` (``packed_kwargs``), it gathers each example's queries, keys and values
into a padded (examples, heads, length, dim) batch (examples of similar length together, one
SDPA call per length bucket), runs causal SDPA on it and scatters the outputs back: right
padding after an example's last token never reaches a real query under a causal mask, so the
result is exact. Without a layout (generation, padded batches) it *is* transformers' SDPA
attention, called with every argument unchanged, so a model switched to it behaves exactly as
before outside packed training.

Only models whose every layer is plain causal attention are switched: a config with a sliding
window, chunked attention, non-"full_attention" layer types or ``is_causal=False`` stays on SDPA
(some of those apply their window only through the mask, which this path does not build). At call
time, soft-capping, attention sinks, position biases and a non-causal module also take the SDPA
path with transformers' own block-diagonal mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

NAME = "prefalign_packed"
LAYOUT_KWARG = "prefalign_packed_layout"
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias")


@dataclass
class PackedLayout:
    """Where each example of a packed batch sits.

    buckets: one (index, valid, write) per length bucket, each (n, L): ``index`` holds the flat
    positions (row * T + column) of n examples right-padded to the bucket's length L, ``valid``
    marks real entries, ``write`` the entries whose outputs go back (all real ones, except a
    shared prompt already written by its chosen completion's example); ``targets`` = the flat
    positions written, in bucket order; ``n_positions`` = R * T.
    """
    buckets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    targets: torch.Tensor
    n_positions: int
    shared: bool = False  # some example attends to a prompt outside its segment


def build_layout(segment_ids: torch.Tensor, shared_prefix: Optional[torch.Tensor] = None,
                 bucket_ratio: float = 0.5) -> PackedLayout:
    """Layout of packed rows from segment_ids (R, T): -1 for padding, any other id marks the
    tokens of one example within its row (ids may repeat across rows).

    ``shared_prefix`` (K, 5) rows of (row, prompt start, prompt length, -, segment id): that
    segment attends to the prompt's tokens before its own, as if it followed them (a DPO pair's
    rejected completion after the prompt its chosen completion shares; see
    ``data.pair_pack_shared``). Examples are sorted by length; a bucket takes examples down to
    ``bucket_ratio`` of its longest, so padding inside a bucket stays bounded while the number of
    SDPA calls stays small."""
    R, T = segment_ids.shape
    device = segment_ids.device
    seg = segment_ids.detach().to("cpu", torch.long)
    if not bool((seg >= 0).any()):  # nothing but padding: no example to attend within
        return PackedLayout([], torch.zeros(0, dtype=torch.long, device=device), R * T)
    stride = int(seg.max()) + 1
    key = torch.where(seg >= 0, seg + torch.arange(R)[:, None] * stride, -1).flatten()
    positions = torch.nonzero(key >= 0).squeeze(1)
    keys = key[positions]
    order = torch.argsort(keys, stable=True)
    positions, keys = positions[order], keys[order]
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    examples = [(pos, 0) for pos in torch.split(positions, counts.tolist())]  # (flat positions, prefix length)
    if shared_prefix is not None and len(shared_prefix):
        where = {k: i for i, k in enumerate(uniq.tolist())}
        for row, start, length, _, segment in shared_prefix.detach().cpu().tolist():
            i = where[segment + row * stride]
            prompt = torch.arange(row * T + start, row * T + start + length)
            examples[i] = (torch.cat([prompt, examples[i][0]]), length)
    examples.sort(key=lambda e: len(e[0]), reverse=True)
    buckets, targets, i = [], [], 0
    while i < len(examples):
        L = len(examples[i][0])
        j = i
        while j < len(examples) and len(examples[j][0]) >= bucket_ratio * L:
            j += 1
        group = examples[i:j]
        index = torch.zeros(len(group), L, dtype=torch.long)
        valid = torch.zeros(len(group), L, dtype=torch.bool)
        write = torch.zeros(len(group), L, dtype=torch.bool)
        for k, (pos, prefix) in enumerate(group):
            index[k, :len(pos)] = pos
            valid[k, :len(pos)] = True
            write[k, prefix:len(pos)] = True
        buckets.append((index.to(device), valid.to(device), write.to(device)))
        targets.append(index[write])
        i = j
    return PackedLayout(buckets, torch.cat(targets).to(device), R * T,
                        shared=shared_prefix is not None and len(shared_prefix) > 0)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, **kwargs):
    """AttentionInterface function: query (B, H, T, D), key/value (B, H_kv, T, D) -> ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout: Optional[PackedLayout] = kwargs.pop(LAYOUT_KWARG, None)
    B, H, T, D = query.shape
    if (layout is None or not layout.buckets or layout.n_positions != B * T or key.shape[2] != T
            or not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False
            or any(kwargs.get(k) is not None for k in _UNSUPPORTED)):
        if layout is not None and layout.shared:  # transformers' block mask cannot express a shared prompt
            raise ValueError(f"{type(module).__name__}: rows with shared prompts need plain causal attention; "
                             f"pack without sharing prompts for this model.")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = H // key.shape[1]
    if groups > 1:  # grouped-query attention: one key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    flat = [x.transpose(1, 2).reshape(B * T, H, x.shape[-1]) for x in (query, key, value)]  # (B*T, H, D)
    outputs = []
    for index, _, write in layout.buckets:
        n, L = index.shape
        q, k, v = (x[index.flatten()].view(n, L, H, x.shape[-1]).transpose(1, 2) for x in flat)  # (n, H, L, D)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        outputs.append(out.transpose(1, 2)[write])  # (tokens the bucket writes, H, D)
    out = flat[2].new_zeros(B * T, H, value.shape[-1]).index_copy(0, layout.targets, torch.cat(outputs))
    return out.view(B, T, H, value.shape[-1]), None  # padding positions get zeros; nothing reads them


def register() -> None:
    """Make ``prefalign_packed`` a valid attn_implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the fallback path needs SDPA's mask


def _hf_model(model):
    """The transformers model inside any wrapper (DDP, FSDP, PEFT, ScalarModel), or None."""
    from transformers import PreTrainedModel
    for _ in range(8):
        if isinstance(model, PreTrainedModel):
            return model
        model = next((getattr(model, a) for a in ("module", "model", "base_model")
                      if isinstance(getattr(model, a, None), torch.nn.Module)), None)
        if model is None:
            return None
    return None


def _implementation(model) -> Optional[str]:
    hf = _hf_model(model)
    return None if hf is None else hf.config._attn_implementation


def uses_packed_attention(model) -> bool:
    """Whether ``model`` (or the transformers model inside its wrappers) runs ``prefalign_packed``."""
    return _implementation(model) == NAME


def plain_causal(config) -> bool:
    """Whether every attention layer the config describes is full causal attention."""
    return not_plain_causal(config) is None


def not_plain_causal(config) -> Optional[str]:
    """What keeps the config's attention from being full causal attention in every layer, or None."""
    configs = [config] + [getattr(config, name) for name in getattr(config, "sub_configs", {}) or {}
                          if getattr(config, name, None) is not None]
    for c in configs:
        window = getattr(c, "sliding_window", None)
        if window is not None and getattr(c, "use_sliding_window", True) is not False:
            return f"sliding-window attention (sliding_window={window})"
        if getattr(c, "attention_chunk_size", None):
            return f"chunked attention (attention_chunk_size={c.attention_chunk_size})"
        if getattr(c, "is_causal", True) is False:
            return "non-causal attention (is_causal=False)"
        other = sorted({t for t in getattr(c, "layer_types", None) or [] if t != "full_attention"})
        if other:
            return f"layers that are not full attention ({', '.join(other)})"
    return None


def packing_blocker(model) -> Optional[str]:
    """Why ``model`` does not run ``prefalign_packed`` (packed rows exact and at the examples' cost), or
    None when it does: the stages pack by default only models for which this is None."""
    hf = _hf_model(model)
    if hf is None:
        return f"{type(model).__name__} is not a transformers model"
    implementation = hf.config._attn_implementation
    if implementation == NAME:
        return None
    kind = type(hf).__name__
    if implementation != "sdpa":
        return f"{kind} runs {implementation} attention (only SDPA models switch to per-example attention)"
    reason = not_plain_causal(hf.config)
    if reason is not None:
        return f"{kind} has {reason}"
    return f"{kind} does not dispatch its attention through transformers' AttentionInterface"


def use_packed_attention(model) -> bool:
    """Switch an SDPA model to ``prefalign_packed`` (same results, cheaper packed rows).

    Leaves alone any other attention implementation, models that do not dispatch through
    transformers' AttentionInterface, and models with anything but full causal attention
    (``plain_causal``). Returns whether the model now uses it.
    """
    hf = _hf_model(model)
    if hf is None or hf.config._attn_implementation != "sdpa":
        return hf is not None and hf.config._attn_implementation == NAME
    if not (hf._can_set_attn_implementation() and plain_causal(hf.config)):
        return False
    register()
    hf.set_attn_implementation(NAME)
    return hf.config._attn_implementation == NAME


def packed_kwargs(model, segment_ids: Optional[torch.Tensor], shared_prefix: Optional[torch.Tensor] = None) -> dict:
    """Extra forward kwargs for a packed batch: the layout, when ``model`` uses ``prefalign_packed``
    (else {}: a caller whose rows share prompts must then refuse, see ``build_layout``)."""
    if segment_ids is None or not uses_packed_attention(model):
        return {}
    return {LAYOUT_KWARG: build_layout(segment_ids, shared_prefix)}
