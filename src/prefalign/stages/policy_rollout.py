"""The policy side of the online loops (`prefalign rloo`, `grpo`, `online-dpo`; `ppo` shares the
prompt schedule and the packed-row width): which prompts each rank samples at each iteration, the
trainable policy and its frozen reference, K completions per prompt seeded by the prompt's place in
the global batch, the reference's log-probs of a rollout, and the completion-length metrics.

Seeding draws by (--seed, iteration, place) rather than by rank makes N processes sample what one
process with N times the prompts samples (the same tokens; log-probs to float rounding, since the
batch a group shares its generate call with reorders the sums), and a resumed run sample exactly
what an uninterrupted one did.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from prefalign.errors import ConfigError
from prefalign.models import apply_lora, check_same_vocab, disabled_adapter, load_causal_lm, prepare_checkpointing
from prefalign.models.attention import uses_packed_attention
from prefalign.rl.forwards import policy_forward
from prefalign.rollout import PackedSequences, Rollout, pack_sequences, sample_groups
from prefalign.stages.packing import announce, choose_layout
from prefalign.train.dist import all_gather_object
from prefalign.train.loop import autocast_for, epoch_order

SEQ_KEYS = ("query_ids", "query_mask", "response_ids", "response_mask")
# --packing: tokens per packed row. With per-example attention a long row costs what its sequences
# cost; otherwise attention and its mask grow with the row's square, so rows stay P + R wide.
PACK_ROW_TOKENS = 1024


def plan_iterations(cfg, n_prompts: int, world_size: int) -> tuple[int, int]:
    """(iterations per pass over the prompts, total iterations)."""
    global_batch = cfg.rollout_batch_size * world_size
    per_epoch = n_prompts // global_batch
    if per_epoch == 0:
        raise ConfigError(f"--prompts {cfg.prompts} has {n_prompts} prompts, fewer than one global rollout batch "
                          f"(--rollout-batch-size {cfg.rollout_batch_size} x {world_size} process(es)).")
    total = cfg.iterations if cfg.iterations > 0 else max(1, math.floor(cfg.epochs * per_epoch))
    return per_epoch, total


def prompt_shard(n_prompts: int, iteration: int, per_epoch: int, cfg, dist) -> list[int]:
    """Indices of the prompts this rank samples at ``iteration``: one permutation per pass (from
    --seed and the pass), global batches in order, rank r taking its contiguous slice."""
    B = cfg.rollout_batch_size
    order = epoch_order(n_prompts, cfg.seed, iteration // per_epoch)
    first = (iteration % per_epoch) * B * dist.world_size + dist.rank * B
    return order[first:first + B]


def pack_for(readers: list[nn.Module], seq: tuple) -> PackedSequences:
    """--packing: a rollout's sequences (query ids/mask, response ids/mask) packed for the models that
    read them: long rows only when every one of them runs per-example attention."""
    long_rows = all(uses_packed_attention(x) for x in readers)
    return pack_sequences(*seq, row_tokens=PACK_ROW_TOKENS if long_rows else 0)


@dataclass
class PolicyModels:
    policy: nn.Module
    tokenizer: object
    ref: Optional[nn.Module]  # None: no KL term (--beta 0), or the policy with adapters off (--lora)
    use_ref: bool             # reference log-probs are needed (--beta > 0)
    trainable: nn.ModuleDict  # what the optimizer updates and checkpoints hold


def load_policy(cfg, device) -> PolicyModels:
    """The trainable policy (from --model, LoRA-wrapped with --lora; checkpointed in the update with
    --gradient-checkpointing) and, when --beta > 0, its frozen reference (--ref-model or --model; none
    with --lora: the adapters are switched off instead)."""
    kw = {"dtype": cfg.dtype, "device": device, "attn_implementation": cfg.attn_implementation}
    policy, tok = load_causal_lm(cfg.model, **kw)
    if cfg.lora:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if cfg.gradient_checkpointing:
        prepare_checkpointing(policy, "policy", cfg.model)
    ref, use_ref = None, cfg.beta > 0
    if use_ref and (cfg.ref_model or not cfg.lora):
        ref, ref_tok = load_causal_lm(cfg.ref_model or cfg.model, trainable=False, **kw)
        check_same_vocab(tok, ref_tok, cfg.model, cfg.ref_model or cfg.model, role="reference")
    trainable = nn.ModuleDict({"policy": policy})
    trainable.eval()  # no dropout: the recorded log-probs must equal the recomputed ones
    return PolicyModels(policy, tok, ref, use_ref, trainable)


def choose_rows(cfg, m: PolicyModels, stage: str, dist):
    """The layout of the reference and training forwards (stages/packing.py): --packing unset packs
    when the policy and the reference run per-example attention. Announced once; returns cfg with
    ``packing`` resolved (the loops read cfg.packing) and the layout for summary.json."""
    readers = {"policy": m.policy, **({"reference": m.ref} if m.ref is not None else {})}
    layout = choose_layout(cfg.packing, readers)
    announce(stage, layout, show=dist.is_main)
    return dataclasses.replace(cfg, packing=layout.packed), layout


def reference_name(cfg, m: PolicyModels) -> str:
    """summary.json's "reference": none, adapters off, or the model folder."""
    return "none" if not m.use_ref else "adapters off" if m.ref is None else (cfg.ref_model or cfg.model)


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, iteration, index, ...), distinct for distinct tuples in practice."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B9) % (1 << 63)
    return h


def packed_rows(m: PolicyModels, seq: tuple) -> PackedSequences:
    """--packing: the rows for the reference and training forwards (pack_for the policy and reference)."""
    return pack_for([x for x in (m.policy, m.ref) if x is not None], seq)


def take(batch: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx`` of a batch, with the columns that are padding in every chosen row dropped."""
    mb = {k: v[idx] for k, v in batch.items() if torch.is_tensor(v)}
    p0 = int((~mb["query_mask"].any(0)).cumprod(0).sum())  # leading all-pad query columns
    r1 = int(mb["response_mask"].any(0).sum())  # responses are right-padded
    for k in ("query_ids", "query_mask"):
        mb[k] = mb[k][:, p0:]
    for k in ("response_ids", "response_mask", "logprobs", "ref_logprobs"):
        if k in mb:
            mb[k] = mb[k][:, :r1]
    return mb


@torch.no_grad()
def rollout(cfg, m: PolicyModels, query_ids: list[list[int]], places: list[int], iteration: int, device) -> Rollout:
    """K completions of each prompt: (P * K, ...) rows, prompt p's at p * K ... p * K + K - 1.
    ``places`` are the prompts' places in the global batch, which seed their draws: each group has its
    own generator, and all of them share one generate call (rollout.sample_groups), so a group draws
    the same tokens whichever prompts share its process."""
    generators = [torch.Generator(device).manual_seed(mixed_seed(cfg.seed, iteration, place)) for place in places]
    with autocast_for(device, cfg.dtype):
        return sample_groups(m.policy, query_ids, cfg.num_generations, generators, max_new_tokens=cfg.max_new_tokens,
                             eos_token_id=m.tokenizer.eos_token_id, pad_token_id=m.tokenizer.pad_token_id,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)


def shard_rollout(cfg, m: PolicyModels, query_ids: list[list[int]], iteration: int, per_epoch: int,
                  dist) -> tuple[list[int], list[int], Rollout]:
    """This rank's prompts at ``iteration`` (indices into the prompt file), their places in the global
    batch (which seed their draws), and their rollout (rollout above)."""
    mine = prompt_shard(len(query_ids), iteration, per_epoch, cfg, dist)
    B = cfg.rollout_batch_size
    first_place = (iteration % per_epoch) * B * dist.world_size + dist.rank * B
    places = [first_place + j for j in range(len(mine))]
    return mine, places, rollout(cfg, m, [query_ids[i] for i in mine], places, iteration, dist.device)


def gathered_lengths(r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion lengths (N_global,) long and whether each ended with EOS (N_global,) bool, over every rank."""
    gathered = all_gather_object((r.response_mask.sum(1).cpu(), r.ended_with_eos.cpu()))
    return torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])


def rollout_batch(r: Rollout) -> dict:
    """The tensors of a rollout the reference and training forwards read, (N, ...) each."""
    return {"query_ids": r.query_ids, "query_mask": r.query_mask, "response_ids": r.response_ids,
            "response_mask": r.response_mask, "logprobs": r.logprobs}


@torch.no_grad()
def reference_logprobs(cfg, m: PolicyModels, batch: dict, device, temperature: Optional[float] = None) -> torch.Tensor:
    """(N, R) log-probs of the sampled tokens under the frozen reference, --minibatch-size rows at a
    time, at ``temperature`` (default --temperature, the sampling distribution's)."""
    n, R = batch["response_ids"].shape
    out = torch.zeros(n, R, device=device)
    for first in range(0, n, cfg.minibatch_size):
        idx = torch.arange(first, min(n, first + cfg.minibatch_size), device=device)
        mb = take(batch, idx)
        seq = tuple(mb[k] for k in SEQ_KEYS)
        packed = packed_rows(m, seq) if cfg.packing else None
        with autocast_for(device, cfg.dtype), (contextlib.nullcontext() if m.ref is not None
                                               else disabled_adapter(m.policy)):
            logps = policy_forward(m.ref if m.ref is not None else m.policy, None, *seq,
                                   temperature=cfg.temperature if temperature is None else temperature,
                                   packed=packed)[0]
        out[idx, :logps.shape[1]] = logps.float()
    return out


def length_metrics(lengths: torch.Tensor, ended: torch.Tensor) -> dict:
    """Completion lengths over the global rollout: (N_global,) long and bool."""
    terminated = lengths[ended].float()
    return {"completions/mean_length": float(lengths.float().mean()), "completions/min_length": int(lengths.min()),
            "completions/max_length": int(lengths.max()),
            "completions/clipped_ratio": float((~ended).float().mean()),
            "completions/mean_terminated_length": float(terminated.mean()) if len(terminated) else 0.0,
            "num_tokens": int(lengths.sum())}
