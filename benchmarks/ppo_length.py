"""Why does the demo's PPO run its completions to the length cap? (issue #16, 4th bullet; docs/ppo-length.md)

Two parts, each rerunnable on the demo's models (`make demo` output, or a copy of its sft/, reward/, data/):

  probe    the reward model's score of the same text with and without a final EOS. SFT completions of
           held-out prompts are sampled as `prefalign ppo` samples them (max 48 new tokens); each is scored
           as ppo scores it (the policy's ids, EOS included when it ended), then
             ended ones:     without their EOS                    (does the RM pay for not ending?)
             every prefix:   cut after k tokens, with and without an EOS appended
             truncated ones: with an EOS appended at the cap
           and the gold reward of the same texts, and the length correlations.
           With --policy DIR (a PPO output) also the sampled per-token KL k1 = log pi - log ref summed
           per completion, by length.
  runs     short `prefalign ppo` runs from the SFT model with the demo's settings, one change each,
           logging per iteration EOS share, length, reward-model score, gold reward (both as reward
           sources, the unused one at weight 0) and KL; then a table.

    python benchmarks/ppo_length.py probe --demo /tmp/ppolength
    python benchmarks/ppo_length.py runs --demo /tmp/ppolength --out /tmp/ppolength/runs --iterations 16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
GOLD = f"{HERE / 'ppo_length_rewards.py'}"

# the demo's PPO settings (src/prefalign/lab/demo_plan.py DEFAULT, lab/demo_stages.py ppo_segment)
DEMO_PPO = ["--rollout-batch-size", "64", "--minibatch-size", "32", "--ppo-epochs", "2", "--kl-coef", "0.2",
            "--lr", "5e-5", "--lr-schedule", "constant", "--max-new-tokens", "48", "--max-prompt-length", "64",
            "--device", "cpu", "--no-progress", "--no-packing"]

CUT_EOS = ["--reward-fn", f"{GOLD}:gold", "--reward-weights", "1,0", "--missing-eos-penalty", "1.0",
           "--score-cut-at-eos"]

# one change each against the first (the demo as it is)
# ({demo} is replaced by --demo)
VARIANTS = {
    "rm": ["--reward-fn", f"{GOLD}:gold", "--reward-weights", "1,0"],
    "rm_value_sft": ["--reward-fn", f"{GOLD}:gold", "--reward-weights", "1,0", "--value-model", "{demo}/sft"],
    "rm_at_eos": ["--reward-fn", f"{GOLD}:gold,{GOLD}:rm_at_eos", "--reward-weights", "0,0,1"],
    "rm_at_eos_value_sft": ["--reward-fn", f"{GOLD}:gold,{GOLD}:rm_at_eos", "--reward-weights", "0,0,1",
                            "--value-model", "{demo}/sft"],
    "rm_eos_penalty": ["--reward-fn", f"{GOLD}:gold", "--reward-weights", "1,0", "--missing-eos-penalty", "1.0"],
    "rm_eos_penalty3": ["--reward-fn", f"{GOLD}:gold", "--reward-weights", "1,0", "--missing-eos-penalty", "3.0"],
    "rm_at_eos_eos_penalty": ["--reward-fn", f"{GOLD}:gold,{GOLD}:rm_at_eos", "--reward-weights", "0,0,1",
                              "--missing-eos-penalty", "1.0"],
    # the demo since 2026-12-03 (--score-cut-at-eos with the penalty), then one more change each
    "cut_eos": CUT_EOS,
    "cut_eos_lr2e-5": [*CUT_EOS, "--lr", "2e-5"],
    "cut_eos_lr1e-4": [*CUT_EOS, "--lr", "1e-4"],
    "cut_eos_rollout128": [*CUT_EOS, "--rollout-batch-size", "128", "--minibatch-size", "64"],
    "cut_eos_value_sft": [*CUT_EOS, "--value-model", "{demo}/sft"],
    # KL efficiency (2026-12-03): a larger KL coefficient, GAE lambda 1, whitened scores
    "cut_eos_kl0.5": [*CUT_EOS, "--kl-coef", "0.5"],
    "cut_eos_kl1": [*CUT_EOS, "--kl-coef", "1.0"],
    "cut_eos_lam1": [*CUT_EOS, "--lam", "1.0"],
    "cut_eos_whiten": [*CUT_EOS, "--normalize-scores"],
    "rm_kl0": ["--reward-fn", f"{GOLD}:gold", "--reward-weights", "1,0", "--kl-coef", "0"],
    "gold10": ["--reward-fn", f"{GOLD}:gold10", "--reward-weights", "0,1"],
    "gold10_value_sft": ["--reward-fn", f"{GOLD}:gold10", "--reward-weights", "0,1", "--value-model", "{demo}/sft"],
}


# --------------------------------------------------------------------------- probe

def rm_scores(rm, seqs: list[list[int]], pad: int, batch: int = 64) -> np.ndarray:
    """(N,) normalised reward-model scores at the last token of each id list (right-padded batches)."""
    out = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, s in enumerate(chunk):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = True
        with torch.no_grad():
            out.append(rm.normalized(rm(ids, mask)).float().numpy())
    return np.concatenate(out)


def sample_completions(policy, tok, prompts: list[str], max_new_tokens: int, seed: int):
    """[(prompt ids, response ids without EOS, ended)] sampled as ppo samples (temperature 1)."""
    from prefalign.data import encode_prompt
    from prefalign.rollout import sample
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(0, len(prompts), 64):
        q = [encode_prompt(tok, p, 64) for p in prompts[i:i + 64]]
        with torch.no_grad():
            r = sample(policy, q, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, generator=gen)
        for qi, ids, mask, ended in zip(q, r.response_ids, r.response_mask, r.ended_with_eos):
            resp = ids[mask].tolist()
            rows.append((qi, resp[:-1] if bool(ended) else resp, bool(ended)))
    return rows


def probe(args) -> dict:
    from prefalign.lab.gold import gold_rewards
    from prefalign.models import load_scalar_model
    from prefalign.models.causal_lm import load_causal_lm
    demo = Path(args.demo)
    torch.manual_seed(0)
    policy, tok = load_causal_lm(str(args.policy or demo / "sft"), trainable=False)
    rm, _ = load_scalar_model(str(demo / "reward"), trainable=False)
    prompts = [json.loads(line)["prompt"] for line in open(demo / "data" / "prompts_heldout.jsonl")][:args.prompts]
    prompts = prompts * args.repeats
    rows = sample_completions(policy, tok, prompts, args.max_new_tokens, args.seed)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ended = np.array([e for _, _, e in rows])
    lengths = np.array([len(r) + e for _, r, e in rows])  # tokens ppo counts (EOS included)
    as_ppo = rm_scores(rm, [q + r + ([eos] if e else []) for q, r, e in rows], pad)
    with_eos = rm_scores(rm, [q + r + [eos] for q, r, _ in rows], pad)
    without_eos = rm_scores(rm, [q + r for q, r, _ in rows], pad)
    texts = [tok.decode(q, skip_special_tokens=True) + tok.decode(r, skip_special_tokens=True) for q, r, _ in rows]
    gold = gold_rewards(texts)
    res = {"policy": str(args.policy or demo / "sft"), "completions": len(rows), "eos_share": float(ended.mean()),
           "mean_length": float(lengths.mean()),
           "rm_as_ppo_scores": {"ended": float(as_ppo[ended].mean()), "truncated": float(as_ppo[~ended].mean())
                                if (~ended).any() else None},
           "gold": {"ended": float(gold[ended].mean()),
                    "truncated": float(gold[~ended].mean()) if (~ended).any() else None},
           "corr_length_rm": float(np.corrcoef(lengths, as_ppo)[0, 1]),
           "corr_length_gold": float(np.corrcoef(lengths, gold)[0, 1]),
           "corr_length_rm_at_eos": float(np.corrcoef(lengths, with_eos)[0, 1]),
           "rm_at_eos_mean": float(with_eos.mean()), "gold_mean": float(gold.mean()),
           # the same text, scored at its last word token vs at an EOS after it
           "rm_without_minus_with_eos": summary(without_eos - with_eos),
           "rm_without_minus_with_eos_ended": summary((without_eos - with_eos)[ended]),
           "rm_without_minus_with_eos_truncated": summary((without_eos - with_eos)[~ended])
           if (~ended).any() else None}
    res["rm_score_std"] = float(as_ppo.std())
    res["prefix_cut"] = prefix_cuts(rm, rows, eos, pad)
    if not args.policy:  # PPO's first iteration starts from the SFT samples
        res["first_iteration_advantages"] = {
            "value_from_reward_model": first_advantages(demo / "reward", rows, as_ppo, eos, pad),
            "value_new_head_on_sft": first_advantages(demo / "sft", rows, as_ppo, eos, pad)}
    if args.policy:
        res["kl_by_length"] = kl_by_length(args, demo, rows, lengths)
    return res


def summary(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / np.sqrt(len(x))), "share_positive": float((x > 0).mean()),
            "n": int(len(x))}


def prefix_cuts(rm, rows, eos: int, pad: int) -> dict:
    """Each ended completion of >= 12 tokens cut after k = 4, 8, ... tokens: the RM score of the cut
    text ending mid-completion (no EOS, as a truncated rollout is scored) minus the same cut + EOS."""
    out = {}
    for k in (4, 8, 16, 24, 32):
        cut = [(q, r[:k]) for q, r, e in rows if e and len(r) > k]
        if len(cut) < 8:
            continue
        no = rm_scores(rm, [q + r for q, r in cut], pad)
        yes = rm_scores(rm, [q + r + [eos] for q, r in cut], pad)
        out[f"cut_{k}"] = {"rm_no_eos": float(no.mean()), "rm_with_eos": float(yes.mean()), **summary(no - yes)}
    return out


def first_advantages(value_path: Path, rows, scores: np.ndarray, eos: int, pad: int, n: int = 128) -> dict:
    """PPO's first iteration on these rows as the ppo stage computes it (KL = 0 before any update, so
    r_t = score on the last token; GAE(gamma=1, lambda=0.95); advantages whitened over the batch), with
    the value model ppo starts from: the reward model by default (head folded to normalised scores),
    or a new head on the SFT model (--value-model sft). Mean whitened advantage of the EOS tokens and
    of the other tokens, and the mean TD residual on EOS: score - V(state before EOS)."""
    from prefalign.losses import gae, whiten
    from prefalign.models import load_scalar_model
    from prefalign.rl.forwards import token_values
    from prefalign.rollout import left_pad
    value, _ = load_scalar_model(str(value_path), trainable=False, seed=0)
    value.fold_normalization()
    rows = rows[:n]
    q_ids, q_mask = left_pad([q for q, _, _ in rows], pad)
    resp = [r + ([eos] if e else []) for _, r, e in rows]
    width = max(len(r) for r in resp)
    r_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    r_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(resp):
        r_ids[i, :len(r)] = torch.tensor(r)
        r_mask[i, :len(r)] = True
    with torch.no_grad():
        values = token_values(value, q_ids, q_mask, r_ids, r_mask)  # (B, R)
    rewards = torch.zeros_like(values)
    last = r_mask.sum(1) - 1
    rewards[torch.arange(len(rows)), last] = torch.as_tensor(scores[:n], dtype=torch.float32)
    adv = whiten(gae(rewards, values, r_mask, 1.0, 0.95)[0], r_mask)
    is_eos = r_mask & (r_ids == eos)
    is_eos[:, :] &= torch.tensor([e for _, _, e in rows])[:, None]
    delta_eos = rewards[is_eos] - values[is_eos]
    return {"adv_eos_tokens": float(adv[is_eos].mean()), "adv_other_tokens": float(adv[r_mask & ~is_eos].mean()),
            "td_residual_on_eos": float(delta_eos.mean()), "values_mean": float(values[r_mask].mean()),
            "n_eos": int(is_eos.sum())}


def kl_by_length(args, demo: Path, rows, lengths: np.ndarray) -> dict:
    """Per-completion sum of k1 = log pi - log ref over the sampled tokens (EOS included), by length bin,
    and its per-token mean on the EOS token vs the others."""
    from prefalign.models.causal_lm import load_causal_lm
    policy, tok = load_causal_lm(str(args.policy), trainable=False)
    ref, _ = load_causal_lm(str(demo / "sft"), trainable=False)
    eos = tok.eos_token_id
    sums, eos_k1, other_k1 = [], [], []
    for q, r, e in rows:
        resp = r + ([eos] if e else [])
        ids = torch.tensor([q + resp])
        with torch.no_grad():
            lp = [torch.log_softmax(m(ids).logits[0, len(q) - 1:-1].float(), -1) for m in (policy, ref)]
        tgt = torch.tensor(resp)
        k1 = (lp[0].gather(1, tgt[:, None]) - lp[1].gather(1, tgt[:, None]))[:, 0].numpy()
        sums.append(k1.sum())
        other_k1.extend(k1[:-1] if e else k1)
        if e:
            eos_k1.append(k1[-1])
    sums = np.array(sums)
    bins = {}
    for lo, hi in ((1, 16), (16, 32), (32, 48), (48, 49)):
        sel = (lengths >= lo) & (lengths < hi)
        if sel.any():
            bins[f"len_{lo}-{hi - 1}"] = {"n": int(sel.sum()), "kl_sum_mean": float(sums[sel].mean()),
                                          "kl_per_token": float(sums[sel].sum() / lengths[sel].sum())}
    return {"kl_mean": float(sums.mean()), "bins": bins, "k1_mean_on_eos_token": float(np.mean(eos_k1)) if eos_k1 else None,
            "k1_mean_on_other_tokens": float(np.mean(other_k1)), "corr_length_klsum": float(np.corrcoef(lengths, sums)[0, 1])}


# --------------------------------------------------------------------------- runs

def run_dir(name: str, args) -> Path:
    return Path(args.out) / (name if args.seed == 0 else f"{name}_seed{args.seed}")


def run_variant(name: str, args) -> Path:
    demo, out = Path(args.demo), run_dir(name, args)
    cmd = [sys.executable, "-m", "prefalign", "ppo", "--model", str(demo / "sft"), "--ref-model", str(demo / "sft"),
           "--reward-model", str(demo / "reward"), "--prompts", str(demo / "data" / "prompts_train.jsonl"),
           "--iterations", str(args.iterations), "--output", str(out), "--seed", str(args.seed), *DEMO_PPO,
           *(a.replace("{demo}", str(demo)) for a in VARIANTS[name])]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PPO_LENGTH_RM": str(demo / "reward")})
    return out


def run_segments(args) -> list[Path]:
    """The demo's PPO as `make demo` runs it: --segments runs of --iterations each, segment k from the
    last one's policy and value model with seed + k - 1 (lab/demo.py ppo_policies), reference = SFT."""
    demo, outs = Path(args.demo), []
    model, value = demo / "sft", None
    for k in range(1, args.segments + 1):
        out = Path(args.out) / f"segments_{k}"
        cmd = [sys.executable, "-m", "prefalign", "ppo", "--model", str(model), "--ref-model", str(demo / "sft"),
               "--reward-model", str(demo / "reward"), "--prompts", str(demo / "data" / "prompts_train.jsonl"),
               "--iterations", str(args.iterations), "--output", str(out), "--seed", str(args.seed + k - 1),
               *DEMO_PPO, *VARIANTS["rm"], *(["--value-model", str(value)] if value else [])]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        model, value = out, out / "value_model"
        outs.append(out)
    return outs


def gold_of(row: dict) -> float:
    """The gold reward r* in [0, 1] of an iteration's samples (gold10 runs log 10 r*)."""
    return row["rewards/gold/mean"] if "rewards/gold/mean" in row else row["rewards/gold10/mean"] / 10


def table(name: str, out: Path) -> str:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    lines = [f"== {out.name}: {' '.join(VARIANTS[name])}",
             "iter  eos   length  rm_score  gold   kl     s/iter"]
    for r in rows:
        lines.append(f"{r['step']:>4}  {r['eos_rate']:.2f}  {r['response_length']:6.1f}  {r['rewards/reward/mean']:+.3f}"
                     f"    {gold_of(r):.3f}  {r['objective/kl']:5.2f}"
                     f"  {r['perf/time_rollout_s'] + r['perf/time_score_s'] + r['perf/time_update_s']:5.1f}")
    last = rows[-4:]  # one rollout of 64 is noisy (EOS share: se ~0.06), so the last 4 iterations' mean

    def mean(key):
        return sum(r[key] for r in last) / len(last)
    lines.append(f"last {len(last)} mean: eos {mean('eos_rate'):.2f}  length {mean('response_length'):.1f}  "
                 f"rm {mean('rewards/reward/mean'):+.3f}  gold {sum(map(gold_of, last)) / len(last):.3f}"
                 f"  kl {mean('objective/kl'):.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="reward-model score with and without a final EOS")
    p.add_argument("--demo", required=True, help="folder with sft/, reward/, data/ of a demo run")
    p.add_argument("--policy", help="a PPO output folder: also the sampled KL by length under it")
    p.add_argument("--prompts", type=int, default=200, help="held-out prompts")
    p.add_argument("--repeats", type=int, default=2, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48, help="the demo's cap")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    r = sub.add_parser("runs", help="short ppo runs, one change each")
    r.add_argument("--demo", required=True, help="folder with sft/, reward/, data/ of a demo run")
    r.add_argument("--out", required=True, help="where the runs go")
    r.add_argument("--iterations", type=int, default=16, help="PPO iterations per run")
    r.add_argument("--seed", type=int, default=0, help="ppo --seed (runs of seed s > 0 go to NAME_seed<s>)")
    r.add_argument("--only", help="comma-separated variants (default: all): " + ", ".join(VARIANTS))
    r.add_argument("--table-only", action="store_true", help="print the tables of finished runs")
    g = sub.add_parser("segments", help="the demo's PPO in segments (each a new ppo run continuing the last)")
    g.add_argument("--demo", required=True, help="folder with sft/, reward/, data/ of a demo run")
    g.add_argument("--out", required=True, help="where the segments go (segments_1, ...)")
    g.add_argument("--segments", type=int, default=5, help="the demo's ppo_segments")
    g.add_argument("--iterations", type=int, default=12, help="the demo's ppo_iterations per segment")
    g.add_argument("--seed", type=int, default=0, help="the demo's seed (segment k uses seed + k - 1)")
    args = ap.parse_args()
    if args.cmd == "segments":
        for out in run_segments(args):
            print(table("rm", out), flush=True)
        return
    if args.cmd == "probe":
        print(json.dumps(probe(args), indent=1))
        return
    for name in (args.only.split(",") if args.only else VARIANTS):
        out = run_dir(name, args) if args.table_only else run_variant(name, args)
        print(table(name, out), flush=True)


if __name__ == "__main__":
    main()
