"""PPO defects found by reading the maths (issue 15, part A), each with a test that failed before
the fix, and the small frictions of issue 17 that live in `prefalign ppo`."""
import json

import pytest

from prefalign.config import PPOConfig
from prefalign.errors import ConfigError
from prefalign.rl.kl_control import AdaptiveKLController
from prefalign.stages import ppo
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model
from prefalign.train.logger import read_metrics


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo-fixes")
    save_tiny_model(d / "sft", vocab_size=300)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t[:12]}) + "\n" for t in SAMPLE_TEXTS))
    return d


def length_reward(prompts, completions, rollout):
    return rollout.response_mask.sum(1).float() / rollout.response_mask.shape[1]


def config(d, out, **kw):
    base = dict(model=str(d / "sft"), prompts=str(d / "prompts.jsonl"), output=str(out), iterations=1,
                rollout_batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=3, lr=5e-3,
                lr_schedule="constant", progress=False, sample_every=0)
    return PPOConfig(**{**base, **kw})


# --------------------------------------------------------------------------- A.2: beta stays positive

def test_adaptive_controller_never_makes_beta_negative():
    # horizon 1, 16 sequences, KL 0 (error clipped to -0.2): multiplier 1 - 0.2 * 16 = -2.2 (was: beta -0.11)
    ctl = AdaptiveKLController(0.05, 6.0, horizon=1)
    with pytest.raises(ValueError, match="beta would turn negative"):
        ctl.update(0.0, 16)
    assert ctl.value == 0.05
    ok = AdaptiveKLController(0.05, 6.0, horizon=4)  # 16 / 5 = 3.2 < 4: multiplier 1 - 0.8 = 0.2
    ok.update(0.0, 16)
    assert ok.value == pytest.approx(0.01, abs=1e-12)


def test_too_short_kl_horizon_is_refused_before_any_model_loads(fixture, tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "load_models", lambda *a: pytest.fail("models were loaded before the check"))
    cfg = config(fixture, tmp_path / "out", target_kl=6.0, kl_horizon=1, rollout_batch_size=16, minibatch_size=8)
    with pytest.raises(ConfigError, match=r"--kl-horizon 1 is too short for 16 sequences.*above 3\.2"):
        ppo.run_ppo(cfg, reward_fn=length_reward)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- A.4: --value-lr

def optimizer_lrs(monkeypatch) -> dict:
    """Patch make_optimizer to record the optimizer a run builds: {"opt": AdamW}."""
    seen, real = {}, ppo.make_optimizer

    def spy(*args, **kwargs):
        seen["opt"] = real(*args, **kwargs)
        seen["model"] = args[0]
        return seen["opt"]
    monkeypatch.setattr(ppo, "make_optimizer", spy)
    return seen


def group_lrs(seen) -> dict[str, set]:
    """{"policy": {peak LRs of groups holding policy weights}, "value": {...}}."""
    names = {id(p): name.split(".")[0] for name, p in seen["model"].named_parameters()}
    out = {}
    for g in seen["opt"].param_groups:
        for p in g["params"]:
            out.setdefault(names[id(p)], set()).add(g["initial_lr"])
    return out


@pytest.mark.parametrize("kw, want", [
    ({}, {"policy": {5e-3}, "value": {5e-3}}),                                  # full model: --lr for both
    ({"lora": True, "lora_r": 4}, {"policy": {5e-3}, "value": {1e-5}}),         # LoRA policy, full value model
    ({"lora": True, "lora_r": 4, "value_lr": 3e-4}, {"policy": {5e-3}, "value": {3e-4}}),
    ({"value_lr": 2e-4, "shared_value_head": True}, {"policy": {5e-3}, "value": {2e-4}}),
], ids=["full", "lora-default", "lora-value-lr", "shared-head"])
def test_value_model_trains_at_its_own_learning_rate(fixture, tmp_path, monkeypatch, kw, want):
    seen = optimizer_lrs(monkeypatch)
    ppo.run_ppo(config(fixture, tmp_path / "out", **kw), reward_fn=length_reward)
    assert group_lrs(seen) == want
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["config"]["value_lr"] == kw.get("value_lr")


def test_bad_value_lr_is_refused(fixture, tmp_path):
    with pytest.raises(ConfigError, match="--value-lr must be positive"):
        ppo.run_ppo(config(fixture, tmp_path / "out", value_lr=0.0), reward_fn=length_reward)


# --------------------------------------------------------------------------- 17.6: samples.jsonl

def test_samples_of_the_first_and_last_iteration_are_always_written(fixture, tmp_path):
    ppo.run_ppo(config(fixture, tmp_path / "out", iterations=3, sample_every=10), reward_fn=length_reward)
    rows = read_metrics(tmp_path / "out" / "samples.jsonl")
    assert [r["step"] for r in rows] == [1, 3]
    assert all(len(r["samples"]) == 4 and {"prompt", "completion", "score"} <= set(r["samples"][0]) for r in rows)


def test_ppo_help_names_trls_batch_options():
    from dataclasses import fields
    helps = {f.name: f.metadata["help"] for f in fields(PPOConfig)}
    assert "local_batch_size" in helps["rollout_batch_size"]
    assert "local_mini_batch_size" in helps["minibatch_size"]
    assert "Not used by ppo" in helps["batch_size"] and "--minibatch-size" in helps["batch_size"]
