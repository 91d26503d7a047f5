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
    """The first file's settings and every file's runs. Each file measured the matmul peak at its start,
    under whatever load there was then; MFU is recomputed against the highest of those peaks."""
    head, runs, peaks = None, {}, []
    for f in files:
        data = json.loads(f.read_text())
        head = head or dict(data)
        peaks += [data["peak_gflop_per_s"], data.get("peak_after_gflop_per_s", 0)]
        for r in data["runs"]:
            key = (r["task"], r["tool"], r["variant"], r.get("max_length"))
            if "mfu" in r:
                r["gflop_per_s"] = r["mfu"] * data["peak_gflop_per_s"]
            if "error" not in r or key not in runs:
                runs[key] = r
        if "load_average_end" in data:
            head["load_average_end"] = data["load_average_end"]
    head["peaks"] = peaks
    for r in runs.values():
        if "gflop_per_s" in r:
            r["mfu"] = r["gflop_per_s"] / max(peaks)
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
            lines.append(f"| {task} | default vs TRL {peer}{' (checkpointing on)' if peer == 'default' else ''} | **{ours['rss_mib'] / trl['rss_mib']:.2f}x** "
                         f"({mem_t or '-'}) | **{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x** ({speed_t or '-'}) | "
                         f"{trl['wall_s'] / ours['wall_s']:.2f}x |")
        gc, trl = find(runs, task, "ours", "gradient-checkpointing", length), find(runs, task, "trl", "default", length)
        if gc and trl:  # both with gradient checkpointing
            lines.append(f"| {task} | --gradient-checkpointing vs TRL default (both on) | **{gc['rss_mib'] / trl['rss_mib']:.2f}x** | "
                         f"{gc['tokens_per_s'] / trl['tokens_per_s']:.2f}x | {trl['wall_s'] / gc['wall_s']:.2f}x |")
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
    t = trl[0]
    lines = [f"PPO ({t['episodes']} episodes = {t['episodes'] // t['batch']} iteration(s) of {t['batch']} prompts, "
             f"{t['response_length']} new tokens, 4 PPO epochs of one minibatch, reward and value models = SmolLM2 "
             f"with a fresh scalar head; ../shared/bench/trl_ppo.py and ppo_bench.py's prefalign command):", "",
             "| tool | variant | s/iteration | rollout / score / update s | peak RSS MiB | whole run s | "
             "iterations/s vs trl 1.9.2 (target >= 2x on defaults) | peak RSS vs trl |", "|---|---|---|---|---|---|---|---|",
             f"| trl 1.9.2 | default | {t['s_per_iter']:.1f} | | {t['rss_mib']:.0f} | {t['wall_s']:.0f} | | |"]
    for o in ours:
        what = {"default": "default", "fastest": "fastest (--shared-value-head)",
                "gradient-checkpointing": "--gradient-checkpointing"}.get(o["variant"], o["variant"])
        lines.append(f"| prefalign | {what} | {o['s_per_iter']:.1f} | {o.get('rollout', 0):.1f} / {o.get('score', 0):.1f} / "
                     f"{o.get('update', 0):.1f} | {o['rss_mib']:.0f} | {o['wall_s']:.0f} | "
                     f"**{t['s_per_iter'] / o['s_per_iter']:.2f}x** | {o['rss_mib'] / t['rss_mib']:.2f}x |")
    return lines


def section(head: dict, runs: list[dict]) -> str:
    lengths = sorted({r["max_length"] for r in runs if r.get("max_length")})
    out = [HEADER, "",
           f"- date: {head['date']}; machine: {machine_line()}; {head['threads']} thread(s) per run "
           f"(OMP_NUM_THREADS); **under load**: load average {head['load_average_start'][0]:.1f} at the start, "
           f"{head.get('load_average_end', [float('nan')])[0]:.1f} at the end (other engineers' jobs on the same 2 cores)",
           f"- fp32 matmul peak (1024^2, {head['threads']} thread(s)), measured at the start and end of each "
           f"invocation: {', '.join(f'{p:.0f}' for p in head['peaks'] if p)} GFLOP/s (the load moved it); MFU is "
           f"against the highest, {max(head['peaks']):.0f} GFLOP/s, and counts 6 N per token of every sequence (+2 N "
           f"for TRL's live reference), so prefalign's DPO, which packs each pair's prompt once, can pass 100%",
           f"- model: SmolLM2-135M-Instruct ({head['params']['params'] / 1e6:.1f} M parameters, tied head, "
           f"49,152-token vocabulary), fp32, CPU; batch {head['batch']}, {head['steps']} optimizer steps "
           f"(loop timed over steps {head['warmup'] + 1}-{head['steps']}), lr 2e-5 / 1e-5 / 1e-6 (SFT / reward / DPO)",
           f"- data: the first {head['batch'] * head['steps']} HH-RLHF harmless-base pairs that fit "
           f"{head['max_length']} tokens untruncated (mean {head['mean_tokens']['sft']:.0f} tokens per "
           f"prompt + chosen, {head['mean_tokens']['pair']:.0f} per pair); the {lengths[-1]}-token rows join "
           f"consecutive HH prompts (mean {head.get('long_mean_tokens', {}).get('pair', 0):.0f} tokens per pair), "
           f"batch 1",
           f"- commands: {head.get('note') or '`python benchmarks/real_model.py --json R.json` then `python benchmarks/real_model_report.py R.json`'}",
           "- raw output: `benchmarks/results/cpu-2026-12-02-real-model.txt` and `.json`; targets, where prefalign's "
           "peak comes from, and checkpointing in ppo/rloo/grpo: docs/real-model.md, section d",
           "", *run_table(runs), ""]
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
    ap.add_argument("--note", default=None, help="how the runs were made (replaces the default command line)")
    ap.add_argument("--merged-json", type=Path, default=None, help="also write the merged runs here")
    a = ap.parse_args()
    head, runs = merge(a.json)
    head["note"] = a.note
    if a.merged_json:
        a.merged_json.write_text(json.dumps({**head, "runs": runs}, indent=1))
    text = section(head, runs)
    print(text)
    if not a.no_write:
        update_section(a.results, HEADER, text)


if __name__ == "__main__":
    main()
