"""How big each step of `prefalign demo` is: one DemoPlan per size (default and --quick).

Every number a run depends on lives here, so a reader can see the whole experiment's scale at
once and results.json can record it (``settings``). Sizes were chosen by timing on 2 shared CPU
cores (docs/demo.md gives the measured wall times).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DemoPlan:
    name: str
    # --- corpus and base model
    pretrain_reviews: int = 20000        # {text} rows the base model is pretrained on
    train_prompts: int = 4000            # reviews cut into SFT rows and preference prompts
    heldout_prompts: int = 200           # prompts no training step sees; every method is evaluated on them
    vocab_size: int = 3000
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    # --- pretraining (run_sft on {text}, packed) and SFT (run_sft on prompt -> continuation)
    pretrain_steps: int = 1000
    pretrain_batch: int = 8              # packed rows of pretrain_length tokens
    pretrain_length: int = 256
    pretrain_lr: float = 1e-3
    sft_steps: int = 200
    sft_batch: int = 16
    sft_lr: float = 2e-4
    max_length: int = 128                # prompt + completion tokens in every later stage
    max_new_tokens: int = 48             # sampled completion length (a review is ~46 tokens)
    # --- preferences and the reward model
    tau: float = 0.1                     # labeler noise: P(y1 > y2) = sigma((r*(y1) - r*(y2)) / tau)
    pairs_per_prompt: int = 2            # labelled pairs per training prompt: reward-model accuracy grows with pairs
    reward_epochs: float = 1.5
    reward_batch: int = 16
    reward_lr: float = 5e-4
    # --- DPO: one run per beta
    dpo_betas: tuple[float, ...] = (0.3, 1.0, 3.0)
    dpo_epochs: float = 1.0
    dpo_batch: int = 16
    dpo_lr: float = 2e-4
    # --- PPO: segments of iterations, each continuing the last; one evaluated checkpoint per segment
    ppo_segments: int = 5
    ppo_iterations: int = 12             # per segment
    ppo_rollout_batch: int = 64
    ppo_minibatch: int = 32
    ppo_epochs: int = 2
    ppo_kl_coef: float = 0.2
    ppo_lr: float = 5e-5
    # --- evaluation
    eval_samples_per_prompt: int = 4     # samples per held-out prompt per policy (for KL and gold)
    frontier_samples: int = 256          # SFT samples per held-out prompt for the optimum and best-of-n
    best_of_n: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)
    frontier_betas: tuple[float, ...] = field(default=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                                                       0.2, 0.3, 0.5, 1.0, 3.0))
    shown_prompts: int = 6               # side-by-side samples in the report
    save_steps: int = 200                # checkpoint period of the training stages (resume)

    @property
    def base_params_hint(self) -> str:
        return f"Llama {self.layers} layers x {self.hidden} hidden"


DEFAULT = DemoPlan(name="default")

QUICK = dataclasses.replace(
    DEFAULT, name="quick", pretrain_reviews=6000, train_prompts=1200, heldout_prompts=64, vocab_size=1500,
    hidden=64, layers=2, heads=2, pretrain_steps=400, pretrain_lr=2e-3, sft_steps=80, sft_lr=5e-4,
    max_new_tokens=32, reward_epochs=2.0, reward_lr=1e-3, dpo_betas=(1.0,), dpo_lr=5e-4,
    ppo_segments=2, ppo_iterations=8, ppo_epochs=4, ppo_lr=2e-4, eval_samples_per_prompt=8, frontier_samples=32,
    best_of_n=(4, 16), shown_prompts=4, save_steps=100)

def plan_for(quick: bool) -> DemoPlan:
    return QUICK if quick else DEFAULT
