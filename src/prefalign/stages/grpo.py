"""prefalign rloo / prefalign grpo: critic-free RL over groups of K completions per prompt, one
iteration read top to bottom (RLOO: Ahmadian et al. 2024; GRPO: Shao et al. 2024; with the
Dr. GRPO and DAPO variants as options; see docs/online.md).

Every iteration:
  1. rollout   each rank takes its slice of the global batch of prompts (prompts are sharded, never
               a prompt's completions, so each group lives on one rank) and samples K completions of
               each (rollout.sample: KV cache), with a generator seeded by (--seed, iteration, the
               prompt's place in the global batch): the draws do not depend on the number of
               processes, so N processes sample what one process with N times the prompts samples.
               The log-probs recorded while sampling are the old log-probs of the ratio.
  2. rewards   every reward source (reward models, reward functions) scores every completion; the
               reward is their weighted sum. A failing reward function saves a checkpoint, then stops.
  3. reference the frozen reference's log-probs when --beta > 0; with --kl-mode reward the sequence's
               summed log-ratio times beta is subtracted from its reward (RLOO).
  4. advantage one per completion from its group: leave-one-out (rloo) or minus the group mean
               (grpo), scaled by the group's, the batch's or no std (losses/group.py).
  5. update    --ppo-epochs passes of shuffled minibatches of the clipped surrogate (+ beta * k3 per
               token with --kl-mode loss), aggregated per token, per sequence or by a constant. The
               shuffle is one permutation of the global rollout; each rank computes its share of each
               global minibatch's loss (normalised by the global counts), gradients are averaged over
               ranks, one AdamW step (a non-finite step is skipped).
  6. log       metrics.jsonl row in TRL's names, samples.jsonl, checkpoint.

The models run in eval mode (no dropout), so sampled and recomputed log-probs agree.
With --gradient-checkpointing the trainable models' decoder layers alone switch to training mode, in the
update's gradient forward only, so that transformers recomputes them in backward (models/checkpointing.py).
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Optional

import torch

from prefalign.data import encode_prompt, load_prompts, source_options
from prefalign.losses import global_moments
from prefalign.losses.group import clipped_policy_loss, group_advantages, group_std
from prefalign.models import lora_summary, recompute_in_backward, save_pretrained
from prefalign.rl.forwards import policy_forward
from prefalign.rl.reward_functions import as_completions, combine
from prefalign.rl.scores import penalise_missing_eos
from prefalign.rollout import completion_texts
from prefalign.stages.common import finish, save_final, start
from prefalign.stages.online_rewards import (batch_columns, columns_of, load_sources, metric_names, plan_rewards,
                                             score, scores_or_stop)
from prefalign.stages.online_steps import ReplicaCheck, global_minibatches, take_step
from prefalign.stages.policy_rollout import (SEQ_KEYS, PolicyModels, choose_rows, gathered_lengths, length_metrics,
                                             load_policy, mixed_seed, packed_rows, plan_iterations, reference_logprobs,
                                             reference_name, rollout_batch, shard_rollout, take)
from prefalign.train.dist import DistInfo
from prefalign.train.harness import Meter, Run
from prefalign.train.loop import autocast_for
from prefalign.train.optim import make_optimizer, make_scheduler

N_SAMPLES = 4  # completions written to samples.jsonl every --sample-every iterations, the first and the last


# --------------------------------------------------------------------------- 4: advantages

def advantages_of(cfg, rewards: torch.Tensor) -> torch.Tensor:
    """(N,) advantages; --scale-rewards batch divides by the std of the global batch's rewards."""
    batch_std = None
    if cfg.scale_rewards == "batch":
        _, var, _ = global_moments(rewards[None].double(), torch.ones_like(rewards[None], dtype=torch.bool))
        batch_std = var.sqrt().to(rewards.dtype)
    return group_advantages(rewards, cfg.num_generations, cfg.estimator, cfg.scale_rewards, batch_std)


# --------------------------------------------------------------------------- 5: the update

def minibatch_loss(cfg, m: PolicyModels, mb: dict, n_sequences: int, n_tokens: int, world_size: int):
    """This rank's share of a global minibatch's loss (times world_size, since gradients are averaged
    over ranks) and its metrics as (sum, count)."""
    seq = tuple(mb[k] for k in SEQ_KEYS)
    mask = mb["response_mask"]
    packed = packed_rows(m, seq) if cfg.packing else None
    logprobs, entropy, _ = policy_forward(m.policy, None, *seq, temperature=cfg.temperature, packed=packed)
    kl_in_loss = m.use_ref and cfg.kl_mode == "loss"
    out = clipped_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mask, cfg.epsilon,
                              cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high, cfg.loss_aggregation,
                              cfg.max_new_tokens, mb["ref_logprobs"] if kl_in_loss else None, cfg.beta,
                              n_sequences=n_sequences, n_tokens=n_tokens)
    tokens = int(mask.sum())
    metrics = {"entropy": (float(torch.where(mask, entropy.detach(), 0.0).sum()), tokens),
               "clip_ratio/low_mean": (int(out.low_clipped.sum()), tokens),
               "clip_ratio/high_mean": (int(out.high_clipped.sum()), tokens),
               "clip_ratio/region_mean": (int((out.low_clipped | out.high_clipped).sum()), tokens)}
    if out.kl is not None:
        metrics["kl"] = (float(out.kl.sum()), tokens)
    return out.loss * world_size, out.loss.item(), metrics


def update(cfg, m: PolicyModels, batch: dict, lengths: torch.Tensor, iteration: int, optimizer, scheduler,
           dist: DistInfo, meter: Meter) -> int:
    """--ppo-epochs passes over the global rollout in shuffled global minibatches of --minibatch-size
    x processes completions; this rank computes the loss of the members it holds. ``lengths`` (N_global,)
    are every rank's completion lengths (for the global token counts). Returns the skipped steps."""
    bad, device, world = 0, dist.device, dist.world_size
    n_local = batch["response_ids"].shape[0]
    params = [p for p in m.trainable.parameters() if p.requires_grad]
    for epoch in range(cfg.ppo_epochs):
        seed = mixed_seed(cfg.seed, iteration, epoch)
        for members, mine in global_minibatches(n_local, cfg.minibatch_size, dist, seed):
            n_tokens = int(lengths[members].sum())
            loss_value, metrics, finite = 0.0, {}, True
            if len(mine):
                with recompute_in_backward(m.trainable):  # --gradient-checkpointing: forward and recompute alike
                    with autocast_for(device, cfg.dtype):
                        loss, loss_value, metrics = minibatch_loss(cfg, m, take(batch, mine.to(device)),
                                                                   len(members), n_tokens, world)
                    loss.backward()
                finite = math.isfinite(loss_value)
            bad += 0 if take_step(cfg, params, optimizer, scheduler, dist, meter, finite, loss_value, metrics) else 1
    return bad


# --------------------------------------------------------------------------- 6: metrics

def rollout_metrics(cfg, per_source: torch.Tensor, names: list[str], rewards: torch.Tensor,
                    seq_kl: Optional[torch.Tensor]) -> dict:
    """Reward metrics as (sum, count) over this rank's rollout (TRL's names)."""
    n, k = rewards.numel(), cfg.num_generations
    std = group_std(rewards, k)  # (P,)
    metrics = {"reward": (float(rewards.sum()), n), "reward_std": (float(std.sum()), std.numel()),
               "frac_reward_zero_std": (int(torch.isclose(std, torch.zeros_like(std)).sum()), std.numel())}
    for name, values in zip(names, per_source):
        metrics[f"rewards/{name}/mean"] = (float(values.sum()), n)
    if seq_kl is not None:
        metrics["kl"] = (float(seq_kl.sum()), n)
    return metrics


def sample_rows(prompts: list, completions: list[str], rewards: torch.Tensor, advantages: torch.Tensor) -> dict:
    return {"samples": [{"prompt": p, "completion": c, "reward": float(r), "advantage": float(a)}
                        for p, c, r, a in zip(prompts, completions, rewards, advantages)][:N_SAMPLES]}


# --------------------------------------------------------------------------- the stage

def run_group(cfg) -> int:
    """Train the policy by RLOO or GRPO (cfg.estimator) against reward models and/or functions.

    Longer than our ~60-line habit on purpose: like CleanRL's ppo.py, one iteration (rollout ->
    rewards -> reference -> advantages -> updates -> log) reads top to bottom in one place."""
    dist, out, t0 = start(cfg, "model", "prompts", "output")
    plan = plan_rewards(cfg)
    examples = load_prompts(cfg.prompts, cfg.data_format, **source_options(cfg))
    columns = columns_of(plan, cfg, len(examples))
    per_epoch, total = plan_iterations(cfg, len(examples), dist.world_size)
    m = load_policy(cfg, dist.device)
    cfg, layout = choose_rows(cfg, m, cfg.estimator, dist)
    sources, weights = load_sources(plan, m.tokenizer, cfg, dist.device), plan.weights
    names = metric_names(sources)
    query_ids = [encode_prompt(m.tokenizer, ex.prompt, cfg.max_prompt_length) for ex in examples]
    K, B = cfg.num_generations, cfg.rollout_batch_size
    optimizer = make_optimizer(m.trainable, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)
    scheduler = make_scheduler(optimizer, total * cfg.ppo_epochs * (B * K // cfg.minibatch_size), cfg.warmup_steps,
                               cfg.warmup_ratio, cfg.lr_schedule)
    replicas = ReplicaCheck(m, dist)
    run = Run(cfg, out, dist, desc=cfg.estimator, unit="iteration", total=total, model=m.trainable,
              optimizer=optimizer, scheduler=scheduler,
              plan={"prompts": len(examples), "prompts per rollout batch": B, "completions per prompt": K,
                    "processes": dist.world_size},
              plan_hint="Resume with the same --prompts, --rollout-batch-size, --num-generations and number of "
                        "processes. ", pre_save=replicas.check, logs=("samples.jsonl",))
    train_time = 0.0
    with run:
        while run.step < total:
            t_iter = time.perf_counter()
            # 1. rollout: this rank's prompts, K completions each
            mine, _, r = shard_rollout(cfg, m, query_ids, run.step, per_epoch, dist)
            t_rollout = time.perf_counter()
            prompts = [examples[i].prompt for i in mine for _ in range(K)]
            texts = completion_texts(m.tokenizer, r)
            cols = batch_columns(columns, mine, K, r)
            # 2. rewards; a failing reward function stops every rank after a checkpoint
            per_source = scores_or_stop(run, out, partial(score, sources, prompts, as_completions(prompts, texts),
                                                          cols, r, cfg.dtype))  # (S, N)
            reward = penalise_missing_eos(combine(per_source.float(), weights), r.ended_with_eos,
                                          cfg.missing_eos_penalty)  # (N,)
            batch = rollout_batch(r)
            # 3. reference log-probs; with --kl-mode reward, the KL leaves the reward
            seq_kl = None
            if m.use_ref:
                batch["ref_logprobs"] = reference_logprobs(cfg, m, batch, dist.device)
                if cfg.kl_mode == "reward":
                    seq_kl = torch.where(r.response_mask, r.logprobs - batch["ref_logprobs"], 0.0).sum(1)  # (N,)
            shaped = reward if seq_kl is None else reward - cfg.beta * seq_kl  # Ziegler et al. 2019 eq. 2
            # 4. group advantages
            batch["advantages"] = advantages_of(cfg, shaped)
            # 5. --ppo-epochs passes of minibatch updates
            lengths, ended = gathered_lengths(r)
            t_update = time.perf_counter()
            bad = update(cfg, m, batch, lengths, run.step, optimizer, scheduler, dist, run.meter)
            # 6. log and checkpoint
            run.meter.add(rollout_metrics(cfg, per_source.float(), names, reward, seq_kl))
            run.count_step(bad)
            now = time.perf_counter()
            train_time += now - t_iter
            run.last = {**run.reduce_metrics(), **length_metrics(lengths, ended), "lr": scheduler.get_last_lr()[0],
                        "bad_steps": run.pos["bad_steps"], "sequences": int(len(lengths)),
                        "perf/time_rollout_s": t_rollout - t_iter, "perf/time_update_s": now - t_update,
                        "perf/tokens_per_s": float(lengths.sum()) / max(now - t_iter, 1e-9)}
            run.log(run.last)
            if cfg.sample_every and (run.step % cfg.sample_every == 0 or run.step in (1, total)):
                run.log(sample_rows(prompts, texts, reward, batch["advantages"]), to="samples.jsonl")
            run.bar.set_postfix(reward=f"{run.last['reward']:.3f}")
            run.end_step(run.agree()[1])  # every rank stops at the same iteration
    digests = replicas.check_at_end()
    save_final(out, dist, lambda d: save_pretrained(m.policy, m.tokenizer, d, merge=cfg.merge_lora,
                                                    adapter_base=cfg.model))
    summary = finish(cfg, out, dist, cfg.estimator, t0, run.result(), global_batch_size=cfg.minibatch_size *
                     dist.world_size, prompts=len(examples), completions_per_iteration=B * K * dist.world_size,
                     iterations_time_s=train_time, reward_sources=[s.name for s in sources], reward_weights=weights,
                     reference=reference_name(cfg, m), layout=layout.info(), replica_checks=replicas.checks,
                     parameter_sha256=digests,
                     **lora_summary(m.policy, cfg.model, cfg.merge_lora))
    if dist.is_main:
        keys = ("reward", "reward_std", "kl", "completions/mean_length")
        print(f"prefalign {cfg.estimator}: {summary['steps']} iterations in {summary['wall_time_s']:.1f}s; "
              + " ".join(f"{k}={run.last[k]:.4g}" for k in keys if k in run.last))
    return 0
