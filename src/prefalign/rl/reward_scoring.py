"""Reward-model inputs for a rollout: the policy's own ids when the tokenizers agree, otherwise the
prompt and the decoded completion re-encoded as `prefalign reward` encodes them."""
from __future__ import annotations

import torch

from prefalign.data import encode_prompt_completion
from prefalign.models import last_token_index
from prefalign.rollout import Rollout


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary and EOS)."""
    return a is b or (type(a) is type(b) and a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id)


def reward_inputs(rollout: Rollout, prompts: list, completions: list[str], rm_tokenizer, retokenize: bool,
                  end_cut: bool = False):
    """Reward-model inputs for a rollout: (input_ids (B, T), attention_mask (B, T) bool).

    Same tokenizer: the policy's query and response ids as they are. Different tokenizer: the prompt
    encoded by the reward model's tokenizer as `prefalign reward` encodes it, then the decoded
    completion and, when the policy emitted one, the reward model's EOS. With ``end_cut`` a completion
    cut at the length cap gets the reward model's EOS as well, so it is scored as an ended text, the
    only kind `prefalign reward` trains on (--score-cut-at-eos).
    """
    if not retokenize:
        ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)
        mask = torch.cat([rollout.query_mask, rollout.response_mask], dim=1)
        return with_eos_on_cut(ids, mask, rollout.ended_with_eos, rm_tokenizer) if end_cut else (ids, mask)
    seqs = []
    for prompt, text, ended in zip(prompts, completions, rollout.ended_with_eos.tolist()):
        completion = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
        ids = encode_prompt_completion(rm_tokenizer, prompt, completion, max_length=1 << 30).input_ids
        if not ended and not end_cut and ids[-1:] == [rm_tokenizer.eos_token_id]:
            ids = ids[:-1]  # encode_prompt_completion terminates every completion; this one never ended
        seqs.append(ids)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), rm_tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for row, s in enumerate(seqs):
        input_ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = True
    device = rollout.query_ids.device
    return input_ids.to(device), mask.to(device)


def with_eos_on_cut(input_ids: torch.Tensor, mask: torch.Tensor, ended_with_eos: torch.Tensor, tokenizer
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) ids and mask with the tokenizer's EOS after the last real token of each row that did not
    end with one (rows are left-padded queries + right-padded responses; real tokens need not be a prefix)."""
    b = input_ids.shape[0]
    pad = torch.full((b, 1), tokenizer.pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    ids, mask = torch.cat([input_ids, pad], dim=1), torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    last = last_token_index(mask)  # (B,)
    rows = torch.nonzero(~ended_with_eos.bool().to(mask.device)).flatten()
    ids[rows, last[rows] + 1] = tokenizer.eos_token_id
    mask[rows, last[rows] + 1] = True
    return ids, mask
