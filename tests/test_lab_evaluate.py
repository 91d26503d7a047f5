"""Evaluation on tiny in-process models: teacher-forced log-probs, sample KL, win rate."""
import copy

import numpy as np
import pytest
import torch

from prefalign.lab.evaluate import (evaluate_policy, prompt_ids, sample_completions, sequence_logprob,
                                    sequence_logprobs, win_rate)
from prefalign.tiny import SAMPLE_TEXTS, tiny_llama, tiny_tokenizer

PROMPTS = ["The movie was", "I loved the", "Honestly the", "The plot"]


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300, add_bos=True)
    model = tiny_llama(tok, hidden=32, layers=2, seed=0).eval()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        perturbed.lm_head.weight.add_(torch.randn(perturbed.lm_head.weight.shape, generator=gen) * 0.5)
    return tok, model, perturbed


def test_sequence_logprob_matches_a_token_by_token_loop(tiny):
    tok, model, _ = tiny
    p, c = prompt_ids(tok, "The movie was"), [17, 42, 5, tok.eos_token_id]
    expected = 0.0
    with torch.no_grad():
        for t in range(len(c)):   # score c[t] after prompt + c[:t], one forward per token
            logits = model(input_ids=torch.tensor([p + c[:t]])).logits[0, -1]
            expected += torch.log_softmax(logits.double(), -1)[c[t]].item()
    assert sequence_logprob(model, p, c) == pytest.approx(expected, abs=1e-4)


def test_batched_logprobs_equal_one_at_a_time(tiny):
    tok, model, _ = tiny
    prompts = [prompt_ids(tok, p) for p in PROMPTS]
    completions = [[5], [9, 10, 11, 12, 13], [7, 7], [100, 3, 2]]
    batched = sequence_logprobs(model, prompts, completions, batch_size=3, pad_id=tok.pad_token_id)
    single = torch.tensor([sequence_logprob(model, p, c) for p, c in zip(prompts, completions)], dtype=torch.float64)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-4)


def test_samples_stop_after_eos_and_are_seeded(tiny):
    tok, model, _ = tiny
    a = sample_completions(model, tok, PROMPTS * 4, max_new_tokens=12, seed=3, batch_size=5)
    b = sample_completions(model, tok, PROMPTS * 4, max_new_tokens=12, seed=3, batch_size=5)
    assert a == b and len(a) == 16
    for c in a:
        assert 1 <= len(c) <= 12
        assert tok.eos_token_id not in c[:-1]


def test_kl_of_a_model_against_itself_is_exactly_zero(tiny):
    tok, model, _ = tiny
    ev = evaluate_policy(model, model, tok, PROMPTS * 2, max_new_tokens=8, seed=0)
    assert ev.kl == 0.0
    assert ev.rewards.shape == (8,) and ((ev.rewards >= 0) & (ev.rewards <= 1)).all()


def test_sample_kl_of_perturbed_model_is_positive_and_matches_exact_per_step_kl(tiny):
    """k1 (log-ratio of samples) and the Rao-Blackwellised sum of per-step full-distribution KLs
    estimate the same E_pi[log pi/ref]; the second is >= 0 by construction and has low variance."""
    tok, model, perturbed = tiny
    prompts = PROMPTS * 40
    completions = sample_completions(perturbed, tok, prompts, max_new_tokens=6, seed=0, batch_size=40)
    p_ids = [prompt_ids(tok, p) for p in prompts]
    k1 = (sequence_logprobs(perturbed, p_ids, completions, pad_id=tok.pad_token_id)
          - sequence_logprobs(model, p_ids, completions, pad_id=tok.pad_token_id)).numpy()     # (N,)
    exact = []
    with torch.no_grad():
        for p, c in zip(p_ids, completions):
            x = torch.tensor([p + c])
            lp = torch.log_softmax(perturbed(input_ids=x).logits[0].double(), -1)[len(p) - 1:-1]   # (len(c), V)
            lr = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)[len(p) - 1:-1]
            exact.append((lp.exp() * (lp - lr)).sum().item())
    se = k1.std(ddof=1) / np.sqrt(len(k1))
    assert k1.mean() > 4 * se > 0, (k1.mean(), se)
    assert abs(k1.mean() - np.mean(exact)) < 4 * se, (k1.mean(), np.mean(exact), se)


def test_win_rate_counts_ties_as_half():
    assert win_rate(np.array([0.9, 0.1, 0.5, 0.7]), np.array([0.1, 0.9, 0.5, 0.2])) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    with pytest.raises(ValueError):
        win_rate(np.zeros(3), np.zeros(4))
