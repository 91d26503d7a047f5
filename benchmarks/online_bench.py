"""Online RL speed, side by side: `prefalign grpo` / `prefalign rloo` vs TRL's GRPOTrainer / RLOOTrainer.

What one "iteration" is, in both tools (the mapping every case below obeys):

    prefalign                              TRL (GRPOConfig / RLOOConfig)
    --rollout-batch-size P  (prompts)      generation_batch_size = P * K  (completions per generation)
    --num-generations K                    num_generations = K
    --minibatch-size M  (completions per   per_device_train_batch_size = M, gradient_accumulation_steps = 1
      optimizer step)                      steps_per_generation = P * K / M
    --ppo-epochs E                         num_iterations = E
    --iterations N                         max_steps = N * E * P * K / M  (optimizer steps)
    --max-new-tokens L                     max_completion_length = L
    --beta (grpo 0: no reference loaded;   beta (GRPO default 0.0; RLOO default 0.05, KL in the reward)
      rloo 0.05, --kl-mode reward)
    --scale-rewards group (grpo) / none    scale_rewards="group" (GRPO) / normalize_advantages=False (RLOO)
    --loss-aggregation token (grpo)        loss_type="dapo" (GRPO); RLOO's loss is its own (sequence ratio)
    --lr 1e-5, linear decay, no warmup,    learning_rate=1e-5, lr_scheduler_type="linear", warmup 0,
      AdamW (0.9, 0.999, 1e-8), wd 0,        AdamW defaults, weight_decay 0, max_grad_norm 1.0,
      max grad norm 1, epsilon 0.2           epsilon 0.2
    temperature 1, top-k 0, top-p 1        temperature 1.0, top_k 0, top_p 1.0, use_vllm=False
    fp32, CPU, no gradient checkpointing   bf16=False, use_cpu=True, gradient_checkpointing=False (TRL's
                                             default is True; off here so both do the same compute)
    the final model saved (HF format)      save_strategy="no", then trainer.save_model()

So an iteration is, on both sides: P prompts -> P * K sampled completions (KV cache, no vLLM) -> the same
Python reward function (benchmarks/peers/online_reward.py:vowel_share) -> E * P * K / M optimizer steps
of M completions. Known differences in the work done: TRL's RLOOTrainer always, and its GRPOTrainer
whenever steps_per_generation * num_iterations > 1, runs one extra no-grad policy forward over the
rollout for the old log-probs; prefalign records them while sampling. prefalign samples one prompt's K
completions per generate call (layout-independent draws, docs/online.md); TRL samples the whole
generation batch in one call.

Each run is a subprocess of this script; its whole wall time (interpreter start, imports, model load,
training, saving), its CPU seconds (user + system) and its peak RSS (os.wait4 of that child alone) are
measured. On a machine shared with other jobs the CPU seconds are the steadier of the two: they count
the work done, not the wait for a core. The two tools run
alternately (trl, prefalign, trl, prefalign, ...) so that load from other processes hits both alike;
the result per case is the median of the per-pair ratios trl wall / prefalign wall.

usage: python benchmarks/online_bench.py [--cases grpo-1x8,grpo-8x4,rloo-1x8,rloo-8x4] [--repeats 3]
       [--threads 1] [--fixture DIR] [--trl-python PATH] [--ours-python PATH] [--variant NAME=SRC_DIR]
--variant adds another prefalign source tree (e.g. a branch's worktree/src) as a third tool in the
alternation of the cases with more than one prompt per iteration (with one prompt, every variant of
the rollout is the same code path).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, default_python, env_for, make_fixture, run_with_rss  # noqa: E402
from results_md import machine_line, versions  # noqa: E402

REWARD = ROOT / "benchmarks" / "peers" / "online_reward.py"
PEER = ROOT / "benchmarks" / "peers" / "trl_online.py"
MAX_NEW_TOKENS, LR = 32, 1e-5

# name -> trainer, P prompts per iteration, K, M completions per optimizer step, E passes, N iterations, beta.
# 1x8: TRL's default layout (num_generations 8, per_device_train_batch_size 8, steps_per_generation 1:
# one prompt's 8 completions per generation, one optimizer step each). 8x4: 8 prompts x 4 per
# generation, two optimizer steps of 16 (TRL then recomputes the old log-probs).
CASES = {
    "grpo-1x8": dict(trainer="grpo", P=1, K=8, M=8, E=1, N=16, beta=0.0),
    "grpo-8x4": dict(trainer="grpo", P=8, K=4, M=16, E=1, N=8, beta=0.0),
    "rloo-1x8": dict(trainer="rloo", P=1, K=8, M=8, E=1, N=16, beta=0.05),
    "rloo-8x4": dict(trainer="rloo", P=8, K=4, M=16, E=1, N=8, beta=0.05),
}


def optimizer_steps(c: dict) -> int:
    return c["N"] * c["E"] * c["P"] * c["K"] // c["M"]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_trl(python: str, fixture: Path, c: dict, env: dict) -> dict:
    out = Path(tempfile.mkdtemp(prefix="online-trl-"))
    cmd = [python, str(PEER), str(fixture), "--trainer", c["trainer"], "--reward-fn", f"{REWARD}:vowel_share",
           "--iterations", str(c["N"]), "--prompts-per-iteration", str(c["P"]), "--num-generations", str(c["K"]),
           "--minibatch-size", str(c["M"]), "--ppo-epochs", str(c["E"]), "--max-new-tokens", str(MAX_NEW_TOKENS),
           "--lr", str(LR), "--beta", str(c["beta"]), "--out", str(out)]
    r = run_with_rss(cmd, env)
    info = json.loads([line for line in r["stdout"].splitlines() if line.startswith('{"tool"')][-1])
    return {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "rss_mib": r["rss_mib"], "train_s": info["train_s"],
            "optimizer_steps": info["optimizer_steps"], "mean_length": info["mean_length"]}


def run_ours(python: str, fixture: Path, c: dict, env: dict, src: Path = ROOT / "src") -> dict:
    out = Path(tempfile.mkdtemp(prefix="online-ours-")) / "out"
    cmd = [python, "-m", "prefalign", c["trainer"], "--model", str(fixture / "model"),
           "--prompts", str(fixture / "pairs.jsonl"), "--reward-fn", f"{REWARD}:vowel_share", "--output", str(out),
           "--iterations", str(c["N"]), "--rollout-batch-size", str(c["P"]), "--num-generations", str(c["K"]),
           "--minibatch-size", str(c["M"]), "--ppo-epochs", str(c["E"]), "--max-new-tokens", str(MAX_NEW_TOKENS),
           "--lr", str(LR), "--lr-schedule", "linear", "--beta", str(c["beta"]), "--temperature", "1.0",
           "--device", "cpu", "--dtype", "float32", "--no-progress", "--sample-every", "0", "--seed", "0"]
    r = run_with_rss(cmd, {**env, "PYTHONPATH": str(src)})
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = optimizer_steps(c)
    return {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "rss_mib": r["rss_mib"],
            "train_s": summary["iterations_time_s"], "optimizer_steps": steps,
            "mean_length": statistics.mean(x["completions/mean_length"] for x in rows)}


def compare(name: str, tool: str, trl: list[dict], ours: list[dict]) -> str:
    """One summary line: the median of the per-pair ratios trl / ours (wall, and loop only), and RSS."""
    ratios = [t["wall_s"] / p["wall_s"] for t, p in zip(trl, ours)]
    train = [t["train_s"] / p["train_s"] for t, p in zip(trl, ours)]
    cpu = [t["cpu_s"] / p["cpu_s"] for t, p in zip(trl, ours)]
    rss = statistics.median(p["rss_mib"] for p in ours) / statistics.median(t["rss_mib"] for t in trl)
    return (f"{name}: whole run, trl / {tool} = {statistics.median(ratios):.2f}x (median; pairs "
            f"{', '.join(f'{r:.2f}' for r in ratios)}); CPU seconds {statistics.median(cpu):.2f}x (pairs "
            f"{', '.join(f'{r:.2f}' for r in cpu)}); training loop only {statistics.median(train):.2f}x; "
            f"median wall trl {statistics.median(t['wall_s'] for t in trl):.1f} s, {tool} "
            f"{statistics.median(p['wall_s'] for p in ours):.1f} s; peak RSS {tool} / trl {rss:.2f}; "
            f"load at end {load()}")


def header(a, ours_python: str) -> list[str]:
    v = versions(ours_python, a.trl_python, env_for(a.threads))
    return [f"# online_bench.py {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
            f"{machine_line()}; load average at the start {load()} (a machine shared with other jobs puts its "
            f"load in the numbers)",
            f"# prefalign: torch {v['ours']['torch']}, transformers {v['ours']['transformers']}; peer: trl "
            f"{v['peer']['trl']}, torch {v['peer']['torch']}, transformers {v['peer']['transformers']}",
            f"# threads per process: {a.threads} (OMP_NUM_THREADS); max_new_tokens {MAX_NEW_TOKENS}; lr {LR}; "
            f"repeats {a.repeats}; load average (1, 5, 15 min) at start: {load()}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each tool per case (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both sides")
    ap.add_argument("--fixture", default=None, help="fixture directory (default: built under .bench/fixture)")
    ap.add_argument("--trl-python", default=default_python("trl"), help="python of the TRL environment")
    ap.add_argument("--ours-python", default=default_python("ours"), help="python with prefalign's dependencies")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SRC_DIR",
                    help="another prefalign src/ to run alongside (cases with P > 1 only)")
    a = ap.parse_args()
    variants = dict(v.split("=", 1) for v in a.variant)
    if not Path(a.trl_python).exists():
        sys.exit(f"no TRL environment at {a.trl_python}: run benchmarks/setup_peers.sh, or pass --trl-python.")
    env = env_for(a.threads)
    fixture = make_fixture(Path(a.fixture) if a.fixture else ROOT / ".bench" / "fixture", a.ours_python)
    for line in header(a, a.ours_python):
        print(line, flush=True)
    summary = []
    for name in a.cases.split(","):
        c = CASES[name]
        print(f"\n## {name}: {c['trainer']} P={c['P']} prompts x K={c['K']} completions per iteration, "
              f"minibatch M={c['M']}, E={c['E']}, N={c['N']} iterations = {optimizer_steps(c)} optimizer steps, "
              f"beta={c['beta']}", flush=True)
        tools = ["trl", "prefalign"] + (list(variants) if c["P"] > 1 else [])
        runs = {t: [] for t in tools}
        for rep in range(a.repeats):
            for tool in tools:
                before = load()
                res = (run_trl(a.trl_python, fixture, c, env) if tool == "trl"
                       else run_ours(a.ours_python, fixture, c, env, Path(variants.get(tool, ROOT / "src"))))
                runs[tool].append(res)
                print(f"{name} rep {rep + 1} {tool:10s} wall_s={res['wall_s']:.2f} cpu_s={res['cpu_s']:.2f} "
                      f"train_s={res['train_s']:.2f} rss_mib={res['rss_mib']:.0f} "
                      f"optimizer_steps={res['optimizer_steps']} "
                      f"mean_length={res['mean_length']:.2f} load_before={before}", flush=True)
        for tool in tools[1:]:
            line = compare(name, tool, runs["trl"], runs[tool])
            summary.append(line)
            print(line, flush=True)
    print("\n# summary (whole-run ratio > 1: prefalign faster; target >= 2x)")
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
