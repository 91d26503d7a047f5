"""Peer baseline: TRL SFTTrainer with packing on a fixture from make_fixture.py, CPU, fp32.

usage: python trl_sft.py FIXTURE_DIR [--steps N] [--batch B] [--max-length L] [--lr LR] [--warmup-steps K]
                        [--layout packing|padded|padding-free] [--gradient-checkpointing] [--device D] [--bf16]
The data are the fixture's pairs as {prompt, completion=chosen} rows (completion-only loss). --layout
packing (the default here): packed best-fit-decreasing into rows of --max-length tokens (TRL then runs
padding-free); padded: TRL's default (one example per row, padded); padding-free: one batch of
examples flattened into one row (padding_free=True, same examples per step as padded; TRL then
refuses max_length, so the data must already fit it, as benchmarks/real_model.py's do).
Prints a final line:
'trl_sft steps=N timed_steps=M wall_s=... tokens=... tokens_per_s=... s_per_step=... loss=...'
timing the steps after the first K (model loading and warm-up excluded).
"""
import json, os

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from steptimer import StepTimer, peer_args, precision_args, result_line

LAYOUTS = {"packing": {"packing": True}, "padded": {"packing": False}, "padding-free": {"padding_free": True}}
a = peer_args(lr=2e-5, extra=[("--layout", {"choices": list(LAYOUTS), "default": "packing"})])

torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(os.path.join(a.fx, "model"))
model = AutoModelForCausalLM.from_pretrained(os.path.join(a.fx, "model"), dtype=torch.float32).to(a.device)
with open(os.path.join(a.fx, "pairs.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
cfg = SFTConfig(output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=a.lr,
                lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, logging_steps=a.steps,
                save_strategy="no", eval_strategy="no", report_to=[], **precision_args(a),
                max_length=None if a.layout == "padding-free" else a.max_length, completion_only_loss=True, **LAYOUTS[a.layout],
                dataloader_num_workers=0, seed=0, disable_tqdm=True)
timer = StepTimer(a.warmup_steps)
tr = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
timer.trainer = tr
out = tr.train()
print(result_line("trl_sft", a.steps, {**timer.summary(a.steps), "rows": len(tr.train_dataset),
                                       "loss": out.training_loss}), flush=True)
