"""The demo's training stages as ordinary prefalign commands, and the cache that makes reruns cheap.

Each training step builds the same config dataclass `prefalign sft|reward|dpo|ppo` fills from
the command line and calls the same run function, so the demo exercises the public API. Every
stage writes OUTPUT/<stage>/; it is done when its summary.json exists. A stage that stopped
half-way resumes from its newest checkpoint (--resume) or, without one, starts again.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from prefalign.config import DPOConfig, GRPOConfig, OnlineDPOConfig, PPOConfig, RewardConfig, RLOOConfig, SFTConfig
from prefalign.errors import ConfigError, DiskError, PrefalignError
from prefalign.lab.demo_plan import DemoPlan, GroupPlan, OnlineDPOPlan
from prefalign.train import diskio
from prefalign.train.checkpoint import CKPT_DIR, MARKER

# What to do after a write the disk refused: finished stages are reused, a stopped one resumes.
RERUN = ("rerun the same `prefalign demo` command: finished stages are reused and a stopped one continues "
         "from its checkpoint")


def is_done(d: Path) -> bool:
    return (d / "summary.json").exists()


def has_checkpoint(d: Path) -> bool:
    return any((p / MARKER).exists() for p in (d / CKPT_DIR).glob("step-*"))


def claim_output(out: Path, settings: dict) -> None:
    """Record the plan in OUTPUT/plan.json; refuse to mix stages from a run with other settings
    (cached stages are reused by name alone, so a --quick run must not feed a default one)."""
    path = out / "plan.json"
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    if path.exists() and json.loads(path.read_text()) != json.loads(text):
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ConfigError(f"{out} holds a demo run with other settings ({', '.join(changed[:6])} differ; "
                          f"see {path}). Choose another --output, or delete {out} to start over.")
    with diskio.guarded(out, then=RERUN):
        out.mkdir(parents=True, exist_ok=True)
    diskio.write_atomic(path, text.encode(), then=RERUN)


class Pipeline:
    """Runs named stages in order, printing one header line each, skipping finished ones."""

    def __init__(self, out: Path, total: int):
        self.out, self.total, self.index = out, total, 0
        self.times: dict[str, float] = {}

    def stage(self, name: str, header: str, fn: Callable[[Path, bool], None]) -> Path:
        """fn(stage_dir, resume) does the work and leaves summary.json in stage_dir."""
        self.index += 1
        d = self.out / name
        tag = f"[{self.index}/{self.total}] {name}"
        if is_done(d):
            print(f"{tag}: done earlier, reusing {d}", flush=True)
            return d
        resume = has_checkpoint(d)
        if d.exists() and not resume:
            shutil.rmtree(d)   # half-written and nothing to resume from: start clean
        print(f"{tag}: {header}{'  (resuming from its checkpoint)' if resume else ''}", flush=True)
        t0 = time.perf_counter()
        with diskio.guarded(d, then=RERUN):
            d.mkdir(parents=True, exist_ok=True)
        diskio.start_run(d)
        try:
            fn(d, resume)
        except DiskError as e:  # the stage says "--resume"; in the demo, rerunning the demo does that
            raise DiskError(f"demo stage {name}: {e} (For the demo: {RERUN}.)", e.path, e.errno) from None
        if not is_done(d):
            raise PrefalignError(f"demo stage {name} finished without writing {d / 'summary.json'}.")
        self.times[name] = time.perf_counter() - t0
        # The demo's own clock for the stage (training stages also time themselves, without loading).
        summary = json.loads((d / "summary.json").read_text())
        summary["demo_wall_time_s"] = self.times[name]
        diskio.write_atomic(d / "summary.json", (json.dumps(summary, indent=2) + "\n").encode(), then=RERUN)
        print(f"{tag}: finished in {self.times[name] / 60:.1f} min", flush=True)
        return d

    def skip(self, name: str, why: str) -> None:
        self.index += 1
        print(f"[{self.index}/{self.total}] {name}: skipped ({why})", flush=True)


def _check(rc: Optional[int], what: str) -> None:
    if rc not in (0, None):
        raise PrefalignError(f"demo: `prefalign {what}` exited with status {rc}.")


def _common(plan: DemoPlan, out: Path, resume: bool, seed: int) -> dict:
    """Options every training stage of the demo shares."""
    return dict(output=str(out), resume=resume, seed=seed, save_steps=plan.save_steps, keep_checkpoints=1,
                device="cpu", logging_steps=10)


def _tuning(plan: DemoPlan) -> dict:
    """LoRA options of the SFT, reward, DPO and PPO stages (pretraining trains every weight)."""
    return dict(lora=True, lora_r=plan.lora_r, lora_alpha=2 * plan.lora_r) if plan.lora else {}


def pretrain(out: Path, resume: bool, init_model: Path, data: Path, plan: DemoPlan, seed: int) -> None:
    """Next-token pretraining on {text} rows: `prefalign sft --packing` (every token is a label)."""
    from prefalign.stages.sft import run_sft
    cfg = SFTConfig(model=str(init_model), data=str(data), packing=True, max_length=plan.pretrain_length,
                    max_steps=plan.pretrain_steps, batch_size=plan.pretrain_batch, lr=plan.pretrain_lr,
                    warmup_steps=plan.pretrain_steps // 20, lr_schedule="cosine", weight_decay=0.01,
                    eval_fraction=0.02, **_common(plan, out, resume, seed))
    _check(run_sft(cfg), "sft (pretraining)")


def sft(out: Path, resume: bool, base: Path, data: Path, plan: DemoPlan, seed: int) -> None:
    """Prompt -> continuation with the loss on the continuation only (`prefalign sft`)."""
    from prefalign.stages.sft import run_sft
    cfg = SFTConfig(model=str(base), data=str(data), max_length=plan.max_length, max_steps=plan.sft_steps,
                    batch_size=plan.sft_batch, lr=plan.sft_lr, warmup_steps=plan.sft_steps // 10,
                    lr_schedule="cosine", eval_fraction=0.05, packing=plan.packing, **_tuning(plan),
                    **_common(plan, out, resume, seed))
    _check(run_sft(cfg), "sft")


def reward(out: Path, resume: bool, sft_model: Path, prefs: Path, plan: DemoPlan, seed: int) -> None:
    """A Bradley-Terry reward model initialised from the SFT model (`prefalign reward`)."""
    from prefalign.stages.reward import run_reward
    cfg = RewardConfig(model=str(sft_model), data=str(prefs), max_length=plan.max_length,
                       epochs=plan.reward_epochs, batch_size=plan.reward_batch, lr=plan.reward_lr,
                       warmup_ratio=0.05, lr_schedule="cosine", eval_fraction=0.05, packing=plan.packing,
                       **_tuning(plan), **_common(plan, out, resume, seed))
    _check(run_reward(cfg), "reward")


def dpo(out: Path, resume: bool, sft_model: Path, prefs: Path, beta: float, plan: DemoPlan, seed: int) -> None:
    """DPO on the labeler's pairs with the SFT model as reference (`prefalign dpo --beta`).

    The reference log-probs are cached next to the stages (OUTPUT/ref_cache), not in the user's
    cache folder: every beta reuses them and deleting OUTPUT removes everything the demo wrote."""
    from prefalign.stages.dpo import run_dpo
    cfg = DPOConfig(model=str(sft_model), data=str(prefs), beta=beta, max_length=plan.max_length,
                    epochs=plan.dpo_epochs, batch_size=plan.dpo_batch, lr=plan.dpo_lr, warmup_ratio=0.05,
                    lr_schedule="cosine", eval_fraction=0.05, ref_cache_dir=str(out.parent / "ref_cache"),
                    packing=plan.packing, **_tuning(plan), **_common(plan, out, resume, seed))
    _check(run_dpo(cfg), f"dpo --beta {beta}")


def ppo_segment(out: Path, resume: bool, start_model: Path, value_model: Optional[Path], sft_model: Path,
                reward_model: Path, prompts: Path, plan: DemoPlan, seed: int, reward_fn: Optional[str] = None) -> None:
    """`prefalign ppo` for plan.ppo_iterations iterations, continuing from the previous segment's
    policy and value model; the reference stays the SFT model, so KL keeps measuring the distance
    to pi_SFT. A constant learning rate makes consecutive segments one long run (only AdamW's
    moments restart), and each segment's output is an HF checkpoint of the policy. With LoRA each
    segment trains new adapters on the last merged policy; with a shared value head value_model is
    the last segment's value_head.pt folder. reward_fn (benchmarks/method_knobs.py: PPO against the gold
    reward) scores instead of the reward model, which then only starts the value model."""
    from prefalign.stages.ppo import run_ppo
    value = value_model or (reward_model if reward_fn else None)
    cfg = PPOConfig(model=str(start_model), ref_model=str(sft_model),
                    reward_model=None if reward_fn else str(reward_model), reward_fn=reward_fn,
                    value_model=str(value) if value else None, prompts=str(prompts),
                    iterations=plan.ppo_iterations, rollout_batch_size=plan.ppo_rollout_batch,
                    minibatch_size=plan.ppo_minibatch, ppo_epochs=plan.ppo_epochs, kl_coef=plan.ppo_kl_coef,
                    lr=plan.ppo_lr, lr_schedule="constant", max_new_tokens=plan.max_new_tokens,
                    missing_eos_penalty=plan.ppo_missing_eos_penalty,
                    score_cut_at_eos=plan.ppo_score_cut_at_eos and not reward_fn,
                    max_prompt_length=plan.max_length // 2, sample_every=plan.ppo_iterations,
                    shared_value_head=plan.shared_value_head, packing=plan.packing, **_tuning(plan),
                    **{**_common(plan, out, resume, seed), "save_steps": max(1, plan.ppo_iterations // 2),
                       "logging_steps": 1})
    _check(run_ppo(cfg), "ppo")


def group_segment(out: Path, resume: bool, estimator: str, start_model: Path, sft_model: Path, reward_model: Path,
                  prompts: Path, plan: DemoPlan, group: GroupPlan, seed: int) -> None:
    """`prefalign rloo` or `prefalign grpo` (estimator) for group.iterations iterations from start_model,
    against the reward model, with the SFT model as the KL reference; like PPO's segments, consecutive
    segments at a constant learning rate are checkpoints of one run (only AdamW's moments restart)."""
    from prefalign.stages.grpo import run_group
    config = {"rloo": RLOOConfig, "grpo": GRPOConfig}[estimator]
    cfg = config(model=str(start_model), ref_model=str(sft_model), reward_model=str(reward_model), prompts=str(prompts),
                 iterations=group.iterations, rollout_batch_size=group.prompts, num_generations=group.generations,
                 minibatch_size=group.minibatch, ppo_epochs=group.epochs, beta=group.beta, lr=group.lr,
                 missing_eos_penalty=group.missing_eos_penalty, score_cut_at_eos=group.score_cut_at_eos,
                 lr_schedule="constant", max_new_tokens=plan.max_new_tokens, max_prompt_length=plan.max_length // 2,
                 sample_every=group.iterations, packing=plan.packing, **_tuning(plan),
                 **{**_common(plan, out, resume, seed), "save_steps": max(1, group.iterations // 2),
                    "logging_steps": 1})
    _check(run_group(cfg), estimator)


# The lab's labeler as online DPO's judge: the gold reward as a reward function, Bradley-Terry at plan.tau.
GOLD_REWARD_FN = "prefalign.lab.gold:gold_reward_fn"


def online_dpo_segment(out: Path, resume: bool, start_model: Path, sft_model: Path, prompts: Path, plan: DemoPlan,
                       o: OnlineDPOPlan, seed: int) -> None:
    """`prefalign online-dpo` for o.iterations iterations from start_model, the SFT model as the DPO
    reference, judged by the lab's labeler itself: `--reward-fn` the gold reward and `--judge-temperature`
    plan.tau, so each pair is labelled with P = sigma((r*(y1) - r*(y2)) / tau) as the offline pairs are
    (offline DPO, too, learns from this labeler; PPO, RLOO and GRPO from the reward model). Segments at a
    constant learning rate are checkpoints of one run, as PPO's; sampled at temperature 1 as theirs."""
    from prefalign.stages.online_dpo import run_online_dpo
    cfg = OnlineDPOConfig(model=str(start_model), ref_model=str(sft_model), prompts=str(prompts),
                          reward_fn=GOLD_REWARD_FN, judge_temperature=plan.tau, beta=o.beta, lr=o.lr,
                          lr_schedule="constant", iterations=o.iterations, rollout_batch_size=o.prompts,
                          minibatch_size=o.minibatch, max_new_tokens=plan.max_new_tokens,
                          max_prompt_length=plan.max_length // 2, temperature=1.0, sample_every=o.iterations,
                          packing=plan.packing, **_tuning(plan),
                          **{**_common(plan, out, resume, seed), "save_steps": max(1, o.iterations // 2),
                             "logging_steps": 1})
    _check(run_online_dpo(cfg), "online-dpo")


def available(stage: str) -> bool:
    """Whether prefalign.stages.<stage> exists in this checkout (DPO and PPO landed later)."""
    import importlib.util
    return importlib.util.find_spec(f"prefalign.stages.{stage}") is not None
