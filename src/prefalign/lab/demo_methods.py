"""The methods `prefalign demo` trains: one entry each in METHODS, in the order they run.

Every method becomes a curve on the gold-reward-vs-KL plot, over its own knob:

  sweep     one run per setting, each from the SFT model (DPO: one run per beta)
  segments  one run cut into segments, each continuing the last one's policy (PPO, RLOO, GRPO, online
            DPO): the segments' outputs are checkpoints along training, each evaluated

Each setting is a stage (OUTPUT/<name>/) and an evaluation (OUTPUT/eval/<name>/). Adding a method
is one entry: its name (results.json's "method", the stage folders' prefix), the stage module it
needs (skipped, with a line in the log, where this checkout lacks it), its settings under a plan,
and a function that trains one setting with the same config dataclass its CLI command fills.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from prefalign.lab import demo_stages as S
from prefalign.lab.demo_plan import DemoPlan


@dataclass(frozen=True)
class Setting:
    stage: str                 # OUTPUT/<stage>/, also the evaluation's name
    knobs: dict                # what results.json's row records: {"beta": ...} and, for checkpoints, {"step": ...}
    header: str                # the stage's log line
    segment: int = 0           # 1, 2, ... for a method trained in segments (0 for a sweep)


# train(stage_dir, resume, run, setting, previous): run has .plan .seed .sft .reward .prefs .data (lab.demo.Run);
# previous is the last segment's stage folder (None for a sweep and for the first segment).
Train = Callable[[Path, bool, Any, Setting, Optional[Path]], None]


@dataclass(frozen=True)
class Method:
    name: str
    module: str                                  # prefalign.stages.<module>
    kind: str                                    # "sweep" | "segments"
    settings: Callable[[DemoPlan], list[Setting]]
    train: Train
    label: str                                   # legend and table name


def _lora(plan: DemoPlan) -> str:
    return f", LoRA r={plan.lora_r}" if plan.lora else ""


def _segments(name: str, n: int, iterations: int, describe: Callable[[int, int], str]) -> list[Setting]:
    """Segment k covers iterations (k-1) * iterations + 1 .. k * iterations; its knob is the last one."""
    return [Setting(f"{name}-{k}", {"step": k * iterations}, describe((k - 1) * iterations + 1, k * iterations), k)
            for k in range(1, n + 1)]


def dpo_settings(plan: DemoPlan) -> list[Setting]:
    return [Setting(f"dpo-beta{b:g}", {"beta": b}, f"DPO beta={b:g}, {plan.dpo_epochs:g} epoch(s){_lora(plan)}")
            for b in plan.dpo_betas]


def dpo_train(d: Path, resume: bool, run, setting: Setting, previous: Optional[Path]) -> None:
    S.dpo(d, resume, run.sft, run.prefs / "prefs.jsonl", setting.knobs["beta"], run.plan, run.seed)


def ppo_settings(plan: DemoPlan) -> list[Setting]:
    total = plan.ppo_segments * plan.ppo_iterations
    rows = _segments("ppo", plan.ppo_segments, plan.ppo_iterations,
                     lambda a, b: f"PPO iterations {a}-{b} of {total}, {plan.ppo_rollout_batch} prompts each, "
                                  f"kl_coef={plan.ppo_kl_coef:g}{_lora(plan)}")
    return [Setting(s.stage, {"beta": plan.ppo_kl_coef, **s.knobs}, s.header, s.segment) for s in rows]


def ppo_train(d: Path, resume: bool, run, setting: Setting, previous: Optional[Path]) -> None:
    """Each segment continues the last one's policy and value model (docs/demo.md)."""
    start, value = (run.sft, None) if previous is None else (previous, previous / "value_model")
    S.ppo_segment(d, resume, start, value, run.sft, run.reward, run.data / "prompts_train.jsonl", run.plan,
                  run.seed + setting.segment - 1)


def group_method(name: str, label: str) -> Method:
    """RLOO or GRPO (`prefalign rloo|grpo`), sized by the plan's GroupPlan of the same name."""
    def settings(plan: DemoPlan) -> list[Setting]:
        g = getattr(plan, name)
        total = g.segments * g.iterations
        rows = _segments(name, g.segments, g.iterations,
                         lambda a, b: f"{label} iterations {a}-{b} of {total}, {g.prompts} prompts x {g.generations} "
                                      f"completions each, beta={g.beta:g}{_lora(plan)}")
        return [Setting(s.stage, {"beta": g.beta, **s.knobs}, s.header, s.segment) for s in rows]

    def train(d: Path, resume: bool, run, setting: Setting, previous: Optional[Path]) -> None:
        S.group_segment(d, resume, name, run.sft if previous is None else previous, run.sft, run.reward,
                        run.data / "prompts_train.jsonl", run.plan, getattr(run.plan, name),
                        run.seed + setting.segment - 1)

    return Method(name, "grpo", "segments", settings, train, label)


def online_dpo_settings(plan: DemoPlan) -> list[Setting]:
    o = plan.online_dpo
    total = o.segments * o.iterations
    rows = _segments("online-dpo", o.segments, o.iterations,
                     lambda a, b: f"online DPO iterations {a}-{b} of {total}, {o.prompts} prompts x 2 completions "
                                  f"each, judged by the labeler (gold reward, tau={plan.tau:g}), beta={o.beta:g}"
                                  f"{_lora(plan)}")
    return [Setting(s.stage, {"beta": o.beta, **s.knobs}, s.header, s.segment) for s in rows]


def online_dpo_train(d: Path, resume: bool, run, setting: Setting, previous: Optional[Path]) -> None:
    """Each segment continues the last one's policy; the reference stays SFT (docs/demo.md)."""
    S.online_dpo_segment(d, resume, run.sft if previous is None else previous, run.sft,
                         run.data / "prompts_train.jsonl", run.plan, run.plan.online_dpo,
                         run.seed + setting.segment - 1)


METHODS: list[Method] = [
    Method("dpo", "dpo", "sweep", dpo_settings, dpo_train, "DPO"),
    Method("ppo", "ppo", "segments", ppo_settings, ppo_train, "PPO"),
    group_method("rloo", "RLOO"),
    group_method("grpo", "GRPO"),
    Method("online-dpo", "online_dpo", "segments", online_dpo_settings, online_dpo_train, "online DPO"),
]


def in_pool(setting: Setting, n_segments: int, plan: DemoPlan) -> bool:
    """Whether a setting's evaluation samples join the frontier's pool: every sweep setting; of a method
    trained in n_segments segments, the checkpoints plan.frontier_pool_checkpoints names and the last."""
    return setting.segment in (0, n_segments) or setting.segment in plan.frontier_pool_checkpoints
