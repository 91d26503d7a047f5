"""Times the training loop of a transformers Trainer from the end of a warm-up step to the
end of the last step, and counts the real tokens of the timed steps.

Model loading, data preparation and the first (warm-up) steps are left out, so the number
compares loop against loop. cpu_s is the process's CPU time (all threads) over the same steps:
on a machine shared with other work it measures the work done rather than the wait for a core. The callback reads the trainer's own running token count
(``_total_train_tokens``: attention_mask.sum() for padded batches, the flattened length for
padding-free ones), i.e. the non-pad tokens fed to the model.
"""
import argparse
import tempfile
import time

from transformers import TrainerCallback


def peer_args(lr: float, extra=()) -> argparse.Namespace:
    """The options every peer script takes: FIXTURE_DIR [--steps N] [--batch B] [--max-length L]
    [--lr LR] [--warmup-steps K] [--out DIR] (a temporary directory by default)
    [--gradient-checkpointing] [--device cpu|cuda] [--bf16], plus ``extra``: (flag, add_argument kwargs)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("fx")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at the start")
    ap.add_argument("--out", default=None)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="TRL's gradient_checkpointing (its configs default to True; off unless given here)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (TRL's bf16=True; GPU runs)")
    for flag, kw in extra:
        ap.add_argument(flag, **kw)
    a = ap.parse_args()
    a.out = a.out or tempfile.mkdtemp()
    return a


def precision_args(a) -> dict:
    """The TrainingArguments that --device, --bf16 and --gradient-checkpointing set."""
    return {"use_cpu": a.device == "cpu", "bf16": a.bf16, "fp16": False,
            "gradient_checkpointing": a.gradient_checkpointing}


class StepTimer(TrainerCallback):
    def __init__(self, warmup: int):
        self.warmup = warmup
        self.trainer = None  # set after the trainer is built
        self.t0 = self.t1 = self.cpu0 = self.cpu1 = None
        self.tokens0 = self.tokens1 = 0

    def on_step_end(self, args, state, control, **kw):
        tokens = self.trainer._total_train_tokens
        if state.global_step == self.warmup:
            self.t0, self.cpu0, self.tokens0 = time.perf_counter(), time.process_time(), tokens
        self.t1, self.cpu1, self.tokens1 = time.perf_counter(), time.process_time(), tokens

    def summary(self, steps: int) -> dict:
        timed = steps - self.warmup
        wall = self.t1 - self.t0
        import torch
        gpu = {"peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 1e9} if torch.cuda.is_available() else {}
        return {"timed_steps": timed, "wall_s": wall, "cpu_s": self.cpu1 - self.cpu0, "tokens": self.tokens1 - self.tokens0,
                "tokens_per_s": (self.tokens1 - self.tokens0) / wall, "s_per_step": wall / timed, **gpu}


def result_line(name: str, steps: int, extra: dict) -> str:
    return name + f" steps={steps} " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in extra.items())
