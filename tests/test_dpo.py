"""prefalign dpo: every loss switch learns; a step's loss by hand; precomputed == live reference;
packed == padded; LoRA reference == base with adapter off (and no second model); the reference
cache is reused and invalidated; resume; CLI with YAML; agreement with TRL when it is installed."""
import contextlib
import copy
import json
import math
import random

import pytest
import torch

import prefalign.config as C
from prefalign.data import PreferenceExample
from prefalign.errors import ConfigError
from prefalign.stages import dpo as dpo_stage
from prefalign.stages import dpo_reference
from prefalign.stages.dpo import DPOObjective, run_dpo
from prefalign.stages.dpo_batch import pair_logps
from prefalign.stages.dpo_reference import (AdapterOffReference, CachedReference, ModelReference, NoReference,
                                           make_reference)
from prefalign.stages.pair_batch import collate_pairs, tokenize_pairs
from prefalign.stages.ref_cache import fill_reference_logps
from prefalign.tiny import save_tiny_model, tiny_llama
from prefalign.train.dist import DistInfo
from prefalign.train.logger import read_metrics
from conftest import run_cli

GOOD = "great wonderful superb lovely brilliant charming".split()
BAD = "awful boring dull terrible weak bland".split()
NOUNS = "movie plot cast music story ending".split()
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def pair_rows(n, seed):
    """Chosen praise, rejected complaints, of varied lengths (so padding and packing differ)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen = " and ".join(rng.choice(GOOD) for _ in range(rng.randint(1, 4)))
        rejected = " and ".join(rng.choice(BAD) for _ in range(rng.randint(1, 4)))
        rows.append({"prompt": f"The {rng.choice(NOUNS)} was", "chosen": f" {chosen}.", "rejected": f" {rejected}."})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def examples(rows):
    return [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A tiny model, a reference that differs from it (same tokenizer), and a data file."""
    d = tmp_path_factory.mktemp("dpo")
    rows = pair_rows(64, 0)
    model, tok = save_tiny_model(d / "base", texts=[r["prompt"] + r["chosen"] + r["rejected"] for r in rows],
                                 vocab_size=300)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ref.save_pretrained(d / "ref")
    tok.save_pretrained(d / "ref")
    write_jsonl(d / "train.jsonl", rows)
    return d


def make_cfg(fx, out, **kw):
    base = dict(model=str(fx / "base"), data=str(fx / "train.jsonl"), output=str(out), batch_size=8, lr=5e-3,
                max_steps=16, logging_steps=4, progress=False, ref_cache_dir=str(out.parent / "cache"))
    base.update(kw)
    return C.DPOConfig(**base)


@pytest.fixture(scope="module")
def tok(fx):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(fx / "base")


SWITCHES = {
    "sigmoid": {},
    "ipo": {"loss": "ipo"},
    "hinge": {"loss": "hinge"},
    "robust": {"loss": "robust", "label_smoothing": 0.1},
    "conservative+simpo+rpo": {"label_smoothing": 0.1, "length_normalize": True, "target_margin": 0.5,
                               "nll_weight": 0.5, "beta": 2.0},
    "reference_free+packing": {"reference_free": True, "packing": True},
}


@pytest.mark.parametrize("name", SWITCHES)
def test_each_loss_switch_trains(fx, tmp_path, name):
    run_dpo(make_cfg(fx, tmp_path / "out", **SWITCHES[name]))
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    for r in rows:
        assert all(math.isfinite(v) for k, v in r.items() if isinstance(v, float)), r
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] + 0.05
    if "reference_free" in SWITCHES[name]:  # rewards are beta log pi: length differences dominate early on
        assert rows[-1]["rewards/accuracies"] >= rows[0]["rewards/accuracies"]
    else:
        assert rows[-1]["rewards/accuracies"] >= 0.9
    assert (tmp_path / "out" / "model.safetensors").exists()


def hand_logps(model, ids, prompt_len):
    """Plain loop: sum over completion tokens t of log softmax(logits[t-1])[ids[t]]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(prompt_len, len(ids)))


def test_one_step_loss_equals_hand_computation(fx, tmp_path, tok):
    from transformers import AutoModelForCausalLM
    row = pair_rows(1, 5)[0]
    write_jsonl(tmp_path / "one.jsonl", [row])
    cfg = make_cfg(fx, tmp_path / "out", data=str(tmp_path / "one.jsonl"), batch_size=1, max_steps=1, logging_steps=1,
                   ref_model=str(fx / "ref"), beta=0.5)
    run_dpo(cfg)
    logged = read_metrics(tmp_path / "out" / "metrics.jsonl")[0]
    (pair,) = tokenize_pairs(examples([row]), tok, cfg.max_length)
    # The tokens: prompt, then the completion's own tokens, then EOS (and nothing else).
    assert pair.chosen.input_ids[-1] == tok.eos_token_id
    assert tok.decode(pair.chosen.input_ids[pair.chosen.prompt_len:-1]) == row["chosen"]
    policy = AutoModelForCausalLM.from_pretrained(fx / "base")
    ref = AutoModelForCausalLM.from_pretrained(fx / "ref")
    pc, pr = (hand_logps(policy, s.input_ids, s.prompt_len) for s in (pair.chosen, pair.rejected))
    rc, rr = (hand_logps(ref, s.input_ids, s.prompt_len) for s in (pair.chosen, pair.rejected))
    assert logged["logps/chosen"] == pytest.approx(pc, rel=1e-5)
    assert logged["logps/rejected"] == pytest.approx(pr, rel=1e-5)
    # Rafailov et al. eq. 7 for one pair: -log sigma(beta ((pc - rc) - (pr - rr)))
    h = (pc - rc) - (pr - rr)
    assert abs(h) > 0.1  # the reference differs from the policy, so the check is not log 2 == log 2
    assert logged["loss"] == pytest.approx(math.log1p(math.exp(-0.5 * h)), rel=1e-5)
    assert logged["rewards/chosen"] == pytest.approx(0.5 * (pc - rc), rel=1e-4, abs=1e-6)
    assert logged["rewards/margins"] == pytest.approx(0.5 * h, rel=1e-4)


def objective_cfg(**kw):
    base = dict(beta=0.3, loss="sigmoid", label_smoothing=0.0, reference_free=False, length_normalize=False,
                target_margin=0.0, nll_weight=0.0)
    base.update(kw)
    return type("Cfg", (), base)


def loss_and_grads(objective, model, batch):
    out = objective(model, batch)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters()])
    return out, grads


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=rtol, atol=atol)
    for k in out_a.metrics:
        torch.testing.assert_close(torch.as_tensor(out_b.metrics[k][0]).float(),
                                   torch.as_tensor(out_a.metrics[k][0]).float(), rtol=1e-4, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_precomputed_reference_equals_live(tok, tmp_path, packing, length_normalize):
    policy, ref = tiny_llama(tok, seed=2), tiny_llama(tok, seed=3).eval()
    pairs = tokenize_pairs(examples(pair_rows(12, 3)), tok, 24, 8)  # some truncated
    collate = (lambda ps: collate_pairs(ps, tok.pad_token_id, pack_tokens=1)) if packing else (
        lambda ps: collate_pairs(ps, tok.pad_token_id))
    info = fill_reference_logps({"train": (pairs, {"test": 1})},
                                lambda: contextlib.nullcontext(ModelReference(ref).logps), collate, 5, tmp_path, CPU,
                                progress=False)
    assert not info["train"]["hit"]
    cfg = objective_cfg(length_normalize=length_normalize, nll_weight=0.2)
    batch = collate(pairs[2:10])
    cached = loss_and_grads(DPOObjective(cfg, reference=CachedReference()), policy, batch)
    live = loss_and_grads(DPOObjective(cfg, reference=ModelReference(ref)), policy, batch)
    assert_same(live, cached)
    assert cached[0].metrics["rewards/margins"][0] != 0  # different models: a real check


def test_packed_run_caches_each_pairs_own_reference(fx, tmp_path, tok):
    """Packed rows hold several pairs in another order than the batch; the precomputed values
    must still belong to their own pair (regression: they were scattered in batch order)."""
    from transformers import AutoModelForCausalLM
    cfg = make_cfg(fx, tmp_path / "out", packing=True, max_length=256, ref_model=str(fx / "ref"))
    pairs = tokenize_pairs(examples(pair_rows(12, 3)), tok, 256)
    wide = collate_pairs(pairs, tok.pad_token_id, pack_tokens=256)
    assert wide["input_ids"].shape[0] < len(pairs)  # several pairs share a row
    make_reference(cfg, tiny_llama(tok), tok, pairs, None, CPU)
    scorer = ModelReference(AutoModelForCausalLM.from_pretrained(fx / "ref").eval())
    for p in pairs:
        chosen, rejected = scorer.logps(collate_pairs([p], tok.pad_token_id))
        assert p.ref_chosen_logps == pytest.approx(float(chosen), rel=1e-5)
        assert p.ref_rejected_logps == pytest.approx(float(rejected), rel=1e-5)


@pytest.mark.parametrize("switches", [{}, {"length_normalize": True, "nll_weight": 0.5, "loss": "ipo"}])
def test_packed_equals_padded(tok, switches):
    policy, ref = tiny_llama(tok, seed=4), tiny_llama(tok, seed=5).eval()
    pairs = tokenize_pairs(examples(pair_rows(9, 4)), tok, 40, 8)
    padded, packed = collate_pairs(pairs, tok.pad_token_id), collate_pairs(pairs, tok.pad_token_id, pack_tokens=1)
    assert packed["input_ids"].shape[0] > 1  # several packed rows, right-padded
    assert "attention_mask" not in packed and packed["input_ids"].numel() < padded["input_ids"].numel()
    wide = collate_pairs(pairs, tok.pad_token_id, pack_tokens=64)  # fewer, longer rows
    assert 1 < wide["input_ids"].shape[0] < packed["input_ids"].shape[0]
    objective = DPOObjective(objective_cfg(**switches), reference=ModelReference(ref))
    assert objective.units(padded) == objective.units(packed) == 9
    want = loss_and_grads(objective, policy, padded)
    assert_same(want, loss_and_grads(objective, policy, packed))
    assert_same(want, loss_and_grads(objective, policy, wide))


@pytest.mark.parametrize("switches", [{}, {"length_normalize": True, "nll_weight": 0.5, "loss": "ipo"}])
def test_shared_prompt_rows_equal_padded(tok, switches):
    """Each pair's prompt packed once (prompt, chosen, rejected) gives the padded loss and
    gradients; a pair whose two prompts differ is packed whole in the same batch."""
    from prefalign.data import shared_prompt_len
    from prefalign.models.attention import use_packed_attention
    policy, ref = tiny_llama(tok, seed=4), tiny_llama(tok, seed=5).eval()
    assert use_packed_attention(policy) and use_packed_attention(ref)
    pairs = tokenize_pairs(examples(pair_rows(9, 4)), tok, 40, 8)
    pairs[3].rejected.input_ids[0] = (pairs[3].rejected.input_ids[0] + 1) % len(tok)  # prompts now differ
    assert shared_prompt_len(pairs[3].chosen, pairs[3].rejected) == 0
    padded = collate_pairs(pairs, tok.pad_token_id)
    whole = collate_pairs(pairs, tok.pad_token_id, pack_tokens=64)
    shared = collate_pairs(pairs, tok.pad_token_id, pack_tokens=64, share_prompt=True)
    assert len(shared["shared_prefix"]) == 8
    assert (shared["segment_ids"] >= 0).sum() < (whole["segment_ids"] >= 0).sum()  # 8 prompts fewer
    objective = DPOObjective(objective_cfg(**switches), reference=ModelReference(ref))
    want = loss_and_grads(objective, policy, padded)
    assert_same(want, loss_and_grads(objective, policy, shared))


def test_shared_prompt_rows_need_the_packed_attention(tok):
    pairs = tokenize_pairs(examples(pair_rows(3, 4)), tok, 40, 8)
    shared = collate_pairs(pairs, tok.pad_token_id, pack_tokens=1, share_prompt=True)
    with pytest.raises(ValueError, match="prefalign_packed"):
        pair_logps(tiny_llama(tok), shared)  # plain SDPA would let rejected tokens see the chosen ones


def test_packed_chosen_and_rejected_share_a_row(tok):
    pairs = tokenize_pairs(examples(pair_rows(7, 6)), tok, 32)
    batch = collate_pairs(pairs, tok.pad_token_id, pack_tokens=64)
    seg = batch["segment_ids"]
    assert batch["input_ids"].shape[0] < 7  # rows hold several pairs
    for k in range(7):
        rows_c, rows_r = (seg == k).any(1), (seg == 7 + k).any(1)  # pair k: chosen k, rejected B + k
        assert rows_c.sum() == 1 and torch.equal(rows_c, rows_r)


def test_lora_reference_is_base_with_adapter_off(tok):
    pytest.importorskip("peft")
    from prefalign.models import apply_lora
    base = tiny_llama(tok, seed=6)
    original = copy.deepcopy(base).eval()
    model = apply_lora(base, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # adapters that change the outputs
    batch = collate_pairs(tokenize_pairs(examples(pair_rows(4, 7)), tok, 32), tok.pad_token_id)
    with torch.no_grad():
        off = AdapterOffReference(model).logps(batch)
        want = ModelReference(original).logps(batch)
        on = ModelReference(model).logps(batch)
    for a, b in zip(off, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(on.chosen, want.chosen)



@pytest.mark.parametrize("options, kind, mode", [
    ({}, CachedReference, "cached"),
    ({"live_reference": True}, ModelReference, "live"),
    ({"live_reference": True, "ref_model": "ref"}, ModelReference, "live"),
    ({"reference_free": True}, NoReference, "none"),
])
def test_make_reference_picks_one_variant(fx, tmp_path, tok, options, kind, mode):
    """One factory, one call: the variant the options ask for, its summary.json info, and log-probs
    (B,) equal to a frozen model's (the initial policy's, or --ref-model's)."""
    from transformers import AutoModelForCausalLM
    if "ref_model" in options:
        options = {**options, "ref_model": str(fx / "ref")}
    cfg = make_cfg(fx, tmp_path / "out", **options)
    pairs = tokenize_pairs(examples(pair_rows(5, 8)), tok, cfg.max_length)
    policy = tiny_llama(tok, seed=7)
    reference = make_reference(cfg, policy, tok, pairs, None, CPU)
    assert type(reference) is kind and reference.info["mode"] == mode
    if mode == "cached":
        assert set(reference.info["train"]) == {"cache_file", "hit", "seconds"}
    batch = collate_pairs(pairs, tok.pad_token_id)
    got = reference.logps(batch)
    assert got.chosen.shape == got.rejected.shape == (5,)
    if mode == "none":
        assert not got.chosen.any() and not got.rejected.any()
        return
    truth = AutoModelForCausalLM.from_pretrained(fx / "ref").eval() if cfg.ref_model else policy
    want = ModelReference(truth).logps(batch)
    if mode == "live" and not cfg.ref_model:
        assert reference.model is not policy  # a frozen copy, not the policy that trains
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("live", [False, True])
def test_lora_run_loads_no_second_model(fx, tmp_path, monkeypatch, live):
    pytest.importorskip("peft")
    loads = []
    real_load = dpo_stage.load_causal_lm
    for module in (dpo_stage, dpo_reference):  # the policy's load, and any reference load
        monkeypatch.setattr(module, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(dpo_reference, "frozen_copy", lambda m: pytest.fail("copied the policy"))
    run_dpo(make_cfg(fx, tmp_path / "out", lora=True, lora_r=4, lr=1e-2, max_steps=8, live_reference=live))
    assert len(loads) == 1  # the policy only: the reference is the same weights with the adapter off
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert rows[0]["rewards/margins"] < rows[-1]["rewards/margins"]


def first_row(out):
    return {k: v for k, v in read_metrics(out / "metrics.jsonl")[0].items() if not k.startswith("perf/")}


def test_reference_cache_reused_and_invalidated(fx, tmp_path, monkeypatch):
    cfg = dict(ref_model=str(fx / "ref"), max_steps=2, logging_steps=1)
    run_dpo(make_cfg(fx, tmp_path / "a", **cfg))
    # A hit must not even load the reference model.
    monkeypatch.setattr(dpo_reference, "load_ref_model", lambda *a: pytest.fail("reference loaded on a cache hit"))
    run_dpo(make_cfg(fx, tmp_path / "b", **cfg))
    summary = lambda out: json.loads((out / "summary.json").read_text())["reference"]["train"]
    assert not summary(tmp_path / "a")["hit"] and summary(tmp_path / "b")["hit"]
    assert first_row(tmp_path / "a") == first_row(tmp_path / "b")
    monkeypatch.undo()
    run_dpo(make_cfg(fx, tmp_path / "c", max_length=12, max_prompt_length=4, **cfg))  # truncates: new key
    assert not summary(tmp_path / "c")["hit"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_resume_equals_uninterrupted(fx, tmp_path):
    common = dict(max_steps=6, logging_steps=1, lr_schedule="constant", ref_model=str(fx / "ref"))
    run_dpo(make_cfg(fx, tmp_path / "a", **common))
    run_dpo(make_cfg(fx, tmp_path / "b", **{**common, "max_steps": 3, "save_steps": 3}))
    run_dpo(make_cfg(fx, tmp_path / "b", **common, resume=True))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    a, b = (strip(read_metrics(tmp_path / o / "metrics.jsonl")) for o in "ab")
    assert a == b


@pytest.mark.parametrize("bad, message", [
    ({"loss": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
    ({"beta": 0.0}, "beta"),
    ({"reference_free": True, "live_reference": True}, "--reference-free"),
    ({"lora": True, "lora_dropout": 0.1}, "--lora-dropout"),
])
def test_bad_options_are_config_errors(fx, tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        run_dpo(make_cfg(fx, tmp_path / "out", **bad))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad, message", [
    ({"loss": "nope"}, "--loss must be one of sigmoid, ipo, hinge, robust"),
    ({"beta": float("nan")}, "--beta must be a positive number"),
    ({"loss": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\) for --loss robust"),
    ({"label_smoothing": 0.6}, r"\[0, 0.5\] for --loss sigmoid"),
    ({"target_margin": float("inf")}, "--target-margin"),
])
def test_dpo_config_checks_its_options(bad, message):
    """DPOConfig refuses bad options when it is built, before any stage code runs."""
    with pytest.raises(ConfigError, match=message):
        C.DPOConfig(**bad)


def test_dpo_config_loss_choices_are_the_losses():
    from typing import get_args
    from prefalign.losses.preference import DPO_LOSSES
    assert set(get_args(C.fields_of(C.DPOConfig)["loss"].type)) == set(DPO_LOSSES)


def test_cli_with_yaml(fx, tmp_path):
    (tmp_path / "dpo.yaml").write_text("beta: 0.2\nlr: 0.005\nbatch_size: 8\nmax_steps: 6\nlogging_steps: 3\n"
                                       "packing: true\neval_fraction: 0.25\nloss: sigmoid\n")
    proc = run_cli("dpo", "--model", fx / "base", "--data", fx / "train.jsonl", "--output", tmp_path / "out",
                   "--config", tmp_path / "dpo.yaml", "--ref-cache-dir", tmp_path / "cache", "--no-progress")
    assert "prefalign dpo: 6 steps" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["config"]["beta"] == 0.2 and summary["train_pairs"] == 48 and summary["eval_pairs"] == 16
    last = read_metrics(tmp_path / "out" / "metrics.jsonl")[-1]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert k in last and f"eval/{k}" in last
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_agreement_with_trl(tmp_path):
    """First-step loss and rewards/margins equal TRL DPOTrainer's (runs only where trl is installed;
    benchmarks/dpo_agreement.py runs the same comparison across the two environments)."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from dpo_agreement import compare
    result = compare(tmp_path, trl_python=sys.executable, ours_python=sys.executable)
    assert result["loss_rel"] < 1e-4 and result["margins_rel"] < 1e-4, result
