"""prefalign online-dpo: online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI
Feedback"; the DPO paper's on-policy variant), one iteration read top to bottom (docs/online.md).

Every iteration:
  1. rollout   each rank takes its slice of the global batch of prompts and samples two completions
               of each from the current policy (stages/policy_rollout.rollout: KV cache; draws seeded by
               (--seed, iteration, the prompt's place in the global batch), so N processes sample what
               one process with N times the prompts samples).
  2. judge     every reward source scores both completions; the score is their weighted sum, minus
               --missing-eos-penalty for a completion without EOS. The higher score is chosen (ties:
               the first sample, as TRL), or with --judge-temperature tau > 0 a simulated labeler
               draws the preference by Bradley-Terry, sigma((s1 - s2) / tau) (rl/judge.py), from a
               uniform seeded like the draws. A failing reward function saves a checkpoint, then stops.
  3. reference the frozen reference's log-probs of both completions (--ref-model, default --model;
               with --lora the policy with its adapters off), at temperature 1 like the policy's.
  4. update    the pairs in global minibatches of --minibatch-size x processes (slices of one seeded
               permutation; default one minibatch, one AdamW step per iteration): the DPO loss
               (losses/preference.dpo_loss) of each pair's summed completion log-probs, averaged over the
               global minibatch; gradients are averaged over ranks, a non-finite step is skipped.
  5. log       metrics.jsonl row in TRL's OnlineDPOTrainer names, samples.jsonl, checkpoint.

The policy runs in eval mode (no dropout): the log-ratio of a policy equal to its reference is 0.
With --gradient-checkpointing the policy's decoder layers alone switch to training mode, in the
update's gradient forward only, so that transformers recomputes them in backward (models/checkpointing.py).
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import NamedTuple

import torch

from prefalign.data import encode_prompt, load_prompts, source_options
from prefalign.losses import dpo_loss
from prefalign.models import lora_summary, recompute_in_backward, save_pretrained
from prefalign.rl.forwards import policy_forward
from prefalign.rl.judge import Judgement, judge_pairs
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

N_SAMPLES = 4  # pairs written to samples.jsonl every --sample-every iterations, the first and the last
JUDGE_STREAM = 2  # the judge's uniforms: a seed tuple of their own, (--seed, iteration, place, JUDGE_STREAM)


class PairRows(NamedTuple):
    """Rows of the rollout (2 per prompt: prompt p's at 2p and 2p + 1) that are each pair's chosen and rejected."""
    chosen: torch.Tensor    # (B,) long
    rejected: torch.Tensor  # (B,) long


# --------------------------------------------------------------------------- 2: the judge

def judge(cfg, scores: torch.Tensor, places: list[int], iteration: int) -> Judgement:
    """Order each prompt's two completions by their scores (2B,) (rows 2p and 2p + 1); the
    Bradley-Terry draws use one uniform per prompt seeded by (--seed, iteration, place)."""
    first, second = scores[0::2], scores[1::2]  # (B,) each
    uniforms = None
    if cfg.judge_temperature > 0:
        uniforms = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(
            mixed_seed(cfg.seed, iteration, place, JUDGE_STREAM)), dtype=torch.float64) for place in places])
    return judge_pairs(first, second, cfg.judge_temperature, uniforms)


def pair_rows(first_chosen: torch.Tensor) -> PairRows:
    """(B,) bool -> the rollout rows of each pair's chosen and rejected completion."""
    base = 2 * torch.arange(len(first_chosen), device=first_chosen.device)
    return PairRows(base + (~first_chosen).long(), base + first_chosen.long())


def judge_metrics(scores: torch.Tensor, names: list[str], per_source: torch.Tensor, rows: PairRows,
                  ended: torch.Tensor) -> dict:
    """Score metrics as (sum, count) over this rank's pairs (TRL's names where TRL has them)."""
    n, b = scores.numel(), len(rows.chosen)
    margin = scores[rows.chosen] - scores[rows.rejected]  # (B,)
    metrics = {"objective/scores": (float(scores.sum()), n), "objective/scores_margin": (float(margin.sum()), b),
               "judge/ties": (int((scores[0::2] == scores[1::2]).sum()), b),
               "judge/flipped": (int((margin < 0).sum()), b), "val/contain_eos_token": (int(ended.sum()), n)}
    for name, values in zip(names, per_source):
        metrics[f"rewards/{name}/mean"] = (float(values.sum()), n)
    return metrics


# --------------------------------------------------------------------------- 4: the DPO update

def minibatch_loss(cfg, m: PolicyModels, batch: dict, rows: PairRows, mine: torch.Tensor, n_pairs: int,
                   world_size: int):
    """This rank's share of a global minibatch's mean DPO loss (times world_size, since gradients are
    averaged over ranks), its value, and metrics as (sum, count)."""
    b = len(mine)
    mb = take(batch, torch.cat([rows.chosen[mine], rows.rejected[mine]]))  # chosen rows, then rejected rows
    seq = tuple(mb[k] for k in SEQ_KEYS)
    packed = packed_rows(m, seq) if cfg.packing else None
    logprobs = policy_forward(m.policy, None, *seq, temperature=1.0, packed=packed)[0]  # (2b, R), 0 where masked
    policy_logps, ref_logps = logprobs.sum(1), mb["ref_logprobs"].sum(1)  # (2b,) summed completion log-probs
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_logps[:b], policy_logps[b:], ref_logps[:b], ref_logps[b:], beta=cfg.beta, loss_type=cfg.loss,
        label_smoothing=cfg.label_smoothing)  # (b,) each; rewards = beta * log-ratio, detached
    loss = losses.sum() / n_pairs
    seq_kl = (policy_logps - ref_logps).detach()  # (2b,) sampled log-ratio summed over each completion
    margins = chosen_rewards - rejected_rewards
    metrics = {"rewards/chosen": (float(chosen_rewards.sum()), b), "rewards/rejected": (float(rejected_rewards.sum()), b),
               "rewards/margins": (float(margins.sum()), b), "rewards/accuracies": (int((margins > 0).sum()), b),
               "logps/chosen": (float(policy_logps[:b].detach().sum()), b),
               "logps/rejected": (float(policy_logps[b:].detach().sum()), b),
               "objective/kl": (float(seq_kl.sum()), 2 * b),
               "objective/entropy": (float(-policy_logps.detach().sum()), 2 * b),  # TRL: -sum log pi, one sample
               "objective/non_score_reward": (float(-cfg.beta * seq_kl.sum()), 2 * b),
               "objective/rlhf_reward": (float((mb["scores"] - cfg.beta * seq_kl).sum()), 2 * b)}
    return loss * world_size, loss.item(), metrics


def update(cfg, m: PolicyModels, batch: dict, rows: PairRows, iteration: int, optimizer, scheduler, dist: DistInfo,
           meter: Meter) -> int:
    """One pass over the global batch of pairs in shuffled global minibatches of --minibatch-size x
    processes pairs; this rank computes the loss of the pairs it holds. Returns the skipped steps."""
    bad, device = 0, dist.device
    params = [p for p in m.trainable.parameters() if p.requires_grad]
    for members, mine in global_minibatches(len(rows.chosen), cfg.minibatch_size, dist, mixed_seed(cfg.seed, iteration)):
        loss_value, metrics, finite = 0.0, {}, True
        if len(mine):
            with recompute_in_backward(m.trainable):  # --gradient-checkpointing: forward and recompute alike
                with autocast_for(device, cfg.dtype):
                    loss, loss_value, metrics = minibatch_loss(cfg, m, batch, rows, mine.to(device), len(members),
                                                               dist.world_size)
                loss.backward()
            finite = math.isfinite(loss_value)
        bad += 0 if take_step(cfg, params, optimizer, scheduler, dist, meter, finite, loss_value, metrics) else 1
    return bad


def sample_rows(prompts: list, texts: list[str], scores: torch.Tensor, rows: PairRows, j: Judgement) -> dict:
    p_chosen = torch.where(j.first_chosen, j.p_first, 1 - j.p_first)
    return {"samples": [{"prompt": prompts[c], "chosen": texts[c], "rejected": texts[r], "score_chosen": float(scores[c]),
                         "score_rejected": float(scores[r]), "p_chosen": float(p)}
                        for c, r, p in zip(rows.chosen.tolist(), rows.rejected.tolist(), p_chosen)][:N_SAMPLES]}


# --------------------------------------------------------------------------- the stage

def run_online_dpo(cfg) -> int:
    """Train the policy by online DPO, judged by reward models and/or functions (OnlineDPOConfig
    checks the options before anything loads). A little over our ~60-line habit so that one
    iteration (rollout -> judge -> reference -> DPO steps -> log) reads top to bottom."""
    dist, out, t0 = start(cfg, "model", "prompts", "output")
    plan = plan_rewards(cfg)
    examples = load_prompts(cfg.prompts, cfg.data_format, **source_options(cfg))
    columns = columns_of(plan, cfg, len(examples))
    per_epoch, total = plan_iterations(cfg, len(examples), dist.world_size)
    m = load_policy(cfg, dist.device)
    cfg, layout = choose_rows(cfg, m, "online-dpo", dist)
    sources = load_sources(plan, m.tokenizer, cfg, dist.device)
    names = metric_names(sources)
    query_ids = [encode_prompt(m.tokenizer, ex.prompt, cfg.max_prompt_length) for ex in examples]
    B = cfg.rollout_batch_size
    optimizer = make_optimizer(m.trainable, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)
    scheduler = make_scheduler(optimizer, total * (B // cfg.minibatch_size), cfg.warmup_steps, cfg.warmup_ratio,
                               cfg.lr_schedule)
    replicas = ReplicaCheck(m, dist)
    run = Run(cfg, out, dist, desc="online-dpo", unit="iteration", total=total, model=m.trainable,
              optimizer=optimizer, scheduler=scheduler,
              plan={"prompts": len(examples), "prompts per rollout batch": B, "processes": dist.world_size},
              plan_hint="Resume with the same --prompts, --rollout-batch-size and number of processes. ",
              pre_save=replicas.check, logs=("samples.jsonl",))
    train_time = 0.0
    with run:
        while run.step < total:
            t_iter = time.perf_counter()
            # 1. rollout: this rank's prompts, two completions each
            mine, places, r = shard_rollout(cfg, m, query_ids, run.step, per_epoch, dist)  # (2B, ...)
            t_rollout = time.perf_counter()
            prompts = [examples[i].prompt for i in mine for _ in range(2)]
            texts = completion_texts(m.tokenizer, r)
            # 2. scores and the judge; a failing reward function stops every rank after a checkpoint
            cols = batch_columns(columns, mine, 2, r)
            per_source = scores_or_stop(run, out, partial(score, sources, prompts, as_completions(prompts, texts),
                                                          cols, r, cfg.dtype)).float()  # (S, 2B)
            scores = penalise_missing_eos(combine(per_source, plan.weights), r.ended_with_eos,
                                          cfg.missing_eos_penalty)  # (2B,)
            j = judge(cfg, scores, places, run.step)
            rows = pair_rows(j.first_chosen)
            # 3. the reference's log-probs of every completion
            batch = {**rollout_batch(r), "scores": scores}
            batch["ref_logprobs"] = reference_logprobs(cfg, m, batch, dist.device, temperature=1.0)
            # 4. DPO steps
            lengths, ended = gathered_lengths(r)
            t_update = time.perf_counter()
            bad = update(cfg, m, batch, rows, run.step, optimizer, scheduler, dist, run.meter)
            # 5. log and checkpoint
            run.meter.add(judge_metrics(scores, names, per_source, rows, r.ended_with_eos))
            run.count_step(bad)
            now = time.perf_counter()
            train_time += now - t_iter
            run.last = {**run.reduce_metrics(), **length_metrics(lengths, ended), "beta": cfg.beta,
                        "lr": scheduler.get_last_lr()[0], "bad_steps": run.pos["bad_steps"],
                        "sequences": int(len(lengths)), "perf/time_rollout_s": t_rollout - t_iter,
                        "perf/time_update_s": now - t_update,
                        "perf/tokens_per_s": float(lengths.sum()) / max(now - t_iter, 1e-9)}
            run.log(run.last)
            if cfg.sample_every and (run.step % cfg.sample_every == 0 or run.step in (1, total)):
                run.log(sample_rows(prompts, texts, scores, rows, j), to="samples.jsonl")
            run.bar.set_postfix(score=f"{run.last['objective/scores']:.3f}")
            run.end_step(run.agree()[1])  # every rank stops at the same iteration
    digests = replicas.check_at_end()
    save_final(out, dist, lambda d: save_pretrained(m.policy, m.tokenizer, d, merge=cfg.merge_lora,
                                                    adapter_base=cfg.model))
    summary = finish(cfg, out, dist, "online-dpo", t0, run.result(), global_batch_size=cfg.minibatch_size *
                     dist.world_size, prompts=len(examples), pairs_per_iteration=B * dist.world_size,
                     iterations_time_s=train_time, reward_sources=[s.name for s in sources],
                     reward_weights=plan.weights, judge_temperature=cfg.judge_temperature,
                     reference=reference_name(cfg, m), layout=layout.info(), replica_checks=replicas.checks,
                     parameter_sha256=digests,
                     **lora_summary(m.policy, cfg.model, cfg.merge_lora))
    if dist.is_main:
        keys = ("objective/scores", "objective/scores_margin", "rewards/accuracies", "objective/kl")
        print(f"prefalign online-dpo: {summary['steps']} iterations in {summary['wall_time_s']:.1f}s; "
              + " ".join(f"{k}={run.last[k]:.4g}" for k in keys if k in run.last))
    return 0
