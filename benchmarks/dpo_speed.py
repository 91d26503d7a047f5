"""DPO speed and memory: prefalign vs TRL's DPOTrainer side by side, plus prefalign's scaling.

usage: python benchmarks/dpo_speed.py [WORK] [--reps 2] [--steps 20] [--warmup 3] [--threads 2]
       [--no-scaling] [--json OUT.json] [--trl-python PY] [--ours-python PY]

Side by side (default fixture of make_fixture.py: 3.4 M parameters, 512 pairs; batch 8, max length
256, fp32, CPU): each repetition runs TRL (trl_dpo.py, live reference, its defaults) and prefalign
(`prefalign dpo --packing`, reference log-probs precomputed), alternating which goes first. Both
log every step; seconds per step are the steady state after --warmup steps (TRL: arrival times of
its per-step log lines; prefalign: perf/steps_per_s of each metrics.jsonl row). Peak RSS is each
child process's own (os.wait4). Wall time covers the whole process (start-up, tokenisation,
prefalign's reference precompute, training, saving). Both get the same OMP_NUM_THREADS.

Model FLOPs utilisation: 6 N tokens per step for the policy's forward + backward (+ 2 N tokens for
TRL's live reference forward), N = parameters outside the input embedding, tokens = the real
(unpadded) tokens of the batch, divided by the fp32 matmul peak measured here (torch, 1024 x 1024,
the same thread count).

Scaling (prefalign only, 64 pairs, 6 steps after 2 warm-up): max length 128..1024 on pairs whose
completions are long enough to fill it, and model sizes 3 M..50 M (make_fixture --hidden/--layers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout, not an installed copy
from bench_common import (default_python, env_for, find_bench_dir, json_lines, make_fixture,  # noqa: E402
                          run_with_rss, subset_fixture)


def matmul_peak_gflops(threads: int, n: int = 1024, reps: int = 30) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(5):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def data_stats(model_dir: Path, pairs_file: Path, max_length: int) -> dict:
    """Parameters (outside the input embedding) and mean real tokens per pair after truncation."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from prefalign.data import load_preferences
    from prefalign.models import load_tokenizer
    from prefalign.stages.pair_batch import tokenize_pairs
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    pairs = tokenize_pairs(load_preferences(pairs_file), load_tokenizer(str(model_dir)), max_length)
    return {"params_matmul": n, "params": sum(p.numel() for p in model.parameters()),
            "tokens_per_pair": statistics.mean(p.n_tokens for p in pairs)}


def run_trl(python: str, fx: Path, steps: int, warmup: int, batch: int, max_length: int, threads: int) -> dict:
    r = run_with_rss([python, str(find_bench_dir() / "trl_dpo.py"), str(fx), "--steps", str(steps + warmup),
                      "--batch", str(batch), "--max-length", str(max_length), "--log-every", "1"], env_for(threads))
    seen = {}
    for t, line in r["lines"]:
        for row in json_lines(line):
            seen.setdefault(row["step"], t)
    s_per_step = (seen[steps + warmup] - seen[warmup]) / steps
    return {"s_per_step": s_per_step, "wall_s": r["wall_s"], "rss_mib": r["rss_mib"]}


def run_ours(python: str, fx: Path, work: Path, steps: int, warmup: int, batch: int, max_length: int,
             threads: int, packing: bool = True) -> dict:
    out, cache = work / "ours-out", work / "ours-cache"
    for d in (out, cache):  # every run pays its own reference precompute
        shutil.rmtree(d, ignore_errors=True)
    r = run_with_rss([python, "-m", "prefalign", "dpo", "--model", str(fx / "model"), "--data", str(fx / "pairs.jsonl"),
                      "--output", str(out), "--batch-size", str(batch), "--max-length", str(max_length),
                      "--max-steps", str(steps + warmup), "--logging-steps", "1", "--ref-cache-dir", str(cache),
                      "--no-progress", "--dtype", "float32", *(["--packing"] if packing else [])], env_for(threads))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    s_per_step = sum(1 / row["perf/steps_per_s"] for row in rows if row["step"] > warmup) / steps
    summary = json.loads((out / "summary.json").read_text())
    return {"s_per_step": s_per_step, "wall_s": r["wall_s"], "rss_mib": r["rss_mib"],
            "precompute_s": summary["reference"]["train"]["seconds"]}


def side_by_side(a, fx: Path, work: Path) -> dict:
    stats = data_stats(fx / "model", fx / "pairs.jsonl", 256)
    runs = []
    for rep in range(a.reps):
        order = ["trl", "ours"] if rep % 2 == 0 else ["ours", "trl"]
        got = {}
        for who in order:
            if who == "trl":
                got[who] = run_trl(a.trl_python, fx, a.steps, a.warmup, 8, 256, a.threads)
            else:
                got[who] = run_ours(a.ours_python, fx, work, a.steps, a.warmup, 8, 256, a.threads)
            print(f"rep {rep} {who}: {json.dumps(got[who])}", flush=True)
        got["speedup"] = got["trl"]["s_per_step"] / got["ours"]["s_per_step"]
        got["rss_ratio"] = got["ours"]["rss_mib"] / got["trl"]["rss_mib"]
        runs.append(got)
    tokens = 8 * stats["tokens_per_pair"]
    for got in runs:
        for who, factor in (("trl", 8), ("ours", 6)):
            got[who]["model_gflop_per_s"] = factor * stats["params_matmul"] * tokens / got[who]["s_per_step"] / 1e9
    return {"stats": stats, "runs": runs}


def long_pairs(fx: Path, out: Path, n_pairs: int, join: int) -> Path:
    """Pairs whose completions join `join` consecutive completions of the fixture (long enough to fill
    a length budget; truncation cuts them to it)."""
    rows = [json.loads(l) for l in (fx / "pairs.jsonl").read_text().splitlines()]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pairs.jsonl", "w") as f:
        for i in range(n_pairs):
            group = [rows[(i * join + k) % len(rows)] for k in range(join)]
            f.write(json.dumps({"prompt": group[0]["prompt"], "chosen": "".join(r["chosen"] for r in group),
                                "rejected": "".join(r["rejected"] for r in group)}) + "\n")
    if not (out / "model").exists():
        (out / "model").symlink_to((fx / "model").resolve())
    return out


def scaling(a, fx: Path, work: Path, peak: float) -> dict:
    table = {"length": [], "size": []}
    long_fx = long_pairs(fx, work / "fixture-long", 64, 24)
    for L in (128, 256, 512, 1024):
        r = run_ours(a.ours_python, long_fx, work, 6, 2, 8, L, a.threads)
        s = data_stats(long_fx / "model", long_fx / "pairs.jsonl", L)
        r.update(max_length=L, tokens_per_step=8 * s["tokens_per_pair"],
                 mfu=6 * s["params_matmul"] * 8 * s["tokens_per_pair"] / r["s_per_step"] / 1e9 / peak)
        print("length", json.dumps(r), flush=True)
        table["length"].append(r)
    for hidden, layers in ((256, 4), (384, 6), (512, 8), (640, 10)):
        big = make_fixture(work / f"fixture-h{hidden}-l{layers}", a.ours_python, hidden=hidden, layers=layers)
        sub = subset_fixture(big, work / f"fixture-h{hidden}-l{layers}-64", 64)
        r = run_ours(a.ours_python, sub, work, 6, 2, 8, 256, a.threads)
        s = data_stats(sub / "model", sub / "pairs.jsonl", 256)
        r.update(hidden=hidden, layers=layers, params=s["params"],
                 mfu=6 * s["params_matmul"] * 8 * s["tokens_per_pair"] / r["s_per_step"] / 1e9 / peak)
        print("size", json.dumps(r), flush=True)
        table["size"].append(r)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", nargs="?", default="/tmp/prefalign-dpo-speed")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--trl-python", default=default_python("trl"))
    ap.add_argument("--ours-python", default=default_python("ours"))
    a = ap.parse_args()
    work = Path(a.work)
    peak = matmul_peak_gflops(a.threads)
    print(f"fp32 matmul peak (1024^2, {a.threads} threads): {peak:.1f} GFLOP/s", flush=True)
    fx = make_fixture(work / "fixture", a.ours_python)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
              f"{platform.platform()}", "load_average": os.getloadavg(), "threads": a.threads,
              "peak_gflop_per_s": peak, "steps": a.steps, "warmup": a.warmup,
              "side_by_side": side_by_side(a, fx, work)}
    for got in result["side_by_side"]["runs"]:
        for who in ("trl", "ours"):
            got[who]["mfu"] = got[who]["model_gflop_per_s"] / peak
    result["peak_after_gflop_per_s"] = matmul_peak_gflops(a.threads)
    if not a.no_scaling:
        result["scaling"] = scaling(a, fx, work, peak)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
