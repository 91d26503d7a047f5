"""The demo's frontier pool on tiny in-process models: every pooled sample scored under every policy,
the evaluations' own log-probs reused, DPO's target beta, and shares past the last trusted point."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.lab.demo_data import ids_array, ids_lists, write_jsonl
from prefalign.lab.demo_eval import evaluate
from prefalign.lab.demo_frontier import Proposal, dpo_targets, frontier_betas, load_pool, pool_frontier, score_pool
from prefalign.lab.demo_plan import QUICK
from prefalign.lab.demo_results import add_gain_shares
from prefalign.lab.evaluate import prompt_ids, sample_completions, sequence_logprob
from prefalign.lab.frontier import FrontierPoint
from prefalign.lab.gold import gold_rewards
from prefalign.models import load_causal_lm
from prefalign.tiny import SAMPLE_TEXTS, tiny_llama, tiny_tokenizer

PROMPTS = ["The movie was", "I loved the", "Honestly the"]
PLAN = dataclasses.replace(QUICK, heldout_prompts=3, eval_samples_per_prompt=2, frontier_samples=4,
                           frontier_pool_sft=3, max_new_tokens=6)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """sft/ and two perturbed "policies" as HF folders, held-out prompts, SFT samples, two evaluations."""
    root = tmp_path_factory.mktemp("lab")
    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300, add_bos=True)
    dirs = {}
    for k, name in enumerate(["sft", "dpo-beta1", "ppo-1"]):
        model = tiny_llama(tok, hidden=32, layers=2, seed=0)
        if k:
            with torch.no_grad():
                gen = torch.Generator().manual_seed(k)
                model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.5)
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    data = root / "data"
    write_jsonl(data / "prompts_heldout.jsonl", [{"prompt": p} for p in PROMPTS])
    samples = root / "sft-samples"
    samples.mkdir()
    sft, _ = load_causal_lm(str(dirs["sft"]))
    flat = [p for p in PROMPTS for _ in range(PLAN.frontier_samples)]                       # prompt-major
    ids = sample_completions(sft.eval(), tok, flat, max_new_tokens=PLAN.max_new_tokens, seed=0)
    gold = gold_rewards([p + tok.decode(c, skip_special_tokens=True) for p, c in zip(flat, ids)])
    np.savez(samples / "samples.npz", gold=gold.reshape(3, -1),
             completion_ids=ids_array(ids, PLAN.max_new_tokens).reshape(3, PLAN.frontier_samples, -1))
    evals = {}
    for name in ("dpo-beta1", "ppo-1"):
        evals[name] = root / "eval" / name
        evals[name].mkdir(parents=True)
        evaluate(evals[name], dirs[name], dirs["sft"], data, PLAN, seed=1, sft_gold=gold.reshape(3, -1))
    proposals = [Proposal("sft", dirs["sft"], None)] + [Proposal(n, dirs[n], evals[n]) for n in evals]
    pool_dir = root / "frontier"
    pool_dir.mkdir()
    score_pool(pool_dir, samples, proposals, data, PLAN)
    return dict(root=root, tok=tok, dirs=dirs, samples=samples, evals=evals, proposals=proposals, data=data,
                pool_dir=pool_dir, sft_ids=ids, sft_gold=gold)


def test_every_pooled_sample_over_the_threshold_is_scored_under_every_policy_as_a_plain_loop_would(lab):
    """Pool layout per prompt: the 4 SFT samples, then 2 of dpo-beta1, then 2 of ppo-1; the threshold is
    each prompt's 3rd best SFT gold reward (frontier_pool_sft = 3). logps[p, m, j] is log q_j(y | x) of a
    sample at or above it, whether this stage computed it or the evaluation did; under it only what the
    evaluations computed (each policy's samples under itself and SFT) is there, the rest NaN."""
    pool, tok = load_pool(lab["pool_dir"]), lab["tok"]
    assert pool.names == ["sft", "dpo-beta1", "ppo-1"] and pool.counts.tolist() == [4, 2, 2]
    assert pool.rewards.shape == (3, 8) and pool.logps.shape == (3, 8, 3)
    np.testing.assert_array_equal(pool.threshold, np.sort(lab["sft_gold"].reshape(3, 4), axis=1)[:, 1])
    needed = pool.rewards >= pool.threshold[:, None]                                        # (P, M)
    assert needed[:, :4].sum(axis=1).min() >= 3 and np.isfinite(pool.logps[needed]).all()
    assert np.isnan(pool.logps[:, :4][~needed[:, :4]]).all()                               # SFT under t: unscored
    own = np.zeros((8, 3), bool)
    own[4:6, 1] = own[6:8, 2] = own[4:, 0] = True                 # what the evaluations scored (own policy, SFT)
    assert (np.isfinite(pool.logps) == (needed[:, :, None] | own[None])).all()
    samples = [[lab["sft_ids"][p * 4 + i] for i in range(4)] for p in range(3)]            # (P, 4) SFT part
    for name in ("dpo-beta1", "ppo-1"):
        rows = [json.loads(line) for line in (lab["evals"][name] / "samples.jsonl").read_text().splitlines()]
        flat = ids_lists(np.load(lab["evals"][name] / "samples.npz")["completion_ids"])       # sample-major
        for p in range(3):
            samples[p] += [flat[k * 3 + p] for k in range(2)]
            for k in range(2):
                assert rows[k * 3 + p]["prompt"] == PROMPTS[p]
    models = [model.eval() for model, _ in (load_causal_lm(str(lab["dirs"][n])) for n in pool.names)]
    for p, prompt in enumerate(PROMPTS):
        for m, completion in enumerate(samples[p]):
            for j, model in enumerate(models):
                if np.isfinite(pool.logps[p, m, j]):
                    expected = sequence_logprob(model, prompt_ids(tok, prompt), completion)
                    assert pool.logps[p, m, j] == pytest.approx(expected, abs=1e-4), (p, m, j)
    np.testing.assert_allclose(pool.rewards[:, :4], lab["sft_gold"].reshape(3, 4))
    summary = json.loads((lab["pool_dir"] / "summary.json").read_text())
    # SFT samples over t under all 3 models, policy samples over t under the 1 other policy; 2 x 4 x 3 reused.
    assert summary["forwards"] == 3 * needed[:, :4].sum() + needed[:, 4:].sum()
    assert summary["forwards_reused_from_evaluations"] == 24
    assert summary["sft_scored_per_prompt"] == pytest.approx(needed[:, :4].sum() / 3)


def test_pool_frontier_and_dpo_target_beta(lab):
    """DPO with beta aims at pi*_{tau beta}: with tau = 0.1, DPO beta 1 -> frontier beta 0.1."""
    pool = load_pool(lab["pool_dir"])
    points = pool_frontier(pool, PLAN.frontier_betas)
    assert frontier_betas(pool, PLAN.frontier_betas) == sorted(PLAN.frontier_betas)   # 8 samples: no point trusted
    assert all(np.isfinite([p.mean_reward, p.mean_kl, p.ess_hmean]).all() for p in points)
    assert all(1 <= p.ess_min <= p.ess_hmean <= p.ess_mean <= 8 + 1e-9 for p in points)
    (target,) = dpo_targets(pool, [{"beta": 1.0, "gold_reward": 0.6, "kl": 2.0}], tau=0.1)
    (expected,) = pool_frontier(pool, [0.1])
    assert target["frontier_beta"] == pytest.approx(0.1) and target["dpo_beta"] == 1.0
    assert target["target_reward"] == expected.mean_reward and target["target_kl"] == expected.mean_kl
    assert target["target_trusted"] == expected.trusted and (target["dpo_gold_reward"], target["dpo_kl"]) == (0.6, 2.0)


def test_a_folder_made_before_the_pool_says_what_to_delete(lab, tmp_path):
    old = tmp_path / "sft-samples"
    old.mkdir()
    np.savez(old / "samples.npz", gold=np.zeros((3, 4)))                                # no completion_ids
    with pytest.raises(PrefalignError, match=f"lacks completion_ids.*Delete {old}"):
        score_pool(tmp_path, old, lab["proposals"], lab["data"], PLAN)


def test_shares_past_the_last_trusted_point_are_upper_bounds():
    """Trusted up to KL 2 (reward 0.7); an untrusted point at KL 4 (0.8) still sets the optimum there,
    so a method at KL 3 has optimum 0.75 and share (0.7 - 0.5) / 0.25 = 0.8, but only as an upper bound."""
    frontier = [FrontierPoint(1.0, 0.5, 0.0), FrontierPoint(0.1, 0.7, 2.0),
                FrontierPoint(0.03, 0.8, 4.0, ess_hmean=3.0, trusted=False)]
    near = {"method": "dpo", "beta": 1.0, "gold_reward": 0.62, "kl": 1.5}       # optimum 0.65: share 0.8
    far = {"method": "dpo", "beta": 0.3, "gold_reward": 0.7, "kl": 3.0}
    methods = [dict(near), dict(far)]
    best = add_gain_shares(methods, frontier, sft_reward=0.5)
    assert methods[1]["optimum_at_kl"] == pytest.approx(0.75) and methods[1]["gain_share"] == pytest.approx(0.8)
    assert methods[1]["beyond_frontier"] and not methods[0]["beyond_frontier"]
    assert best["dpo"]["beta"] == 1.0 and not best["dpo"]["upper_bound"]
    best = add_gain_shares([dict(far)], frontier, sft_reward=0.5)
    assert best["dpo"]["upper_bound"] and best["dpo"]["gain_share"] == pytest.approx(0.8)
