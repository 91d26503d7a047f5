"""SmolLM2-135M-Instruct on HH-RLHF harmless pairs: prefalign vs TRL side by side, SFT, reward, DPO, PPO.

usage: python benchmarks/real_model.py [--work DIR] [--steps 2] [--batch 4] [--max-length 512]
       [--threads 1] [--only main,ppo,long,extra] [--json OUT.json] [--dry-run]
       [--device cpu|cuda] [--bf16]

Every run is its own process: peak memory is that child's ru_maxrss (os.wait4), wall time covers the
whole process (imports, load, tokenising, any reference precompute, training; no saving on TRL's
side, prefalign saves its final model). Both tools get the same examples (the first pairs of the
shared HH file whose prompt + completion fits in max_length, so neither tool truncates anything), the same batch size, number of optimizer steps, learning rate and
max length, fp32 on the CPU, the same OMP_NUM_THREADS; runs alternate TRL / prefalign.

Variants: each tool's defaults (TRL's configs default to gradient_checkpointing=True, padded
batches and a live reference copy; prefalign's to packed rows when the model supports it, a
precomputed reference, no checkpointing), each tool's fastest documented setting (TRL:
padding_free=True, precompute_ref_log_probs=True, no checkpointing; prefalign: its defaults), and
gradient checkpointing on and off for both. "long" repeats the SFT and DPO defaults at --long-length
on pairs whose prompt joins consecutive HH dialogues up to that length (memory rows, a couple of steps).

Loop time: steps after the first --warmup (TRL: a callback; prefalign: metrics.jsonl). Tokens: the
examples' own tokens (prompt + completion + EOS per sequence, counted once by our tokenizer, so both
tools are credited the same work). MFU = 6 N tokens (+ 2 N for a live reference forward in the loop)
/ loop time / the fp32 matmul peak measured here (torch, 1024^2, same threads); N = parameters of
every matmul (the tied head counted, the input embedding lookup not; attention scores not counted).
PPO: seconds per iteration and peak memory (trl 1.9.2, ../shared/bench/trl_ppo.py, via ppo_bench.py).
--dry-run writes the data and prints every command without running it (a check on any machine).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout, not an installed copy
from bench_common import ROOT, env_for, run_with_rss  # noqa: E402
from bench_sft_reward import parse_ours, parse_peer  # noqa: E402

PEERS = ROOT / "benchmarks" / "peers"
DATA = ROOT.parent / "shared" / "data" / "hh-harmless-base-test.jsonl.gz"
for _up in (ROOT.parent, ROOT.parent.parent):  # worktrees sit one level deeper
    if (_up / "shared" / "data").is_dir():
        DATA = _up / "shared" / "data" / "hh-harmless-base-test.jsonl.gz"
        break
LR = {"sft": 2e-5, "reward": 1e-5, "dpo": 1e-6}

# (task, tool, variant, options) in run order: TRL and prefalign alternate. TRL's peers leave gradient
# checkpointing off unless given; its configs default it on, so TRL's "default" rows pass it.
# "fastest": TRL's documented speed options (padding_free, precompute_ref_log_probs), no checkpointing.
# (trl 1.16's DPOTrainer ignores padding_free with a warning: "temporarily unavailable after a refactor".)
# prefalign's defaults are already its fastest documented settings (packed rows, precomputed reference).
TRL_DEFAULT = {"sft": ["--layout", "padded", "--gradient-checkpointing"], "reward": ["--gradient-checkpointing"],
               "dpo": ["--gradient-checkpointing"]}
GC = ["--gradient-checkpointing"]
MAIN = [("sft", "trl", "default", TRL_DEFAULT["sft"]), ("sft", "ours", "default", []),
        ("sft", "trl", "fastest", ["--layout", "padding-free"]), ("sft", "ours", "gradient-checkpointing", GC),
        ("reward", "trl", "default", TRL_DEFAULT["reward"]), ("reward", "ours", "default", []),
        ("dpo", "trl", "default", TRL_DEFAULT["dpo"]), ("dpo", "ours", "default", []),
        ("dpo", "trl", "fastest", ["--precompute", "--padding-free"]), ("dpo", "ours", "gradient-checkpointing", GC)]
LONG = [("sft", "trl", "default", TRL_DEFAULT["sft"]), ("sft", "ours", "default", []),
        ("dpo", "trl", "default", TRL_DEFAULT["dpo"]), ("dpo", "ours", "default", []),
        ("sft", "ours", "gradient-checkpointing", GC), ("dpo", "ours", "gradient-checkpointing", GC)]
# Last, so that a run short of time can leave them out: TRL without checkpointing (its cost of it).
EXTRA = [("sft", "trl", "no-checkpointing", ["--layout", "padded"]), ("reward", "trl", "no-checkpointing", []),
         ("dpo", "trl", "no-checkpointing", [])]


def hh_pairs(model_dir: Path, n: int, max_length: int, fill: bool = False) -> list[dict]:
    """The first n HH pairs (prompt/chosen/rejected text) that need no truncation: each prompt +
    completion + EOS at most max_length tokens, so both tools see the same tokens. fill: each prompt
    joins consecutive HH prompts for as long as the pair still fits (long sequences, memory rows)."""
    from prefalign.data import load_preferences
    from prefalign.models import load_tokenizer
    tok = load_tokenizer(str(model_dir))
    pairs, rows, i = load_preferences(str(DATA)), [], 0

    def lengths(prompt: str, ex) -> tuple[int, int, int]:
        return (len(tok(prompt)["input_ids"]), *(len(tok(prompt + c)["input_ids"]) + 1 for c in (ex.chosen, ex.rejected)))

    while len(rows) < n and i < len(pairs):
        ex, prompt, j = pairs[i], pairs[i].prompt, i + 1
        while fill and j < len(pairs) and max(lengths(pairs[j].prompt + prompt, ex)[1:]) <= max_length:
            prompt, j = pairs[j].prompt + prompt, j + 1
        n_prompt, n_c, n_r = lengths(prompt, ex)
        if ex.chosen.strip() and max(n_c, n_r) <= max_length:
            rows.append({"prompt": prompt, "chosen": ex.chosen, "rejected": ex.rejected,
                         "tokens": {"sft": n_c, "pair": n_c + n_r, "prompt": n_prompt}})
        i = j
    if len(rows) < n:
        sys.exit(f"only {len(rows)} HH pairs fit max length {max_length}; need {n}")
    return rows


def write_fixture(out: Path, model_dir: Path, rows: list[dict]) -> Path:
    """A fixture directory as the peer scripts read it: model/ (a link) and pairs.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                             for r in rows))
    if not (out / "model").exists():
        (out / "model").symlink_to(model_dir.resolve())
    return out


def matmul_params(model_dir: Path) -> dict:
    """Parameters that take part in a matmul: all but the input embedding, plus the (tied) head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    total = sum(p.numel() for p in m.parameters())
    emb, head = m.get_input_embeddings().weight.numel(), m.get_output_embeddings().weight.numel()
    return {"params": total, "causal_lm": total - emb + head, "backbone": total - emb}


def peer_command(a, task: str, fx: Path, steps: int, batch: int, max_length: int, extra: list[str]) -> list[str]:
    cmd = [a.trl_python, str(PEERS / f"trl_{task}.py"), str(fx), "--steps", str(steps), "--batch", str(batch),
           "--max-length", str(max_length), "--lr", str(LR[task]), "--warmup-steps", str(a.warmup), *extra]
    return cmd + (["--device", "cuda"] if a.device == "cuda" else []) + (["--bf16"] if a.bf16 else [])


def ours_command(a, task: str, fx: Path, out: Path, steps: int, batch: int, max_length: int,
                 extra: list[str]) -> list[str]:
    cmd = [a.ours_python, "-m", "prefalign", task, "--model", str(fx / "model"), "--data", str(fx / "pairs.jsonl"),
           "--output", str(out), "--max-steps", str(steps), "--batch-size", str(batch), "--max-length",
           str(max_length), "--lr", str(LR[task]), "--logging-steps", "1", "--no-progress", "--device", a.device,
           "--dtype", "auto" if a.bf16 else "float32", *extra]
    if task == "reward":
        cmd += ["--normalize", "none"]  # TRL has no post-training normalisation pass
    if task == "dpo":
        cmd += ["--ref-cache-dir", str(out.parent / "ref-cache")]  # emptied per run: each pays its precompute
    return cmd


def measure(a, task: str, tool: str, variant: str, fx: Path, rows: list[dict], steps: int, batch: int,
            max_length: int, extra: list[str], params: dict, peak: float) -> dict:
    """One run in its own process: wall, peak RSS, loop time, tokens/s, MFU."""
    out = a.work / "runs" / f"{task}-{tool}-{variant}-{max_length}"
    shutil.rmtree(out.parent, ignore_errors=True)  # the previous run's saved model (540 MB) goes: one at a time on disk
    cmd = (peer_command(a, task, fx, steps, batch, max_length, extra) if tool == "trl"
           else ours_command(a, task, fx, out / "run", steps, batch, max_length, extra))
    res = {"task": task, "tool": tool, "variant": variant, "max_length": max_length, "batch": batch, "steps": steps,
           "command": " ".join(cmd)}
    if a.dry_run:
        print("dry-run:", res["command"], flush=True)
        return res
    out.mkdir(parents=True)
    env = env_for(a.threads)
    if tool == "trl":
        env["PYTHONPATH"] = str(PEERS)
    try:
        r = run_with_rss(cmd, env)
    except RuntimeError as e:  # recorded, and the next run still goes
        print(f"FAILED {task} {tool} {variant}: {str(e)[-1500:]}", flush=True)
        return {**res, "error": str(e)[-1500:]}
    loop = parse_peer(r["stdout"]) if tool == "trl" else parse_ours(out / "run", a.warmup)
    if tool == "ours":  # loss: the mean over all steps, as TRL's training_loss
        logged = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        loop["loss"] = sum(x["loss"] for x in logged) / len(logged)
        loop["peak_gpu_mem_gb"] = logged[-1].get("perf/peak_gpu_mem_gb")  # on cuda; the peers print theirs
    per_example = sum(x["tokens"]["sft" if task == "sft" else "pair"] for x in rows) / len(rows)
    tokens = per_example * batch * (steps - a.warmup)
    live_ref = task == "dpo" and tool == "trl" and "--precompute" not in extra
    flops = (6 * params["backbone" if task == "reward" else "causal_lm"] + 2 * params["causal_lm"] * live_ref) * tokens
    res.update(wall_s=round(r["wall_s"], 1), rss_mib=round(r["rss_mib"]), loop_s=round(loop["wall_s"], 2),
               cpu_s=round(loop["cpu_s"], 2), s_per_step=round(loop["wall_s"] / (steps - a.warmup), 2),
               tokens_per_s=round(tokens / loop["wall_s"], 1), mfu=round(flops / loop["wall_s"] / 1e9 / peak, 4),
               loss=loop.get("loss"), load_average=os.getloadavg(),
               **({"peak_gpu_mem_gb": loop.get("peak_gpu_mem_gb")} if a.device == "cuda" else {}))
    return res


PPO = [("trl", "default", ()), ("ours", "default", ()), ("ours", "fastest", ("--shared-value-head",)),
       ("ours", "gradient-checkpointing", ("--gradient-checkpointing",))]


def ppo_runs(a, fx: Path) -> list[dict]:
    """trl 1.9.2 PPOTrainer vs prefalign ppo, via ppo_bench: our defaults (packed forwards, a separate
    value model as TRL's), our fastest documented setting (--shared-value-head: the value head on
    the policy, one model's forward and backward less per update) and the defaults with
    --gradient-checkpointing (memory against time)."""
    import ppo_bench
    episodes = a.ppo_iterations * a.ppo_batch
    runs = []
    for tool, variant, extra in PPO:
        if a.select and f"ppo/{tool}/{variant}" not in a.select:
            continue
        res = {"task": "ppo", "tool": tool, "variant": variant, "episodes": episodes, "batch": a.ppo_batch,
               "response_length": ppo_bench.RESPONSE_LENGTH}
        if a.dry_run:
            print(f"dry-run: ppo {tool} {variant} ({episodes} episodes, batch {a.ppo_batch}) via benchmarks/ppo_bench.py",
                  flush=True)
            runs.append(res)
            continue
        t0 = time.perf_counter()
        got = (ppo_bench.run_trl(a.trl_ppo_python, fx, episodes, a.ppo_batch) if tool == "trl"
               else ppo_bench.run_prefalign(fx, packing=False, episodes=episodes, batch=a.ppo_batch, extra=extra))
        res.update({k: round(v, 3) for k, v in got.items()}, wall_s=round(time.perf_counter() - t0, 1),
                   load_average=os.getloadavg())
        print(json.dumps(res), flush=True)
        runs.append(res)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/prefalign-real-model"))
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per run (both tools)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of the loop")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--long-length", type=int, default=2048)
    ap.add_argument("--long-batch", type=int, default=1)
    ap.add_argument("--long-steps", type=int, default=2)
    ap.add_argument("--ppo-iterations", type=int, default=1)
    ap.add_argument("--ppo-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    ap.add_argument("--only", default="main,ppo,long,extra", help="blocks to run: main (SFT, reward, DPO), ppo, "
                    "long (memory at --long-length), extra (TRL without gradient checkpointing)")
    ap.add_argument("--select", type=lambda s: set(s.split(",")), default=None,
                    help="only these runs of the chosen blocks, as task/tool/variant (e.g. sft/trl/fastest)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16: TRL bf16=True, prefalign --dtype auto (GPU runs)")
    ap.add_argument("--trl-python", default=str(ROOT / ".bench" / "trl" / "bin" / "python"))
    ap.add_argument("--trl-ppo-python", default=str(ROOT / ".bench" / "trl-ppo" / "bin" / "python"))
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true", help="write the data, print the commands, run nothing")
    a = ap.parse_args()
    only = set(a.only.split(","))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)  # ppo_bench's children
    from dpo_speed import matmul_peak_gflops
    peak = matmul_peak_gflops(a.threads)
    params = matmul_params(a.model)
    rows = hh_pairs(a.model, a.steps * a.batch, a.max_length)
    fx = write_fixture(a.work / "fixture", a.model, rows)
    head = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_start": os.getloadavg(),
            "threads": a.threads, "peak_gflop_per_s": round(peak, 1), "params": params, "steps": a.steps,
            "warmup": a.warmup, "batch": a.batch, "max_length": a.max_length, "device": a.device, "bf16": a.bf16,
            "mean_tokens": {k: sum(r["tokens"][k] for r in rows) / len(rows) for k in ("sft", "pair", "prompt")}}
    print(json.dumps(head), flush=True)
    runs = []

    def save() -> None:  # after every run, so that a stopped benchmark keeps what it measured
        if a.json and not a.dry_run:
            a.json.write_text(json.dumps({**head, "runs": runs}, indent=1))

    def block(name: str, plan: list, fixture: Path, rows: list[dict], steps: int, batch: int, length: int) -> None:
        for task, tool, variant, extra in plan if name in only else []:
            if a.select and f"{task}/{tool}/{variant}" not in a.select:
                continue
            runs.append(measure(a, task, tool, variant, fixture, rows, steps, batch, length, extra, params, peak))
            print(json.dumps(runs[-1]), flush=True)
            save()

    block("main", MAIN, fx, rows, a.steps, a.batch, a.max_length)
    if "long" in only:
        long_rows = hh_pairs(a.model, a.long_steps * a.long_batch, a.long_length, fill=True)
        head["long_mean_tokens"] = {k: sum(r["tokens"][k] for r in long_rows) / len(long_rows) for k in ("sft", "pair")}
        block("long", LONG, write_fixture(a.work / "fixture-long", a.model, long_rows), long_rows, a.long_steps,
              a.long_batch, a.long_length)
    if "ppo" in only and a.device == "cuda":
        print("ppo skipped on cuda: ../shared/bench/trl_ppo.py (read-only) runs trl 1.9.2 on the CPU only", flush=True)
    elif "ppo" in only:
        ppo_fx = write_fixture(a.work / "fixture-ppo", a.model,
                               [r for r in hh_pairs(a.model, 4 * a.ppo_iterations * a.ppo_batch, 256)
                                if r["tokens"]["prompt"] <= 128][:a.ppo_iterations * a.ppo_batch])
        runs.extend(ppo_runs(a, ppo_fx))
        save()
    block("extra", EXTRA, fx, rows, a.steps, a.batch, a.max_length)
    head["peak_after_gflop_per_s"] = round(matmul_peak_gflops(a.threads), 1)
    head["load_average_end"] = os.getloadavg()
    print(json.dumps(head), flush=True)
    save()


if __name__ == "__main__":
    main()
