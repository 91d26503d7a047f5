"""Peer baseline: TRL RewardTrainer on a fixture from make_fixture.py, CPU, fp32.

usage: python trl_reward.py FIXTURE_DIR [--steps N] [--batch B] [--max-length L] [--lr LR] [--warmup-steps K]
                           [--gradient-checkpointing] [--device D] [--bf16]
The model is AutoModelForSequenceClassification(num_labels=1) on the fixture's causal LM; the
batch is B pairs (2B sequences in one padded forward). Prints a final line:
'trl_reward steps=N timed_steps=M wall_s=... tokens=... tokens_per_s=... s_per_step=... pairs_per_s=... loss=...'
timing the steps after the first K (model loading and warm-up excluded).
"""
import os

import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from steptimer import StepTimer, peer_args, precision_args, result_line

a = peer_args(lr=1e-5)

torch.manual_seed(0)
path = os.path.join(a.fx, "model")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32).to(a.device)
ds = load_dataset("json", data_files=os.path.join(a.fx, "pairs.jsonl"), split="train")
cfg = RewardConfig(output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=a.lr,
                   lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, logging_steps=a.steps,
                   save_strategy="no", eval_strategy="no", report_to=[], **precision_args(a), max_length=a.max_length, dataloader_num_workers=0, seed=0,
                   disable_tqdm=True)
timer = StepTimer(a.warmup_steps)
tr = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
timer.trainer = tr
out = tr.train()
s = timer.summary(a.steps)
s["pairs_per_s"] = a.batch * s["timed_steps"] / s["wall_s"]
print(result_line("trl_reward", a.steps, {**s, "loss": out.training_loss}), flush=True)
