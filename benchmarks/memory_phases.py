"""Where a prefalign run's peak memory comes from: resident memory per phase of one CLI run.

usage: python benchmarks/memory_phases.py [--every-ms 5] -- sft --model ... (any prefalign command)

Runs the command in this process with a thread sampling RSS (psutil) every --every-ms, and marks
phases by wrapping what every stage calls: the setup (imports, load, tokenising, reference
precompute) with step 1's forward (everything before the first backward), then per optimizer step
the forward (up to
``Tensor.backward``), the backward and ``AdamW.step``, and the final save
(``save_model_final``). Prints each phase's peak and the weights / gradients / AdamW-state sizes
the model implies, so the peak can be read as "fixed state + what the step adds". Also sums the
tensors autograd saves for backward in each step's forward (``saved_tensors_hooks``, each storage
counted once): the activation memory a step holds at its peak.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


SETUP = "setup, step 1 forward"  # everything before the first backward


class Sampler:
    """Peak RSS (MiB) per named phase; ``mark`` starts the next phase."""

    def __init__(self, every_s: float):
        import psutil
        self.proc, self.every, self.phase, self.peaks, self.order = psutil.Process(), every_s, SETUP, {}, [SETUP]
        self.lock, self.stop = threading.Lock(), False
        threading.Thread(target=self.loop, daemon=True).start()

    def sample(self) -> None:
        rss = self.proc.memory_info().rss / 2 ** 20
        with self.lock:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)

    def loop(self) -> None:
        while not self.stop:
            self.sample()
            time.sleep(self.every)

    def mark(self, phase: str) -> None:
        self.sample()  # the end of the phase before
        with self.lock:
            if phase not in self.order:
                self.order.append(phase)
            self.phase = phase
        self.sample()


def instrument(s: Sampler) -> dict:
    """Wrap Tensor.backward, AdamW.step and save_model_final to mark phases; returns counters."""
    import torch
    import prefalign.stages.common as common
    seen = {"steps": 0, "params": 0, "saved": {}, "storages": set(), "bytes": 0}
    backward, step = torch.Tensor.backward, torch.optim.AdamW.step

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen["storages"]:
            seen["storages"].add(storage.data_ptr())
            seen["bytes"] += storage.nbytes()
        return t

    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t).__enter__()  # for the whole run

    def wrapped_backward(self, *a, **k):
        key = f"step {seen['steps'] + 1}"
        seen["saved"][key] = seen["saved"].get(key, 0) + seen["bytes"]
        seen["storages"], seen["bytes"] = set(), 0
        s.mark(f"step {seen['steps'] + 1} backward")
        out = backward(self, *a, **k)
        s.mark(f"step {seen['steps'] + 1} forward")  # a next micro-batch's forward, or the optimizer next
        return out

    def wrapped_step(self, *a, **k):
        seen["steps"] += 1
        seen["params"] = sum(p.numel() for g in self.param_groups for p in g["params"])
        s.mark(f"step {seen['steps']} optimizer")
        out = step(self, *a, **k)
        s.mark(f"step {seen['steps'] + 1} forward")
        return out

    torch.Tensor.backward, torch.optim.AdamW.step = wrapped_backward, wrapped_step
    for mod in [common] + [sys.modules[m] for m in list(sys.modules) if m.startswith("prefalign.stages.")]:
        save = getattr(mod, "save_model_final", None)
        if save is not None and not getattr(save, "_marked", False):
            def marked(*a, _save=save, **k):
                s.mark("save")
                return _save(*a, **k)
            marked._marked = True
            mod.save_model_final = marked
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--every-ms", type=float, default=5.0)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then a prefalign command and its options")
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    import prefalign.cli as cli
    import prefalign.stages.dpo  # noqa: F401  (loaded before instrumenting, so their save_model_final is wrapped)
    import prefalign.stages.reward  # noqa: F401
    import prefalign.stages.sft  # noqa: F401
    s = Sampler(a.every_ms / 1e3)
    seen = instrument(s)
    rc = cli.main(cmd)
    s.mark("end")
    s.stop = True
    mib = seen["params"] * 4 / 2 ** 20
    print(f"prefalign {' '.join(cmd[:1])}: exit {rc}; {seen['steps']} optimizer steps; trainable parameters "
          f"{seen['params'] / 1e6:.1f} M: fp32 weights {mib:.0f} MiB, gradients {mib:.0f} MiB, AdamW states "
          f"{2 * mib:.0f} MiB (together {4 * mib:.0f} MiB)")
    for phase in s.order:
        if phase in s.peaks:
            print(f"  {phase:24s} peak RSS {s.peaks[phase]:7.0f} MiB")
    for key, nbytes in seen["saved"].items():
        print(f"  {key}: tensors saved for backward {nbytes / 2 ** 20:.0f} MiB")


if __name__ == "__main__":
    main()
