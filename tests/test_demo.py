"""`prefalign demo`: the whole pipeline end to end, its cache, and the numbers it reports.

The slow test runs the real `prefalign demo --quick` (about 4.5 minutes on the loaded 2-core
build machine) and checks results.json's numbers for sanity. The --base smollm2 path runs end to
end with a tiny stand-in for SmolLM2 as --base-model (seconds), so no test needs the 135M model.
"""
import json
import math

import numpy as np
import pytest

from conftest import run_cli
from prefalign.lab.demo_eval import best_of_n_win_rate
from prefalign.lab.demo_results import add_gain_shares
from prefalign.lab.demo_stages import Pipeline
from prefalign.lab.frontier import FrontierPoint
from prefalign.errors import ConfigError


def test_best_of_n_win_rate_matches_a_loop_over_subsets():
    """Exact expectation vs brute force over every n-subset of N = 5 samples (ties count 1/2)."""
    from itertools import combinations
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 4, size=(3, 5)).astype(float)        # integer rewards: ties happen
    proxy = rng.normal(size=(3, 5))
    for n in (1, 2, 3, 5):
        per_prompt = []
        for g, p in zip(gold, proxy):
            picks = [g[max(s, key=lambda i: p[i])] for s in combinations(range(5), n)]
            per_prompt.append(np.mean([np.mean((x > g) + 0.5 * (x == g)) for x in picks]))
        assert best_of_n_win_rate(gold, proxy, n) == pytest.approx(np.mean(per_prompt), abs=1e-12)
    # n = 1 picks a random sample: it wins exactly half the time against another random sample.
    assert best_of_n_win_rate(gold, proxy, 1) == pytest.approx(0.5)


def test_gain_shares_ignore_near_zero_kl_and_pick_each_methods_best():
    """Frontier: reward 0.5 + 0.1 * KL up to KL 2 (gain 0.2). Shares are (r - 0.5) / (0.1 * KL)."""
    frontier = [FrontierPoint(1.0, 0.5, 0.0), FrontierPoint(0.1, 0.7, 2.0)]
    methods = [{"method": "sft", "gold_reward": 0.5, "kl": 0.0},
               {"method": "dpo", "beta": 0.1, "gold_reward": 0.58, "kl": 1.0},     # share 0.8
               {"method": "dpo", "beta": 0.3, "gold_reward": 0.55, "kl": 1.0},     # share 0.5
               {"method": "ppo", "step": 1, "gold_reward": 0.5019, "kl": 0.01},    # gain 0.001 < 10 % of 0.2: noise
               {"method": "ppo", "step": 2, "gold_reward": 0.62, "kl": 2.0}]       # share 0.6
    best = add_gain_shares(methods, frontier, sft_reward=0.5)
    assert methods[1]["gain_share"] == pytest.approx(0.8) and methods[3]["gain_share"] == pytest.approx(1.9)
    assert best["dpo"]["gain_share"] == pytest.approx(0.8) and best["dpo"]["beta"] == 0.1
    assert best["ppo"]["gain_share"] == pytest.approx(0.6) and best["ppo"]["step"] == 2
    assert not best["dpo"]["upper_bound"]


def test_a_share_past_the_frontiers_kl_is_only_a_headline_when_nothing_else_is():
    """Past KL 2 the optimum is held at 0.7, so r = 0.68 at KL 5 shows share 0.9: an upper bound."""
    frontier = [FrontierPoint(1.0, 0.5, 0.0), FrontierPoint(0.1, 0.7, 2.0)]
    far = {"method": "dpo", "beta": 0.1, "gold_reward": 0.68, "kl": 5.0}
    near = {"method": "dpo", "beta": 1.0, "gold_reward": 0.56, "kl": 1.0}
    best = add_gain_shares([dict(far), dict(near)], frontier, sft_reward=0.5)
    assert best["dpo"]["beta"] == 1.0 and best["dpo"]["gain_share"] == pytest.approx(0.6)
    best = add_gain_shares([dict(far)], frontier, sft_reward=0.5)
    assert best["dpo"]["upper_bound"] and best["dpo"]["gain_share"] == pytest.approx(0.9)


def test_pipeline_skips_done_stages_and_restarts_half_written_ones(tmp_path, capsys):
    calls = []

    def work(d, resume):
        calls.append((d.name, resume))
        (d / "summary.json").write_text("{}")

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "leftover.jsonl").write_text("half")         # no checkpoint: start clean
    pipe = Pipeline(tmp_path, total=2)
    pipe.stage("a", "first", work)
    pipe.stage("b", "second", work)
    assert calls == [("b", False)]
    assert not (tmp_path / "b" / "leftover.jsonl").exists()
    assert "demo_wall_time_s" in json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "[1/2] a: done earlier" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_end_to_end_and_cached_rerun(tmp_path):
    out = tmp_path / "demo"
    run_cli("demo", "--quick", "--output", out, timeout=900)
    results = json.loads((out / "results.json").read_text())
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Sample completions" in html

    def finite(x):
        return x is None or (isinstance(x, (int, float)) and math.isfinite(x))

    for m in results["methods"]:
        assert all(finite(m.get(k)) for k in ("beta", "gold_reward", "kl", "win_rate_vs_sft", "gain_share")), m
        assert 0 <= m["gold_reward"] <= 1
    rm = results["reward_model"]
    assert 0 <= rm["heldout_accuracy"] <= 1 and 0.5 <= rm["bayes_optimal_accuracy"] <= 1
    sft = next(m for m in results["methods"] if m["method"] == "sft")
    for method in ("dpo", "ppo", "rloo", "grpo", "online-dpo"):
        rows = [m for m in results["methods"] if m["method"] == method]
        assert rows, f"no {method} rows"
        assert max(m["gold_reward"] for m in rows) > sft["gold_reward"], (method, rows, sft)
    assert [m["step"] for m in results["methods"] if m["method"] == "grpo"] == [8, 16]   # checkpoints: a curve
    for m in results["methods"][1:]:                             # every share with its standard error over prompts
        assert m["gain_share_se"] is None or m["gain_share_se"] > 0, m
    assert sum(m["gain_share_se"] is not None for m in results["methods"]) >= 6
    assert set(results["frontier_pool"]["proposals"]) == {"sft", "dpo-beta1", "ppo-2", "rloo-2", "grpo-2",
                                                          "online-dpo-2"}
    rm_optimum = results["reward_model_optimum"]
    assert rm_optimum["beta_scale"] > 0 and len(rm_optimum["points"]) == len(results["frontier"])
    assert any(p["trusted"] and p["gain_share"] is not None for p in rm_optimum["points"])
    kls = [p["mean_kl"] for p in rm_optimum["points"]]
    assert kls == sorted(kls, reverse=True)                      # the frontier's betas (small to large), scaled
    # Policies are plain transformers checkpoints.
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(rows[-1]["policy"])
    # A rerun finds every stage done and only rewrites the report.
    again = run_cli("demo", "--quick", "--output", out, timeout=300)
    assert "finished in" not in again.stdout and "done earlier" in again.stdout


def test_an_output_folder_refuses_a_run_with_other_settings(tmp_path):
    from prefalign.lab.demo_stages import claim_output
    claim_output(tmp_path, {"plan": "quick", "seed": 0})
    claim_output(tmp_path, {"plan": "quick", "seed": 0})          # same settings: a rerun continues
    with pytest.raises(ConfigError, match="seed"):
        claim_output(tmp_path, {"plan": "quick", "seed": 1})


def test_pipeline_resumes_a_stage_that_left_a_complete_checkpoint(tmp_path):
    calls = []

    def work(d, resume):
        calls.append(resume)
        (d / "summary.json").write_text("{}")

    ckpt = tmp_path / "sft" / "checkpoints" / "step-000000010"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("10\n")
    (tmp_path / "sft" / "checkpoints" / ".tmp-step-000000020-1").mkdir()   # a save that was cut short
    Pipeline(tmp_path, total=1).stage("sft", "resumable", work)
    assert calls == [True] and ckpt.exists()


def test_unknown_word_rate_counts_words_the_completion_wrote(tmp_path):
    from prefalign.lab.demo_data import write_jsonl
    from prefalign.lab.demo_results import unknown_word_rate
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": "It was pouring and the film was great."}])
    # Counted: "pouring" (finished by the completion), "the", "flim"; left out: "It", "was" (prompt)
    # and "cut" (last word, maybe cut by the token budget). One unknown word of three.
    write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "It was p", "completion": "ouring the flim cut"}])
    assert unknown_word_rate(tmp_path / "corpus.jsonl", tmp_path / "samples.jsonl") == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def smollm2_stand_in(tmp_path_factory):
    """A tiny Llama + byte-level BPE standing in for SmolLM2 (--base-model): the smollm2 code path
    (no pretraining, LoRA everywhere, packing, a shared PPO value head) without the 135M model."""
    from prefalign.lab.corpus import generate_reviews
    from prefalign.lab.pretrain import build_tokenizer
    from prefalign.tiny import tiny_llama
    d = tmp_path_factory.mktemp("stand-in") / "base"
    tok = build_tokenizer([r.text for r in generate_reviews(300, seed=1)], vocab_size=400, add_bos=False)
    tiny_llama(tok, hidden=32, layers=2, max_positions=256, seed=1).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_demo_with_a_smollm2_base_end_to_end(tmp_path, smollm2_stand_in):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--base", "smollm2", "--quick", "--base-model", smollm2_stand_in, "--output", out,
                   timeout=600)
    assert "SmolLM2-135M-Instruct" in proc.stdout and "LoRA r=16" in proc.stdout and "] pretrain" not in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.html").exists() and not (out / "pretrain").exists()
    methods = {m["method"] for m in results["methods"]}
    assert {"sft", "dpo", "ppo", "best-of-n"} <= methods
    settings = results["settings"]
    assert settings["plan"] == "smollm2-quick" and settings["lora"] and settings["base_model"] == str(smollm2_stand_in)
    assert results["sft_fluency"]["not_applicable"] == ["pretrain_eval_loss", "sft_unknown_word_rate"]
    assert (out / "ppo-2" / "value_model" / "value_head.pt").exists()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["base"] == "smollm2" and plan["base_model"] == str(smollm2_stand_in)


def test_smollm2_without_a_base_model_says_to_run_make_real_model(tmp_path, monkeypatch):
    from prefalign.config import DemoConfig
    from prefalign.lab import demo_data
    from prefalign.lab.demo import run_demo
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo_data, "find_smollm2_gguf", lambda: None)
    monkeypatch.setattr(demo_data, "REAL_MODEL", tmp_path / "absent")   # hides this checkout's models/ too
    with pytest.raises(ConfigError, match="make real-model"):
        run_demo(DemoConfig(base="smollm2", output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--base-model"):
        run_demo(DemoConfig(base="tiny", base_model=str(tmp_path), output=str(tmp_path / "out")))


def test_tiny_plans_record_what_they_recorded_before_the_smollm2_fields():
    """plan.json of a tiny run holds no smollm2 field, so folders made before them are still reused."""
    from prefalign.lab.demo_plan import QUICK, SMOLLM2, recorded
    assert not {"base", "lora", "lora_r", "packing", "shared_value_head"} & set(recorded(QUICK))
    assert {"base", "lora", "packing", "shared_value_head"} <= set(recorded(SMOLLM2))


def test_score_cut_at_eos_is_recorded_only_where_on():
    """The default plans record ppo_score_cut_at_eos (it changed how PPO trains: older default folders are
    refused); the smollm2 plans, which keep it off, record nothing, so their older folders still match."""
    from prefalign.lab.demo_plan import DEFAULT, QUICK, SMOLLM2, SMOLLM2_QUICK, recorded
    assert recorded(DEFAULT)["ppo_score_cut_at_eos"] is True and recorded(QUICK)["ppo_score_cut_at_eos"] is True
    assert "ppo_score_cut_at_eos" not in recorded(SMOLLM2) and "ppo_score_cut_at_eos" not in recorded(SMOLLM2_QUICK)
    assert recorded(DEFAULT)["rloo"]["score_cut_at_eos"] is True


def test_rloo_and_grpo_are_recorded_only_where_they_run_with_other_sizes():
    """RLOO, GRPO and online DPO are recorded wherever they run, since their defaults changed how they
    train (the EOS penalty; online DPO's pairs per iteration), so a folder trained before is refused; a
    plan that does not run them (segments 0, the smollm2 plans) records nothing of them."""
    from prefalign.lab.demo_plan import DEFAULT, QUICK, SMOLLM2, SMOLLM2_QUICK, recorded
    later = {"rloo", "grpo", "online_dpo", "frontier_pool_checkpoints"}
    assert later & set(recorded(DEFAULT)) == {"rloo", "grpo", "online_dpo"}
    assert recorded(DEFAULT)["online_dpo"]["prompts"] == 512
    assert recorded(DEFAULT)["grpo"]["missing_eos_penalty"] == 1.0
    assert not later & (set(recorded(SMOLLM2)) | set(recorded(SMOLLM2_QUICK)))
    assert recorded(QUICK)["rloo"]["segments"] == 2 and recorded(QUICK)["frontier_pool_checkpoints"] == (2,)
    assert recorded(QUICK)["online_dpo"]["segments"] == 2
    json.dumps(recorded(QUICK))                                   # plan.json is plain JSON


def test_every_method_is_one_registry_entry_with_its_curve_of_settings():
    """DPO sweeps beta from SFT; PPO, RLOO, GRPO and online DPO are checkpoints of one run each; the pool takes the
    checkpoints the plan names (none by default) and each method's last."""
    import dataclasses
    from prefalign.lab.demo_methods import METHODS, in_pool
    from prefalign.lab.demo_plan import DEFAULT
    by_name = {m.name: m for m in METHODS}
    assert list(by_name) == ["dpo", "ppo", "rloo", "grpo", "online-dpo"]
    assert [s.stage for s in by_name["dpo"].settings(DEFAULT)] == ["dpo-beta0.3", "dpo-beta0.5", "dpo-beta1"]
    rloo = by_name["rloo"].settings(DEFAULT)
    assert [s.stage for s in rloo] == [f"rloo-{k}" for k in range(1, 7)]
    assert [s.knobs for s in rloo][:2] == [{"beta": 0.5, "step": 24}, {"beta": 0.5, "step": 48}]
    assert [in_pool(s, len(rloo), DEFAULT) for s in rloo] == [False, False, False, False, False, True]
    assert [in_pool(s, len(rloo), dataclasses.replace(DEFAULT, frontier_pool_checkpoints=(3,))) for s in rloo] == [
        False, False, True, False, False, True]
    assert all(in_pool(s, 0, DEFAULT) for s in by_name["dpo"].settings(DEFAULT))
    odpo = by_name["online-dpo"].settings(DEFAULT)
    assert [s.stage for s in odpo] == [f"online-dpo-{k}" for k in range(1, 6)]
    assert odpo[1].knobs == {"beta": DEFAULT.online_dpo.beta, "step": 2 * DEFAULT.online_dpo.iterations}


def test_rloo_grpo_and_online_dpo_join_the_demo_as_curves_of_checkpoints(tmp_path, smollm2_stand_in, monkeypatch):
    """The smollm2-quick plan (LoRA, packing) with 2 segments of RLOO, GRPO and online DPO: each
    checkpoint is a `prefalign rloo|grpo|online-dpo` run from the last one's policy with SFT as the
    reference, evaluated, in the table and the pool, and its share has a standard error. Online DPO's
    judge is the lab's labeler: the gold reward as --reward-fn, Bradley-Terry at the plan's tau."""
    import dataclasses
    from prefalign.config import DemoConfig
    from prefalign.lab import demo_plan
    from prefalign.lab.demo import run_demo
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    group = demo_plan.GroupPlan(segments=2, iterations=2, prompts=4, generations=2, minibatch=4, epochs=1,
                                beta=0.1, lr=1e-3)
    online = demo_plan.OnlineDPOPlan(segments=2, iterations=2, prompts=4, minibatch=2, beta=0.5, lr=1e-3)
    plan = dataclasses.replace(demo_plan.SMOLLM2_QUICK, rloo=group, grpo=group, online_dpo=online, ppo_segments=1)
    monkeypatch.setitem(demo_plan.PLANS, ("smollm2", True), plan)
    out = tmp_path / "demo"
    run_demo(DemoConfig(base="smollm2", quick=True, base_model=str(smollm2_stand_in), output=str(out)))
    results = json.loads((out / "results.json").read_text())
    for name in ("rloo", "grpo"):
        rows = [m for m in results["methods"] if m["method"] == name]
        assert [(m["step"], m["beta"]) for m in rows] == [(2, 0.1), (4, 0.1)]
        second = json.loads((out / f"{name}-2" / "summary.json").read_text())["config"]
        assert second["model"] == str(out / f"{name}-1") and second["ref_model"] == str(out / "sft")
        assert second["num_generations"] == 2 and second["lora"]
        assert f"{name}_at_least_70pct_of_optimum_gain" in results["targets"]
    rows = [m for m in results["methods"] if m["method"] == "online-dpo"]
    assert [(m["step"], m["beta"]) for m in rows] == [(2, 0.5), (4, 0.5)]
    first, second = (json.loads((out / f"online-dpo-{k}" / "summary.json").read_text()) for k in (1, 2))
    assert second["config"]["model"] == str(out / "online-dpo-1") and second["config"]["ref_model"] == str(out / "sft")
    assert first["config"]["model"] == str(out / "sft") and first["config"]["lora"]
    assert first["reward_sources"] == ["prefalign.lab.gold:gold_reward_fn"] and first["judge_temperature"] == plan.tau
    assert first["pairs_per_iteration"] == 4 and first["config"]["minibatch_size"] == 2
    assert "online-dpo_at_least_70pct_of_optimum_gain" in results["targets"]
    assert {"rloo-2", "grpo-2", "online-dpo-2"} <= set(results["frontier_pool"]["proposals"])
    assert "rloo-1" not in results["frontier_pool"]["proposals"]
    assert all("gain_share_se" in m for m in results["methods"][1:])
    html = (out / "report.html").read_text()
    assert "RLOO iter 4" in html and "online DPO iter 4" in html  # the last checkpoint's samples, side by side


def test_a_plan_without_sft_uses_the_base_as_the_reference(tmp_path, smollm2_stand_in, monkeypatch):
    """sft_steps = 0: no sft stage; the base samples the pairs and is the reference of KL and the frontier."""
    import dataclasses
    from prefalign.config import DemoConfig
    from prefalign.lab import demo_plan
    from prefalign.lab.demo import run_demo
    monkeypatch.setenv("OMP_NUM_THREADS", "1")          # keep pick_threads off this process's torch
    plan = dataclasses.replace(demo_plan.SMOLLM2_QUICK, sft_steps=0, ppo_segments=1)
    monkeypatch.setitem(demo_plan.PLANS, ("smollm2", True), plan)
    out = tmp_path / "demo"
    run_demo(DemoConfig(base="smollm2", quick=True, base_model=str(smollm2_stand_in), output=str(out)))
    assert not (out / "sft").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["sft_fluency"]["sft_eval_loss"] is None
    ppo = json.loads((out / "ppo-1" / "summary.json").read_text())
    assert ppo["config"]["ref_model"] == str(smollm2_stand_in)


def test_a_ppo_segment_with_a_reward_function_scores_by_it_and_starts_its_value_model_from_the_reward_model(
        tmp_path, monkeypatch):
    """benchmarks/method_knobs.py --method ppo --reward-fn (PPO against the gold reward): the reward model leaves the
    scoring (and --score-cut-at-eos, which only applies to one) but still starts the value model; a later segment's
    value model is the previous one's."""
    import prefalign.stages.ppo as ppo_stage
    from prefalign.lab import demo_stages
    from prefalign.lab.demo_plan import DEFAULT
    seen = []
    monkeypatch.setattr(ppo_stage, "run_ppo", lambda cfg: seen.append(cfg) or 0)
    args = (tmp_path / "sft", tmp_path / "reward", tmp_path / "prompts.jsonl", DEFAULT, 0)
    demo_stages.ppo_segment(tmp_path / "p1", False, tmp_path / "sft", None, *args)
    demo_stages.ppo_segment(tmp_path / "p2", False, tmp_path / "sft", None, *args, reward_fn="m:gold")
    demo_stages.ppo_segment(tmp_path / "p3", False, tmp_path / "p2", tmp_path / "p2" / "value_model", *args,
                            reward_fn="m:gold")
    by_rm, by_fn, later = seen
    assert (by_rm.reward_model, by_rm.reward_fn, by_rm.value_model) == (str(tmp_path / "reward"), None, None)
    assert by_rm.score_cut_at_eos == DEFAULT.ppo_score_cut_at_eos
    assert (by_fn.reward_model, by_fn.reward_fn, by_fn.value_model) == (None, "m:gold", str(tmp_path / "reward"))
    assert not by_fn.score_cut_at_eos and by_fn.missing_eos_penalty == DEFAULT.ppo_missing_eos_penalty
    assert later.value_model == str(tmp_path / "p2" / "value_model")
