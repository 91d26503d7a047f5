"""Packed rows by default: every stage packs when each model it runs supports per-example attention
(detected from the loaded models), pads otherwise and says why, and --no-packing pads; the default
packed sft run gives the padded run's numbers."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from prefalign import config as C
from prefalign.models.attention import packing_blocker, use_packed_attention
from prefalign.stages.packing import choose_layout
from prefalign.stages.sft import run_sft
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model
from conftest import run_cli

GOOD = "great wonderful superb lovely brilliant charming".split()
BAD = "awful boring dull terrible weak bland".split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("packing")
    save_tiny_model(w / "base", hidden=32, layers=2, texts=SAMPLE_TEXTS + [" ".join(GOOD + BAD)])
    # completions of varied lengths, so padded and packed batches differ
    sft = [{"prompt": "The movie was", "completion": " " + " and ".join(GOOD[:1 + i % 5]) + "."} for i in range(16)]
    prefs = [{"prompt": "The movie was", "chosen": f" {GOOD[i % 6]}.",
              "rejected": " " + " and ".join(BAD[:1 + i % 4]) + "."} for i in range(16)]
    write_jsonl(w / "sft.jsonl", sft)
    write_jsonl(w / "prefs.jsonl", prefs)
    write_jsonl(w / "prompts.jsonl", [{"prompt": p} for p in ["The movie was", "The plot", "Honestly", "The cast"]])
    return w


def tiny(cls=LlamaForCausalLM, config=LlamaConfig, attn="sdpa", **kw):
    model = cls(config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, attn_implementation=attn, **kw))
    use_packed_attention(model)  # what load_causal_lm does
    return model


# ----------------------------------------------------------------------------- detection

def test_layout_follows_the_models():
    llama = tiny()
    assert packing_blocker(llama) is None
    assert choose_layout(None, {"policy": llama}).packed
    eager = tiny(attn="eager")
    assert "eager attention" in packing_blocker(eager)
    windowed = tiny(MistralForCausalLM, MistralConfig, sliding_window=4)
    assert "sliding-window attention (sliding_window=4)" in packing_blocker(windowed)
    mixed = choose_layout(None, {"policy": llama, "reference": windowed})
    assert not mixed.packed and mixed.why.startswith("the reference: MistralForCausalLM has sliding-window")
    assert "--packing packs anyway" in mixed.why
    # one model in two roles counts once; explicit options win over detection
    assert choose_layout(None, {"policy": llama, "reference": llama}).why.count("the ") == 1
    assert choose_layout(True, {"policy": eager}).info() == {"rows": "packed", "packing": "--packing",
                                                            "why": "--packing given"}
    assert not choose_layout(False, {"policy": llama}).packed


def test_packing_option_is_three_way(tmp_path):
    parse = lambda *a: C.parse_config(C.DPOConfig, ["--model", "m", *a]).packing
    assert (parse(), parse("--packing"), parse("--no-packing")) == (None, True, False)
    (tmp_path / "c.yaml").write_text("packing: auto\n")
    assert parse("--config", str(tmp_path / "c.yaml")) is None
    assert C.parse_config(C.PPOConfig, ["--no-packing"]).packing is False


# ----------------------------------------------------------------------------- every stage

def stage_args(name, w):
    common = ["--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--no-progress", "--seed", "3"]
    if name == "ppo":
        return ["ppo", "--model", w / "base", "--reward-model", w / "rm", "--prompts", w / "prompts.jsonl",
                "--iterations", "1", "--rollout-batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "1",
                "--max-new-tokens", "4", "--no-progress"]
    data = w / ("sft.jsonl" if name == "sft" else "prefs.jsonl")
    return [name, "--model", w / "base", "--data", data, *common]


@pytest.fixture(scope="module")
def reward_model(work):
    run_cli(*stage_args("reward", work), "--output", work / "rm")
    return work / "rm"


@pytest.mark.parametrize("name", ["sft", "reward", "dpo", "ppo"])
def test_default_run_packs_and_says_so(work, reward_model, tmp_path, name):
    proc = run_cli(*stage_args(name, work), "--output", tmp_path / "out")
    assert f"prefalign {name}: packed rows" in proc.stderr and "auto:" in proc.stderr
    layout = json.loads((tmp_path / "out" / "summary.json").read_text())["layout"]
    assert layout["rows"] == "packed" and layout["packing"] == "auto"


@pytest.mark.parametrize("name", ["sft", "dpo", "ppo"])
def test_eager_attention_pads_and_says_why(work, reward_model, tmp_path, name):
    proc = run_cli(*stage_args(name, work), "--attn-implementation", "eager", "--output", tmp_path / "out")
    assert f"prefalign {name}: padded rows (the policy: LlamaForCausalLM runs eager attention" in proc.stderr
    layout = json.loads((tmp_path / "out" / "summary.json").read_text())["layout"]
    assert layout["rows"] == "padded" and "eager attention" in layout["why"]


def test_no_packing_pads(work, tmp_path):
    proc = run_cli(*stage_args("reward", work), "--no-packing", "--output", tmp_path / "out")
    assert "prefalign reward: padded rows (--no-packing given)" in proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["layout"]["rows"] == "padded" and summary["config"]["packing"] is False


def test_default_packed_sft_equals_padded(work, tmp_path):
    """The default packs each batch's examples: the steps see the padded run's examples, so the
    metrics and weights agree to float rounding (and --batch-size still counts examples)."""
    base = dict(model=str(work / "base"), data=str(work / "sft.jsonl"), max_steps=4, batch_size=4, lr=1e-3,
                logging_steps=1, max_length=32, progress=False, seed=3)
    run_sft(C.SFTConfig(output=str(tmp_path / "padded"), packing=False, **base))
    run_sft(C.SFTConfig(output=str(tmp_path / "packed"), **base))
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("padded", "packed")]
    assert [s["layout"]["rows"] for s in summaries] == ["padded", "packed"]
    assert summaries[0]["train_rows"] == summaries[1]["train_rows"] == 16
    rows = [[json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("padded", "packed")]
    for a, b in zip(*rows):
        for key in ("loss", "token_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    wa, wb = (load_file(tmp_path / n / "model.safetensors") for n in ("padded", "packed"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)
