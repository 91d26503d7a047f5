"""Small pieces of the PPO stage, kept out of stages/ppo.py so that file reads as one iteration.

KL controllers (Ziegler et al. 2019), running score statistics, statistics over the global batch
(all ranks), per-token values, the policy's training forward, reward-model scoring (with
re-tokenisation when the reward model's tokenizer differs from the policy's), gradient averaging
across ranks, and the check that the ranks' copies of the weights stayed identical.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from prefalign.data import encode_prompt_completion
from prefalign.errors import InternalError
from prefalign.ops import entropy_from_logits, masked_sum, token_logps
from prefalign.rollout import (PackedSequences, Rollout, forward_logps, forward_logps_packed,
                               position_ids_from_mask)
from prefalign.train.dist import all_reduce_sum


# --------------------------------------------------------------------------- KL coefficient

class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Adaptive beta of Ziegler et al. 2019, Sec. 2.2: moves the observed KL toward ``target``.

    error = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + error * n_steps / horizon).
    ``kl`` is the mean per-sequence KL of the batch, ``n_steps`` the number of sequences in it.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)  # proportional error, clipped
        self.value *= 1.0 + error * n_steps / self.horizon


# --------------------------------------------------------------------------- global statistics

def global_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, unbiased variance and count of x over masked entries of every rank's batch.

    Two passes (mean, then squared deviations), each one all_reduce of (sum, count) in float64, so a
    world of one gives exactly ops.masked_mean / masked_var.
    """
    x64 = x.double()
    stats = torch.stack([masked_sum(x64, mask), mask.sum().double()])
    all_reduce_sum(stats)
    n = stats[1]
    mean = stats[0] / n.clamp(min=1)
    sq = masked_sum((x64 - mean) ** 2, mask).reshape(1)
    all_reduce_sum(sq)
    var = sq[0] / n.clamp(min=1) * n / (n - 1).clamp(min=1)  # Bessel's correction, as masked_var
    return mean.to(x.dtype), var.to(x.dtype), n


def global_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """losses.whiten over the global batch: (B, T) -> (B, T), 0 where mask is False."""
    mean, var, _ = global_moments(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


class RunningMoments:
    """Running mean and variance of scores over all iterations and ranks (Chan et al. parallel update).

    ``update(scores)`` folds this iteration's global batch in; ``normalize`` uses the statistics
    including it, so the first iteration is whitened by its own batch.
    """

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, scores: torch.Tensor) -> None:
        mask = torch.ones_like(scores, dtype=torch.bool)
        mean, var, n = (float(v) for v in global_moments(scores.double(), mask))
        var = var * (n - 1) / n if n > 1 else 0.0  # population variance of the batch
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / math.sqrt(self.var + 1e-8)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def average_gradients(parameters, world_size: int) -> None:
    """Mean of every gradient over ranks (a no-op in one process). PPO does not wrap models in DDP:
    it calls backbones and heads directly, which DDP's hooks would not see.

    A parameter that got no gradient on some rank (an MoE expert none of its tokens reached) counts
    as zeros there. The ranks first agree on which parameters have a gradient anywhere: one
    all-reduce per parameter only where ``p.grad`` is set locally would pair different tensors
    across ranks, or hang."""
    if world_size == 1:
        return
    params = list(parameters)
    if not params:
        return
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)  # (N,)
    all_reduce_sum(has_grad)
    for p, anywhere in zip(params, has_grad.tolist()):
        if not anywhere:
            continue  # None on every rank: stays None, so the optimizer leaves it alone
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce_sum(p.grad)
        p.grad /= world_size


def check_replicas(digests: list[dict[str, str]], when: str) -> None:
    """Raise InternalError when the ranks' parameter digests differ (``[rank 0's, rank 1's, ...]``,
    each ``{"policy": sha256, "value": sha256}``, see dist.param_digest). Every rank gets the same
    list from one all_gather_object, so every rank raises, or none."""
    for name in digests[0]:
        values = [d[name] for d in digests]
        if len(set(values)) > 1:
            found = ", ".join(f"rank {r} {v[:12]}" for r, v in enumerate(values))
            raise InternalError(
                f"the {name} model's parameters differ between processes {when} (sha256: {found}). The "
                f"ranks diverged, which is a bug in prefalign: please report it with the command line and "
                f"`pip list`. Each checkpoint was written only after this check passed, so --resume "
                f"continues from identical weights.")


# --------------------------------------------------------------------------- forwards

def _backbone(model: nn.Module) -> nn.Module:
    """The transformer under a causal LM (LlamaForCausalLM.model, GPT2LMHeadModel.transformer), under peft."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, hf.base_model_prefix)


def _response_hidden(backbone: nn.Module, query_ids, query_mask, response_ids, response_mask,
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
    hidden = _response_hidden(value_model.backbone, query_ids, query_mask, response_ids, response_mask, packed)
    values = value_model.head(hidden).squeeze(-1).float()  # (B, R)
    return torch.where(response_mask, values, torch.zeros((), device=values.device))


def policy_forward(policy, value_head: Optional[nn.Module], query_ids, query_mask, response_ids, response_mask,
                   temperature: float, packed: Optional[PackedSequences] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The training forward: (logprobs (B, R), entropy (B, R), values (B, R) or None), 0 where masked.

    Without a shared value head this is rollout.forward_logps (forward_logps_packed with ``packed``).
    With one, the backbone runs once and both the LM head and the value head read its final hidden
    states.
    """
    if value_head is None:
        if packed is not None:
            logprobs, entropy = forward_logps_packed(policy, packed, response_ids, response_mask, temperature)
        else:
            logprobs, entropy = forward_logps(policy, query_ids, query_mask, response_ids, response_mask, temperature)
        return logprobs, entropy, None
    hidden = _response_hidden(_backbone(policy), query_ids, query_mask, response_ids, response_mask,
                              packed)  # (B, R, H)
    logits = policy.get_output_embeddings()(hidden).float() / temperature  # (B, R, V)
    zero = torch.zeros((), device=logits.device)
    logprobs = torch.where(response_mask, token_logps(logits, response_ids), zero)
    entropy = torch.where(response_mask, entropy_from_logits(logits), zero)
    values = torch.where(response_mask, value_head(hidden.float()).squeeze(-1), zero)
    return logprobs, entropy, values


def new_value_head(hidden_size: int, seed: int) -> nn.Linear:
    """A linear value head on the policy's hidden state, N(0, 1/(H+1)) as reward heads are initialised."""
    head = nn.Linear(hidden_size, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(hidden_size + 1))
        head.bias.zero_()
    return head


# --------------------------------------------------------------------------- reward model

def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary and EOS)."""
    return a is b or (type(a) is type(b) and a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id)


def reward_inputs(rollout: Rollout, prompts: list, completions: list[str], rm_tokenizer, retokenize: bool):
    """Reward-model inputs for a rollout: (input_ids (B, T), attention_mask (B, T) bool).

    Same tokenizer: the policy's query and response ids as they are. Different tokenizer: the prompt
    encoded by the reward model's tokenizer as `prefalign reward` encodes it, then the decoded
    completion and, when the policy emitted one, the reward model's EOS.
    """
    if not retokenize:
        return (torch.cat([rollout.query_ids, rollout.response_ids], dim=1),
                torch.cat([rollout.query_mask, rollout.response_mask], dim=1))
    seqs = []
    for prompt, text, ended in zip(prompts, completions, rollout.ended_with_eos.tolist()):
        completion = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
        ids = encode_prompt_completion(rm_tokenizer, prompt, completion, max_length=1 << 30).input_ids
        if not ended and ids[-1:] == [rm_tokenizer.eos_token_id]:
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
