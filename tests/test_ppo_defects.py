"""PPO defects of issue 15 part A, each with a test that failed before the fix (A.2 is in
test_ppo_fixes.py; A.3, the unscored first token after an empty prompt, in test_tokenize.py).

A.1: a value model initialised from a normalised reward model must predict on the scale of PPO's
rewards, ``(raw - shift) / scale``. With gamma = 1 a constant offset c in the values moves each
advantage by -c * lam^(L-1-t), which whitening does not remove.
"""
import json

import pytest
import torch

from prefalign.config import PPOConfig
from prefalign.models import ScalarModel, load_scalar_model, load_tokenizer, save_pretrained
from prefalign.rl.forwards import token_values
from prefalign.stages.ppo_models import load_models, save_models
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model

CPU = torch.device("cpu")
PROMPT, RESPONSE = "The movie was", " great and the cast was wonderful."
# (shift, scale) as `prefalign reward --normalize shift` (the default) and `--normalize std` store them
NORMALIZATIONS = [(5.0, 1.0), (5.0, 4.0)]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo-defects")
    save_tiny_model(d / "sft", vocab_size=300)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t[:12]}) + "\n" for t in SAMPLE_TEXTS))
    for shift, scale in NORMALIZATIONS:
        rm, tok = load_scalar_model(str(d / "sft"), seed=3)
        rm.set_normalization(shift, scale)
        save_pretrained(rm, tok, d / f"rm-{shift}-{scale}")
    return d


def config(d, out, **kw):
    base = dict(model=str(d / "sft"), prompts=str(d / "prompts.jsonl"), output=str(out), iterations=1,
                rollout_batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=3, progress=False,
                sample_every=0)
    return PPOConfig(**{**base, **kw})


def rollout_batch(d):
    """One (query, response) row as a rollout holds it: query_ids (1, P), response_ids (1, R), masks all True."""
    tok = load_tokenizer(str(d / "sft"))
    query = tok(PROMPT)["input_ids"]
    response = tok(RESPONSE, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    q, r = torch.tensor([query]), torch.tensor([response])
    return q, torch.ones_like(q, dtype=torch.bool), r, torch.ones_like(r, dtype=torch.bool)


def normalized_reward_of_prefixes(rm: ScalarModel, seq) -> torch.Tensor:
    """(1, R): the reward model's normalised score of query + response[:r], the state before response token r."""
    q, _, r, _ = seq
    ids = torch.cat([q, r], dim=1)
    P, R = q.shape[1], r.shape[1]
    with torch.no_grad():
        return torch.stack([rm.normalized(rm(ids[:, :P + k])) for k in range(R)], dim=1)


@pytest.mark.parametrize("shift,scale", NORMALIZATIONS, ids=["normalize-shift", "normalize-std"])
def test_value_model_from_a_normalised_reward_model_predicts_normalised_rewards(fixture, tmp_path, shift, scale):
    d = fixture
    m = load_models(config(d, tmp_path / "out", reward_model=str(d / f"rm-{shift}-{scale}")), CPU, None)
    seq = rollout_batch(d)
    q, _, r, _ = seq
    ids = torch.cat([q, r], dim=1)
    with torch.no_grad():
        raw = m.reward_model(ids)
        reward = m.reward_model.normalized(raw)
        value_at_end = m.value_model(ids)
        values = token_values(m.value_model, *seq)  # (1, R)
    # The reproduction: the value of the whole sequence is the normalised score, not the raw one
    # (both models start from the same weights, so they agree up to the normalisation).
    assert abs((reward - raw).item()) > 1.0
    torch.testing.assert_close(value_at_end, reward, rtol=0, atol=1e-5)
    # ... and so is the value before every response token.
    torch.testing.assert_close(values, normalized_reward_of_prefixes(m.reward_model, seq), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shift,scale", NORMALIZATIONS, ids=["normalize-shift", "normalize-std"])
def test_reward_path_is_unchanged(fixture, tmp_path, shift, scale):
    """PPO's reward is still (raw - shift) / scale of the reward folder, whatever the value model does."""
    d = fixture
    rm_dir = d / f"rm-{shift}-{scale}"
    m = load_models(config(d, tmp_path / "out", reward_model=str(rm_dir)), CPU, None)
    assert (m.reward_model.shift, m.reward_model.scale) == (shift, scale)
    plain = ScalarModel.from_pretrained(str(rm_dir), trainable=False)
    q, _, r, _ = rollout_batch(d)
    ids = torch.cat([q, r], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(m.reward_model.normalized(m.reward_model(ids)), (plain(ids) - shift) / scale,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift,scale", NORMALIZATIONS, ids=["normalize-shift", "normalize-std"])
def test_saved_value_model_loads_back_with_the_same_values(fixture, tmp_path, shift, scale):
    """OUTPUT/value_model as a later run's --value-model gives the values it had (normalisation applied
    once, not again), twice over; read as a reward model, its normalised score is the value too."""
    d = fixture
    rm_dir = str(d / f"rm-{shift}-{scale}")
    seq = rollout_batch(d)
    expected = normalized_reward_of_prefixes(ScalarModel.from_pretrained(rm_dir, trainable=False), seq)
    m = load_models(config(d, tmp_path / "out", reward_model=rm_dir), CPU, None)
    with torch.no_grad():
        m.value_model.head.weight.mul_(1.5)  # as training would move it
        values = token_values(m.value_model, *seq)
    assert not torch.allclose(values, expected, atol=1e-3)
    for run in ("first", "second"):
        save_models(m, tmp_path / run)
        again = config(d, tmp_path / "out", reward_model=rm_dir, value_model=str(tmp_path / run / "value_model"))
        m = load_models(again, CPU, None)
        with torch.no_grad():
            torch.testing.assert_close(token_values(m.value_model, *seq), values, rtol=0, atol=1e-5, msg=run)
    scorer, _ = load_scalar_model(str(tmp_path / "second" / "value_model"), trainable=False)
    ids = torch.cat([seq[0], seq[2]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(scorer.normalized(scorer(ids)), m.value_model(ids), rtol=0, atol=1e-5)


def test_ppo_run_with_a_normalised_reward_model_saves_and_resumes(fixture, tmp_path):
    """The folded head's bias is trained, checkpointed and read back by --resume; OUTPUT/value_model is a
    plain transformers checkpoint whose config carries that bias as its shift."""
    from transformers import AutoModelForSequenceClassification
    from prefalign.stages.ppo import run_ppo

    d = fixture
    cfg = dict(reward_model=str(d / "rm-5.0-4.0"), iterations=2, save_steps=1, lr=1e-3, lr_schedule="constant")
    run_ppo(config(d, tmp_path / "out", **cfg))
    from prefalign.train.checkpoint import load_latest
    _, state = load_latest(tmp_path / "out")
    assert "value.model.score.bias" in state["model"]
    run_ppo(config(d, tmp_path / "out", resume=True, **cfg))  # loads the step-2 checkpoint strictly
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["resumed_from_step"] == 2
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "value_model")
    assert hf.score.bias is None and hf.config.prefalign_reward_scale == 1.0
    assert hf.config.prefalign_reward_shift == pytest.approx(5.0 / 4.0, abs=0.05)  # -bias: 5 / 4, moved a little
