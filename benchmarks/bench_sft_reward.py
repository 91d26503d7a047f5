"""Side-by-side speed of `prefalign sft --packing` / `prefalign reward` and TRL's SFTTrainer /
RewardTrainer on the shared fixture (../shared/bench/make_fixture.py), on this CPU.

usage: python benchmarks/bench_sft_reward.py [--rounds R] [--steps N] [--only sft|reward] [--no-write]

Runs peer, ours, ours, peer, peer, ours, ... (alternating, so load from other processes hits both
alike) and reports the median of the per-round ratios with the raw numbers. Both sides time the training
loop only: from the end of step --warmup-steps to the end of step --steps, counting the real
(non-pad) tokens fed to the model in those steps. Peak memory is the max RSS of each whole
process. Writes the "SFT" and "Reward" sections of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import machine_line, update_section, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
MAKE_FIXTURE = ROOT.parent / "shared" / "bench" / "make_fixture.py"
HEADERS = {"sft": "## SFT (packing) vs TRL SFTTrainer", "reward": "## Reward model vs TRL RewardTrainer"}

# Runs a command and prints its peak RSS: a fresh wrapper per run, so RUSAGE_CHILDREN holds one child only.
MAXRSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
          "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def run_measured(cmd: list[str], env: dict) -> tuple[str, float]:
    """(stdout, peak RSS in MiB) of cmd; raises with its stderr tail when it fails."""
    p = subprocess.run([sys.executable, "-c", MAXRSS, *cmd], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    kb = [line.split()[1] for line in p.stderr.splitlines() if line.startswith("maxrss_kb")][-1]
    return p.stdout, int(kb) / 1024


def parse_peer(stdout: str) -> dict:
    line = [x for x in stdout.splitlines() if x.startswith("trl_")][-1]
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def parse_ours(out_dir: Path, warmup: int) -> dict:
    """Loop time and tokens of steps warmup+1.. from metrics.jsonl (logged every step)."""
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = [r for r in rows if r["step"] > warmup]
    wall = sum(1 / r["perf/steps_per_s"] for r in timed)
    cpu = sum(r["perf/cpu_s"] for r in timed)
    tokens = sum(r["perf/tokens_per_s"] / r["perf/steps_per_s"] for r in timed)
    return {"timed_steps": len(timed), "wall_s": wall, "cpu_s": cpu, "tokens": round(tokens), "tokens_per_s": tokens / wall,
            "s_per_step": wall / len(timed), "loss": rows[-1]["loss"]}


def peer_cmd(a, task: str) -> list[str]:
    return [a.peer_python, str(PEERS / f"trl_{task}.py"), str(a.fixture), "--steps", str(a.steps),
            "--batch", str(a.batch), "--max-length", str(a.max_length), "--lr", str(LR[task]),
            "--warmup-steps", str(a.warmup_steps)]


LR = {"sft": 2e-5, "reward": 1e-5}
# Our variants per task: (name in the table, extra CLI options). Reward runs both the default
# padded batches and --packing (padding-free rows); TRL's RewardTrainer has only padded batches.
VARIANTS = {"sft": [("prefalign --packing", ["--packing"])],
            "reward": [("prefalign", []), ("prefalign --packing", ["--packing"])]}


def ours_cmd(a, task: str, out_dir: Path, extra: list[str]) -> list[str]:
    cmd = [a.ours_python, "-m", "prefalign", task, "--model", str(a.fixture / "model"),
           "--data", str(a.fixture / "pairs.jsonl"), "--output", str(out_dir), "--max-steps", str(a.steps),
           "--batch-size", str(a.batch), "--max-length", str(a.max_length), "--lr", str(LR[task]),
           "--logging-steps", "1", "--no-progress", "--dtype", "float32", "--device", "cpu", *extra]
    if task == "reward":
        cmd += ["--normalize", "none"]  # TRL has no post-training normalisation pass
    return cmd


def one_round(a, task: str, env: dict, reverse: bool) -> dict[str, dict]:
    """{tool name: result} for the peer and each of our variants, run one after the other;
    ``reverse`` runs them in the opposite order (A B B A ... cancels a steady drift in load)."""
    tools = [("trl", None)] + VARIANTS[task]
    res = {}
    for name, extra in (tools[::-1] if reverse else tools):
        if extra is None:
            out, rss = run_measured(peer_cmd(a, task), env)
            res[name] = {**parse_peer(out), "rss_mib": rss}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            _, rss = run_measured(ours_cmd(a, task, Path(tmp) / "run", extra), env)
            res[name] = {**parse_ours(Path(tmp) / "run", a.warmup_steps), "rss_mib": rss}
    for r in res.values():
        r["pairs_per_s"] = a.batch * r["timed_steps"] / r["wall_s"]
        r["work_per_cpu_s"] = (a.batch * r["timed_steps"] if task == "reward" else r["tokens"]) / r["cpu_s"]
    return {name: res[name] for name, _ in tools}


def unit_of(task: str) -> str:
    return "pairs_per_s" if task == "reward" else "tokens_per_s"


def bench(a, task: str, env: dict) -> list[dict[str, dict]]:
    unit = unit_of(task)
    rounds = []
    for i in range(a.rounds):
        res = one_round(a, task, env, reverse=i % 2 == 1)
        rounds.append(res)
        print(f"{task} round {i + 1}: " + " | ".join(
            f"{name} {r[unit]:.1f} {unit} {r['rss_mib']:.0f} MiB x{r[unit] / res['trl'][unit]:.2f} "
            f"(cpu x{r['work_per_cpu_s'] / res['trl']['work_per_cpu_s']:.2f})"
            for name, r in res.items()), flush=True)
    return rounds


def section(a, task: str, rounds: list[dict[str, dict]], vers: dict) -> str:
    unit = unit_of(task)
    reward = task == "reward"
    what = ("`prefalign sft --packing` vs `SFTTrainer(packing=True)` (BFD packing, padding-free), {prompt, "
            "completion=chosen} rows, completion-only loss" if not reward else
            "`prefalign reward` (padded, and `--packing`: padding-free rows, each pair's prompt packed once, attention per example) vs `RewardTrainer` (padded), "
            "AutoModelForSequenceClassification(num_labels=1) on the fixture's backbone, batch counted in pairs")
    lines = [HEADERS[task], "",
             f"{what}. Fixture: make_fixture.py defaults (3.4 M parameters, 512 pairs). "
             f"Batch {a.batch}, max length {a.max_length}, {a.steps} optimizer steps, lr {LR[task]}, fp32, CPU, "
             f"no eval, no saving; timed: steps {a.warmup_steps + 1}-{a.steps} (loop only, load and warm-up "
             f"excluded). Tokens = real (non-pad) tokens fed to the model. Peak RSS = whole process.", "",
             f"- date: {vers['date']}; machine: {machine_line()}",
             f"- prefalign env: torch {vers['ours']['torch']}, transformers {vers['ours']['transformers']}; "
             f"peer env: trl {vers['peer']['trl']}, torch {vers['peer']['torch']}, "
             f"transformers {vers['peer']['transformers']}",
             f"- threads: {a.threads or 'torch default'} (OMP_NUM_THREADS, same for both); load average before the "
             f"runs: {vers['load']}",
             f"- command: `python benchmarks/bench_sft_reward.py --only {task} --rounds {a.rounds} --steps {a.steps}"
             f"{f' --threads {a.threads}' if a.threads else ''}`",
             "", f"| round | tool | loop s | loop CPU s | tokens | tokens/s |{' pairs/s |' if reward else ''} "
             f"peak RSS MiB | speed vs trl (wall) | (CPU) |", f"|---|---|---|---|---|---|{'---|' if reward else ''}---|---|---|"]
    for i, res in enumerate(rounds, 1):
        for name, r in res.items():
            extra = f" {r['pairs_per_s']:.2f} |" if reward else ""
            ratio = f"{r[unit] / res['trl'][unit]:.2f} | {r['work_per_cpu_s'] / res['trl']['work_per_cpu_s']:.2f}" \
                if name != "trl" else " |"
            lines.append(f"| {i} | {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {int(r['tokens'])} | "
                         f"{r['tokens_per_s']:.0f} |{extra} {r['rss_mib']:.0f} | {ratio} |")
    lines.append("")
    peer_rss = max(res["trl"]["rss_mib"] for res in rounds)
    for name, _ in VARIANTS[task]:
        ratios = [res[name][unit] / res["trl"][unit] for res in rounds]
        cpu = [res[name]["work_per_cpu_s"] / res["trl"]["work_per_cpu_s"] for res in rounds]
        mem = max(res[name]["rss_mib"] for res in rounds) / peer_rss
        lines.append(f"- **{name}: {statistics.median(ratios):.2f}x** TRL's {unit.replace('_per_s', '/s')} "
                     f"(median of per-round ratios: {', '.join(f'{x:.2f}' for x in ratios)}); per CPU second "
                     f"{statistics.median(cpu):.2f}x ({', '.join(f'{x:.2f}' for x in cpu)}); "
                     f"peak RSS {mem:.2f}x TRL's.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for both sides (default: torch's choice, one per core)")
    ap.add_argument("--only", choices=["sft", "reward"], default=None)
    ap.add_argument("--fixture", type=Path, default=ROOT / ".bench" / "fixture")
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON", str(ROOT / ".bench" / "trl" / "bin" / "python")))
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print the sections instead of updating RESULTS.md")
    a = ap.parse_args()
    # Our side runs this checkout's source, whatever prefalign the interpreter has installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    if not (a.fixture / "pairs.jsonl").exists():
        subprocess.run([a.ours_python, str(MAKE_FIXTURE), str(a.fixture)], env=env, check=True)
    vers = versions(a.ours_python, a.peer_python, env)
    for task in ([a.only] if a.only else ["sft", "reward"]):
        text = section(a, task, bench(a, task, env), vers)
        if a.no_write:
            print(text)
        else:
            update_section(a.results, HEADERS[task], text)
            print(f"updated {a.results} ({HEADERS[task]})")


if __name__ == "__main__":
    main()
