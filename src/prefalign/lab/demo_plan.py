"""How big each step of `prefalign demo` is: one DemoPlan per base and size (default and --quick).

Every number a run depends on lives here, so a reader can see the whole experiment's scale at
once and results.json can record it (``settings``). Sizes were chosen by timing on 2 shared CPU
cores (docs/demo.md gives the measured wall times).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class GroupPlan:
    """One critic-free online method (`prefalign rloo` / `prefalign grpo`) trained in segments, each
    continuing the last from its policy: one evaluated checkpoint per segment (segments = 0: not run).
    A rollout is prompts x generations completions; beta is the KL coefficient (RLOO: in the reward,
    the sequence's summed log-ratio, as PPO's kl_coef; GRPO: k3 per token in the loss).

    The stages sample all of a rank's prompts in one generate call (rollout.sample_groups; each
    group's draws from its own generator, so they do not depend on the batch). The sizes below were
    chosen when the stages still made one sampling call per prompt (default model, load average 6:
    16 prompts x 4 took 11-20 s to sample, 4 s to update; 8 x 8 halved the calls), so a rollout now
    costs less than docs/demo.md's timings of the default run."""
    segments: int = 5
    iterations: int = 12                 # per segment
    prompts: int = 8                     # per rollout, each sampled `generations` times
    generations: int = 8                 # K
    minibatch: int = 32                  # completions per optimizer step
    epochs: int = 2                      # passes over each rollout
    beta: float = 0.2
    lr: float = 5e-5
    # Subtracted from the reward model's score of a completion cut at max_new_tokens, as PPO's
    # (DemoPlan.ppo_missing_eos_penalty): without it GRPO drifted to the length cap in the default run
    # of 2026-12-02 (EOS share 0.30 -> 0.07, KL 21 nats after 60 iterations).
    missing_eos_penalty: Optional[float] = 1.0
    # The reward model scores a completion cut at max_new_tokens with an EOS after it, as PPO's
    # (DemoPlan.ppo_score_cut_at_eos).
    score_cut_at_eos: bool = True


@dataclass(frozen=True)
class OnlineDPOPlan:
    """`prefalign online-dpo` trained in segments like GroupPlan (segments = 0: not run). Each iteration
    samples two completions of each of `prompts` prompts; the judge is the lab's own labeler, the gold
    reward (`--reward-fn prefalign.lab.gold:gold_reward_fn`) with `--judge-temperature` = the plan's tau,
    so P(y1 > y2) = sigma((r*(y1) - r*(y2)) / tau) as for the offline pairs, and like offline DPO's
    target its fixed point is the optimum at tau * beta. minibatch: pairs per optimizer step.
    The class default is PPO's sampling budget of 2026-12-02 (64 completions per iteration; DemoPlan's
    default takes 512 pairs since 2026-12-04). Measured on the default run's SFT model (2026-12-02, load
    average 2.4-3.7): 32 prompts x 2 took 2.0-4.6 s per iteration (rollout 1.0-3.0 s, update 0.7-2.0 s;
    20 iterations in 71 s), the rollouts' gold reward rising from 0.57 to 0.62-0.67 at KL 1.3 after 20
    iterations with beta 0.3, lr 1e-4."""
    segments: int = 5
    iterations: int = 12                 # per segment
    prompts: int = 32                    # pairs per rollout (64 completions)
    minibatch: int = 16                  # pairs per optimizer step
    beta: float = 0.3
    lr: float = 1e-4


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
    # Labelled pairs per training prompt: reward-model accuracy grows with pairs. 2 until 2026-12-04; 4 raised the
    # reward model's accuracy on its eval split from 0.753 to 0.797 (docs/demo.md); offline DPO learns from them.
    # 8 (measured 2026-12-04, seed 0): accuracy 0.789 (gold order 0.852), DPO beta 3 0.63 at KL 2.89 (4 pairs' beta 0.5:
    # 0.64 at KL 2.79), for 9 more minutes of preferences, reward and DPO (benchmarks/results/*-screen-pairs8.txt).
    pairs_per_prompt: int = 4
    reward_epochs: float = 1.5
    reward_batch: int = 16
    reward_lr: float = 5e-4
    # --- DPO: one run per beta
    # (0.3, 1, 3) until 2026-12-04: beta 1 landed at KL 1.9-2.2 and 0.3 at 4.05, past the frontier's trusted 3.2-3.3,
    # so the curve had no point between them to measure DPO inside the range
    # (0.3, 0.5, 1, 3) until 2026-12-07: beta 3 landed at KL 0.77-0.79 with a share of 0.49-0.51, the curve's
    # low end that pi_SFT's own samples already cover; its 4.1-4.4 minutes pay for RLOO's and GRPO's sixth segment
    dpo_betas: tuple[float, ...] = (0.3, 0.5, 1.0)
    # 1 epoch at lr 1e-4 until 2026-12-04: beta 0.5 then reached 0.64 of the optimum's gain at KL 2.79 (seed 0), beta 1
    # 0.55 at 1.91; 2 epochs at 5e-5 gave beta 0.5 0.68 at KL 1.95 (benchmarks/method_knobs.py --method dpo;
    # a batch of 64 at lr 2e-4 for 1 epoch 0.63 at 2.95), a gentler path to a point nearer the optimum
    dpo_epochs: float = 2.0
    dpo_batch: int = 16
    # 2e-4 until 2026-12-03: every beta then landed at KL 4.6-8.2 (beta 3 aims at KL 0.26), past the
    # frontier's trusted range; 5e-5 for 1 epoch landed at KL 0.3-0.8; 1e-4 until 2026-12-04 (docs/demo.md).
    dpo_lr: float = 5e-5
    # --- PPO: segments of iterations, each continuing the last; one evaluated checkpoint per segment
    ppo_segments: int = 5
    # 12 per segment until 2026-12-03; with kl_coef 0.5 PPO's gold still rose at equal KL past 60 iterations
    ppo_iterations: int = 24             # per segment
    # 64 / 32 until 2026-12-04: a rollout twice as large with minibatches twice as large (the same optimizer
    # steps, each on a gradient half as noisy) moved RLOO, GRPO and online DPO nearer the frontier at equal KL
    # (benchmarks/method_knobs.py, docs/demo.md); PPO the same, so each method still samples as many completions.
    # 256 / 128 (2026-12-08, seed 0, PPO on the gold reward, benchmarks/method_knobs.py): share 0.82 against 0.75 at
    # iteration 120, at 1.9x the stage's time (about 4.5 minutes more); not yet run as the plan on two seeds.
    ppo_rollout_batch: int = 128
    ppo_minibatch: int = 64
    ppo_epochs: int = 2
    # 0.2 until 2026-12-03: at its KL PPO then reached a third of the reward-model gain its own objective's
    # optimum has (benchmarks/rm_optimum.py); 0.5 pulls back the KL its noisy updates spend (docs/demo.md)
    ppo_kl_coef: float = 0.5
    ppo_lr: float = 5e-5
    # Subtracted from the reward model's score of a completion cut at max_new_tokens: the demo's reward
    # model scores cut completions higher than the same text ending in EOS, and without this PPO drifts
    # to the length cap (docs/ppo-length.md: EOS share 0.89 with it, 0.25 without, equal gold at equal KL).
    ppo_missing_eos_penalty: float = 1.0
    # The reward model scores a completion cut at max_new_tokens as an ended text, with an EOS after it
    # (--score-cut-at-eos): scored at its last word token, an input it never saw in training, the reward
    # model of the 2026-12-03 default run gave the same text +3.6 more without its EOS (sd of its scores
    # 3.3), the penalty of 1.0 did not outweigh it, and PPO's EOS share fell 0.75 -> 0.01. Over 24 PPO
    # iterations from SFT (docs/ppo-length.md): EOS 0.02, gold 0.703 at KL 4.0 with the penalty alone;
    # EOS 0.71, gold 0.681 at KL 1.1 with both.
    ppo_score_cut_at_eos: bool = True
    # --- RLOO and GRPO: as PPO, segments continuing the last, at PPO's completions per iteration
    # beta 0.2 / 0.04 and 12 iterations per segment until 2026-12-03 (GRPO's KL then ran to 15-20 nats, and
    # to 8-13 at beta 0.1). GRPO's advantage is the reward over the group's std (~1.7 here) and its k3 is
    # averaged over the same tokens, so its beta 0.3 is about RLOO's 0.5 in reward units.
    # 8 prompts x 8, minibatch 32 until 2026-12-04: at 72 iterations RLOO's share of the optimum's gain was 0.47
    # at KL 2.17 and GRPO's 0.48 at 1.77; 16 x 8 with minibatch 64 (the same optimizer steps) 0.59 at 2.08 and
    # 0.59 at 1.72; 16 x 4 with minibatch 32 changed nothing measurable (benchmarks/method_knobs.py).
    # 5 segments until 2026-12-07: both still rose at iteration 120 (seed 0 from 96 to 120: RLOO 0.64 -> 0.69 at
    # KL 2.62, GRPO 0.63 -> 0.67 at 2.69; trusted to 3.47), a segment costs 0.7-0.9 minutes a method with its
    # evaluation.
    rloo: GroupPlan = GroupPlan(segments=6, beta=0.5, iterations=24, prompts=16, generations=8, minibatch=64)
    grpo: GroupPlan = GroupPlan(segments=6, beta=0.3, iterations=24, prompts=16, generations=8, minibatch=64)
    # --- online DPO: segments as RLOO/GRPO, judged by the labeler itself (gold reward, tau)
    # 32 pairs per iteration, minibatch 16 until 2026-12-04: 60 iterations saw 1,920 pairs (offline DPO sees 8,000)
    # and reached share 0.23 at KL 1.77; 128 pairs (minibatch 32) 0.34 at KL 1.78, 256 (minibatch 64) 0.47 at
    # KL 1.80 (benchmarks/method_knobs.py). 256 (minibatch 64) until 2026-12-04 (later that day): on seed 0's run its
    # best share inside the trusted range was 0.63 (KL 3.07); 512 pairs (minibatch 128) 0.69 at KL 2.38, 0.73 at 2.84
    # and 0.74 at 3.19 (benchmarks/method_knobs.py, docs/demo.md). An iteration is cheap next to the others' (no reward
    # model, no value).
    online_dpo: OnlineDPOPlan = OnlineDPOPlan(prompts=512, minibatch=128)
    # --- evaluation
    eval_samples_per_prompt: int = 4     # samples per held-out prompt per policy (for KL and gold)
    frontier_samples: int = 256          # SFT samples per held-out prompt for the optimum and best-of-n
    # All of them join the frontier's pool with every policy's evaluation samples; the pooled samples whose
    # gold reward reaches that of the prompt's frontier_pool_sft-th best SFT sample are scored under pi_SFT
    # and every policy, the rest count as pi_SFT's alone (lab.demo_frontier): the forwards grow with this.
    frontier_pool_sft: int = 32
    # Which checkpoints (segment numbers) of every method trained in segments (PPO, RLOO, GRPO) join the
    # pool besides each one's last: each proposal adds a forward of every pooled sample, so not all of
    # them (the others are still evaluated and plotted). Every DPO beta joins.
    frontier_pool_checkpoints: tuple[int, ...] = ()
    best_of_n: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)
    frontier_betas: tuple[float, ...] = field(default=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                                                       0.2, 0.3, 0.5, 1.0, 3.0))
    shown_prompts: int = 6               # side-by-side samples in the report
    save_steps: int = 200                # checkpoint period of the training stages (resume)
    # --- the base policy, and how the training stages run on it (fields added for --base smollm2;
    # see ``recorded``). A tiny base is built and pretrained here; a smollm2 base is loaded, and
    # the pretraining fields above are then 0. sft_steps = 0 skips SFT: the base is the reference.
    base: str = "tiny"
    lora: bool = False                   # SFT, reward, DPO and PPO train LoRA adapters (outputs are merged)
    lora_r: int = 16                     # LoRA rank; alpha = 2 r
    packing: bool = False                # padding-free rows in SFT, reward, DPO and PPO
    shared_value_head: bool = False      # PPO's value head on the policy backbone, not a second model

    def __post_init__(self):
        if not 1 <= self.frontier_pool_sft <= self.frontier_samples:
            raise ValueError(f"plan {self.name}: frontier_pool_sft = {self.frontier_pool_sft} must be in "
                             f"[1, frontier_samples = {self.frontier_samples}]")

    @property
    def base_params_hint(self) -> str:
        if self.base == "smollm2":
            return "SmolLM2-135M-Instruct (134.5 M parameters" + (f", LoRA r={self.lora_r})" if self.lora else ")")
        return f"Llama {self.layers} layers x {self.hidden} hidden"


def recorded(plan: DemoPlan) -> dict:
    """The plan as OUTPUT/plan.json records it: every field, except those added later (for --base
    smollm2, the frontier's pool, RLOO, GRPO and online DPO) while they hold their defaults or name a method that
    does not run (RLOO, GRPO and online DPO are recorded whenever they run: their defaults changed), so output
    folders of runs made before them still match (a stage that lacks what a later one needs says to delete it;
    a method added later just runs its stages)."""
    later = {"base", "lora", "lora_r", "packing", "shared_value_head", "frontier_pool_sft", "rloo", "grpo",
             "frontier_pool_checkpoints", "online_dpo"}
    defaults = {f.name: f.default for f in dataclasses.fields(DemoPlan)}

    def inert(k: str) -> bool:   # holds its default, or is a method that does not run (no stage of it exists)
        value = getattr(plan, k)
        if isinstance(value, (GroupPlan, OnlineDPOPlan)) and value.segments == 0:
            return True
        # RLOO and GRPO trained without an EOS penalty before GroupPlan.missing_eos_penalty, online DPO on 32
        # pairs per iteration before 2026-12-04: a running method is recorded, so a folder of theirs made
        # before is refused rather than mixed
        return value == defaults[k] and not isinstance(value, (GroupPlan, OnlineDPOPlan))
    # ppo_score_cut_at_eos: recorded when on (the default since 2026-12-03, so older default folders are
    # refused), left out when off (how every plan trained before it, so their folders still match)
    return {k: v for k, v in dataclasses.asdict(plan).items()
            if (k not in later or not inert(k)) and not (k == "ppo_score_cut_at_eos" and not v)}


DEFAULT = DemoPlan(name="default")

QUICK = dataclasses.replace(
    DEFAULT, name="quick", pretrain_reviews=6000, train_prompts=1200, heldout_prompts=64, vocab_size=1500,
    hidden=64, layers=2, heads=2, pretrain_steps=400, pretrain_lr=2e-3, sft_steps=80, sft_lr=5e-4,
    max_new_tokens=32, pairs_per_prompt=2, reward_epochs=2.0, reward_lr=1e-3, dpo_betas=(1.0,), dpo_lr=5e-4,
    dpo_epochs=1.0,
    ppo_segments=2, ppo_iterations=8, ppo_rollout_batch=64, ppo_minibatch=32, ppo_epochs=4, ppo_kl_coef=0.2,
    ppo_lr=2e-4,
    rloo=GroupPlan(segments=2, iterations=8, prompts=4, generations=8, minibatch=16, epochs=4, beta=0.2, lr=2e-4),
    grpo=GroupPlan(segments=2, iterations=8, prompts=4, generations=8, minibatch=16, epochs=4, beta=0.04, lr=2e-4),
    online_dpo=OnlineDPOPlan(segments=2, iterations=8, prompts=32, minibatch=16, beta=1.0, lr=2e-4),
    eval_samples_per_prompt=8, frontier_samples=32, frontier_pool_sft=32, frontier_pool_checkpoints=(2,),
    best_of_n=(4, 16), shown_prompts=4, save_steps=100)

# SmolLM2-135M-Instruct as the base: no pretraining (the pretraining fields are 0), a short LoRA SFT,
# then every stage with LoRA. Sized from per-step timings on the 2-core build machine (docs/demo.md).
SMOLLM2 = dataclasses.replace(
    DEFAULT, name="smollm2", base="smollm2", lora=True, lora_r=16, packing=True, shared_value_head=True,
    pretrain_reviews=0, vocab_size=0, hidden=0, layers=0, heads=0, pretrain_steps=0, pretrain_batch=0,
    pretrain_length=0, pretrain_lr=0.0,
    train_prompts=512, heldout_prompts=32, sft_steps=40, sft_batch=8, sft_lr=1e-3, max_length=128, max_new_tokens=32,
    pairs_per_prompt=2, reward_epochs=1.0, reward_batch=8, reward_lr=5e-4,
    dpo_betas=(0.1, 0.5), dpo_epochs=1.0, dpo_batch=8, dpo_lr=5e-4,
    ppo_segments=3, ppo_iterations=8, ppo_rollout_batch=32, ppo_minibatch=8, ppo_epochs=2, ppo_kl_coef=0.1,
    ppo_lr=2e-4, rloo=GroupPlan(segments=0), grpo=GroupPlan(segments=0), online_dpo=OnlineDPOPlan(segments=0),
    ppo_score_cut_at_eos=False,   # as measured on 2026-11-28 (docs/demo.md): not rerun with it
    eval_samples_per_prompt=8, frontier_samples=64, frontier_pool_sft=16, best_of_n=(2, 4, 8, 16, 32),
    shown_prompts=6, save_steps=20)

# The same recipe in a few minutes; the tests run it with a tiny stand-in for SmolLM2 (--base-model).
SMOLLM2_QUICK = dataclasses.replace(
    SMOLLM2, name="smollm2-quick", train_prompts=32, heldout_prompts=8, sft_steps=4, pairs_per_prompt=1,
    dpo_betas=(0.5,), ppo_segments=2, ppo_iterations=2, ppo_rollout_batch=8, ppo_minibatch=4, max_new_tokens=16,
    eval_samples_per_prompt=2, frontier_samples=8, frontier_pool_sft=8, best_of_n=(2, 4), shown_prompts=2,
    save_steps=10)

PLANS = {("tiny", False): DEFAULT, ("tiny", True): QUICK, ("smollm2", False): SMOLLM2, ("smollm2", True): SMOLLM2_QUICK}


def plan_for(quick: bool, base: str = "tiny") -> DemoPlan:
    return PLANS[(base, quick)]
