"""prefalign demo: the DPO paper's controlled-sentiment experiment (sec. 6.1), in miniature and offline.

The recipe, top to bottom:

  1. data        generated reviews -> pretraining text, training prompts, held-out prompts; a BPE
                 tokenizer and an untrained Llama
  2. pretrain    `prefalign sft --packing` on {text}: the base model learns to write reviews
  3. sft         `prefalign sft` on prompt -> continuation (2-8 token review prefixes)
  4. preferences SFT samples two completions per training prompt; a simulated labeler prefers
                 one with probability sigma((r*(y1) - r*(y2)) / tau), r* = VADER sentiment
  5. reward      `prefalign reward` on those pairs
  6. sft-samples N SFT samples per held-out prompt: the optimum frontier, best-of-n and the
                 reward model's held-out accuracy come from them
  7. dpo         `prefalign dpo` for each beta, then evaluated on the held-out prompts
  8. ppo, rloo,  `prefalign ppo|rloo|grpo` in segments (one evaluated checkpoint each), against the
     grpo        reward model; `prefalign online-dpo` in segments, judged by the labeler of step 4
     online-dpo  itself (steps 7-8 are lab.demo_methods.METHODS, one entry per method)
  9. frontier    SFT and policy samples pooled and scored under every policy: the optimum frontier by
                 importance sampling from their mixture (lab.demo_frontier)
 10. report      results.json and report.html

With --base smollm2 the base is SmolLM2-135M-Instruct (demo_plan.SMOLLM2): stage 1 only cuts the
prompts with its tokenizer, stage 2 does not run, and SFT, reward, DPO and PPO train LoRA adapters
(merged into plain HF folders) with packed rows and PPO's value head on the policy.

Every stage lives in OUTPUT/<stage>/ and is skipped when its summary.json exists, so a rerun (or
a rerun after a crash) continues where the last one stopped.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from prefalign.config import DemoConfig
from prefalign.errors import ConfigError
from prefalign.lab import demo_noise as N
from prefalign.lab import demo_results as R
from prefalign.lab import demo_stages as S
from prefalign.lab.demo_data import make_preferences, prepare_data, smollm2_base
from prefalign.lab.demo_eval import best_of_n_rows, evaluate, sft_samples
from prefalign.lab.demo_frontier import (Proposal, dpo_targets, frontier_betas, load_pool, pool_frontier, pool_record,
                                         score_pool)
from prefalign.lab.demo_methods import METHODS, in_pool
from prefalign.lab.demo_plan import DemoPlan, plan_for, recorded
from prefalign.lab.report import write_report


@dataclass
class Run:
    """What every stage after SFT needs: the plan, the pipeline and the folders made so far."""
    plan: DemoPlan
    seed: int
    pipe: S.Pipeline
    data: Path
    sft: Path
    prefs: Path
    reward: Path
    samples: Path

    def evaluate(self, name: str, policy: Path) -> Path:
        """The held-out evaluation of one policy, as its own cached stage eval/<name>."""
        plan, sft_gold = self.plan, np.load(self.samples / "samples.npz")["gold"]     # (P, N)
        return self.pipe.stage(f"eval/{name}", f"{plan.eval_samples_per_prompt} samples x {plan.heldout_prompts} "
                               f"held-out prompts, gold reward and KL to SFT ({eta(plan, 'eval')})",
                               lambda d, r: evaluate(d, policy, self.sft, self.data, plan, self.seed, sft_gold))


def run_demo(cfg: DemoConfig) -> int:
    if cfg.base not in ("tiny", "smollm2"):
        raise ConfigError(f"--base {cfg.base}: choose tiny (a Llama pretrained here on the generated reviews) "
                          f"or smollm2 (SmolLM2-135M-Instruct; see docs/demo.md).")
    if cfg.base_model and cfg.base != "smollm2":
        raise ConfigError("--base-model sets the base of --base smollm2; --base tiny builds and pretrains its own.")
    plan, out, seed, t0 = plan_for(cfg.quick, cfg.base), Path(cfg.output), cfg.seed, time.perf_counter()
    base_model = smollm2_base(cfg.base_model) if plan.base == "smollm2" else None
    settings = {**recorded(plan), "seed": seed, "base": cfg.base, **({"base_model": base_model} if base_model else {})}
    S.claim_output(out, json.loads(json.dumps(settings)))
    pick_threads()
    fixed_stages = 4 + (plan.pretrain_steps > 0) + (plan.sft_steps > 0)
    pipe = S.Pipeline(out, fixed_stages + 2 * sum(len(m.settings(plan)) for m in METHODS) + 1)
    start = f"{plan.pretrain_steps} pretraining steps" if base_model is None else f"no pretraining (base {base_model})"
    print(f"prefalign demo ({plan.name}): {plan.base_params_hint}, {start}, "
          f"{plan.train_prompts} training prompts, {plan.heldout_prompts} held-out prompts -> {out}", flush=True)
    run = base_stages(pipe, plan, seed, base_model)
    policies = trained_policies(run)                   # [(method, knobs, eval dir, in the frontier's pool)]
    pool = frontier_pool(run, policies)
    results = collect_results(out, plan, seed, run.samples, pool, run.prefs, policies, time.perf_counter() - t0,
                              base_model or str((out / "pretrain").resolve()))
    trained = [(n, None) for n in ("pretrain", "sft", "reward") if (out / n).is_dir()]
    trained += [(e.name, method if knobs.get("step") is not None else None) for method, knobs, e, _ in policies]
    report = write_report(out, results, R.curves(out, trained),
                          R.side_by_side(out, plan.shown_prompts, plan.frontier_samples, shown_policies(policies),
                                         max(plan.best_of_n) if plan.best_of_n else None))
    print_summary(results, report)
    return 0


def base_stages(pipe: S.Pipeline, plan: DemoPlan, seed: int, base_model: Optional[str]) -> Run:
    """Stages 1-6: data, pretraining, SFT, labelled pairs, reward model, SFT samples.

    With a given base_model (--base smollm2) there is no pretraining; with plan.sft_steps = 0 no SFT
    either, and the base itself is "SFT": the reference of KL and of the frontier."""
    if base_model is None:
        data = pipe.stage("data", f"{plan.pretrain_reviews} reviews, a {plan.vocab_size}-token BPE, an untrained "
                          f"Llama (seconds)", lambda d, r: prepare_data(d, plan, seed))
        base = pipe.stage("pretrain", f"{plan.pretrain_steps} steps x {plan.pretrain_batch} packed rows of "
                          f"{plan.pretrain_length} tokens ({eta(plan, 'pretrain')})",
                          lambda d, r: S.pretrain(d, r, data / "init-model", data / "pretrain.jsonl", plan, seed))
    else:
        data = pipe.stage("data", f"{plan.train_prompts + plan.heldout_prompts} review prompts cut with the base's "
                          f"tokenizer (seconds)", lambda d, r: prepare_data(d, plan, seed, base_model))
        base = Path(base_model)
    sft = base if not plan.sft_steps else pipe.stage(
        "sft", f"{plan.sft_steps} steps x {plan.sft_batch} {'packed rows' if plan.packing else 'rows'} of prompt -> "
               f"continuation{with_lora(plan)} ({eta(plan, 'sft')})",
        lambda d, r: S.sft(d, r, base, data / "sft.jsonl", plan, seed))
    n_pairs = plan.pairs_per_prompt * plan.train_prompts
    prefs = pipe.stage("preferences", f"{n_pairs} pairs of SFT samples, labelled with tau={plan.tau} "
                       f"({eta(plan, 'preferences')})", lambda d, r: make_preferences(d, sft, data, plan, seed))
    rm = pipe.stage("reward", f"{plan.reward_epochs:g} epochs over {n_pairs} pairs{with_lora(plan)} "
                    f"({eta(plan, 'reward')})",
                    lambda d, r: S.reward(d, r, sft, prefs / "prefs.jsonl", plan, seed))
    samples = pipe.stage("sft-samples", f"{plan.frontier_samples} SFT samples x {plan.heldout_prompts} held-out "
                         f"prompts, gold and reward-model scores ({eta(plan, 'sft-samples')})",
                         lambda d, r: sft_samples(d, sft, rm, data, plan, seed))
    return Run(plan, seed, pipe, data, sft, prefs, rm, samples)


def trained_policies(run: Run) -> list[tuple[str, dict, Path, bool]]:
    """Every method of lab.demo_methods.METHODS, each setting trained and evaluated:
    [(method, knobs, eval dir, joins the frontier's pool)]."""
    out = []
    for method in METHODS:
        settings, previous = method.settings(run.plan), None
        for setting in settings:
            if not S.available(method.module):
                run.pipe.skip(setting.stage, f"prefalign.stages.{method.module} is not in this checkout")
                run.pipe.skip(f"eval/{setting.stage}", "no policy")
                continue
            policy = run.pipe.stage(setting.stage, f"{setting.header} ({eta(run.plan, method.name)})",
                                    lambda d, r, s=setting, p=previous: method.train(d, r, run, s, p))
            previous = policy if method.kind == "segments" else None
            out.append((method.name, setting.knobs, run.evaluate(setting.stage, policy),
                        in_pool(setting, len(settings), run.plan)))
    return out


def frontier_pool(run: Run, policies: list) -> Path:
    """The frontier's pool (lab.demo_frontier): SFT samples and every evaluated policy's samples,
    each scored under SFT and every policy."""
    plan = run.plan
    proposals = [Proposal("sft", run.sft, None)] + [Proposal(e.name, Path(R.summary(e)["policy"]), e)
                                                    for _, _, e, pooled in policies if pooled]
    return run.pipe.stage("frontier", f"{plan.frontier_samples} SFT + {plan.eval_samples_per_prompt} samples of each "
                          f"of {len(proposals) - 1} policies per held-out prompt; those at or above the "
                          f"{plan.frontier_pool_sft}th best SFT sample's gold reward scored under SFT and every policy "
                          f"for the optimum frontier ({eta(plan, 'frontier')})",
                          lambda d, r: score_pool(d, run.samples, proposals, run.data, plan))


def pick_threads() -> None:
    """One torch thread when other processes already keep every core busy.

    Measured on the 2-core build machine under a load average of ~9: a training step of the
    default model took 0.43 s with 1 thread and 2.3 s with 2 (threads waiting on each other
    while descheduled). OMP_NUM_THREADS, when set, always wins.
    """
    import os

    import torch
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cores and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        print(f"prefalign demo: load average {load:.1f} on {cores} cores, so torch uses 1 thread "
              f"(set OMP_NUM_THREADS to choose).", flush=True)


def shown_policies(policies: list) -> dict[str, str]:
    """Report columns -> eval stage names: every setting of a sweep (DPO's betas) and the last
    checkpoint of every method trained in segments."""
    labels = {m.name: m.label for m in METHODS}
    shown, last = {}, {}
    for method, knobs, e, _ in policies:
        if knobs.get("step") is None:
            shown[f"{labels[method]} β={knobs['beta']:g}"] = e.name
        else:
            last[method] = (knobs, e)
    for method, (knobs, e) in last.items():
        shown[f"{labels[method]} iter {knobs['step']}"] = e.name
    return shown


def with_lora(plan: DemoPlan) -> str:
    return f", LoRA r={plan.lora_r}" if plan.lora else ""


def eta(plan: DemoPlan, stage: str) -> str:
    """A rough duration for the stage header (the stage's own bar then shows a live ETA)."""
    minutes = ESTIMATED_MINUTES.get(plan.name, {}).get(stage)
    machine = "a quiet 2-core CPU" if plan.base == "smollm2" else "a busy 2-core CPU"
    return "the bar shows the ETA" if minutes is None else f"~{minutes:g} min on {machine}"


# Stage wall times measured on the build machine, rounded up; PPO and eval are per segment / per
# policy. Tiny plans: 2 cores shared with other jobs (load average 6-9; a quiet machine is 2-3x
# faster). smollm2: the quiet machine with 2 torch threads (docs/demo.md gives the timings).
# default: the stages the plan of 2026-12-04 made larger are the earlier busy times scaled by the ratio
# of their quiet times (the whole plan: 34.5 minutes on the quiet machine); online DPO on 512 pairs per
# iteration (later that day) 1.8 minutes a segment on the quiet machine, three times that here.
ESTIMATED_MINUTES: dict[str, dict[str, float]] = {
    "default": {"pretrain": 12, "sft": 1, "preferences": 8, "reward": 5, "sft-samples": 6, "dpo": 9, "ppo": 5,
                "rloo": 5, "grpo": 5, "online-dpo": 6, "eval": 1, "frontier": 6},
    "quick": {"pretrain": 2, "sft": 0.5, "preferences": 0.5, "reward": 0.5, "sft-samples": 0.5, "dpo": 0.5,
              "ppo": 0.5, "rloo": 0.5, "grpo": 0.5, "online-dpo": 0.5, "eval": 0.5, "frontier": 1},
    # From 2-4 step timings (docs/demo.md): SFT 4.8 s/step, reward 1.7, DPO 2.1 (+2 min of reference
    # log-probs for the first beta), PPO 23.5 s/iteration, sampling 0.09-0.11 s per completion.
    # The frontier's pool: estimated, not measured (8,192 forwards at the DPO reference's 0.065 s each).
    "smollm2": {"sft": 4, "preferences": 4, "reward": 5, "sft-samples": 4, "dpo": 7, "ppo": 4, "eval": 1.5,
                "frontier": 9},
}


def collect_results(out: Path, plan: DemoPlan, seed: int, samples_dir: Path, pool_dir: Path, prefs: Path,
                    policies: list, wall_time_s: float, base_model: str) -> dict:
    """Every number the report shows, one entry per method and setting."""
    samples, pool = np.load(samples_dir / "samples.npz"), load_pool(pool_dir)
    sft_reward = float(samples["gold"].mean())
    betas = frontier_betas(pool, plan.frontier_betas)   # the plan's grid and where its trusted range ends
    frontier = pool_frontier(pool, betas)
    methods = [{"method": "sft", "beta": None, "gold_reward": sft_reward, "kl": 0.0, "win_rate_vs_sft": 0.5}]
    methods += [R.policy_row(method, eval_dir, **knobs) for method, knobs, eval_dir, _ in policies]
    methods += best_of_n_rows(samples, plan)
    add_share_errors(methods, policies, samples, pool, plan, betas)
    by_method = R.add_gain_shares(methods, frontier, sft_reward)
    rm = R.summary(samples_dir)["reward_model"]
    results = {"methods": methods, "gain_share_by_method": by_method,
               "reward_model": {**rm, "train_pairs_bayes_optimal_accuracy": R.summary(prefs)["bayes_optimal_accuracy"]},
               "frontier": [p._asdict() for p in frontier],
               "frontier_pool": pool_record(pool),
               "reward_model_optimum": R.reward_model_optimum(samples["gold"], samples["proxy"], betas,
                                                              frontier, sft_reward),
               "dpo_targets": dpo_targets(pool, [m for m in methods if m["method"] == "dpo"], plan.tau),
               "settings": {"plan": plan.name, **{k: v for k, v in dataclasses.asdict(plan).items() if k != "name"}, "seed": seed,
                            "base_model": base_model, "base_params_hint": plan.base_params_hint,
                            "frontier_samples": plan.frontier_samples,
                            "frontier_estimator": pool_record(pool)["estimator"],
                            "wall_time_s": wall_time_s, "stage_wall_time_s": R.stage_times(out),
                            "machine": R.machine()},
               "sft_fluency": sft_fluency(out, samples)}
    results["targets"] = R.targets(results)
    return results


def add_share_errors(methods: list[dict], policies: list, samples, pool, plan: DemoPlan, betas) -> None:
    """gain_share_se of every row (SFT's null): the bootstrap over held-out prompts of lab.demo_noise, the
    frontier at `betas`. methods: SFT's row, then one per policy in `policies`' order, then best-of-n's."""
    gold, proxy = samples["gold"], samples["proxy"]
    rows = [N.policy_per_prompt(e, gold.shape[0]) for _, _, e, _ in policies]
    rows += [N.best_of_n_per_prompt(gold, proxy, n) for n in plan.best_of_n]
    frontier = N.frontier_per_prompt(pool.rewards, pool.logps[:, :, 0], pool.logps, pool.counts, betas,
                                     pool.threshold)
    methods[0]["gain_share_se"] = None  # SFT: the share's zero point, no error
    for m, se in zip(methods[1:], N.share_standard_errors(rows, gold.mean(1), frontier)):
        m["gain_share_se"] = se


def sft_fluency(out: Path, samples) -> dict:
    """What can be measured of 'fluent': held-out next-token loss of pretraining and SFT, how often
    SFT ends a review by itself (EOS) within the token budget, and the share of words in SFT
    samples that never occur in the pretraining reviews (invented words; each completion's last
    word is left out, since the token budget may cut it).

    A stage that did not run (no pretraining with --base smollm2; no SFT when sft_steps is 0) has
    no loss: null, named in not_applicable with the unknown-word rate, which compares against
    pretraining reviews a SmolLM2 base never saw."""
    def eval_loss(stage: str):
        done = (out / stage / "summary.json").exists()
        return R.summary(out / stage).get("eval_metrics", {}).get("eval/loss") if done else None

    corpus = out / "data" / "pretrain.jsonl"
    fluency = {"pretrain_eval_loss": eval_loss("pretrain"), "sft_eval_loss": eval_loss("sft"),
               "sft_eos_rate": float(np.mean(samples["ended_with_eos"])),
               "sft_unknown_word_rate": R.unknown_word_rate(corpus, out / "sft-samples" / "samples.jsonl")
               if corpus.exists() else None}
    missing = [k for k, v in fluency.items() if v is None]
    return {**fluency, "not_applicable": missing} if missing else fluency


def print_summary(results: dict, report: Path) -> None:
    print("\nmethod      setting          gold reward   KL (nats)   win vs SFT   share of optimum gain")
    for m in results["methods"]:
        knob = (f"iteration {m['step']}" if m.get("step") is not None else f"n={m['n']}" if m.get("n") is not None
                else f"beta={m['beta']:g}" if m.get("beta") is not None else "")
        print(f"{m['method']:<11} {knob:<15} {m['gold_reward']:>12.3f} {m['kl']:>11.2f} "
              f"{m['win_rate_vs_sft']:>12.2f} {R.share_text(m):>15}")
    rm = results["reward_model"]
    print(f"reward model held-out accuracy {rm['heldout_accuracy']:.3f} "
          f"(Bayes-optimal {rm['bayes_optimal_accuracy']:.3f} on the same {rm['heldout_pairs']} pairs)")
    frontier, pool = results["frontier"], results["frontier_pool"]
    trusted = [p["mean_kl"] for p in frontier if p["trusted"]]
    print(f"optimum frontier: {len(pool['proposals'])} proposals, {pool['samples_per_prompt']} samples per prompt; "
          f"KL up to {max(p['mean_kl'] for p in frontier):.2f}, trusted (ESS >= {pool['min_ess']:g}) up to "
          f"{max(trusted, default=0.0):.2f}")
    rm_opt = [p for p in results.get("reward_model_optimum", {}).get("points", [])
              if p["trusted"] and p.get("gain_share") is not None]               # a share of exactly 0 too
    if rm_opt:
        print("the reward model's own optimum (pi_SFT exp(r_RM / beta) / Z), share of the optimum's gain: "
              + ", ".join(f"{p['gain_share']:.2f} at KL {p['mean_kl']:.2f}" for p in rm_opt))
    for t in results["dpo_targets"]:
        print(f"DPO beta={t['dpo_beta']:g} targets the optimum at beta={t['frontier_beta']:g}: gold reward "
              f"{t['target_reward']:.3f} at KL {t['target_kl']:.2f}{'' if t['target_trusted'] else ' (ESS too small)'}")
    for name, t in results["targets"].items():
        values = ", ".join(f"{k}={v:.3f}" for k, v in t.items() if isinstance(v, float))
        print(f"target {name}: {'met' if t['met'] else 'MISSED'} ({values})")
    print(f"(<= : past the KL of the frontier's last trusted point (ESS), an upper bound; +- : standard error "
          f"over held-out prompts)\nreport: {report}\n"
          f"results: {report.parent / 'results.json'}")
