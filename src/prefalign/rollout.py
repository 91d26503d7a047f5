"""Batched sampling from a causal LM with a KV cache, and the matching teacher-forced log-probs.

Our own loop rather than ``model.generate`` so the log-probs PPO needs are recorded exactly as the
training path recomputes them.

Layout. Prompts are LEFT-padded into ``query_ids`` (B, P); responses are RIGHT-padded into
``response_ids`` (B, R). Position ids count real tokens only, ``cumsum(attention_mask) - 1``, so a
row's positions do not depend on how much padding its batch needed.

Recorded log-probs. ``logprobs[b, r]`` is log softmax(logits / temperature) at the sampled token:
the temperature-scaled model distribution, *before* top-k / top-p filtering. ``forward_logps``
recomputes exactly this, so PPO's first ratio is 1. With filtering on, tokens are drawn from the
filtered distribution while log-probs refer to the unfiltered one (as TRL does); filtering only ever
removes unlikely tokens, so this is a mild, documented off-policy bias.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from prefalign.logits import head_logps
from prefalign.ops import entropy_from_logits, token_logps


@dataclass
class Rollout:
    """One batch of sampled completions. Masks are bool, True = a real token."""

    query_ids: torch.Tensor  # (B, P) long, left-padded prompts
    query_mask: torch.Tensor  # (B, P) bool
    response_ids: torch.Tensor  # (B, R) long, pad_token_id after EOS
    response_mask: torch.Tensor  # (B, R) bool, True for sampled tokens including the EOS
    logprobs: torch.Tensor  # (B, R) float32, log softmax(logits / T) of each sampled token; 0 where masked
    ended_with_eos: torch.Tensor  # (B,) bool, False when a row ran out of max_new_tokens


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int,
             device: Union[str, torch.device] = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: -> (ids (B, P) long, mask (B, P) bool)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample: every prompt needs at least one token (got an empty prompt or no prompts).")
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompt_ids), width, dtype=torch.bool)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = True
    return ids.to(device), mask.to(device)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens: (B, T) bool -> (B, T) long; padding gets 0 (never attended)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _cache_kwarg(model) -> str:
    """transformers >= 5.x calls the KV cache argument ``cache``; earlier releases ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # unwrap peft
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. (B, V) -> (B, V).

    At least the most likely token always survives.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_tokens(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: (B, V) non-negative weights, (B,) uniforms in [0, 1) -> (B,) long.

    Row b's token is the first index whose running sum of weights exceeds uniform[b] times the row's
    total, so token i is drawn with probability weights[i] / total (the sums in float64), and a token of
    weight 0 never is. One uniform per row where torch.multinomial draws a row's worth: on 2 CPU cores
    and a 3,000-token vocabulary it took a quarter of multinomial's time for 128 rows, and a group's
    rows no longer need a call of their own (rollout.sample_groups).
    """
    cdf = probs.double().cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    # u < 1 keeps u * total below the total (rounding to nearest cannot reach it), so some running sum exceeds it
    target = uniform.double()[:, None] * total
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def _check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"sample: max_new_tokens must be at least 1, got {max_new_tokens}.")
    if temperature <= 0:
        raise ValueError(f"sample: temperature must be positive, got {temperature}; for greedy decoding use top_k=1.")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sample: need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}.")


@torch.no_grad()
def sample(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
           eos_token_id: Union[int, Sequence[int], None], pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> Rollout:
    """Sample one completion per prompt with a KV cache; see the module docstring for log-prob semantics.

    prompt_ids: B token lists (any lengths, at least one token each). A row stops at its first EOS
    (any of ``eos_token_id`` when a list); the loop stops when every row has stopped or after
    max_new_tokens. R (the response width) is the number of steps actually taken.
    generator: a torch.Generator on the model's device, for reproducible draws.
    Call ``model.eval()`` first if the model has dropout: sampling does not change the model's mode.
    """
    def draw(probs):  # (B, V) -> (B,)
        return draw_tokens(probs, torch.rand(len(probs), generator=generator, dtype=torch.float64,
                                             device=probs.device))

    return _sample_rows(model, prompt_ids, draw, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p)


@torch.no_grad()
def sample_groups(model, prompt_ids: Sequence[Sequence[int]], group_size: int,
                  generators: Sequence[Optional[torch.Generator]], **kwargs) -> Rollout:
    """``group_size`` (K) completions of each prompt in one generate call: (P * K, ...) rows, prompt p's
    at p * K ... p * K + K - 1, prompts left-padded to the longest. Group p's tokens are drawn from
    ``generators[p]`` on its own K rows, so the draws do not depend on which other prompts share the
    call; the logits do only through floating-point rounding (the padding and the batch size change
    the order of the sums), so a group's tokens are those of ``sample(model, [prompt] * K,
    generator=generators[p], **kwargs)`` and its log-probs agree to float precision (tested).
    The response width is the longest group's."""
    if len(generators) != len(prompt_ids):
        raise ValueError(f"sample_groups: {len(prompt_ids)} prompts but {len(generators)} generators.")

    def draw(probs):  # (P * K, V) -> (P * K,): group p's rows from its own generator
        uniform = torch.cat([torch.rand(group_size, generator=g, dtype=torch.float64, device=probs.device)
                             for g in generators])
        return draw_tokens(probs, uniform)

    return _sample_rows(model, [q for q in prompt_ids for _ in range(group_size)], draw, **kwargs)


def _sample_rows(model, prompt_ids, draw, *, max_new_tokens: int, eos_token_id, pad_token_id: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Rollout:
    """The sampling loop of ``sample``; ``draw`` maps the (B, V) probabilities to (B,) sampled tokens."""
    _check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos = torch.as_tensor(eos_ids, dtype=torch.long, device=device)  # empty: rows run to max_new_tokens
    query_ids, query_mask = left_pad(prompt_ids, pad_token_id, device)
    cache_kw, cache = _cache_kwarg(model), _new_cache(model)
    attention = query_mask.long()  # (B, P + steps so far)
    positions = position_ids_from_mask(query_mask)
    logits = model(input_ids=query_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]  # (B, V)
    next_position = positions[:, -1:] + 1  # (B, 1)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    tokens, logps, alive = [], [], []
    for step in range(max_new_tokens):
        scaled = logits.float() / temperature  # (B, V)
        token = draw(torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1))  # (B,)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        alive.append(~done)
        logps.append(token_logps(scaled[:, None], token[:, None])[:, 0])
        tokens.append(token)
        done = done | torch.isin(token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        # Finished rows keep stepping on a pad token; their outputs are masked, and batching stays simple.
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_position,
                       use_cache=True, **{cache_kw: cache}).logits[:, -1]
        next_position = next_position + 1
    response_mask = torch.stack(alive, dim=1)  # (B, R)
    return Rollout(query_ids=query_ids, query_mask=query_mask, response_ids=torch.stack(tokens, dim=1),
                   response_mask=response_mask,
                   logprobs=torch.where(response_mask, torch.stack(logps, dim=1), 0.0), ended_with_eos=done)


def forward_logps(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                  response_mask: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of the response tokens in one forward pass (the training path; keeps grad).

    query_ids/query_mask (B, P) left-padded, response_ids/response_mask (B, R) right-padded, as in Rollout.
    Returns (logprobs (B, R) float32 of log softmax(logits / temperature), entropy (B, R) of that
    distribution), both 0 where response_mask is False. Positions match ``sample``. The head runs chunk
    by chunk on the states that predict response tokens (``logits.head_logps``); models that
    post-process their logits take the full path.
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (B, P + R)
    mask = torch.cat([query_mask, response_mask], dim=1)
    inputs = dict(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask),
                  use_cache=False)
    # The state at P - 1 + r predicts response token r.
    before = torch.zeros_like(mask)
    before[:, query_ids.shape[1] - 1:-1] = response_mask
    chunked = head_logps(model, inputs, before, response_ids[response_mask], temperature=temperature,
                         with_entropy=True)
    if chunked is not None:
        zero = chunked.logps.new_zeros(response_ids.shape)  # (B, R)
        return zero.masked_scatter(response_mask, chunked.logps), zero.masked_scatter(response_mask, chunked.entropy)
    R = response_ids.shape[1]
    # The last R + 1 positions suffice: logits at P - 1 + r predict response token r.
    logits = model(**inputs, logits_to_keep=R + 1).logits[:, :-1]  # (B, R, V)
    logits = logits.float() / temperature
    zero = torch.zeros((), device=logits.device)
    logps = torch.where(response_mask, token_logps(logits, response_ids), zero)
    return logps, torch.where(response_mask, entropy_from_logits(logits), zero)


@dataclass
class PackedSequences:
    """A rollout's query + response pairs packed into rows of real tokens: no left padding of prompts
    and nothing after EOS, so a forward costs about what the tokens cost. Built by ``pack_sequences``.

    Sequence b occupies a contiguous run of one row (its query's real tokens, then its response's),
    with position ids restarting at 0: the positions ``position_ids_from_mask`` gives the padded batch,
    so both layouts compute the same thing (tested to float tolerance). Rows hold at most
    max(row_tokens, P + R) tokens, which bounds the (W, W) attention mask transformers builds per row.
    """

    input_ids: torch.Tensor  # (S, W) long, S <= B rows, W <= max(row_tokens, P + R); 0 after a row's last sequence
    position_ids: torch.Tensor  # (S, W) long, 0.. within each sequence
    segment_ids: torch.Tensor  # (S, W) long, the sequence index b; -1 after a row's last sequence
    before: torch.Tensor  # (B, R) long: flat index (row * W + column) of the state that predicts response
    #                       token r; 0 where the response is masked
    keep: torch.Tensor  # (S, W) bool: the states in ``before`` that predict a real response token
    _layout: Optional[object] = field(default=None, repr=False)  # built on first use

    def attention_kwargs(self, model) -> dict:
        """Forward kwargs that keep the sequences apart: the per-example layout when ``model`` runs
        prefalign_packed attention (built once for the policy, reference and value forwards of this
        batch), else {} and transformers derives the block-diagonal causal mask from the restarting
        position ids."""
        from prefalign.models.attention import LAYOUT_KWARG, build_layout, uses_packed_attention
        if not uses_packed_attention(model):
            return {}
        if self._layout is None:
            self._layout = build_layout(self.segment_ids)
        return {LAYOUT_KWARG: self._layout}


def pack_sequences(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor, row_tokens: int = 1024) -> PackedSequences:
    """Pack a rollout's left-padded queries (B, P) and right-padded responses (B, R), in order, into
    rows of at most max(row_tokens, P + R) tokens: a sequence starts a new row when it does not fit
    the current one. The rows are as wide as the fullest one."""
    if not (torch.equal(query_mask.flip(1).cummin(1).values.flip(1), query_mask)
            and torch.equal(response_mask.cummin(1).values, response_mask)):
        raise ValueError("pack_sequences: queries must be left-padded and responses right-padded.")
    mask = torch.cat([query_mask, response_mask], dim=1)  # (B, P + R)
    B, device = mask.shape[0], mask.device
    budget = max(row_tokens, mask.shape[1])
    lengths, prompt_lengths = mask.sum(dim=1).tolist(), query_mask.sum(dim=1).tolist()
    if min(prompt_lengths) == 0:
        raise ValueError("pack_sequences: every query needs at least one token.")
    rows, cols, row, col = [], [], 0, 0  # where each sequence starts
    for n in lengths:
        if col + n > budget:
            row, col = row + 1, 0
        rows.append(row)
        cols.append(col)
        col += n
    S, W = row + 1, max(c + n for c, n in zip(cols, lengths))
    starts_t = torch.tensor(rows, device=device) * W + torch.tensor(cols, device=device)  # (B,) flat starts
    lengths_t = torch.tensor(lengths, device=device)
    within = position_ids_from_mask(mask)[mask]  # (N,) each real token's position in its sequence
    flat = starts_t.repeat_interleave(lengths_t) + within  # (N,) where each real token goes
    input_ids = torch.zeros(S * W, dtype=torch.long, device=device)
    input_ids[flat] = torch.cat([query_ids, response_ids], dim=1)[mask]  # row-major: query then response
    position_ids = torch.zeros(S * W, dtype=torch.long, device=device)
    position_ids[flat] = within
    segment_ids = torch.full((S * W,), -1, dtype=torch.long, device=device)
    segment_ids[flat] = torch.arange(B, device=device).repeat_interleave(lengths_t)
    r = torch.arange(response_ids.shape[1], device=device)
    before = starts_t[:, None] + torch.tensor(prompt_lengths, device=device)[:, None] - 1 + r  # (B, R)
    before = torch.where(response_mask, before, torch.zeros((), dtype=torch.long, device=device))
    keep = torch.zeros(S * W, dtype=torch.bool, device=device)
    keep[before[response_mask]] = True
    return PackedSequences(*(t.view(S, W) for t in (input_ids, position_ids, segment_ids)), before, keep.view(S, W))


def forward_logps_packed(model, packed: PackedSequences, response_ids: torch.Tensor, response_mask: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward_logps`` on packed rows: the same (logprobs (B, R), entropy (B, R)), 0 where masked.

    The K states that predict response tokens (``packed.keep``) come out in row-major order, which is
    the (b, r) order of ``response_mask``. A plain linear head runs chunk by chunk on them
    (``logits.head_logps``). A model that post-processes its logits runs its own head on them
    (``logits_to_keep`` as a boolean mask, transformers >= 5; older transformers compute every
    position's logits and the K are gathered).
    """
    kwargs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                  **packed.attention_kwargs(model))
    chunked = head_logps(model, kwargs, packed.keep, response_ids[response_mask], temperature=temperature,
                         with_entropy=True)
    if chunked is not None:
        zero = chunked.logps.new_zeros(response_ids.shape)  # (B, R)
        return zero.masked_scatter(response_mask, chunked.logps), zero.masked_scatter(response_mask, chunked.entropy)
    from transformers import modeling_utils
    K = int(response_mask.sum())
    refuse = (f"{type(model).__name__} does not take a boolean logits_to_keep (transformers' "
              f"slice_logits_to_keep); rerun with --no-packing for this model.")
    if hasattr(modeling_utils, "slice_logits_to_keep"):
        try:
            logits = model(**kwargs, logits_to_keep=packed.keep).logits  # (K, V)
        except (IndexError, TypeError) as e:
            raise ValueError(f"{refuse} ({type(e).__name__}: {e})") from e
    else:
        logits = model(**kwargs).logits.flatten(0, 1)[packed.before[response_mask]]  # (S * W, V) -> (K, V)
    if logits.shape[:-1] != (K,):
        raise ValueError(f"{refuse} (logits of shape {tuple(logits.shape)} for {K} selected positions)")
    logits = logits.float() / temperature  # (K, V)
    zero = logits.new_zeros(response_ids.shape)  # (B, R)
    logps = zero.masked_scatter(response_mask, token_logps(logits, response_ids[response_mask]))
    return logps, zero.masked_scatter(response_mask, entropy_from_logits(logits))


def generate_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, batch_size: int = 16,
                   generator: Optional[torch.Generator] = None) -> list[str]:
    """Sample one completion per prompt string and decode it (special tokens, EOS included, dropped).

    Prompts are encoded with the tokenizer's defaults (e.g. a BOS for Llama tokenizers); apply a chat
    template before calling if the model expects one.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]]
        out = sample(model, chunk, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=pad, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        texts += completion_texts(tokenizer, out)
    return texts


def completion_texts(tokenizer, r: Rollout) -> list[str]:
    """Each row's sampled completion decoded, special tokens (EOS included) dropped."""
    return [tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            for ids, mask in zip(r.response_ids, r.response_mask)]
