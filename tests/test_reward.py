"""prefalign reward and score: separable data is learned, normalisation, CLI with YAML."""
import json
import random

import pytest
import torch

from prefalign.data import encode_preference, load_preferences
from prefalign.models import load_scalar_model
from prefalign.stages.pair_batch import TokenizedPair, collate_pairs
from prefalign.stages.reward import RewardObjective
from prefalign.tiny import save_tiny_model
from conftest import run_cli

GOOD = "great wonderful superb lovely brilliant charming".split()
BAD = "awful boring dull terrible weak bland".split()
NOUNS = "movie plot cast music story ending".split()


def separable_pairs(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"The {rng.choice(NOUNS)} was"
        rows.append({"prompt": prompt, "chosen": f" {rng.choice(GOOD)} and {rng.choice(GOOD)}.",
                     "rejected": f" {rng.choice(BAD)} and {rng.choice(BAD)}."})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in separable_pairs(200, 0)]
    save_tiny_model(d / "base", hidden=32, layers=2, texts=texts, vocab_size=300)
    write_jsonl(d / "train.jsonl", separable_pairs(256, 1))
    write_jsonl(d / "test.jsonl", separable_pairs(64, 2))
    (d / "rm.yaml").write_text("lr: 0.003\nbatch_size: 16\nmax-steps: 40\nlogging-steps: 10\nnormalize: std\n")
    run_cli("reward", "--model", d / "base", "--data", d / "train.jsonl", "--output", d / "rm",
            "--config", d / "rm.yaml", "--no-progress")
    return d


def test_reward_model_separates(trained):
    proc = run_cli("score", "--reward-model", trained / "rm", "--data", trained / "test.jsonl",
                   "--output", trained / "scores.jsonl")
    summary = json.loads(proc.stdout)
    assert summary["pairs"] == 64 and summary["accuracy"] >= 0.95
    rows = [json.loads(l) for l in (trained / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and {"chosen_score", "rejected_score", "correct"} <= set(rows[0])


def test_normalisation_centres_training_completions(trained):
    summary = json.loads((trained / "rm" / "summary.json").read_text())
    norm = summary["normalization"]
    assert norm["mode"] == "std" and norm["n_completions"] == 512 and norm["scale"] > 0
    cfg = json.loads((trained / "rm" / "config.json").read_text())
    assert cfg["prefalign_reward_shift"] == pytest.approx(norm["shift"])
    assert cfg["prefalign_reward_scale"] == pytest.approx(norm["scale"])
    rows = [{"prompt": r["prompt"], "completion": c} for r in separable_pairs(256, 1) for c in (r["chosen"], r["rejected"])]
    write_jsonl(trained / "completions.jsonl", rows)
    out = json.loads(run_cli("score", "--reward-model", trained / "rm", "--data", trained / "completions.jsonl").stdout)
    assert abs(out["score_mean"]) < 1e-4 and out["score_std"] == pytest.approx(1.0, abs=1e-3)


def test_reward_metrics_logged(trained):
    rows = [json.loads(l) for l in (trained / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    for key in ("loss", "accuracy", "margin", "rewards/mean", "rewards/std"):
        assert key in rows[-1]
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_pairs_equal_padded_pairs(trained, share_prompt):
    """--packing changes only the layout: loss, metrics and gradients match the padded batch,
    also with each pair's prompt packed once."""
    model, tok = load_scalar_model(str(trained / "base"), seed=1)
    examples = load_preferences(trained / "test.jsonl")[:6]
    pairs = [TokenizedPair(*encode_preference(tok, ex, 64), margin=0.5 * i) for i, ex in enumerate(examples)]
    padded = collate_pairs(pairs, tok.pad_token_id)
    packed = collate_pairs(pairs, tok.pad_token_id, pack_tokens=40, share_prompt=share_prompt)
    assert packed["input_ids"].shape[0] > 1  # several rows, global segment ids
    prompts = sum(p.chosen.prompt_len for p in pairs) if share_prompt else 0
    assert prompts > 0 or not share_prompt
    assert int((packed["segment_ids"] >= 0).sum()) == int(padded["attention_mask"].sum()) - prompts
    obj = RewardObjective(center_coef=0.01)
    assert obj.units(packed) == obj.units(padded) == 6
    out_pad, out_pack = obj(model, padded), obj(model, packed)
    torch.testing.assert_close(out_pack.loss, out_pad.loss, rtol=1e-5, atol=1e-6)
    for k, (s, c) in out_pad.metrics.items():
        torch.testing.assert_close(torch.as_tensor(out_pack.metrics[k][0]), torch.as_tensor(s), rtol=1e-5, atol=1e-5)
    g_pad = torch.autograd.grad(out_pad.loss, list(model.parameters()))
    g_pack = torch.autograd.grad(obj(model, packed).loss, list(model.parameters()))
    for a, b in zip(g_pad, g_pack):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_reward_packing_cli(trained, tmp_path):
    run_cli("reward", "--model", trained / "base", "--data", trained / "train.jsonl", "--output", tmp_path / "rm",
            "--packing", "--max-length", "32", "--batch-size", "8", "--max-steps", "2", "--logging-steps", "1",
            "--no-progress")
    rows = [json.loads(l) for l in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["perf/tokens_per_s"] > 0 for r in rows)


def test_reward_lora_trains_adapters_and_head(tmp_path):
    """--lora: only adapters and the head train; the saved model is a plain HF checkpoint."""
    import transformers
    d = tmp_path
    save_tiny_model(d / "base", texts=[r["prompt"] + r["chosen"] + r["rejected"] for r in separable_pairs(50, 0)],
                    vocab_size=300)
    write_jsonl(d / "train.jsonl", separable_pairs(32, 1))
    run_cli("reward", "--model", d / "base", "--data", d / "train.jsonl", "--output", d / "rm", "--lora",
            "--lora-r", "4", "--max-steps", "2", "--batch-size", "8", "--lr", "1e-2", "--no-progress")
    base = transformers.AutoModelForCausalLM.from_pretrained(d / "base")
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(d / "rm")
    assert not any("lora" in k for k in rm.state_dict())  # adapters merged into plain weights
    moved = [k for k, v in base.model.state_dict().items() if not torch.equal(v, rm.model.state_dict()[k])]
    assert moved and all(("proj" in k) for k in moved)  # only adapted linear layers changed
    assert all("embed" not in k and "norm" not in k for k in moved)
