"""The RESULTS.md section of benchmarks/real_model.py: every run, then the ratios the targets name.

usage: python benchmarks/real_model_report.py RESULT.json [MORE.json ...] [--no-write]
Later files replace earlier runs of the same (task, tool, variant, max length): a rerun of a failed
run goes last.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import machine_line, update_section  # noqa: E402

HEADER = "## SmolLM2-135M on HH-RLHF: prefalign vs TRL, whole runs (`benchmarks/real_model.py`)"
TARGETS = {"sft": ("<= 0.5x", ">= 2x"), "reward": ("", ">= 2x"), "dpo": ("<= 0.5x", ">= 2x")}


def merge(files: list[Path]) -> tuple[dict, list[dict]]:
    head, runs = None, {}
    for f in files:
        data = json.loads(f.read_text())
        head = head or data
        for r in data["runs"]:
            key = (r["task"], r["tool"], r["variant"], r.get("max_length"))
            if "error" not in r or key not in runs:
                runs[key] = r
    return head, list(runs.values())


def find(runs, task, tool, variant, length=None):
    for r in runs:
        if (r["task"], r["tool"], r["variant"]) == (task, tool, variant) and (length is None or r.get("max_length") == length) \
                and "error" not in r:
            return r
    return None


def run_table(runs: list[dict]) -> list[str]:
    lines = ["| task | max length | tool | variant | whole run s | peak RSS MiB | loop s/step | tokens/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r["task"] == "ppo":
            continue
        if "error" in r:
            lines.append(f"| {r['task']} | {r['max_length']} | {r['tool']} | {r['variant']} | failed: "
                         f"{r['error'].strip().splitlines()[-1][:120]} | | | | |")
            continue
        lines.append(f"| {r['task']} | {r['max_length']} | {r['tool']} | {r['variant']} | {r['wall_s']:.0f} | "
                     f"{r['rss_mib']} | {r['s_per_step']:.1f} | {r['tokens_per_s']:.1f} | {100 * r['mfu']:.0f}% |")
    return lines


def ratio_lines(runs: list[dict], length: int) -> list[str]:
    lines = [f"| {length} tokens | ours vs TRL | peak RSS (target) | loop speed (target) | whole run speed |",
             "|---|---|---|---|---|"]
    for task in ("sft", "reward", "dpo"):
        ours = find(runs, task, "ours", "default", length)
        for peer in ("default", "fastest", "no-checkpointing"):
            trl = find(runs, task, "trl", peer, length)
            if not (ours and trl):
                continue
            mem_t, speed_t = TARGETS[task] if peer == "default" and length == 512 else ("", "")
            lines.append(f"| {task} | default vs TRL {peer} | **{ours['rss_mib'] / trl['rss_mib']:.2f}x** "
                         f"({mem_t or '-'}) | **{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x** ({speed_t or '-'}) | "
                         f"{trl['wall_s'] / ours['wall_s']:.2f}x |")
    return lines


def checkpointing_lines(runs: list[dict]) -> list[str]:
    lines = ["| task | tool | peak RSS without -> with | memory saved | time per step without -> with |",
             "|---|---|---|---|---|"]
    for task in ("sft", "reward", "dpo"):
        pairs = [("ours", find(runs, task, "ours", "default", 512), find(runs, task, "ours", "gradient-checkpointing", 512)),
                 ("trl", find(runs, task, "trl", "no-checkpointing", 512), find(runs, task, "trl", "default", 512))]
        for tool, off, on in pairs:
            if off and on:
                lines.append(f"| {task} | {tool} | {off['rss_mib']} -> {on['rss_mib']} MiB | "
                             f"{off['rss_mib'] - on['rss_mib']} MiB ({1 - on['rss_mib'] / off['rss_mib']:.0%}) | "
                             f"{off['s_per_step']:.1f} -> {on['s_per_step']:.1f} s "
                             f"(x{on['s_per_step'] / off['s_per_step']:.2f}) |")
    return lines


def ppo_lines(runs: list[dict]) -> list[str]:
    trl = [r for r in runs if r["task"] == "ppo" and r["tool"] == "trl" and "s_per_iter" in r]
    ours = [r for r in runs if r["task"] == "ppo" and r["tool"] == "ours" and "s_per_iter" in r]
    if not (trl and ours):
        return ["PPO: no complete pair of runs."]
    t, o = min(trl, key=lambda r: r["s_per_iter"]), min(ours, key=lambda r: r["s_per_iter"])
    return [f"PPO ({o['episodes']} episodes = {o['episodes'] // o['batch']} iteration(s) of {o['batch']} prompts, "
            f"{o['response_length']} new tokens, 4 PPO epochs, reward and value models = SmolLM2 with a fresh "
            f"scalar head): trl 1.9.2 {t['s_per_iter']:.1f} s/iteration, {t['rss_mib']:.0f} MiB; prefalign "
            f"{o['s_per_iter']:.1f} s/iteration (rollout {o.get('rollout', 0):.1f} s, score {o.get('score', 0):.1f} s, "
            f"update {o.get('update', 0):.1f} s), {o['rss_mib']:.0f} MiB: **{t['s_per_iter'] / o['s_per_iter']:.2f}x** "
            f"iterations/s (target >= 2x), peak RSS **{o['rss_mib'] / t['rss_mib']:.2f}x**; whole runs "
            f"{t['wall_s']:.0f} s vs {o['wall_s']:.0f} s."]


def section(head: dict, runs: list[dict]) -> str:
    lengths = sorted({r["max_length"] for r in runs if r.get("max_length")})
    out = [HEADER, "",
           f"- date: {head['date']}; machine: {machine_line()}; {head['threads']} thread(s) per run "
           f"(OMP_NUM_THREADS); **under load**: load average {head['load_average_start'][0]:.1f} at the start, "
           f"{head.get('load_average_end', [float('nan')])[0]:.1f} at the end (other engineers' jobs on the same 2 cores)",
           f"- fp32 matmul peak (1024^2, {head['threads']} thread(s)): {head['peak_gflop_per_s']} GFLOP/s before, "
           f"{head.get('peak_after_gflop_per_s', '?')} after; MFU is against the first",
           f"- model: SmolLM2-135M-Instruct ({head['params']['params'] / 1e6:.1f} M parameters, tied head, "
           f"49,152-token vocabulary), fp32, CPU; batch {head['batch']}, {head['steps']} optimizer steps "
           f"(loop timed over steps {head['warmup'] + 1}-{head['steps']}), lr 2e-5 / 1e-5 / 1e-6 (SFT / reward / DPO)",
           f"- data: the first {head['batch'] * head['steps']} HH-RLHF harmless-base pairs that fit "
           f"{head['max_length']} tokens untruncated (mean {head['mean_tokens']['sft']:.0f} tokens per "
           f"prompt + chosen, {head['mean_tokens']['pair']:.0f} per pair); the {lengths[-1]}-token rows join "
           f"consecutive HH prompts (mean {head.get('long_mean_tokens', {}).get('pair', 0):.0f} tokens per pair), "
           f"batch 1",
           "- command: `python benchmarks/real_model.py --json ...` then "
           "`python benchmarks/real_model_report.py ...json`", "", *run_table(runs), ""]
    for length in lengths:
        out += [*ratio_lines(runs, length), ""]
    out += ["Gradient checkpointing (TRL's configs turn it on by default; prefalign's is off):", "",
            *checkpointing_lines(runs), "", *ppo_lines(runs), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    head, runs = merge(a.json)
    text = section(head, runs)
    print(text)
    if not a.no_write:
        update_section(a.results, HEADER, text)


if __name__ == "__main__":
    main()
