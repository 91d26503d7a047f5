"""prefalign ppo: RLHF with PPO (Ziegler et al. 2019, Stiennon et al. 2020), one iteration read top to bottom.

Every iteration:
  1. rollout   each rank samples one completion for each of its prompts (rollout.sample: KV cache,
               left-padded prompts, EOS stop). The log-probs recorded while sampling are PPO's old
               log-probs: the training forward recomputes them exactly (logged as
               policy/first_minibatch_logprob_maxdiff), so no extra policy forward is needed.
  2. score     the reward model's normalised score at the last real token (re-tokenised when its
               tokenizer differs), optionally whitened by running statistics, clipped, minus
               --missing-eos-penalty; the frozen reference's log-probs; the value model's per-token values.
  3. reward    r_t = -beta * KL_t, plus the score on the last real token (Ziegler et al. 2019 eq. 2).
  4. GAE       advantages and returns by GAE(gamma, lambda); advantages whitened over the global batch.
  5. update    K epochs of shuffled minibatches: clipped policy loss + vf_coef * clipped value loss
               - entropy_coef * entropy, one AdamW over policy and value weights, clip_and_check
               (a non-finite step is skipped).
  6. log       metrics.jsonl row (step = iteration), samples.jsonl, checkpoint; beta adapts when
               --target-kl is set.

The models run in eval mode (no dropout), so sampled and recomputed log-probs agree.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from prefalign.data import encode_prompt, load_prompts
from prefalign.errors import ConfigError, ModelError
from prefalign.losses import gae, kl_estimate, ppo_policy_loss, ppo_value_loss
from prefalign.models import (apply_lora, check_same_vocab, disabled_adapter, load_causal_lm, load_scalar_model,
                              save_pretrained)
from prefalign.ops import masked_mean
from prefalign.models.attention import uses_packed_attention
from prefalign.rollout import PackedSequences, Rollout, pack_sequences, sample
from prefalign.stages.common import finish, save_final, start
from prefalign.stages.value_head_file import load_value_head, save_value_head
from prefalign.stages.ppo_parts import (AdaptiveKLController, FixedKLController, RunningMoments, average_gradients,
                                        check_replicas, global_moments, global_whiten, new_value_head,
                                        policy_forward, reward_inputs, same_tokenizer, token_values)
from prefalign.train import checkpoint as ckpt
from prefalign.train import diskio
from prefalign.train.dist import DistInfo, all_gather_object, all_reduce_sum, barrier, param_digest
from prefalign.train.logger import MetricsLogger, progress
from prefalign.train.loop import (LoopResult, TrainingStopped, _apply_new_lr, _Meter, _SignalFlag, agree, autocast_for,
                                  epoch_order)
from prefalign.train.optim import clip_and_check, make_optimizer, make_scheduler

# reward_fn(prompts, completions, rollout) -> scores (B,): replaces --reward-model (tests, the lab).
RewardFn = Callable[[list, list[str], Rollout], torch.Tensor]
N_SAMPLES = 4  # completions written to samples.jsonl every --sample-every iterations


@dataclass
class Models:
    policy: nn.Module
    tokenizer: object
    ref: Optional[nn.Module]  # None with --lora and no --ref-model: the policy with adapters off
    reward_model: Optional[nn.Module]  # None when a reward_fn is given
    rm_tokenizer: object
    retokenize: bool  # the reward model's tokenizer differs from the policy's
    value_model: Optional[nn.Module]  # a ScalarModel, or None with --shared-value-head
    value_head: Optional[nn.Module]  # a linear head on the policy's hidden states, or None
    trainable: nn.ModuleDict  # what the optimizer updates and checkpoints hold


# --------------------------------------------------------------------------- set-up

def check_options(cfg) -> None:
    if cfg.rollout_batch_size < 1 or cfg.minibatch_size < 1 or cfg.rollout_batch_size % cfg.minibatch_size:
        raise ConfigError(f"--rollout-batch-size ({cfg.rollout_batch_size}) must be a positive multiple of "
                          f"--minibatch-size ({cfg.minibatch_size}).")
    if cfg.ppo_epochs < 1 or cfg.max_new_tokens < 1 or cfg.temperature <= 0:
        raise ConfigError("--ppo-epochs and --max-new-tokens must be at least 1 and --temperature positive.")
    if cfg.kl_coef < 0 or (cfg.target_kl is not None and cfg.target_kl <= 0) or cfg.kl_horizon < 1:
        raise ConfigError("--kl-coef must be >= 0, --target-kl > 0 when given, and --kl-horizon >= 1.")
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        raise ConfigError(f"--gamma and --lam must lie in [0, 1], got {cfg.gamma} and {cfg.lam}.")
    unused = {"max_steps": (-1, "--iterations"), "batch_size": (8, "--rollout-batch-size and --minibatch-size"),
              "grad_accum": (1, "--minibatch-size"), "eval_steps": (0, "samples.jsonl (--sample-every)")}
    for name, (default, instead) in unused.items():
        if getattr(cfg, name) != default:
            raise ConfigError(f"`prefalign ppo` does not use --{name.replace('_', '-')}; use {instead} instead.")
    if cfg.gradient_checkpointing or cfg.distributed == "fsdp":
        raise ConfigError("`prefalign ppo` supports neither --gradient-checkpointing nor --distributed fsdp; "
                          "drop the option (torchrun runs PPO data-parallel with gradients averaged over ranks).")


def load_models(cfg, device, reward_fn: Optional[RewardFn]) -> Models:
    """Policy (trainable, from --model), frozen reference and reward model, trainable value model."""
    kw = {"dtype": cfg.dtype, "device": device, "attn_implementation": cfg.attn_implementation}
    policy, tok = load_causal_lm(cfg.model, **kw)
    if cfg.lora:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    ref = None
    if cfg.ref_model or not cfg.lora:
        ref, ref_tok = load_causal_lm(cfg.ref_model or cfg.model, trainable=False, **kw)
        check_same_vocab(tok, ref_tok, cfg.model, cfg.ref_model or cfg.model, role="reference")
    rm, rm_tok = (None, None) if reward_fn else load_scalar_model(cfg.reward_model, trainable=False, seed=cfg.seed, **kw)
    retokenize = rm is not None and not same_tokenizer(tok, rm_tok)
    value_model = value_head = None
    if cfg.shared_value_head:
        value_head = new_value_head(policy.config.hidden_size, cfg.seed).to(device)
        if cfg.value_model:
            value_head.load_state_dict(load_value_head(cfg.value_model, policy.config.hidden_size))
    else:
        # Values are per policy token, so the value model must share the policy's tokenizer.
        path = cfg.value_model or (cfg.reward_model if rm is not None and not retokenize else None)
        if path is None:
            path = cfg.model
            print(f"prefalign ppo: value model: a new value head on the policy's backbone ({cfg.model}), "
                  f"since the reward model's tokenizer differs or no reward model was given.", file=sys.stderr)
        value_model, value_tok = load_scalar_model(path, seed=cfg.seed, **kw)
        if not same_tokenizer(tok, value_tok):
            raise ModelError(f"--value-model {path} has a different tokenizer from the policy ({cfg.model}); "
                             f"values are per policy token. Leave --value-model out, or use --shared-value-head.")
    trainable = nn.ModuleDict({"policy": policy, "value": value_model if value_model is not None else value_head})
    trainable.eval()  # no dropout: the recorded log-probs must equal the recomputed ones
    return Models(policy, tok, ref, rm, rm_tok, retokenize, value_model, value_head, trainable)


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


# --------------------------------------------------------------------------- 1-2: rollout and scores

def final_scores(raw: torch.Tensor, ended_with_eos: torch.Tensor, cfg, stats: RunningMoments) -> torch.Tensor:
    """(B,) scores the reward is built from: running whitening, clipping, then the missing-EOS penalty."""
    scores = raw.float()
    if cfg.normalize_scores:
        stats.update(scores)
        scores = stats.normalize(scores)
    if cfg.score_clip is not None:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~ended_with_eos).float()
    return scores


# --packing: tokens per packed row. With per-example attention a long row costs what its sequences
# cost; otherwise attention and its mask grow with the row's square, so rows stay P + R wide.
PACK_ROW_TOKENS = 1024


def pack_rows(m: Models, seq: tuple) -> PackedSequences:
    """The rollout's sequences packed for the scoring and training forwards (``--packing``): long
    rows only when every model that reads them runs per-example attention."""
    readers = [x for x in (m.policy, m.ref, m.value_model, m.reward_model) if x is not None]
    long_rows = all(uses_packed_attention(x) for x in readers)
    return pack_sequences(*seq, row_tokens=PACK_ROW_TOKENS if long_rows else 0)


@torch.no_grad()
def collect(cfg, m: Models, prompts: list, query_ids: list[list[int]], stats: RunningMoments,
            generator: torch.Generator, device, reward_fn: Optional[RewardFn]) -> tuple[dict, dict]:
    """Sample, score, and record everything the update needs. Returns (batch of (B, ...) tensors, timings)."""
    t0 = time.perf_counter()
    with autocast_for(device, cfg.dtype):
        r = sample(m.policy, query_ids, max_new_tokens=cfg.max_new_tokens, eos_token_id=m.tokenizer.eos_token_id,
                   pad_token_id=m.tokenizer.pad_token_id, temperature=cfg.temperature, top_k=cfg.top_k,
                   top_p=cfg.top_p, generator=generator)
    t1 = time.perf_counter()
    completions = [m.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
                   for ids, mask in zip(r.response_ids, r.response_mask)]
    seq = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    packed = pack_rows(m, seq) if cfg.packing else None
    with autocast_for(device, cfg.dtype):
        if reward_fn is not None:
            raw = torch.as_tensor(reward_fn(prompts, completions, r), dtype=torch.float32, device=device)
        elif packed is not None and not m.retokenize:
            raw = m.reward_model.normalized(m.reward_model(packed.input_ids, position_ids=packed.position_ids,
                                                           segment_ids=packed.segment_ids, n_segments=len(prompts)))
        else:
            raw = m.reward_model.normalized(m.reward_model(*reward_inputs(r, prompts, completions, m.rm_tokenizer,
                                                                          m.retokenize)))
        with contextlib.nullcontext() if m.ref is not None else disabled_adapter(m.policy):
            ref_logprobs = policy_forward(m.ref if m.ref is not None else m.policy, None, *seq,
                                          temperature=cfg.temperature, packed=packed)[0]
        if m.value_model is not None:
            values = token_values(m.value_model, *seq, packed=packed)
        else:
            values = policy_forward(m.policy, m.value_head, *seq, temperature=cfg.temperature, packed=packed)[2]
    batch = {"query_ids": r.query_ids, "query_mask": r.query_mask, "response_ids": r.response_ids,
             "response_mask": r.response_mask, "logprobs": r.logprobs, "ref_logprobs": ref_logprobs.float(),
             "values": values.float(), "ended_with_eos": r.ended_with_eos, "raw_scores": raw.float(),
             "scores": final_scores(raw, r.ended_with_eos, cfg, stats), "completions": completions}
    return batch, {"rollout": t1 - t0, "score": time.perf_counter() - t1}


# --------------------------------------------------------------------------- 3-4: shaped reward and GAE

def shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                   beta: float, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -beta * KL_t with the score added on each row's last real token.

    scores (B,), logprobs/ref_logprobs (B, R), mask (B, R) bool (a prefix of each row).
    Returns (rewards (B, R), kl (B, R)), both 0 where masked.
    """
    zero = torch.zeros((), device=logprobs.device)
    kl = torch.where(mask, kl_estimate(logprobs, ref_logprobs, estimator), zero)  # (B, R)
    rewards = -beta * kl  # Ziegler et al. 2019 eq. 2: R(x, y) = r(x, y) - beta log(pi(y|x) / ref(y|x))
    last = mask.sum(dim=1) - 1  # (B,) every response has at least one token
    rewards[torch.arange(len(last), device=last.device), last] += scores
    return rewards, kl


def add_advantages(batch: dict, cfg, beta: float) -> None:
    """rewards, kl, advantages (whitened over the global batch) and returns into ``batch``: (B, R) each."""
    mask = batch["response_mask"]
    rewards, kl = shaped_rewards(batch["scores"], batch["logprobs"], batch["ref_logprobs"], mask, beta,
                                 cfg.kl_estimator)
    advantages, returns = gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
    batch.update(rewards=rewards, kl=kl, advantages=global_whiten(advantages, mask), returns=returns)


# --------------------------------------------------------------------------- 5: the PPO update

def minibatch_loss(cfg, m: Models, mb: dict) -> tuple[torch.Tensor, dict]:
    """Policy + value (+ entropy) loss of one minibatch and its metrics as (sum, count)."""
    seq = (mb["query_ids"], mb["query_mask"], mb["response_ids"], mb["response_mask"])
    mask = mb["response_mask"]
    packed = pack_rows(m, seq) if cfg.packing else None  # one layout for the policy and value forwards
    logprobs, entropy, values = policy_forward(m.policy, m.value_head, *seq, temperature=cfg.temperature,
                                               packed=packed)
    if values is None:
        values = token_values(m.value_model, *seq, packed=packed)
    pg_loss, pg = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mask, cfg.cliprange)
    vf_loss, vf = ppo_value_loss(values, mb["values"], mb["returns"], mask, cfg.cliprange_value)
    mean_entropy = masked_mean(entropy, mask)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * mean_entropy
    gap = torch.where(mask, (logprobs - mb["logprobs"]).abs(), 0.0).max()
    return loss, {"loss/policy": (pg_loss.item(), 1), "loss/value": (vf_loss.item(), 1),
                  "policy/entropy": (mean_entropy.item(), 1), "policy/clipfrac": (pg["clipfrac"].item(), 1),
                  "policy/approxkl": (pg["approxkl"].item(), 1), "val/clipfrac": (vf["vf_clipfrac"].item(), 1),
                  "_logprob_gap": (gap.item(), 1)}


def update(cfg, m: Models, batch: dict, optimizer, scheduler, shuffle: torch.Generator,
           dist: DistInfo) -> tuple[_Meter, int, float]:
    """K epochs of shuffled minibatches. Returns (metrics, skipped steps, the first minibatch's
    max |recomputed - recorded| log-prob, measured before any update)."""
    meter, bad, first_gap = _Meter(), 0, None
    device, world_size = dist.device, dist.world_size
    n = batch["response_ids"].shape[0]
    params = [p for p in m.trainable.parameters() if p.requires_grad]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=shuffle)
        for first in range(0, n, cfg.minibatch_size):
            idx = order[first:first + cfg.minibatch_size].to(device)
            mb = {k: v[idx] for k, v in batch.items() if torch.is_tensor(v)}
            with autocast_for(device, cfg.dtype):
                loss, metrics = minibatch_loss(cfg, m, mb)
            gap = metrics.pop("_logprob_gap")[0]
            first_gap = gap if first_gap is None else first_gap
            loss.backward()
            average_gradients(params, world_size)
            grad_norm, finite = clip_and_check(params, cfg.max_grad_norm)
            finite, _ = agree(finite and math.isfinite(loss.item()), None, dist)  # all ranks skip, or none
            if finite:
                optimizer.step()
                meter.add({**metrics, "loss/total": (loss.item(), 1), "grad_norm": (float(grad_norm), 1)})
            else:
                bad += 1
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped step still advances the schedule
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
    return meter, bad, first_gap


# --------------------------------------------------------------------------- 6: metrics

def rollout_metrics(batch: dict, beta: float) -> dict:
    """Per-sequence objective metrics as (sum, count) over this rank's rollout."""
    mask = batch["response_mask"]
    n = mask.shape[0]
    kl = batch["kl"].sum(1)  # (B,) per-sequence KL estimate
    s = batch["scores"]
    return {"objective/scores": (s.sum(), n), "objective/raw_scores": (batch["raw_scores"].sum(), n),
            "objective/kl": (kl.sum(), n), "objective/entropy": (-batch["logprobs"].sum(), n),
            "objective/rlhf_reward": ((s - beta * kl).sum(), n), "response_length": (mask.sum(), n),
            "eos_rate": (batch["ended_with_eos"].sum(), n)}


def explained_variance(batch: dict) -> float:
    """1 - Var(returns - values) / Var(returns) over the global batch, values from before the update."""
    mask = batch["response_mask"]
    _, var_returns, _ = global_moments(batch["returns"], mask)
    _, var_error, _ = global_moments(batch["returns"] - batch["values"], mask)
    return float(1 - var_error / var_returns) if var_returns > 0 else float("nan")


def iteration_row(meter: _Meter, batch: dict, device, elapsed: float, times: dict, **extra) -> dict:
    """The metrics.jsonl row of one iteration: means over all ranks, timings, ``extra`` as given."""
    row = meter.reduce(device)
    counts = torch.tensor([float(batch["query_mask"].sum() + batch["response_mask"].sum()),
                           float(batch["response_mask"].shape[0])], device=device)  # (tokens, sequences)
    tokens, sequences = all_reduce_sum(counts).tolist()
    row.update(extra)
    row.update({"sequences": int(sequences), "val/explained_variance": explained_variance(batch),
                "perf/tokens_per_s": tokens / max(elapsed, 1e-9),
                **{f"perf/time_{k}_s": v for k, v in times.items()}})
    return row


def replica_digests(m: Models) -> dict[str, str]:
    """{"policy": sha256, "value": sha256} of this rank's weights (see check_replicas)."""
    return {name: param_digest(module) for name, module in m.trainable.items()}


def sample_rows(step: int, prompts: list, batch: dict) -> dict:
    return {"step": step, "samples": [
        {"prompt": p, "completion": c, "score": float(s), "ended_with_eos": bool(e)}
        for p, c, s, e in zip(prompts, batch["completions"], batch["scores"], batch["ended_with_eos"])][:N_SAMPLES]}


# --------------------------------------------------------------------------- the stage

def run_ppo(cfg, reward_fn: Optional[RewardFn] = None) -> int:
    """Train the policy by PPO. ``reward_fn(prompts, completions, rollout) -> (B,)`` replaces
    --reward-model when given (tests and the demo lab use it)."""
    dist, out, t0 = start(cfg, "model", "prompts", "output", *(() if reward_fn else ("reward_model",)))
    check_options(cfg)
    examples = load_prompts(cfg.prompts, cfg.data_format)
    m = load_models(cfg, dist.device, reward_fn)
    query_ids = [encode_prompt(m.tokenizer, ex.prompt, cfg.max_prompt_length) for ex in examples]
    per_epoch, total = plan_iterations(cfg, len(examples), dist.world_size)
    optimizer = make_optimizer(m.trainable, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)
    steps = total * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
    scheduler = make_scheduler(optimizer, steps, cfg.warmup_steps, cfg.warmup_ratio, cfg.lr_schedule)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl is not None
              else FixedKLController(cfg.kl_coef))
    stats = RunningMoments()
    generators = {"sample": torch.Generator(dist.device).manual_seed(cfg.seed * 1_000_003 + dist.rank),
                  "shuffle": torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 + dist.rank)}
    stateful = {"model": m.trainable, "optimizer": optimizer, "scheduler": scheduler, "kl_ctl": kl_ctl,
                "score_stats": stats}
    pos = {"iteration": 0, "bad_steps": 0}
    logger, samples = MetricsLogger(out, dist.is_main), MetricsLogger(out, dist.is_main, "samples.jsonl")

    plan = {"prompts": len(examples), "rollout_batch": cfg.rollout_batch_size, "world_size": dist.world_size}

    replica_checks = 0  # times the ranks' weights were compared and found identical

    def save() -> None:
        nonlocal replica_checks
        # Every rank's own streams (sampling is seeded per rank), gathered to rank 0, with the digests
        # of its weights: no checkpoint is written from ranks that diverged.
        streams = all_gather_object({"rng": ckpt.rng_state(dist.device),
                                     "generators": {k: g.get_state() for k, g in generators.items()},
                                     "digests": replica_digests(m) if dist.distributed else {}})
        check_replicas([s.pop("digests") for s in streams], f"at iteration {pos['iteration']}")
        replica_checks += int(dist.distributed)
        if dist.is_main:
            state = {k: v.state_dict() for k, v in stateful.items()}
            state.update(rng=streams[0]["rng"], streams=streams, position=dict(pos), plan=plan)
            ckpt.save_checkpoint(out, pos["iteration"], state, keep=cfg.keep_checkpoints)
        barrier()  # nobody leaves (or raises) before the checkpoint is on disk

    resumed_from = resume(cfg, out, stateful, generators, pos, (logger, samples), plan, dist)
    last: dict = {}
    train_time = 0.0
    bar = progress(total, "ppo", initial=pos["iteration"], enabled=cfg.progress and dist.is_main, unit="iter")
    with _SignalFlag() as stop, bar:
        while pos["iteration"] < total:
            t_iter = time.perf_counter()
            mine = prompt_shard(len(examples), pos["iteration"], per_epoch, cfg, dist)
            prompts = [examples[i].prompt for i in mine]
            batch, times = collect(cfg, m, prompts, [query_ids[i] for i in mine], stats, generators["sample"],
                                   dist.device, reward_fn)
            beta = kl_ctl.value
            add_advantages(batch, cfg, beta)
            t_update = time.perf_counter()
            meter, bad, gap = update(cfg, m, batch, optimizer, scheduler, generators["shuffle"], dist)
            times["update"] = time.perf_counter() - t_update
            meter.add(rollout_metrics(batch, beta))
            pos["iteration"] += 1
            pos["bad_steps"] += bad
            step = pos["iteration"]
            elapsed = time.perf_counter() - t_iter
            train_time += elapsed
            last = iteration_row(meter, batch, dist.device, elapsed, times, kl_coef=beta, bad_steps=pos["bad_steps"],
                                 lr=scheduler.get_last_lr()[0], **{"policy/first_minibatch_logprob_maxdiff": gap})
            kl_ctl.update(last["objective/kl"], cfg.rollout_batch_size * dist.world_size)
            logger.log({"step": step, **last})
            if cfg.sample_every and step % cfg.sample_every == 0:
                samples.log(sample_rows(step, prompts, batch))
            bar.update(1)
            bar.set_postfix(score=f"{last['objective/scores']:.3f}", kl=f"{last['objective/kl']:.3f}")
            _, signum = agree(True, stop.signum, dist)  # every rank stops at the same iteration
            stop_now = bool(signum) and step < total
            if (cfg.save_steps and step % cfg.save_steps == 0) or stop_now or pos["bad_steps"] > cfg.max_bad_steps:
                save()
            check_stop(cfg, out, pos, signum if stop_now else None)
    digests = None
    if dist.distributed:  # the ranks update their own copies: they must have stayed bit-identical
        digests = replica_digests(m)
        check_replicas(all_gather_object(digests), f"at the end (iteration {pos['iteration']})")
        replica_checks += 1
    save_final(out, dist, lambda d: save_models(m, d))
    result = LoopResult(steps=pos["iteration"], last_metrics=last, eval_metrics={}, bad_steps=pos["bad_steps"],
                        wall_time_s=time.perf_counter() - t0, resumed_from=resumed_from)
    summary = finish(cfg, out, dist, "ppo", t0, result, global_batch_size=cfg.rollout_batch_size * dist.world_size,
                     prompts=len(examples), iterations_time_s=train_time, final_kl_coef=kl_ctl.value,
                     value_model="shared head" if m.value_head is not None else "separate",
                     reward_retokenized=m.retokenize, replica_checks=replica_checks, parameter_sha256=digests)
    if dist.is_main:
        keys = ("objective/scores", "objective/kl", "kl_coef", "eos_rate")
        print(f"prefalign ppo: {summary['steps']} iterations in {summary['wall_time_s']:.1f}s; "
              + " ".join(f"{k}={last[k]:.4g}" for k in keys if k in last))
    return 0


def resume(cfg, out, stateful: dict, generators: dict, pos: dict, loggers, plan: dict,
           dist: DistInfo) -> Optional[int]:
    """Load the newest complete checkpoint when --resume; drop log rows written after it."""
    # Every process reads the checkpoint itself: sending a whole model-and-optimizer pickle from
    # rank 0 would pass through each GPU under NCCL. --output must be visible to every machine.
    found = ckpt.load_latest(out) if cfg.resume else None
    if found is None:
        return None
    path, state = found
    if state.get("plan", plan) != plan:
        raise ConfigError(f"cannot resume from {path}: it was written with {state['plan']}, this run has {plan}. "
                          f"Resume with the same --prompts, --rollout-batch-size and number of processes, "
                          f"or start a new --output.")
    try:
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"cannot resume from {path}: it does not match this run's models or options "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). Resume with the same --model, "
                          f"--shared-value-head and --lora, or start a new --output.") from None
    new_lr = _apply_new_lr(cfg.lr, stateful["optimizer"], stateful["scheduler"])
    mine = state["streams"][dist.rank]
    ckpt.set_rng_state(mine["rng"], dist.device)
    for name, g in generators.items():
        g.set_state(mine["generators"][name])
    pos.update(state["position"])
    if new_lr:
        pos["bad_steps"] = 0  # a new --lr is a fresh try at the steps that failed
    for logger in loggers:
        logger.truncate_after(pos["iteration"])
    if dist.is_main:
        print(f"prefalign: resumed from {path} (iteration {pos['iteration']}).", file=sys.stderr)
    return pos["iteration"]


def check_stop(cfg, out, pos: dict, signum: Optional[int]) -> None:
    """Stop (after the checkpoint is written) on a signal or too many skipped steps."""
    if pos["bad_steps"] > cfg.max_bad_steps:
        raise TrainingStopped(
            f"stopped at iteration {pos['iteration']}: {pos['bad_steps']} minibatch steps had a non-finite loss or "
            f"gradient (more than --max-bad-steps {cfg.max_bad_steps}). The last state is checkpointed in "
            f"{out / ckpt.CKPT_DIR}; lower --lr, then rerun with --resume.", exit_code=3)
    if signum is not None:
        raise TrainingStopped(f"{signal.Signals(signum).name} received: saved a checkpoint at iteration "
                              f"{pos['iteration']} in {out / ckpt.CKPT_DIR}; rerun with --resume to continue.",
                              exit_code=128 + signum)


def save_models(m: Models, out_dir) -> None:
    """The policy in HF format in OUTPUT, the value model (or the shared head, with its checksum) in
    OUTPUT/value_model. save_final removes the folder when a write fails; the guard here gives the
    message the space the models need."""
    with diskio.guarded(out_dir, ckpt.nbytes(m.trainable.state_dict()), ckpt.resume_hint(out_dir.parent),
                        what=f"the final models into {out_dir.parent}"):
        save_pretrained(m.policy, m.tokenizer, out_dir)
        if m.value_model is not None:
            save_pretrained(m.value_model, m.tokenizer, out_dir / "value_model")
        else:
            save_value_head(m.value_head, out_dir / "value_model")
