"""Peer baseline: TRL DPOTrainer on a fixture directory (model/ and pairs.jsonl), timed like the other peers.

usage: python trl_dpo.py FIXTURE_DIR [--steps N] [--batch B] [--max-length L] [--lr LR] [--warmup-steps K]
                        [--precompute] [--padding-free] [--gradient-checkpointing] [--device D] [--bf16]
The reference is a second copy of the policy (TRL's default when ref_model is None), scored live
per batch unless --precompute (precompute_ref_log_probs=True). --padding-free flattens each batch
into one row (padding_free=True). Prints a final line:
'trl_dpo steps=N timed_steps=M wall_s=... cpu_s=... tokens=... tokens_per_s=... s_per_step=... loss=...'
timing the steps after the first K. (../shared/bench/trl_dpo.py, read-only, times the whole
train() call and has neither padding_free nor gradient checkpointing.)
"""
import os

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from steptimer import StepTimer, peer_args, precision_args, result_line

a = peer_args(lr=1e-6, extra=[("--precompute", {"action": "store_true"}), ("--padding-free", {"action": "store_true"})])

torch.manual_seed(0)
path = os.path.join(a.fx, "model")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(a.device)
ds = load_dataset("json", data_files=os.path.join(a.fx, "pairs.jsonl"), split="train")
cfg = DPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=a.lr,
                lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, logging_steps=a.steps, beta=0.1,
                save_strategy="no", eval_strategy="no", report_to=[], **precision_args(a), max_length=a.max_length,
                precompute_ref_log_probs=a.precompute, padding_free=a.padding_free,
                dataloader_num_workers=0, seed=0, disable_tqdm=True)
timer = StepTimer(a.warmup_steps)
tr = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
timer.trainer = tr
out = tr.train()
print(result_line("trl_dpo", a.steps, {**timer.summary(a.steps), "loss": out.training_loss}), flush=True)
