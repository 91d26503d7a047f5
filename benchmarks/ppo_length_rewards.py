"""Gold-reward functions for `prefalign ppo --reward-fn` in benchmarks/ppo_length.py.

gold:   the lab's r*(prompt + completion) in [0, 1] (src/prefalign/lab/gold.py), as demo_eval scores it.
gold10: the same times 10, the scale of the labels (the issue's gold-reward PPO run).
rm_at_eos: the reward model at an EOS after every completion, ended or cut (needs PPO_LENGTH_RM=DIR).
"""
import os
from functools import lru_cache

import torch

from prefalign.lab.gold import gold_rewards


def gold(prompts, completions, **columns):
    return gold_rewards([p + c for p, c in zip(prompts, completions)]).tolist()


def gold10(prompts, completions, **columns):
    return (10.0 * gold_rewards([p + c for p, c in zip(prompts, completions)])).tolist()


@lru_cache(maxsize=1)
def _reward_model():
    from prefalign.models import load_scalar_model
    return load_scalar_model(os.environ["PPO_LENGTH_RM"], trainable=False)


def rm_at_eos(prompts, completions, **columns):
    """The reward model's normalised score of prompt + completion + EOS, whether the completion ended or
    was cut at the cap: the same text always scored at an EOS, so not ending earns nothing."""
    from prefalign.data import encode_prompt_completion
    rm, tok = _reward_model()
    seqs = [encode_prompt_completion(tok, p, c, max_length=1 << 30).input_ids for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = True
    with torch.no_grad():
        return rm.normalized(rm(ids, mask)).float().tolist()
