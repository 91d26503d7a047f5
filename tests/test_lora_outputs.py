"""LoRA outputs users can ship: every stage run with --lora writes its adapter in PEFT format
(OUTPUT/adapter, loadable with PeftModel.from_pretrained on the base) next to the merged model,
or instead of it with --no-merge-lora; the adapter on the base reproduces the merged model's
logits, and a reward model's adapter carries its scalar head and reproduces its scores."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

peft = pytest.importorskip("peft")

from prefalign import config as C
from prefalign.errors import ConfigError
from prefalign.models import ScalarModel
from prefalign.stages.dpo import run_dpo
from prefalign.stages.ppo import run_ppo
from prefalign.stages.reward import run_reward
from prefalign.stages.sft import run_sft
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model

GOOD = "great wonderful superb lovely brilliant charming".split()
BAD = "awful boring dull terrible weak bland".split()
LORA = dict(lora=True, lora_r=4, lora_alpha=8)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("lora-out")
    save_tiny_model(w / "base", hidden=32, layers=2, texts=SAMPLE_TEXTS + [" ".join(GOOD + BAD)])
    write_jsonl(w / "sft.jsonl", [{"prompt": "The movie was", "completion": f" {g}."} for g in GOOD * 2])
    write_jsonl(w / "prefs.jsonl", [{"prompt": "The movie was", "chosen": f" {g}.", "rejected": f" {b} and dull."}
                                    for g, b in zip(GOOD * 2, BAD * 2)])
    write_jsonl(w / "prompts.jsonl", [{"prompt": p} for p in ["The movie was", "The plot", "Honestly", "The cast"]])
    return w


def common(w, out):
    return dict(model=str(w / "base"), output=str(out), max_steps=2, batch_size=4, lr=1e-2, progress=False,
                max_length=32, **LORA)


def batch(w):
    tok = AutoTokenizer.from_pretrained(w / "base")
    return torch.tensor([tok("The movie was great and the acting was wonderful.")["input_ids"]])


def adapter_on_base(w, out, cls=AutoModelForCausalLM, **kw):
    base = cls.from_pretrained(w / "base", **kw)
    return peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()


def assert_adapter_written(w, out):
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(w / "base") and config["r"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "tokenizer_config.json").exists()  # the folder can be pushed as it is
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora"]["adapter"] == "adapter" and summary["lora"]["adapter_base"] == str(w / "base")
    return summary


@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo"])
def test_adapter_on_the_base_equals_the_merged_model(work, tmp_path, stage):
    out = tmp_path / "out"
    if stage == "sft":
        run_sft(C.SFTConfig(data=str(work / "sft.jsonl"), **common(work, out)))
    elif stage == "dpo":
        run_dpo(C.DPOConfig(data=str(work / "prefs.jsonl"), ref_cache_dir=str(tmp_path / "cache"),
                            **common(work, out)))
    else:
        cfg = common(work, out)
        cfg.pop("max_steps"), cfg.pop("batch_size"), cfg.pop("max_length")
        run_ppo(C.PPOConfig(prompts=str(work / "prompts.jsonl"), iterations=2, rollout_batch_size=4, minibatch_size=2,
                            max_new_tokens=4, **cfg),
                reward_fn=lambda prompts, completions, r: r.response_mask.sum(1).float())
    summary = assert_adapter_written(work, out)
    assert summary["lora"]["merged_model"] is True
    x = batch(work)
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(work / "base")
    with torch.no_grad():
        want = merged(x).logits
        assert (want - base(x).logits).abs().max() > 1e-4  # the adapter trained
        torch.testing.assert_close(adapter_on_base(work, out)(x).logits, want, rtol=0, atol=1e-5)


def test_reward_adapter_carries_the_head_and_reproduces_scores(work, tmp_path):
    out = tmp_path / "rm"
    run_reward(C.RewardConfig(data=str(work / "prefs.jsonl"), **common(work, out)))
    assert_adapter_written(work, out)
    x = batch(work)
    merged = ScalarModel.from_pretrained(str(out)).eval()
    loaded = ScalarModel(adapter_on_base(work, out, AutoModelForSequenceClassification, num_labels=1)).eval()
    with torch.no_grad():
        want = merged(x)
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=1e-5)
        untrained = ScalarModel.from_causal_lm(str(work / "base"), seed=0)  # the run's initial head (--seed 0)
        assert (untrained(x) - want).abs().max() > 1e-4  # adapter and head trained


def test_no_merge_lora_writes_the_adapter_only(work, tmp_path):
    out = tmp_path / "out"
    run_reward(C.RewardConfig(data=str(work / "prefs.jsonl"), merge_lora=False, **common(work, out)))
    names = {p.name for p in out.iterdir()}
    assert "adapter" in names and "tokenizer_config.json" in names
    assert not names & {"config.json", "model.safetensors"}
    summary = assert_adapter_written(work, out)
    assert summary["lora"]["merged_model"] is False
    assert "--no-merge-lora" in summary["lora"]["note"] and "prefalign_reward_shift" in summary["lora"]["note"]
    x = batch(work)
    load = lambda: ScalarModel(adapter_on_base(work, out, AutoModelForSequenceClassification, num_labels=1))
    with torch.no_grad():  # the head comes from the adapter, not from transformers' random init of `score`
        torch.manual_seed(1)
        first = load()(x)
        torch.manual_seed(2)
        torch.testing.assert_close(load()(x), first, rtol=0, atol=0)
        assert (first - ScalarModel.from_causal_lm(str(work / "base"), seed=0)(x)).abs().max() > 1e-4  # it trained


def test_no_merge_lora_needs_lora():
    with pytest.raises(ConfigError, match="--no-merge-lora applies to --lora runs"):
        C.parse_config(C.SFTConfig, ["--model", "m", "--no-merge-lora"])
