"""Behaviour unchanged, proven: fixed-seed runs of every stage at two revisions give the same
metrics.jsonl (every key but perf/) and the same weights, bit for bit.

    python benchmarks/same_behaviour.py                 # HEAD's working tree against e160771
    python benchmarks/same_behaviour.py --ref abc1234   # against another revision

The reference revision's src/ is exported with `git archive` into the work folder and run with
PYTHONPATH pointing at it; the working tree's src/ runs the same command lines. Both use one
torch thread (bitwise equality needs the same reduction order). Each run is a tiny model on a
few examples, so the whole check takes a few minutes on two cores. Exit code 0 when every run
matches, 1 otherwise; a table of the comparisons is printed either way.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "e160771"  # the last commit before the run harness (issue 14)

GOOD = "great wonderful superb lovely brilliant charming".split()
BAD = "awful boring dull terrible weak bland".split()
COMMON = ["--batch-size", "2", "--grad-accum", "2", "--logging-steps", "1", "--max-length", "48", "--seed", "5",
          "--no-progress", "--lr", "3e-3"]
PPO = ["--prompts", "{w}/prompts.jsonl", "--lr", "3e-3", "--iterations", "4", "--rollout-batch-size", "4",
       "--minibatch-size", "2", "--ppo-epochs", "2", "--max-new-tokens", "8", "--seed", "5", "--no-progress",
       "--sample-every", "1", "--logging-steps", "1"]

# name -> command line ({w}: the workspace; {rm}: the reward model of the same revision). Padded runs
# say --no-packing: packing became the default after the baseline (which has the flag already).
RUNS = {
    "sft": ["sft", "--model", "{w}/base", "--data", "{w}/sft.jsonl", "--max-steps", "6", "--eval-fraction", "0.25",
            "--eval-steps", "3", "--no-packing", *COMMON],
    "sft-packing": ["sft", "--model", "{w}/base", "--data", "{w}/sft.jsonl", "--max-steps", "4", "--packing",
                    *COMMON],
    "reward": ["reward", "--model", "{w}/base", "--data", "{w}/prefs.jsonl", "--max-steps", "6",
               "--eval-fraction", "0.25", "--eval-steps", "3", "--no-packing", *COMMON],
    "dpo": ["dpo", "--model", "{w}/base", "--data", "{w}/prefs.jsonl", "--max-steps", "6", "--beta", "0.1",
            "--eval-fraction", "0.25", "--eval-steps", "3", "--ref-cache-dir", "{out}/refcache", "--no-packing", *COMMON],
    "dpo-live-packing": ["dpo", "--model", "{w}/base", "--data", "{w}/prefs.jsonl", "--max-steps", "4",
                         "--live-reference", "--packing", "--loss", "ipo", *COMMON],
    "dpo-lora": ["dpo", "--model", "{w}/base", "--data", "{w}/prefs.jsonl", "--max-steps", "4", "--lora",
                 "--lora-r", "4", "--ref-cache-dir", "{out}/refcache", "--no-packing", *COMMON],
    "ppo": ["ppo", "--model", "{w}/base", "--reward-model", "{rm}", "--no-packing", *PPO],
    "ppo-shared-packing": ["ppo", "--model", "{w}/base", "--reward-model", "{rm}", "--shared-value-head",
                           "--packing", "--target-kl", "1.0", *PPO],
    "ppo-lora": ["ppo", "--model", "{w}/base", "--reward-model", "{rm}", "--lora", "--lora-r", "4", "--no-packing",
                 *PPO],
}


def write_workspace(w: Path) -> None:
    """A tiny base model and the data every run reads (the same files for both revisions)."""
    sys.path.insert(0, str(ROOT / "src"))
    from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model
    rng = random.Random(0)
    save_tiny_model(w / "base", texts=SAMPLE_TEXTS + [" ".join(GOOD + BAD)])
    rows = lambda xs: "".join(json.dumps(x) + "\n" for x in xs)
    (w / "sft.jsonl").write_text(rows({"prompt": "The movie was", "completion": f" {rng.choice(GOOD)}."}
                                      for _ in range(24)))
    (w / "prefs.jsonl").write_text(rows({"prompt": "The movie was", "chosen": f" {rng.choice(GOOD)}.",
                                         "rejected": f" {rng.choice(BAD)} and {rng.choice(BAD)}."}
                                        for _ in range(24)))
    (w / "prompts.jsonl").write_text(rows({"prompt": p} for p in ["The movie was", "I thought the plot",
                                                                  "Honestly", "The cast"] * 2))


def run_all(src: Path, w: Path, out_root: Path) -> dict[str, str]:
    """Every run of RUNS with ``src`` on PYTHONPATH; returns name -> error text ('' when it ran)."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    rm = out_root / "rm-for-ppo"
    errors = {}
    setup = ["reward", "--model", str(w / "base"), "--data", str(w / "prefs.jsonl"), "--max-steps", "3", "--no-packing",
             *COMMON, "--output", str(rm)]
    subprocess.run([sys.executable, "-m", "prefalign", *setup], env=env, check=True, capture_output=True)
    for name, args in RUNS.items():
        out = out_root / name
        cmd = [a.format(w=w, rm=rm, out=out_root) for a in args] + ["--output", str(out)]
        proc = subprocess.run([sys.executable, "-m", "prefalign", *cmd], env=env, capture_output=True, text=True)
        errors[name] = "" if proc.returncode == 0 else proc.stderr[-2000:]
        print(f"  {src.parent.name:>10} {name:<20} {'ok' if proc.returncode == 0 else 'FAILED'}", flush=True)
    return errors


def metrics_without_perf(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if not k.startswith("perf/")}
            for l in path.read_text().splitlines() if l.strip()]


def weight_files(out: Path) -> list[Path]:
    """The final weights; a LoRA run's adapter/ folder is newer than the baseline (its merged model is compared)."""
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.suffix in (".safetensors", ".pt")
                  and not {"checkpoints", "refcache", "adapter"} & set(p.relative_to(out).parts))


def compare(a: Path, b: Path) -> str:
    """'' when both outputs hold the same metrics (but perf/) and bit-identical weights."""
    import torch
    from safetensors.torch import load_file
    for name in ("metrics.jsonl", "samples.jsonl"):
        if (a / name).exists() != (b / name).exists():
            return f"{name} exists in one run only"
        if (a / name).exists() and metrics_without_perf(a / name) != metrics_without_perf(b / name):
            return f"{name} differs"
    files = weight_files(a)
    if files != weight_files(b):
        return f"weight files differ: {files} vs {weight_files(b)}"
    for f in files:
        load = load_file if f.suffix == ".safetensors" else lambda p: torch.load(p, weights_only=True)
        ta, tb = load(a / f), load(b / f)
        if ta.keys() != tb.keys() or any(not torch.equal(ta[k], tb[k]) for k in ta):
            return f"{f} differs"
    return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default=BASELINE, help="git revision to compare the working tree against")
    ap.add_argument("--work", help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--only", help="comma-separated run names (default: all of them)")
    args = ap.parse_args()
    if args.only:
        unknown = set(args.only.split(",")) - set(RUNS)
        if unknown:
            ap.error(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
        for name in set(RUNS) - set(args.only.split(",")):
            del RUNS[name]
    work = Path(args.work or tempfile.mkdtemp(prefix="same-behaviour-"))
    ref_root, ws = work / "ref", work / "workspace"
    for p in (ref_root, ws):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(ref_root)], input=archive.stdout, check=True)
    write_workspace(ws)
    print(f"comparing the working tree against {args.ref} in {work}")
    errors = {"ref": run_all(ref_root / "src", ws, work / "out-ref"),
              "head": run_all(ROOT / "src", ws, work / "out-head")}
    failed = 0
    print(f"\n{'run':<20} result")
    for name in RUNS:
        problem = errors["ref"][name] or errors["head"][name]
        verdict = ("run failed: " + problem.strip().splitlines()[-1]) if problem else \
            compare(work / "out-ref" / name, work / "out-head" / name) or "same metrics and weights"
        failed += verdict != "same metrics and weights"
        print(f"{name:<20} {verdict}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(RUNS) - failed} of {len(RUNS)} runs identical to {args.ref}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
