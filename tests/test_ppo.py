"""prefalign ppo: controller and reward maths, sampled == recomputed log-probs, learning against a
reward a test can compute, the KL leash, adaptive beta, exact resume, a reward model with another
tokenizer through the CLI, --gradient-checkpointing == without it."""
import json

import pytest
import torch

from prefalign.config import PPOConfig
from prefalign.errors import ModelError
from prefalign.stages.ppo import run_ppo, shaped_rewards
from prefalign.rl.kl_control import AdaptiveKLController, FixedKLController
from prefalign.rl.scores import RunningMoments, final_scores
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model
from prefalign.train.logger import read_metrics
from conftest import assert_same_run, num_layers, run_cli


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo")
    _, tok = save_tiny_model(d / "sft", vocab_size=300)
    prompts = [t[:12] for t in SAMPLE_TEXTS] * 4  # 96 short prompts
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return d, len(tok)


def low_half_reward(vocab_size):
    """Score = share of response tokens whose id is in the lower half of the vocabulary (about 0.5 at init)."""
    def reward_fn(prompts, completions, rollout):
        good = (rollout.response_ids < vocab_size // 2) & rollout.response_mask
        return good.sum(1).float() / rollout.response_mask.sum(1).float()
    return reward_fn


def config(d, out, **kw):
    base = dict(model=str(d / "sft"), prompts=str(d / "prompts.jsonl"), output=str(out), iterations=2,
                rollout_batch_size=32, minibatch_size=16, max_new_tokens=4, lr=5e-3, lr_schedule="constant",
                kl_coef=0.05, progress=False, sample_every=0)
    return PPOConfig(**{**base, **kw})


def train(fixture, out, reward_fn=None, **kw):
    d, vocab = fixture
    run_ppo(config(d, out, **kw), reward_fn=reward_fn or low_half_reward(vocab))
    return read_metrics(out / "metrics.jsonl")


# --------------------------------------------------------------------------- pure pieces

def test_adaptive_controller_fixed_values():
    # beta = 0.1, target 1, horizon 100, 10 sequences per batch: beta *= 1 + clip(KL - 1, -0.2, 0.2) * 0.1
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(1.5, 10)  # error 0.5 clipped to 0.2 -> 0.1 * 1.02
    assert ctl.value == pytest.approx(0.102, abs=1e-12)
    ctl.update(1.1, 10)  # error 0.1 -> 0.102 * 1.01
    assert ctl.value == pytest.approx(0.10302, abs=1e-12)
    ctl.update(0.0, 10)  # error -1 clipped to -0.2 -> 0.10302 * 0.98
    assert ctl.value == pytest.approx(0.1009596, abs=1e-12)
    fixed = FixedKLController(0.1)
    fixed.update(5.0, 10)
    assert fixed.value == 0.1


def test_shaped_rewards_fixed_values():
    # k1 per token = logp - ref; reward = -beta * k1, score added on the last real token.
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rewards, kl = shaped_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, beta=0.1, estimator="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    # row 0: -0.05, 0.1, 0 + 2; row 1: -0.1 - 1 on its only token, masked positions stay 0
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-1.1, 0.0, 0.0]]))


def test_final_scores_order():
    class Cfg:
        normalize_scores, score_clip, missing_eos_penalty = False, 1.5, 1.0
    raw = torch.tensor([3.0, -0.5, 0.2])
    ended = torch.tensor([True, False, True])
    # clip to [-1.5, 1.5] first, then the penalty on the row without EOS
    torch.testing.assert_close(final_scores(raw, ended, Cfg, RunningMoments()), torch.tensor([1.5, -1.5, 0.2]))


def test_running_moments_match_concatenation():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 8, 3)]
    stats = RunningMoments()
    for b in batches:
        stats.update(b)
    allx = torch.cat(batches).double()
    assert stats.mean == pytest.approx(float(allx.mean()), abs=1e-12)
    assert stats.var == pytest.approx(float(allx.var(unbiased=False)), abs=1e-12)


# --------------------------------------------------------------------------- the stage

# --------------------------------------------------------------------------- packed == padded


def ragged_rollout(vocab: int, eos: int, pad: int):
    """A (B=5) rollout with prompts of 1-6 tokens (left-padded) and responses of 1-7 tokens
    (right-padded after EOS), as `sample` lays them out."""
    g = torch.Generator().manual_seed(3)
    prompt_lengths, response_lengths, P, R = [6, 1, 3, 4, 2], [7, 3, 1, 5, 7], 6, 7
    query_ids, query_mask = torch.full((5, P), pad), torch.zeros(5, P, dtype=torch.bool)
    response_ids, response_mask = torch.full((5, R), pad), torch.zeros(5, R, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        query_ids[b, P - p:] = torch.randint(3, vocab, (p,), generator=g)
        query_mask[b, P - p:] = True
        response_ids[b, :r] = torch.randint(3, vocab, (r,), generator=g)
        response_mask[b, :r] = True
        if r < R:
            response_ids[b, r - 1] = eos
    return query_ids, query_mask, response_ids, response_mask


@pytest.mark.parametrize("attention,old_transformers", [("prefalign_packed", False), ("sdpa", False),
                                                        ("eager", False), ("prefalign_packed", True)])
def test_packed_forwards_equal_padded_with_gradients(fixture, attention, old_transformers, monkeypatch):
    """Policy log-probs and entropy, per-token values, the shared-head path and reward scores: the
    packed row gives the padded batch's numbers (and gradients), for the per-example attention and
    for transformers' block-diagonal mask (sdpa, eager)."""
    from prefalign.models import load_causal_lm, load_scalar_model
    from prefalign.rollout import forward_logps, forward_logps_packed, pack_sequences
    from prefalign.rl.forwards import policy_forward, token_values
    from prefalign.rl.value_head import new_value_head

    if old_transformers:  # before transformers 5 (no boolean logits_to_keep): every logit, then gathered
        import transformers.modeling_utils
        monkeypatch.delattr(transformers.modeling_utils, "slice_logits_to_keep")
    d, vocab = fixture
    policy, tok = load_causal_lm(str(d / "sft"))  # loaded on prefalign_packed; switched back for the others
    value, _ = load_scalar_model(str(d / "sft"), seed=1)
    if attention != "prefalign_packed":
        policy.set_attn_implementation(attention)
        value.backbone.set_attn_implementation(attention)
    assert policy.config._attn_implementation == value.backbone.config._attn_implementation == attention
    seq = ragged_rollout(vocab, tok.eos_token_id, tok.pad_token_id)
    packed = pack_sequences(*seq, row_tokens=8)  # rows of at most max(8, P + R) = 13 tokens
    # Sequences of 13, 4, 4, 9, 9 real tokens in rows of width P + R = 13: [13], [4, 4], [9], [9].
    assert packed.input_ids.shape == (4, 13) and packed.position_ids[0].tolist() == list(range(13))
    assert packed.segment_ids[1].tolist() == [1] * 4 + [2] * 4 + [-1] * 5 and int(packed.keep.sum()) == 23
    mask = seq[3]

    def grads(model):
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    lp, ent = forward_logps(policy, *seq, temperature=0.7)
    (lp.sum() + ent.sum()).backward()
    g_pad = grads(policy)
    lp_k, ent_k = forward_logps_packed(policy, packed, seq[2], mask, temperature=0.7)
    (lp_k.sum() + ent_k.sum()).backward()
    g_pack = grads(policy)
    torch.testing.assert_close(lp_k, lp, rtol=0, atol=2e-5)
    one_row = pack_sequences(*seq)  # the default budget (1024 tokens) takes all 39 tokens in one row
    assert one_row.input_ids.shape == (1, 39)
    torch.testing.assert_close(forward_logps_packed(policy, one_row, seq[2], mask, temperature=0.7)[0].detach(),
                               lp.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(ent_k, ent, rtol=0, atol=2e-5)
    assert bool((lp_k[~mask] == 0).all()) and g_pad.keys() == g_pack.keys()
    assert (packed._layout is not None) == (attention == "prefalign_packed")  # per-example attention was used
    for n in g_pad:
        torch.testing.assert_close(g_pack[n], g_pad[n], rtol=1e-4, atol=1e-6, msg=n)

    v = token_values(value, *seq)
    v_k = token_values(value, *seq, packed=packed)
    torch.testing.assert_close(v_k, v, rtol=0, atol=2e-5)
    torch.testing.assert_close(value(packed.input_ids, position_ids=packed.position_ids,
                                     segment_ids=packed.segment_ids, n_segments=5),
                               value(torch.cat(seq[:3:2], 1), torch.cat([seq[1], mask], 1)), rtol=0, atol=2e-5)

    with pytest.raises(ValueError, match="left-padded"):  # a query padded on the right
        pack_sequences(seq[0].flip(1), seq[1].flip(1), *seq[2:])

    head = new_value_head(policy.config.hidden_size, seed=0)
    padded = policy_forward(policy, head, *seq, temperature=1.0)
    packed_out = policy_forward(policy, head, *seq, temperature=1.0, packed=packed)
    for a, b in zip(packed_out, padded):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_packed_rows_are_long_only_when_every_model_attends_per_example(fixture):
    """A value model on transformers' block mask (cost grows with the row's square) keeps rows P + R wide."""
    from types import SimpleNamespace
    from prefalign.models import load_causal_lm, load_scalar_model
    from prefalign.stages.ppo_models import pack_rows

    d, vocab = fixture
    policy, tok = load_causal_lm(str(d / "sft"))
    value, _ = load_scalar_model(str(d / "sft"))
    seq = ragged_rollout(vocab, tok.eos_token_id, tok.pad_token_id)  # 39 real tokens, P + R = 13
    m = SimpleNamespace(policy=policy, ref=None, value_model=value, sources=[])
    assert pack_rows(m, seq).input_ids.shape == (1, 39)
    value.backbone.set_attn_implementation("sdpa")
    assert pack_rows(m, seq).input_ids.shape == (4, 13)


@pytest.mark.parametrize("row_tokens", [1024, 0], ids=["one-row", "rows-of-P+R"])
def test_packed_ppo_run_equals_padded(fixture, tmp_path, monkeypatch, row_tokens):
    """Two PPO iterations with --packing against a reward model (the packed reward path) give the
    padded run's metrics and weights, whether a batch fits one row or needs many."""
    monkeypatch.setattr("prefalign.stages.policy_rollout.PACK_ROW_TOKENS", row_tokens)
    d, _ = fixture
    # Adam divides each gradient by its own running size: on embedding rows whose gradient is ~1e-8
    # (tokens seen once), float rounding between the layouts becomes a step of ~lr/10. A larger
    # epsilon keeps the comparison about the gradients, not about Adam's amplification of rounding.
    kw = dict(reward_model=str(d / "sft"), iterations=2, max_new_tokens=6, temperature=0.8, adam_eps=1e-5)
    run_ppo(config(d, tmp_path / "padded", packing=False, **kw))
    run_ppo(config(d, tmp_path / "packed", packing=True, **kw))
    padded, packed = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("padded", "packed"))
    assert packed[1]["eos_rate"] > 0 or packed[1]["response_length"] < 6  # some rows were shorter than others
    for a, b in zip(padded, packed):
        for key, value in a.items():
            if not key.startswith("perf/") and isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("padded", "packed"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("kw", [{"packing": False},
                                {"shared_value_head": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9,
                                 "packing": False},
                                {"packing": True}],
                         ids=["value-model", "shared-head-filtered", "packed"])
def test_sampled_logprobs_equal_recomputed(fixture, tmp_path, kw):
    rows = train(fixture, tmp_path / "out", **kw)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # first minibatch of each iteration, before that iteration's first update
        assert 0 <= r["policy/first_minibatch_logprob_maxdiff"] < 1e-5
        assert abs(r["objective/kl"]) < 1e-5 or r["step"] > 1  # policy == reference before any update
    assert rows[1]["objective/kl"] != 0.0  # the policy moved after the first update
    for key in ("objective/scores", "objective/entropy", "objective/rlhf_reward", "policy/clipfrac",
                "policy/approxkl", "val/explained_variance", "val/clipfrac", "kl_coef", "response_length",
                "eos_rate", "perf/tokens_per_s", "perf/time_rollout_s", "perf/time_score_s", "perf/time_update_s"):
        assert key in rows[-1], key
    assert (tmp_path / "out" / "value_model").is_dir() and (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow
def test_reward_rises_with_bounded_kl_and_large_beta_stays_at_reference(fixture, tmp_path):
    free = train(fixture, tmp_path / "free", iterations=16)
    scores = [r["objective/scores"] for r in free]
    # At init the score is about 0.5; 16 iterations of PPO lift it well above that (seen: about 0.85).
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.15, scores
    # Bound: KL of 4 tokens stays under 8 nats per sequence (seen: about 3 at beta 0.05).
    assert max(r["objective/kl"] for r in free) < 8.0
    # beta = 20: the KL penalty dominates the shaped reward, the policy stays near the reference
    # (seen: mean KL of the last 5 iterations about 0.15 against about 2.2 at beta 0.05) and the score does not move.
    leashed = train(fixture, tmp_path / "leashed", iterations=16, kl_coef=20.0)
    tail = lambda rows: sum(r["objective/kl"] for r in rows[-5:]) / 5
    assert abs(tail(leashed)) < 0.5 and abs(tail(leashed)) < 0.2 * tail(free), (tail(leashed), tail(free))
    assert sum(r["objective/scores"] for r in leashed[-3:]) / 3 < sum(scores[-3:]) / 3 - 0.15


def test_adaptive_controller_moves_beta_toward_target(fixture, tmp_path):
    # horizon 32 = the batch: each iteration beta moves by the clipped error, at most 20 %.
    high = train(fixture, tmp_path / "high", iterations=3, target_kl=100.0, kl_horizon=32)
    betas = [r["kl_coef"] for r in high] + [json.loads((tmp_path / "high" / "summary.json").read_text())["final_kl_coef"]]
    # KL far below target: error -0.2 each time, beta shrinks by 20 % per iteration
    assert betas == pytest.approx([0.05 * 0.8 ** i for i in range(4)], rel=1e-9)
    # k3 is >= 0, so once the policy has moved its KL exceeds a tiny target and beta grows again.
    low = train(fixture, tmp_path / "low", iterations=3, target_kl=1e-3, kl_horizon=32, kl_estimator="k3")
    for r, nxt in zip(low, low[1:]):
        error = min(max(r["objective/kl"] / 1e-3 - 1, -0.2), 0.2)
        assert nxt["kl_coef"] == pytest.approx(r["kl_coef"] * (1 + error), rel=1e-9)
    assert low[1]["objective/kl"] > 1e-3 and low[2]["kl_coef"] == pytest.approx(low[1]["kl_coef"] * 1.2, rel=1e-9)


def test_resume_is_exact(fixture, tmp_path):
    d, vocab = fixture
    reward = low_half_reward(vocab)
    train(fixture, tmp_path / "full", iterations=4, save_steps=2, normalize_scores=True, target_kl=0.5)

    calls = {"n": 0}

    def crashing(prompts, completions, rollout):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash in iteration 4")
        return reward(prompts, completions, rollout)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(fixture, tmp_path / "cut", reward_fn=crashing, iterations=4, save_steps=2, normalize_scores=True,
              target_kl=0.5)
    assert [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3]
    train(fixture, tmp_path / "cut", iterations=4, save_steps=2, normalize_scores=True, target_kl=0.5, resume=True)

    def deterministic(path):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(path)]
    assert deterministic(tmp_path / "cut" / "metrics.jsonl") == deterministic(tmp_path / "full" / "metrics.jsonl")
    from safetensors.torch import load_file
    for name in ("model.safetensors", "value_model/model.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["resumed_from_step"] == 2


def test_value_model_with_other_tokenizer_is_refused(fixture, tmp_path):
    d, _ = fixture
    save_tiny_model(tmp_path / "sp", kind="sentencepiece", vocab_size=300)
    with pytest.raises(ModelError, match="different tokenizer"):
        train(fixture, tmp_path / "out", value_model=str(tmp_path / "sp"))


def test_cli_with_reward_model_of_another_tokenizer(fixture, tmp_path):
    """A saved scalar reward model over a SentencePiece-style tokenizer scores a byte-level BPE policy:
    the logged scores equal the reward model applied to the re-encoded prompt + completion."""
    from prefalign.data import encode_prompt_completion
    from prefalign.models import load_scalar_model, save_pretrained
    d, _ = fixture
    save_tiny_model(tmp_path / "sp", kind="sentencepiece", vocab_size=300, seed=3)
    rm, rm_tok = load_scalar_model(str(tmp_path / "sp"), seed=5)
    rm.set_normalization(0.25, 2.0)
    save_pretrained(rm, rm_tok, tmp_path / "rm")
    out = tmp_path / "out"
    run_cli("ppo", "--model", d / "sft", "--reward-model", tmp_path / "rm", "--prompts", d / "prompts.jsonl",
            "--output", out, "--iterations", 2, "--rollout-batch-size", 8, "--minibatch-size", 4,
            "--max-new-tokens", 6, "--sample-every", 1, "--no-progress", "--lr", "1e-4")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["reward_retokenized"] is True
    rows = read_metrics(out / "samples.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and len(rows[0]["samples"]) == 4
    rm.eval()
    for s in rows[0]["samples"]:
        ids = encode_prompt_completion(rm_tok, s["prompt"], s["completion"], max_length=10_000).input_ids
        ids = ids if s["ended_with_eos"] else ids[:-1]
        with torch.no_grad():
            expected = rm.normalized(rm(torch.tensor([ids]))).item()
        assert s["score"] == pytest.approx(expected, abs=1e-5)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)  # the final policy is a plain HF checkpoint
    assert (out / "value_model" / "config.json").exists()


def test_with_eos_on_cut_fixed_values():
    """Left-padded queries + right-padded responses: a row cut at the cap gets EOS after its last real
    token (one column wider), an ended row only the extra padding."""
    from types import SimpleNamespace
    from prefalign.rl.reward_scoring import with_eos_on_cut
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=9)
    ids = torch.tensor([[0, 5, 6, 7, 9, 0],      # ended: EOS already there, then padding
                        [5, 6, 7, 8, 8, 8],      # cut at the cap, no padding
                        [0, 0, 5, 7, 0, 0]])     # cut after fewer tokens (a shorter cap in its batch)
    mask = ids != 0
    out_ids, out_mask = with_eos_on_cut(ids, mask, torch.tensor([True, False, False]), tok)
    assert out_ids.tolist() == [[0, 5, 6, 7, 9, 0, 0], [5, 6, 7, 8, 8, 8, 9], [0, 0, 5, 7, 9, 0, 0]]
    assert out_mask.tolist() == [[False, True, True, True, True, False, False], [True] * 7,
                                 [False, False, True, True, True, False, False]]


@pytest.mark.parametrize("retokenize", [False, True])
def test_reward_model_scores_a_cut_completion_at_an_eos(fixture, retokenize):
    """RewardModel(score_cut_at_eos=True) on a rollout of one ended and one cut completion: the cut one
    scores as the reward model on its ids + EOS, the ended one as it is; without it the cut one is scored
    at its last token. Both the policy's own ids and the re-encoded text (retokenize) give this."""
    from prefalign.data import encode_prompt_completion
    from prefalign.models import load_scalar_model
    from prefalign.rl.reward_functions import RewardModel
    from prefalign.rollout import Rollout
    d, _ = fixture
    rm, tok = load_scalar_model(str(d / "sft"), seed=5)
    rm.eval()
    prompts, texts = ["a good", "the film"], [" one", " was quite"]
    rows = [encode_prompt_completion(tok, p, c, max_length=1000) for p, c in zip(prompts, texts)]
    q = [r.input_ids[:r.prompt_len] for r in rows]
    resp = [rows[0].input_ids[rows[0].prompt_len:], rows[1].input_ids[rows[1].prompt_len:-1]]   # ended; cut (no EOS)
    assert resp[0][-1] == tok.eos_token_id and resp[1][-1] != tok.eos_token_id
    P, R = max(map(len, q)), max(map(len, resp))
    query = torch.tensor([[tok.pad_token_id] * (P - len(x)) + x for x in q])
    response = torch.tensor([x + [tok.pad_token_id] * (R - len(x)) for x in resp])
    qmask = torch.tensor([[False] * (P - len(x)) + [True] * len(x) for x in q])
    rmask = torch.tensor([[True] * len(x) + [False] * (R - len(x)) for x in resp])
    rollout = Rollout(query, qmask, response, rmask, torch.zeros(2, R), torch.tensor([True, False]))
    with torch.no_grad():
        def alone(ids):
            return rm.normalized(rm(torch.tensor([ids]))).item()
        got = RewardModel("rm", rm, tok, retokenize, score_cut_at_eos=True)(prompts, texts, {}, rollout).tolist()
        as_is = RewardModel("rm", rm, tok, retokenize)(prompts, texts, {}, rollout).tolist()
    assert got[0] == pytest.approx(alone(q[0] + resp[0]), abs=1e-5)
    assert got[1] == pytest.approx(alone(q[1] + resp[1] + [tok.eos_token_id]), abs=1e-5)
    assert as_is[0] == pytest.approx(got[0], abs=1e-6) and as_is[1] == pytest.approx(alone(q[1] + resp[1]), abs=1e-5)
    assert abs(as_is[1] - got[1]) > 1e-4


def test_score_cut_at_eos_in_ppo_packed_equals_padded(fixture, tmp_path):
    """prefalign ppo --score-cut-at-eos with a reward model of the policy's tokenizer: the first
    iteration's logged scores are the same on packed rows as padded (packed rows cannot take the
    appended EOS, so that source is scored padded) and differ from the run without it exactly on the
    completions cut at --max-new-tokens."""
    from prefalign.models import load_scalar_model, save_pretrained
    d, _ = fixture
    rm, rm_tok = load_scalar_model(str(d / "sft"), seed=5)
    rm.set_normalization(0.25, 2.0)
    save_pretrained(rm, rm_tok, tmp_path / "rm")

    def first_samples(name, *flags):
        out = tmp_path / name
        run_cli("ppo", "--model", d / "sft", "--reward-model", tmp_path / "rm", "--prompts", d / "prompts.jsonl",
                "--output", out, "--iterations", 1, "--rollout-batch-size", 8, "--minibatch-size", 4,
                "--max-new-tokens", 3, "--sample-every", 1, "--no-progress", *flags)
        return read_metrics(out / "samples.jsonl")[0]["samples"]
    padded = first_samples("padded", "--score-cut-at-eos", "--no-packing")
    packed = first_samples("packed", "--score-cut-at-eos", "--packing")
    plain = first_samples("plain", "--no-packing")
    assert [s["completion"] for s in packed] == [s["completion"] for s in padded] == [s["completion"] for s in plain]
    assert any(not s["ended_with_eos"] for s in padded)
    for a, b, c in zip(padded, packed, plain):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert (a["score"] == pytest.approx(c["score"], abs=1e-5)) == a["ended_with_eos"]


def test_shared_value_head_continues_from_an_earlier_runs_value_model(fixture, tmp_path):
    """--value-model with --shared-value-head loads the earlier run's head (how the demo chains segments);
    a folder without value_head.pt, or a head of another width, is refused with what to pass."""
    from prefalign.errors import ConfigError
    from prefalign.stages.ppo_models import load_models
    d, vocab = fixture
    train(fixture, tmp_path / "first", iterations=1, shared_value_head=True)
    saved = torch.load(tmp_path / "first" / "value_model" / "value_head.pt", weights_only=True)
    cfg = config(d, tmp_path / "next", shared_value_head=True, value_model=str(tmp_path / "first" / "value_model"),
                 seed=7)   # another seed: a new head would differ
    head = load_models(cfg, torch.device("cpu"), low_half_reward(vocab)).value_head
    assert all(torch.equal(head.state_dict()[k], saved[k]) for k in saved)
    with pytest.raises(ConfigError, match="value_head.pt"):
        load_models(config(d, tmp_path / "x", shared_value_head=True, value_model=str(d / "sft")),
                    torch.device("cpu"), low_half_reward(vocab))
    torch.save({"weight": torch.zeros(1, 5), "bias": torch.zeros(1)}, tmp_path / "narrow.pt")
    with pytest.raises(ModelError, match="hidden size"):
        load_models(config(d, tmp_path / "x", shared_value_head=True, value_model=str(tmp_path / "narrow.pt")),
                    torch.device("cpu"), low_half_reward(vocab))
    (tmp_path / "torn.pt").write_bytes((tmp_path / "first" / "value_model" / "value_head.pt").read_bytes()[:40])
    torch.save({"weight": torch.zeros(1, 32)}, tmp_path / "no_bias.pt")
    for bad, message in (("torn.pt", "cannot be read as a value head"), ("no_bias.pt", "expected a state dict")):
        with pytest.raises(ModelError, match=message):
            load_models(config(d, tmp_path / "x", shared_value_head=True, value_model=str(tmp_path / bad)),
                        torch.device("cpu"), low_half_reward(vocab))


@pytest.mark.parametrize("kw,models", [({}, 2), ({"shared_value_head": True}, 1)],
                         ids=["value-model", "shared-value-head"])
def test_gradient_checkpointing_equals_a_run_without(fixture, tmp_path, checkpoint_calls, kw, models):
    """--gradient-checkpointing: the metrics (rel 1e-5 / abs 1e-6) and final policy (atol 1e-6) of the
    run without it, with a separate value model (a new head on the policy's backbone, checkpointed too)
    or a shared value head; the value models match too. Every layer of every update forward (policy and
    value model: ``models`` backbones) ran checkpointed, and no sampling or scoring forward did."""
    d, _ = fixture
    train(fixture, tmp_path / "plain", **kw)
    assert checkpoint_calls == []
    train(fixture, tmp_path / "gc", gradient_checkpointing=True, **kw)
    cfg = config(d, tmp_path / "gc")
    forwards = cfg.iterations * cfg.ppo_epochs * cfg.rollout_batch_size // cfg.minibatch_size
    assert len(checkpoint_calls) == forwards * models * num_layers(d / "sft")
    assert_same_run(tmp_path / "plain", tmp_path / "gc")
    a, b = (saved_value_model(tmp_path / run / "value_model") for run in ("plain", "gc"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(b[k], a[k], rtol=0, atol=1e-6), k


def saved_value_model(folder) -> dict:
    """The tensors of a saved value model (safetensors) or shared value head (value_head.pt)."""
    from safetensors.torch import load_file
    files = list(folder.glob("*.safetensors"))
    return load_file(files[0]) if files else torch.load(folder / "value_head.pt")


def test_gradient_checkpointing_refuses_a_value_model_with_dropout(fixture, tmp_path):
    d, _ = fixture
    value = tmp_path / "value"
    value.mkdir()
    for f in (d / "sft").iterdir():
        (value / f.name).write_bytes(f.read_bytes())
    config_json = json.loads((value / "config.json").read_text())
    (value / "config.json").write_text(json.dumps({**config_json, "attention_dropout": 0.1}))
    from prefalign.errors import ConfigError
    with pytest.raises(ConfigError, match=rf"the value model \({value}\) sets attention_dropout = 0.1"):
        train(fixture, tmp_path / "out", value_model=str(value), gradient_checkpointing=True)
    train(fixture, tmp_path / "plain", value_model=str(value), iterations=1)  # accepted without the option
