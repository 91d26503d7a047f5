"""Peer baseline: TRL's GRPOTrainer or RLOOTrainer on a fixture from make_fixture.py, CPU, fp32, no vLLM.

usage: python trl_online.py FIXTURE_DIR --trainer grpo|rloo --reward-fn FILE.py:FUNCTION [--iterations N]
       [--prompts-per-iteration P] [--num-generations K] [--minibatch-size M] [--ppo-epochs E]
       [--max-new-tokens L] [--lr LR] [--beta B] [--out DIR]

One "iteration" is prefalign's: P prompts, K completions each (one generate call of P*K rows), then E
passes of (P*K)/M optimizer steps of M completions. In TRL's names: generation_batch_size = P*K,
per_device_train_batch_size = M, gradient_accumulation_steps = 1, steps_per_generation = P*K/M,
num_iterations = E, max_steps = N * E * P*K/M. The model is given as a path, so TRL loads it (and its
reference when beta > 0) itself; the final model is saved, as prefalign does. Prints one JSON line
{"tool": "trl", "trainer", "optimizer_steps", "generations", "train_s", "completion_tokens", ...}.
"""
import argparse
import importlib.util
import json
import os
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback

ap = argparse.ArgumentParser()
ap.add_argument("fx", help="fixture directory (model/, pairs.jsonl)")
ap.add_argument("--trainer", choices=("grpo", "rloo"), required=True, help="GRPOTrainer or RLOOTrainer")
ap.add_argument("--reward-fn", required=True, help="FILE.py:FUNCTION, called as fn(prompts, completions, **kw)")
ap.add_argument("--iterations", type=int, default=8, help="generations (rollouts) of P*K completions")
ap.add_argument("--prompts-per-iteration", type=int, default=8, help="P, prompts per generation batch")
ap.add_argument("--num-generations", type=int, default=4, help="K, completions per prompt")
ap.add_argument("--minibatch-size", type=int, default=16, help="M, completions per optimizer step")
ap.add_argument("--ppo-epochs", type=int, default=1, help="E, TRL's num_iterations")
ap.add_argument("--max-new-tokens", type=int, default=32, help="max_completion_length")
ap.add_argument("--lr", type=float, default=1e-5, help="learning_rate")
ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model)")
ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
a = ap.parse_args()
a.out = a.out or tempfile.mkdtemp()

path, name = a.reward_fn.rsplit(":", 1)
spec = importlib.util.spec_from_file_location("bench_reward", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
reward_fn = getattr(module, name)

if a.trainer == "grpo":
    from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    extra = {"loss_type": "dapo", "scale_rewards": "group"}  # prefalign grpo's defaults: token mean, group std
else:
    from trl import RLOOConfig as Config, RLOOTrainer as Trainer
    extra = {"normalize_advantages": False}  # plain leave-one-out, as prefalign rloo (--scale-rewards none)

completions = a.prompts_per_iteration * a.num_generations
steps_per_generation = completions // a.minibatch_size
max_steps = a.iterations * a.ppo_epochs * steps_per_generation
mdir = os.path.join(a.fx, "model")
prompts = [json.loads(line)["prompt"] for line in open(os.path.join(a.fx, "pairs.jsonl"))]
cfg = Config(output_dir=a.out, per_device_train_batch_size=a.minibatch_size, gradient_accumulation_steps=1,
             steps_per_generation=steps_per_generation, num_generations=a.num_generations,
             max_completion_length=a.max_new_tokens, num_iterations=a.ppo_epochs, max_steps=max_steps,
             learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
             beta=a.beta, epsilon=0.2, temperature=1.0, top_p=1.0, top_k=0, use_vllm=False,
             gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
             model_init_kwargs={"dtype": torch.float32}, logging_steps=1, save_strategy="no", report_to=[],
             disable_tqdm=True, seed=0, dataloader_num_workers=0, **extra)


class Clock(TrainerCallback):
    """Seconds from the start of training to its end (model loading and set-up excluded)."""

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        self.t1 = time.perf_counter()


clock = Clock()
tok = AutoTokenizer.from_pretrained(mdir, padding_side="left")
trainer = Trainer(model=mdir, reward_funcs=reward_fn, args=cfg, processing_class=tok,
                  train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[clock])
trainer.train()
trainer.save_model(os.path.join(a.out, "model"))
logs = [row for row in trainer.state.log_history if "num_tokens" in row or "reward" in row]
last = logs[-1] if logs else {}
print(json.dumps({"tool": "trl", "trainer": a.trainer, "optimizer_steps": trainer.state.global_step,
                  "generations": max_steps // (a.ppo_epochs * steps_per_generation), "train_s": clock.t1 - clock.t0,
                  "num_tokens": last.get("num_tokens"), "mean_length": last.get("completions/mean_length"),
                  "reward": last.get("reward")}), flush=True)
