"""The demo's measurements on held-out prompts: SFT samples (best-of-n and the reward model's held-out
accuracy come from them, and the optimum frontier's pool starts with them) and one evaluation per trained
policy (whose samples join that pool: lab.demo_frontier).

SFT gets no separate evaluation: with N samples per prompt its mean gold reward is measured more
precisely by the frontier samples than by a policy-sized sample, its KL to itself is 0, and its win
rate against itself is 1/2. The same N samples are every policy's win-rate baseline: a policy
sample is compared with all N SFT samples of its prompt, which lowers the variance of the win rate.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from prefalign.data import encode_prompt_completion
from prefalign.lab.demo_data import ids_array, read_jsonl
from prefalign.lab.demo_plan import DemoPlan
from prefalign.lab.evaluate import evaluate_policy, sample_completions
from prefalign.lab.frontier import best_of_n
from prefalign.lab.gold import gold_rewards
from prefalign.lab.labeler import bayes_optimal_accuracy, label_pairs
from prefalign.models import load_causal_lm, load_scalar_model
from prefalign.stages.reward import score_sequences
from prefalign.train.logger import write_summary


def heldout_prompts(data_dir: Path) -> list[str]:
    return [r["prompt"] for r in read_jsonl(data_dir / "prompts_heldout.jsonl")]


@torch.no_grad()
def reward_model_scores(reward_dir: Path, prompts: list[str], completions: list[str], max_length: int) -> np.ndarray:
    """Normalised reward-model scores (N,) of prompt + completion, as `prefalign score` computes them."""
    model, tokenizer = load_scalar_model(str(reward_dir), trainable=False)
    seqs = [encode_prompt_completion(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]
    raw = score_sequences(model, seqs, tokenizer.pad_token_id, batch_size=64, device=torch.device("cpu"),
                          desc="reward-model scores")
    return model.normalized(raw).double().numpy()


def sft_samples(d: Path, sft_dir: Path, reward_dir: Path, data_dir: Path, plan: DemoPlan, seed: int) -> None:
    """N SFT samples per held-out prompt, with gold and reward-model scores: samples.npz, samples.jsonl.

    Consecutive samples of a prompt are paired and labelled by the simulated labeler: the reward
    model's held-out accuracy is measured on those pairs, next to their Bayes-optimal accuracy.
    """
    model, tokenizer = load_causal_lm(str(sft_dir))
    model.eval()
    prompts, n = heldout_prompts(data_dir), plan.frontier_samples
    flat_prompts = [p for p in prompts for _ in range(n)]                       # prompt-major: (P * N,)
    ids = sample_completions(model, tokenizer, flat_prompts, plan.max_new_tokens, batch_size=256, seed=seed,
                             progress="SFT samples")
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in ids]
    gold = gold_rewards([p + c for p, c in zip(flat_prompts, texts)]).reshape(len(prompts), n)   # (P, N)
    proxy = reward_model_scores(reward_dir, flat_prompts, texts, plan.max_length).reshape(len(prompts), n)
    # completion_ids: the sampled tokens themselves, which the frontier's pool scores under every policy
    # (decoded text does not give them back: it drops the EOS and may re-tokenise differently).
    np.savez_compressed(d / "samples.npz", gold=gold, proxy=proxy,
                        ended_with_eos=np.array([bool(c) and c[-1] == tokenizer.eos_token_id for c in ids]
                                                ).reshape(gold.shape),
                        completion_ids=ids_array(ids, plan.max_new_tokens).reshape(*gold.shape, -1))   # (P, N, T)
    (d / "samples.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                             for p, c in zip(flat_prompts, texts)), encoding="utf-8")
    write_summary(d, {"stage": "sft-samples", "prompts": len(prompts), "samples_per_prompt": n,
                      "reward_model": reward_model_accuracy(flat_prompts, texts, gold, proxy, plan.tau, seed)})


def reward_model_accuracy(flat_prompts, texts, gold: np.ndarray, proxy: np.ndarray, tau: float, seed: int) -> dict:
    """Held-out pairs (sample 2i vs 2i+1 of each prompt), labelled by the simulated labeler."""
    g, s = gold.reshape(-1), proxy.reshape(-1)
    first, second = np.arange(0, len(g) - 1, 2), np.arange(1, len(g), 2)
    rows = label_pairs([flat_prompts[i] for i in first], [texts[i] for i in first], [texts[i] for i in second],
                       tau=tau, seed=seed + 101)
    chose_first = np.array([r["chosen"] == texts[i] for r, i in zip(rows, first)])   # equal texts tie below
    pred_first = s[first] > s[second]
    ties = s[first] == s[second]
    correct = np.where(ties, 0.5, (pred_first == chose_first).astype(float))
    p_first = np.where(chose_first, [r["p_true"] for r in rows], [1 - r["p_true"] for r in rows])
    return {"heldout_pairs": int(len(first)),
            "heldout_accuracy": float(correct.mean()),
            # Expected accuracy over the labeler's coin flips: the same quantity with less noise.
            "heldout_expected_accuracy": float(np.where(pred_first, p_first, 1 - p_first).mean()),
            "bayes_optimal_accuracy": bayes_optimal_accuracy(g[first], g[second], tau),
            "gold_order_accuracy": float(np.mean((s[first] > s[second]) == (g[first] > g[second])))}


def evaluate(d: Path, policy_dir: Path, sft_dir: Path, data_dir: Path, plan: DemoPlan, seed: int,
             sft_gold: np.ndarray) -> None:
    """Gold reward, KL(pi || pi_SFT) and win rate of one policy on the held-out prompts: summary.json,
    samples.jsonl, and samples.npz (sample-major, (K * P,): completion_ids (K * P, T) padded with -1,
    gold, policy_logps, sft_logps; the frontier's pool reuses them). sft_gold: (P, N) gold rewards
    of the SFT samples, the win-rate baseline."""
    policy, tokenizer = load_causal_lm(str(policy_dir))
    sft_model, _ = load_causal_lm(str(sft_dir))
    policy.eval(), sft_model.eval()
    prompts, k = heldout_prompts(data_dir), plan.eval_samples_per_prompt
    flat = [p for _ in range(k) for p in prompts]                                # sample-major: (K * P,)
    ev = evaluate_policy(policy, sft_model, tokenizer, flat, max_new_tokens=plan.max_new_tokens, seed=seed,
                         progress=f"samples of {policy_dir.name}")
    rewards = ev.rewards.reshape(k, len(prompts))                                 # (K, P)
    wins = (rewards[:, :, None] > sft_gold[None]) + 0.5 * (rewards[:, :, None] == sft_gold[None])   # (K, P, N)
    (d / "samples.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c, "gold": float(r)}) + "\n"
                                             for p, c, r in zip(flat, ev.completions, ev.rewards)), encoding="utf-8")
    np.savez_compressed(d / "samples.npz", completion_ids=ids_array(ev.completion_ids, plan.max_new_tokens),
                        gold=ev.rewards, policy_logps=ev.policy_logps, sft_logps=ev.ref_logps)
    write_summary(d, {"stage": "evaluate", "policy": str(policy_dir), "gold_reward": ev.gold_reward, "kl": ev.kl,
                      "win_rate_vs_sft": float(wins.mean()), "samples": len(flat),
                      "gold_reward_se": float(ev.rewards.std(ddof=1) / np.sqrt(len(flat)))})


def best_of_n_rows(samples: dict, plan: DemoPlan) -> list[dict]:
    """Best-of-n rows for plan.best_of_n, the reward model as picker, from the N SFT samples per prompt."""
    gold, proxy = samples["gold"], samples["proxy"]
    rows = []
    for n in plan.best_of_n:
        reward, kl = best_of_n(gold, n, proxy=proxy)
        rows.append({"method": "best-of-n", "n": n, "beta": None, "gold_reward": reward, "kl": kl,
                     "win_rate_vs_sft": best_of_n_win_rate(gold, proxy, n), "picker": "reward model"})
    return rows


def best_of_n_win_rate(gold: np.ndarray, proxy: np.ndarray, n: int) -> float:
    """P(gold of the best-of-n pick > gold of a fresh SFT sample), ties 1/2, exact over n-subsets
    as in lab.frontier.best_of_n: the i-th ranked sample is the pick with prob C(i, n-1) / C(N, n)."""
    from math import comb
    total = gold.shape[1]
    order = np.argsort(proxy, axis=1, kind="stable")
    ranked = np.take_along_axis(gold, order, axis=1)                                       # (P, N)
    p_pick = np.array([comb(i, n - 1) for i in range(total)], dtype=np.float64) / comb(total, n)
    beats = (ranked[:, :, None] > gold[:, None, :]) + 0.5 * (ranked[:, :, None] == gold[:, None, :])  # (P, N, N)
    return float((beats.mean(axis=2) @ p_pick).mean())
