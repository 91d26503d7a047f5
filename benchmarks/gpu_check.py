"""GPU check: exercise the CUDA / bf16-autocast / SDPA paths of every stage and time them.

usage: python benchmarks/gpu_check.py OUT_DIR [--hidden 512] [--layers 8] [--steps 30] [--device cuda]
       [--real-model DIR] [--sections stages,rollout,findings,real_model] [--dry-run]

Builds a Llama of the given size with a byte-level BPE tokenizer in-process (nothing is
downloaded), writes preference / SFT / prompt data, then runs each stage through the CLI
twice — bf16 autocast (`--dtype auto`) and fp32 (`--dtype float32`) — and records steps/s,
tokens/s, peak GPU memory and the first logged loss of each. Also checks that log-probs
recorded while sampling equal those recomputed by a training forward on the GPU.
Then (benchmarks/gpu_findings.py) measures the two open findings of benchmarks/GPU.md: bf16
autocast slower than fp32 at 25 M parameters, and the bf16 sampler ~7x slower than fp32, on the
in-process model and on the real model (--real-model, default models/smollm2-135m-instruct from
`make real-model`); and runs benchmarks/real_model.py on the GPU in bf16 (prefalign vs TRL's
SFT / reward / DPO trainers, defaults and fastest settings, gradient checkpointing, max length 2048;
PPO stays on the CPU benchmark: the trl 1.9.2 peer script is CPU-only).
Writes OUT_DIR/gpu_results.json (and OUT_DIR/real_model_bf16.json). Every section is independent:
a failure is recorded and the next section still runs.

--dry-run: a CPU check of this script before a GPU session: a tiny model (hidden 64, 2 layers),
2 steps per stage, every section on the CPU, real_model.py with --dry-run (commands only).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

POS = "great wonderful superb moving brilliant lovely charming delightful excellent fun".split()
NEG = "awful boring dull terrible weak bland tedious poor messy bad".split()
NOUNS = "film movie story plot cast acting script ending music scene director pacing".split()
OPEN = ["I thought the", "Honestly the", "The", "My friends said the", "Overall the", "In the end the"]


def sentence(rng, words):
    return f"{rng.choice(OPEN)} {rng.choice(NOUNS)} was {rng.choice(words)} and the {rng.choice(NOUNS)} felt {rng.choice(words)}."


def write_data(out: Path, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"{rng.choice(OPEN)} {rng.choice(NOUNS)}"
        rows.append({"prompt": prompt,
                     "chosen": " " + " ".join(sentence(rng, POS) for _ in range(rng.randint(2, 6))),
                     "rejected": " " + " ".join(sentence(rng, NEG) for _ in range(rng.randint(2, 6)))})
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                                           for r in rows))
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return rows


def build_model(out: Path, rows, hidden: int, layers: int) -> Path:
    from prefalign.tiny import tiny_llama, tiny_tokenizer
    tok = tiny_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=4096)
    model = tiny_llama(tok, hidden=hidden, layers=layers, heads=max(1, hidden // 64), intermediate=hidden * 8 // 3 // 8 * 8,
                       max_positions=2048)
    d = out / "base"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def run_stage(name: str, args: list[str], out: Path, env: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "prefalign", *args, "--no-progress"], capture_output=True, text=True,
                          env=env, timeout=600)
    wall = time.perf_counter() - t
    res = {"stage": name, "returncode": proc.returncode, "wall_s": round(wall, 2)}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-3000:]
        return res
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    first = rows[0] if rows else {}
    last = rows[-1] if rows else {}
    res.update({"first_loss": first.get("loss", first.get("objective/scores")),
                "last_loss": last.get("loss", last.get("objective/scores")),
                "steps_per_s": last.get("perf/steps_per_s"), "tokens_per_s": last.get("perf/tokens_per_s"),
                "peak_gpu_mem_gb": last.get("perf/peak_gpu_mem_gb"), "last": last})
    return res


def stage_args(stage: str, data: Path, base: Path, out: Path, steps: int, dtype: str, extra: dict) -> list[str]:
    common = ["--model", str(base), "--output", str(out), "--max-steps", str(steps), "--batch-size", "8",
              "--max-length", "256", "--logging-steps", str(max(1, steps // 3)), "--dtype", dtype]
    if stage == "sft":
        return ["sft", *common, "--data", str(data / "sft.jsonl"), "--packing", "--lr", "1e-4"]
    if stage == "reward":
        return ["reward", *common, "--data", str(data / "pairs.jsonl"), "--lr", "1e-4"]
    if stage == "dpo":
        return ["dpo", *common, "--data", str(data / "pairs.jsonl"), "--lr", "1e-5"]
    if stage == "ppo":
        return ["ppo", "--model", str(base), "--reward-model", str(extra["rm"]), "--prompts", str(data / "prompts.jsonl"),
                "--output", str(out), "--iterations", str(max(2, steps // 6)), "--rollout-batch-size", "32",
                "--minibatch-size", "8", "--max-new-tokens", "48", "--logging-steps", "1", "--dtype", dtype]
    raise ValueError(stage)


def rollout_check(base: Path, device: str) -> dict:
    import torch
    from prefalign.models import load_causal_lm
    from prefalign.rollout import forward_logps, sample
    res = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_causal_lm(str(base), dtype=dtype, device=device, trainable=False)
        model.eval()
        prompts = [tok(t)["input_ids"] for t in ["The film", "Honestly the acting was", "My friends said"] * 22]
        with torch.no_grad():  # warm-up: first use of a dtype's kernels is not what we time
            sample(model, prompts[:4], max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        g = torch.Generator(device=device).manual_seed(0)
        torch.cuda.synchronize() if device.startswith("cuda") else None
        t = time.perf_counter()
        with torch.no_grad():
            ro = sample(model, prompts, max_new_tokens=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        temperature=1.0, generator=g)
        torch.cuda.synchronize() if device.startswith("cuda") else None
        dt = time.perf_counter() - t
        with torch.no_grad():
            recomputed, _ = forward_logps(model, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
        diff = (recomputed - ro.logprobs).abs()[ro.response_mask].max().item()
        res[dtype] = {"sampled_tokens": int(ro.response_mask.sum()), "tokens_per_s": round(int(ro.response_mask.sum()) / dt, 1),
                      "max_abs_logprob_diff_sampled_vs_recomputed": diff}
    return res


def guarded(results: dict, out: Path, key: str, fn) -> None:
    """results["sections"][key] = fn(), or the error; written to OUT/gpu_results.json either way."""
    try:
        results["sections"][key] = fn()
    except Exception as e:
        results["sections"][key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    print(key, json.dumps(results["sections"][key], default=str)[:600], flush=True)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=2, default=str))


def findings(base: Path, real: Path | None, device: str, hidden: int, layers: int, dry: bool) -> dict:
    """The autocast and sampler findings on the in-process model and the real model."""
    from transformers import AutoModelForCausalLM
    from gpu_findings import autocast_steps, sampler_speed
    models = {f"h{hidden}-l{layers}": base, **({"real": real} if real else {})}
    prompts = ["The film", "Honestly the acting was", "My friends said"] * (2 if dry else 22)
    res = {}
    for name, path in models.items():
        res[f"autocast/{name}"] = autocast_steps(lambda: AutoModelForCausalLM.from_pretrained(path), device,
                                                 batch=2 if dry else 8, tokens=32 if dry else 256, steps=1 if dry else 10)
        res[f"sampler/{name}"] = sampler_speed(path, device, prompts, max_new_tokens=8 if dry else 64,
                                               repeats=1 if dry else 3)
    return res


def real_model_bench(real: Path, out: Path, env: dict, dry: bool) -> dict:
    """benchmarks/real_model.py on the GPU in bf16 (its JSON: OUT/real_model_bf16.json)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "real_model.py"), "--model", str(real), "--device", "cuda",
           "--bf16", "--work", str(out / "real-model-work"), "--json", str(out / "real_model_bf16.json"),
           "--steps", "10", "--warmup", "3", "--batch", "8", "--long-batch", "4", "--long-steps", "3",
           "--threads", "4", "--only", "main,long"] + (["--dry-run"] if dry else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=560)
    res = {"returncode": proc.returncode, "command": " ".join(cmd), "stdout_tail": proc.stdout[-4000:]}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-3000:]
    elif not dry:
        res["runs"] = json.loads((out / "real_model_bf16.json").read_text())["runs"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stages", default="sft,reward,dpo,ppo")
    ap.add_argument("--sections", default="stages,rollout,findings,real_model")
    ap.add_argument("--real-model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct",
                    help="the real model for findings and real_model (skipped when absent)")
    ap.add_argument("--dry-run", action="store_true", help="tiny model, 2 steps, CPU: checks this script runs")
    a = ap.parse_args()
    if a.dry_run:
        a.device, a.hidden, a.layers, a.steps, a.pairs = "cpu", 64, 2, 2, 128
    sections = set(a.sections.split(","))
    real = a.real_model if (a.real_model / "config.json").exists() else None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                     "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
                     "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
                     "hidden": a.hidden, "layers": a.layers, "steps": a.steps, "dry_run": a.dry_run,
                     "real_model": str(real) if real else None, "sections": {}}
    work = Path(tempfile.mkdtemp(prefix="prefalign-gpu-"))
    rows = write_data(work, a.pairs)
    base = build_model(work, rows, a.hidden, a.layers)
    results["params_m"] = round(sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(base).parameters()) / 1e6, 2)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if a.device != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    extra = {"rm": work / "rm-auto"}
    device = a.device if a.device != "cuda" else "cuda:0"
    for stage in a.stages.split(",") if "stages" in sections else []:
        for dtype in ("auto", "float32"):
            key = f"{stage}/{dtype}"
            run_out = work / f"{stage}-{dtype}" if stage != "reward" else work / f"rm-{dtype}"
            guarded(results, out, key, lambda: run_stage(key, stage_args(stage, work, base, run_out, a.steps, dtype,
                                                                         extra), run_out, env))
    if "rollout" in sections:
        guarded(results, out, "rollout", lambda: rollout_check(base, device))
    if "findings" in sections:
        guarded(results, out, "findings", lambda: findings(base, real, device, a.hidden, a.layers, a.dry_run))
    if "real_model" in sections and real:
        guarded(results, out, "real_model", lambda: real_model_bench(real, out, env, a.dry_run))

if __name__ == "__main__":
    main()
