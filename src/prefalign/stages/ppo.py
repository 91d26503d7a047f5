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
With --gradient-checkpointing the trainable models' decoder layers alone switch to training mode, in the
update's gradient forward only, so that transformers recomputes them in backward (models/checkpointing.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from functools import partial
from typing import NamedTuple, Optional

import torch

from prefalign.config import refuse_offline_options
from prefalign.data import encode_prompt, load_prompts, source_options
from prefalign.errors import ConfigError
from prefalign.losses import gae, global_moments, kl_estimate, ppo_policy_loss, ppo_value_loss, whiten
from prefalign.models import disabled_adapter, lora_summary, recompute_in_backward
from prefalign.ops import masked_mean
from prefalign.rl.forwards import policy_forward, token_values
from prefalign.rl.kl_control import make_kl_controller
from prefalign.rl.reward_functions import RewardModel, as_completions, combine
from prefalign.rl.scores import RunningMoments, final_scores
from prefalign.rollout import PackedSequences, Rollout, completion_texts, sample
from prefalign.stages.common import finish, save_final, start
from prefalign.stages.online_rewards import batch_columns, columns_of, metric_names, plan_rewards, scores_or_stop
from prefalign.stages.online_steps import ReplicaCheck
from prefalign.stages.packing import announce, choose_layout
from prefalign.stages.policy_rollout import plan_iterations, prompt_shard
from prefalign.stages.ppo_models import Models, RewardFn, load_models, pack_rows, row_readers, save_models
from prefalign.train.dist import DistInfo, all_reduce_sum, average_gradients
from prefalign.train.harness import Meter, Run, agree
from prefalign.train.loop import autocast_for, scheduler_step
from prefalign.train.optim import clip_and_check, make_optimizer, make_scheduler

N_SAMPLES = 4  # completions written to samples.jsonl every --sample-every iterations, the first and the last


# --------------------------------------------------------------------------- set-up

def check_options(cfg) -> None:
    if cfg.rollout_batch_size < 1 or cfg.minibatch_size < 1 or cfg.rollout_batch_size % cfg.minibatch_size:
        raise ConfigError(f"--rollout-batch-size ({cfg.rollout_batch_size}) must be a positive multiple of "
                          f"--minibatch-size ({cfg.minibatch_size}).")
    if cfg.ppo_epochs < 1 or cfg.max_new_tokens < 1 or cfg.temperature <= 0:
        raise ConfigError("--ppo-epochs and --max-new-tokens must be at least 1 and --temperature positive.")
    if cfg.value_lr is not None and cfg.value_lr <= 0:
        raise ConfigError(f"--value-lr must be positive, got {cfg.value_lr:g}.")
    if cfg.kl_coef < 0 or (cfg.target_kl is not None and cfg.target_kl <= 0) or cfg.kl_horizon < 1:
        raise ConfigError("--kl-coef must be >= 0, --target-kl > 0 when given, and --kl-horizon >= 1.")
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        raise ConfigError(f"--gamma and --lam must lie in [0, 1], got {cfg.gamma} and {cfg.lam}.")
    refuse_offline_options(cfg, "ppo")


def value_learning_rate(cfg, m: Models) -> float:
    """--value-lr, or its default: --lr, except 1e-5 for a separate (full) value model next to a LoRA
    policy, whose --lr suits adapters, not a whole model."""
    if cfg.value_lr is not None:
        return cfg.value_lr
    return 1e-5 if cfg.lora and m.value_model is not None else cfg.lr


# --------------------------------------------------------------------------- 1-2: rollout and scores

class Sampled(NamedTuple):
    """One rank's rollout with its decoded completions and (with --packing) its packed rows."""
    rollout: Rollout
    completions: list[str]
    packed: Optional[PackedSequences]


@torch.no_grad()
def sample_rollout(cfg, m: Models, query_ids: list[list[int]], generator: torch.Generator, device) -> Sampled:
    """One completion of each prompt from the current policy, decoded, and packed with --packing."""
    with autocast_for(device, cfg.dtype):
        r = sample(m.policy, query_ids, max_new_tokens=cfg.max_new_tokens, eos_token_id=m.tokenizer.eos_token_id,
                   pad_token_id=m.tokenizer.pad_token_id, temperature=cfg.temperature, top_k=cfg.top_k,
                   top_p=cfg.top_p, generator=generator)
    completions = completion_texts(m.tokenizer, r)
    seq = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    return Sampled(r, completions, pack_rows(m, seq) if cfg.packing else None)


@torch.no_grad()
def rollout_scores(cfg, m: Models, s: Sampled, prompts: list, reward_fn: Optional[RewardFn], columns: list[dict],
                   mine: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """raw_scores of a rollout under --dtype's autocast; ``columns``: every prompt's other fields (for
    reward functions), ``mine`` the prompts sampled. Nothing here is collective, so a function that
    fails on one rank leaves every rank free to agree on the error (online_rewards.scores_or_stop)."""
    with autocast_for(s.rollout.query_ids.device, cfg.dtype):
        return raw_scores(m, s.rollout, prompts, s.completions, s.packed, reward_fn,
                          batch_columns(columns, mine, 1, s.rollout) if m.sources else {})


@torch.no_grad()
def scored_batch(cfg, m: Models, s: Sampled, raw: torch.Tensor, per_source: Optional[torch.Tensor],
                 stats: RunningMoments, device) -> dict:
    """Everything the update needs, as (B, ...) tensors: the rollout, the reference's log-probs, the
    values, and the final scores (with --normalize-scores ``stats`` takes this iteration's global batch
    in: a collective, after every rank has its scores)."""
    r, packed = s.rollout, s.packed
    seq = (r.query_ids, r.query_mask, r.response_ids, r.response_mask)
    with autocast_for(device, cfg.dtype):
        with contextlib.nullcontext() if m.ref is not None else disabled_adapter(m.policy):
            ref_logprobs = policy_forward(m.ref if m.ref is not None else m.policy, None, *seq,
                                          temperature=cfg.temperature, packed=packed)[0]
        if m.value_model is not None:
            values = token_values(m.value_model, *seq, packed=packed)
        else:
            values = policy_forward(m.policy, m.value_head, *seq, temperature=cfg.temperature, packed=packed)[2]
    return {"query_ids": r.query_ids, "query_mask": r.query_mask, "response_ids": r.response_ids,
            "response_mask": r.response_mask, "logprobs": r.logprobs, "ref_logprobs": ref_logprobs.float(),
            "values": values.float(), "ended_with_eos": r.ended_with_eos, "raw_scores": raw.float(),
            "scores": final_scores(raw, r.ended_with_eos, cfg, stats), "completions": s.completions,
            "source_metrics": {} if per_source is None else {
                f"rewards/{name}/mean": (float(v.sum()), v.numel())
                for name, v in zip(metric_names(m.sources), per_source)}}


def raw_scores(m: Models, r: Rollout, prompts: list, completions: list[str], packed: Optional[PackedSequences],
               reward_fn: Optional[RewardFn], columns: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B,) the hook's scores, or the weighted sum of the reward sources' (--reward-weights), with the
    (S, B) scores of each source (None with the hook). A RewardFunctionError when a function fails."""
    if reward_fn is not None:
        return torch.as_tensor(reward_fn(prompts, completions, r), dtype=torch.float32, device=r.query_ids.device), None
    per_source = torch.stack([source_scores(s, r, prompts, completions, packed, columns) for s in m.sources]).float()
    return combine(per_source, m.weights), per_source


def source_scores(source, r: Rollout, prompts: list, completions: list[str], packed: Optional[PackedSequences],
                  columns: dict) -> torch.Tensor:
    """(B,) one source's scores: a reward model's normalised score at the last real token (on the packed
    rows when it shares the policy's tokenizer and scores cut completions as they are, else re-tokenised
    or given an EOS as needed), or a function's values."""
    if isinstance(source, RewardModel) and packed is not None and not source.retokenize and not source.score_cut_at_eos:
        rm = source.model
        return rm.normalized(rm(packed.input_ids, position_ids=packed.position_ids, segment_ids=packed.segment_ids,
                                n_segments=len(prompts)))
    return source(prompts, as_completions(prompts, completions), columns, r)


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
    batch.update(rewards=rewards, kl=kl, advantages=whiten(advantages, mask), returns=returns)


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


def update(cfg, m: Models, batch: dict, optimizer, scheduler, shuffle: torch.Generator, dist: DistInfo,
           meter: Meter) -> tuple[int, float]:
    """K epochs of shuffled minibatches, their metrics added to ``meter``. Returns (skipped steps, the
    first minibatch's max |recomputed - recorded| log-prob, measured before any update)."""
    bad, first_gap = 0, None
    device, world_size = dist.device, dist.world_size
    n = batch["response_ids"].shape[0]
    params = [p for p in m.trainable.parameters() if p.requires_grad]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=shuffle)
        for first in range(0, n, cfg.minibatch_size):
            idx = order[first:first + cfg.minibatch_size].to(device)
            mb = {k: v[idx] for k, v in batch.items() if torch.is_tensor(v)}
            with recompute_in_backward(m.trainable):  # --gradient-checkpointing: forward and recompute alike
                with autocast_for(device, cfg.dtype):
                    loss, metrics = minibatch_loss(cfg, m, mb)
                loss.backward()
            gap = metrics.pop("_logprob_gap")[0]
            first_gap = gap if first_gap is None else first_gap
            average_gradients(params, world_size)
            grad_norm, finite = clip_and_check(params, cfg.max_grad_norm)
            finite, _ = agree(finite and math.isfinite(loss.item()), None, dist)  # all ranks skip, or none
            if finite:
                optimizer.step()
                meter.add({**metrics, "loss/total": (loss.item(), 1), "grad_norm": (float(grad_norm), 1)})
            else:
                bad += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler_step(scheduler)
    return bad, first_gap


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
            "eos_rate": (batch["ended_with_eos"].sum(), n), **batch["source_metrics"]}


def explained_variance(batch: dict) -> float:
    """1 - Var(returns - values) / Var(returns) over the global batch, values from before the update."""
    mask = batch["response_mask"]
    _, var_returns, _ = global_moments(batch["returns"], mask)
    _, var_error, _ = global_moments(batch["returns"] - batch["values"], mask)
    return float(1 - var_error / var_returns) if var_returns > 0 else float("nan")


def iteration_row(run: Run, batch: dict, elapsed: float, times: dict, **extra) -> dict:
    """The metrics.jsonl row of one iteration: means of run.meter over all ranks, timings, ``extra``."""
    device = run.dist.device
    row = run.reduce_metrics()
    counts = torch.tensor([float(batch["query_mask"].sum() + batch["response_mask"].sum()),
                           float(batch["response_mask"].shape[0])], device=device)  # (tokens, sequences)
    tokens, sequences = all_reduce_sum(counts).tolist()
    row.update(extra)
    row.update({"sequences": int(sequences), "val/explained_variance": explained_variance(batch),
                "perf/tokens_per_s": tokens / max(elapsed, 1e-9),
                **{f"perf/time_{k}_s": v for k, v in times.items()}})
    return row


def sample_rows(prompts: list, batch: dict) -> dict:
    """The first N_SAMPLES completions of this rank's rollout, for samples.jsonl."""
    return {"samples": [
        {"prompt": p, "completion": c, "score": float(s), "ended_with_eos": bool(e)}
        for p, c, s, e in zip(prompts, batch["completions"], batch["scores"], batch["ended_with_eos"])][:N_SAMPLES]}


# --------------------------------------------------------------------------- the stage

def run_ppo(cfg, reward_fn: Optional[RewardFn] = None) -> int:
    """Train the policy by PPO against --reward-model and/or --reward-fn (weighted by --reward-weights).
    A Python hook ``reward_fn(prompts, completions, rollout) -> (B,)`` replaces them (and their weights)
    when given (tests use it). A little over our ~60-line habit so that one iteration (rollout ->
    rewards -> advantages -> updates -> log) reads top to bottom."""
    if reward_fn is not None and (cfg.reward_model or cfg.reward_fn or cfg.reward_weights is not None):
        raise ConfigError("run_ppo(reward_fn=...) replaces --reward-model, --reward-fn and --reward-weights (it is "
                          "the whole reward, so they would be ignored); leave those unset.")
    dist, out, t0 = start(cfg, "model", "prompts", "output")
    check_options(cfg)
    plan = None if reward_fn is not None else plan_rewards(cfg)
    kl_ctl, stats = make_kl_controller(cfg, cfg.rollout_batch_size * dist.world_size), RunningMoments()
    examples = load_prompts(cfg.prompts, cfg.data_format, **source_options(cfg))
    columns = columns_of(plan, cfg, len(examples)) if plan else []
    m = load_models(cfg, dist.device, reward_fn, plan)
    layout = choose_layout(cfg.packing, row_readers(m))
    announce("ppo", layout, show=dist.is_main)
    cfg = dataclasses.replace(cfg, packing=layout.packed)  # sample_rollout() and minibatch_loss() read cfg.packing
    query_ids = [encode_prompt(m.tokenizer, ex.prompt, cfg.max_prompt_length) for ex in examples]
    per_epoch, total = plan_iterations(cfg, len(examples), dist.world_size)
    value_lr = value_learning_rate(cfg, m)
    optimizer = make_optimizer(m.trainable, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps,
                               submodule_lrs={"value": value_lr} if value_lr != cfg.lr else None)
    steps = total * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
    scheduler = make_scheduler(optimizer, steps, cfg.warmup_steps, cfg.warmup_ratio, cfg.lr_schedule)
    generators = {"sample": torch.Generator(dist.device).manual_seed(cfg.seed * 1_000_003 + dist.rank),
                  "shuffle": torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 + dist.rank)}
    replicas = ReplicaCheck(m, dist)
    run = Run(cfg, out, dist, desc="ppo", unit="iteration", total=total, model=m.trainable, optimizer=optimizer,
              scheduler=scheduler, extra={"kl_ctl": kl_ctl, "score_stats": stats}, generators=generators,
              plan={"prompts": len(examples), "prompts per rollout batch": cfg.rollout_batch_size,
                    "processes": dist.world_size},
              plan_hint="Resume with the same --prompts, --rollout-batch-size and number of processes. ",
              pre_save=replicas.check, logs=("samples.jsonl",))
    train_time = 0.0
    with run:
        while run.step < total:
            t_iter = time.perf_counter()
            # 1-2. rollout and scores
            mine = prompt_shard(len(examples), run.step, per_epoch, cfg, dist)
            prompts = [examples[i].prompt for i in mine]
            drawn_from = generators["sample"].get_state()
            sampled = sample_rollout(cfg, m, [query_ids[i] for i in mine], generators["sample"], dist.device)
            t_score = time.perf_counter()
            # a failing reward function stops every rank after a checkpoint of the iterations done, its
            # sampling stream rewound so that --resume draws what this iteration drew; only the scoring is
            # guarded, so no rank has entered a collective (or updated score statistics) before
            raw, per_source = scores_or_stop(run, out, partial(rollout_scores, cfg, m, sampled, prompts, reward_fn,
                                                               columns, mine),
                                             before_save=partial(generators["sample"].set_state, drawn_from))
            batch = scored_batch(cfg, m, sampled, raw, per_source, stats, dist.device)
            times = {"rollout": t_score - t_iter, "score": time.perf_counter() - t_score}
            # 3-4. shaped reward, GAE, whitened advantages
            beta = kl_ctl.value
            add_advantages(batch, cfg, beta)
            # 5. K epochs of minibatch updates
            t_update = time.perf_counter()
            bad, gap = update(cfg, m, batch, optimizer, scheduler, generators["shuffle"], dist, run.meter)
            times["update"] = time.perf_counter() - t_update
            # 6. log, adapt beta, checkpoint
            run.meter.add(rollout_metrics(batch, beta))
            run.count_step(bad)
            elapsed = time.perf_counter() - t_iter
            train_time += elapsed
            run.last = iteration_row(run, batch, elapsed, times, kl_coef=beta, bad_steps=run.pos["bad_steps"],
                                     lr=scheduler.get_last_lr()[0], **{"policy/first_minibatch_logprob_maxdiff": gap})
            kl_ctl.update(run.last["objective/kl"], cfg.rollout_batch_size * dist.world_size)
            run.log(run.last)
            if cfg.sample_every and (run.step % cfg.sample_every == 0 or run.step in (1, total)):
                run.log(sample_rows(prompts, batch), to="samples.jsonl")
            run.bar.set_postfix(score=f"{run.last['objective/scores']:.3f}", kl=f"{run.last['objective/kl']:.3f}")
            run.end_step(run.agree()[1])  # every rank stops at the same iteration
    digests = replicas.check_at_end()
    save_final(out, dist, lambda d: save_models(m, d, base=cfg.model, merge=cfg.merge_lora))
    summary = finish(cfg, out, dist, "ppo", t0, run.result(), global_batch_size=cfg.rollout_batch_size * dist.world_size,
                     prompts=len(examples), iterations_time_s=train_time, final_kl_coef=kl_ctl.value,
                     value_model="shared head" if m.value_head is not None else "separate",
                     reward_sources=[s.name for s in m.sources] if reward_fn is None else ["reward_fn hook"],
                     reward_weights=m.weights if reward_fn is None else [1.0],
                     reward_retokenized=m.retokenize, replica_checks=replicas.checks, parameter_sha256=digests,
                     layout=layout.info(), **lora_summary(m.policy, cfg.model, cfg.merge_lora))
    if dist.is_main:
        keys = ("objective/scores", "objective/kl", "kl_coef", "eos_rate")
        print(f"prefalign ppo: {summary['steps']} iterations in {summary['wall_time_s']:.1f}s; "
              + " ".join(f"{k}={run.last[k]:.4g}" for k in keys if k in run.last))
    return 0
