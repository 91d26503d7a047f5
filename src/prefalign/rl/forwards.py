"""The per-token forwards of the online loops over a rollout's (query, response) batch.

    policy_forward  the policy's log-probs and entropy at each response token (and, with a value head
                    on its backbone, the values from the same forward)
    token_values    a separate value model's (ScalarModel's) value before each response token

Both read the padded batch, or with ``packed`` the rollout's packed rows (rollout.pack_sequences):
the same states, no padding.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from prefalign.logits import plain_linear_head
from prefalign.ops import entropy_from_logits, token_logps
from prefalign.ops_chunked import chunked_token_logps
from prefalign.rollout import PackedSequences, forward_logps, forward_logps_packed, position_ids_from_mask


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer under a causal LM (LlamaForCausalLM.model, GPT2LMHeadModel.transformer), under peft."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, hf.base_model_prefix)


def response_hidden(backbone: nn.Module, query_ids, query_mask, response_ids, response_mask,
                     packed: Optional[PackedSequences] = None) -> torch.Tensor:
    """Final hidden states of the states before each response token: (B, R, H).

    Position P - 1 + r holds the context that predicts (and is valued before) response token r.
    With ``packed`` the backbone reads the packed row instead of the padded batch (same states).
    """
    if packed is not None:
        hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                          **packed.attention_kwargs(backbone)).last_hidden_state  # (S, W, H)
        return hidden.flatten(0, 1)[packed.before]  # (B, R, H)
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (B, P + R)
    mask = torch.cat([query_mask, response_mask], dim=1)
    hidden = backbone(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask),
                      use_cache=False).last_hidden_state  # (B, P + R, H)
    R = response_ids.shape[1]
    return hidden[:, -R - 1:-1]


def token_values(value_model, query_ids, query_mask, response_ids, response_mask,
                 packed: Optional[PackedSequences] = None) -> torch.Tensor:
    """Per-token values of a ScalarModel (its head on the state before each response token).

    query_ids/query_mask (B, P) left-padded, response_ids/response_mask (B, R) -> (B, R) float32, 0 where masked.
    """
    hidden = response_hidden(value_model.backbone, query_ids, query_mask, response_ids, response_mask, packed)
    values = value_model.head(hidden).squeeze(-1).float()  # (B, R)
    return torch.where(response_mask, values, torch.zeros((), device=values.device))


def policy_forward(policy, value_head: Optional[nn.Module], query_ids, query_mask, response_ids, response_mask,
                   temperature: float, packed: Optional[PackedSequences] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The training forward: (logprobs (B, R), entropy (B, R), values (B, R) or None), 0 where masked.

    Without a shared value head this is rollout.forward_logps (forward_logps_packed with ``packed``).
    With one, the backbone runs once and both the LM head and the value head read its final hidden
    states; a plain linear LM head (``logits.plain_linear_head``) runs chunk by chunk on the states
    before real response tokens (``ops_chunked.chunked_token_logps``), so no (B, R, V) logits exist.
    """
    if value_head is None:
        if packed is not None:
            logprobs, entropy = forward_logps_packed(policy, packed, response_ids, response_mask, temperature)
        else:
            logprobs, entropy = forward_logps(policy, query_ids, query_mask, response_ids, response_mask, temperature)
        return logprobs, entropy, None
    hidden = response_hidden(backbone_of(policy), query_ids, query_mask, response_ids, response_mask,
                              packed)  # (B, R, H)
    zero = torch.zeros((), device=hidden.device)
    values = torch.where(response_mask, value_head(hidden.float()).squeeze(-1), zero)
    head = plain_linear_head(policy)
    if head is None:
        logprobs, entropy = _full_logits(policy.get_output_embeddings(), hidden, response_ids, response_mask,
                                         temperature)
        return logprobs, entropy, values
    chunked = chunked_token_logps(hidden[response_mask], head.weight, head.bias, response_ids[response_mask],
                                  temperature=temperature, with_entropy=True)  # (N,) each
    zeros = chunked.logps.new_zeros(response_ids.shape)  # (B, R)
    logprobs = zeros.masked_scatter(response_mask, chunked.logps)
    return logprobs, zeros.masked_scatter(response_mask, chunked.entropy), values


def _full_logits(head: nn.Module, hidden: torch.Tensor, response_ids, response_mask,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs (B, R), entropy (B, R)) from the head's full logits on hidden (B, R, H), 0 where masked."""
    logits = head(hidden).float() / temperature  # (B, R, V)
    zero = torch.zeros((), device=logits.device)
    logprobs = torch.where(response_mask, token_logps(logits, response_ids), zero)
    return logprobs, torch.where(response_mask, entropy_from_logits(logits), zero)
