"""prefalign rloo / grpo: the group advantages and the clipped loss by hand and against plain loops,
reward functions (loading, columns, clear errors with a checkpoint), option checks before any
model loads, both CLIs on a tiny model, the reward rising, packed == padded, --gradient-checkpointing
== without it (the mechanism: tests/test_online_checkpointing.py).

Resume after SIGKILL is in tests/test_resume.py (stages grpo and rloo); 2 processes == 1 process
with twice the prompts in tests/test_distributed.py.
"""
import json
import math
import statistics

import pytest
import torch

from prefalign.cli import main as cli_main
from prefalign.config import GRPOConfig, RLOOConfig
from prefalign.errors import ConfigError
from prefalign.losses.group import aggregation_weights, clipped_policy_loss, group_advantages
from prefalign.rl.reward_functions import RewardFunction, RewardFunctionError, load_function
from prefalign.stages.grpo import run_group
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model
from prefalign.train.logger import read_metrics
from conftest import assert_same_run, num_layers, run_cli

STD_EPS = 1e-4

REWARDS = '''
def low_half(prompts, completions, completion_ids, **columns):
    """Share of sampled token ids below 150 (about 0.5 at initialisation)."""
    return [sum(i < 150 for i in ids) / len(ids) for ids in completion_ids]

def answer_key(prompts, completions, answer, **columns):
    assert len(answer) == len(completions) and all(a is not None for a in answer)
    return [float(a) for a in answer]

def short_list(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)

CALLS = [0]
def nan_at_second_call(prompts, completions, **columns):
    CALLS[0] += 1
    return [float("nan") if CALLS[0] == 2 and i == 2 else 0.5 for i in range(len(completions))]

def raises(prompts, completions, **columns):
    raise KeyError("no such answer")
'''


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    save_tiny_model(d / "base", vocab_size=300)
    prompts = [t[:12] for t in SAMPLE_TEXTS] * 2  # 48 short prompts
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": i % 3}) + "\n"
                                             for i, p in enumerate(prompts)))
    (d / "rewards.py").write_text(REWARDS)
    return d


def config(d, out, cls=GRPOConfig, fn="low_half", **kw):
    base = dict(model=str(d / "base"), prompts=str(d / "prompts.jsonl"), output=str(out),
                reward_fn=f"{d / 'rewards.py'}:{fn}", iterations=2, rollout_batch_size=4, num_generations=4,
                minibatch_size=8, ppo_epochs=2, max_new_tokens=4, lr=5e-3, lr_schedule="constant", progress=False,
                sample_every=0)
    return cls(**{**base, **kw})


# --------------------------------------------------------------------------- advantages

def test_group_advantages_fixed_values():
    # Two groups of K = 4: [1, 2, 3, 6] (mean 3, deviations -2, -1, 0, 3) and [5, 5, 5, 5] (std 0).
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    dev = torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    # Dr. GRPO (scale none): r - mean.
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo", "none"), dev)
    # GRPO: group std, unbiased: sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3); the equal group gets 0, not 0/0.
    std = math.sqrt(14 / 3)
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo", "group"),
                               torch.cat([dev[:4] / (std + STD_EPS), torch.zeros(4)]))
    # Batch std over all 8: mean 4, squared deviations 9 4 1 4 1 1 1 1 = 22, / 7.
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo", "batch"), dev / (math.sqrt(22 / 7) + STD_EPS))
    # RLOO: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3 -> -8/3, -4/3, 0, 4 = 4/3 x deviation.
    torch.testing.assert_close(group_advantages(rewards, 4, "rloo", "none"),
                               torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]))
    # A batch std passed in (the global batch's under torchrun) replaces the local one.
    torch.testing.assert_close(group_advantages(rewards, 4, "rloo", "batch", batch_std=torch.tensor(2.0)),
                               torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0, 0, 0, 0]) / (2.0 + STD_EPS))


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_a_plain_loop(estimator, scale):
    P, K = 5, 3
    rewards = torch.rand(P * K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = rewards.tolist()
    expected = []
    for p in range(P):
        group = r[p * K:(p + 1) * K]
        for i, ri in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            a = ri - (sum(others) / (K - 1) if estimator == "rloo" else sum(group) / K)
            if scale == "group":
                a /= statistics.stdev(group) + STD_EPS
            elif scale == "batch":
                a /= statistics.stdev(r) + STD_EPS
            expected.append(a)
    torch.testing.assert_close(group_advantages(rewards, K, estimator, scale),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_group_advantages_refuse_bad_shapes():
    with pytest.raises(ValueError, match="K >= 2"):
        group_advantages(torch.zeros(6), 1)
    with pytest.raises(ValueError, match="K >= 2"):
        group_advantages(torch.zeros(7), 2)


# --------------------------------------------------------------------------- the clipped loss

def two_sequences():
    """Sequence 0 has 1 token, sequence 1 has 3; ratio 1 (logprobs == old), so each token's loss is -A."""
    mask = torch.tensor([[True, False, False], [True, True, True]])
    logprobs = torch.full((2, 3), -1.0)
    return logprobs, logprobs.clone(), torch.tensor([2.0, -1.0]), mask


@pytest.mark.parametrize("aggregation,expected", [
    ("token", (-2 + 1 + 1 + 1) / 4),        # DAPO: every token counts once: sum 1 over 4 tokens
    ("sequence", (-2 / 1 + 3 / 3) / 2),     # GRPO: per-sequence means -2 and 1, then their mean
    ("constant", (-2 + 3) / (2 * 4)),       # Dr. GRPO: sum / (2 sequences x max_tokens 4)
])
def test_loss_aggregations_fixed_values(aggregation, expected):
    out = clipped_policy_loss(*two_sequences(), eps_low=0.2, eps_high=0.2, aggregation=aggregation, max_tokens=4)
    assert out.loss.item() == pytest.approx(expected, abs=1e-7)
    torch.testing.assert_close(out.per_token, torch.tensor([[-2.0, 0, 0], [1.0, 1.0, 1.0]]))
    assert not out.low_clipped.any() and not out.high_clipped.any() and out.kl is None


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_shares_with_global_counts_sum_to_the_whole_loss(aggregation):
    """Each rank's share, normalised by the global minibatch's counts, sums to the one-process loss."""
    g = torch.Generator().manual_seed(0)
    logprobs, old = -torch.rand(6, 5, generator=g), -torch.rand(6, 5, generator=g)
    adv, mask = torch.randn(6, generator=g), torch.rand(6, 5, generator=g) > 0.3
    mask[:, 0] = True
    kw = dict(eps_low=0.2, eps_high=0.28, aggregation=aggregation, max_tokens=5)
    whole = clipped_policy_loss(logprobs, old, adv, mask, **kw).loss
    counts = dict(n_sequences=6, n_tokens=int(mask.sum()))
    parts = [clipped_policy_loss(logprobs[s], old[s], adv[s], mask[s], **kw, **counts).loss
             for s in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-6, atol=1e-7)


def test_clip_higher_and_k3():
    # ratio 1.25 with A = +1: eps_high 0.2 clips it at 1.2 (no gradient); DAPO's 0.28 does not (gradient -1.25).
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for eps_high, loss, grad, clipped in [(0.2, -1.2, 0.0, True), (0.28, -1.25, -1.25, False)]:
        logprobs = torch.full((1, 1), math.log(1.25), requires_grad=True)
        out = clipped_policy_loss(logprobs, old, torch.tensor([1.0]), mask, 0.2, eps_high)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(loss, abs=1e-6) and out.high_clipped.item() is clipped
        assert logprobs.grad.item() == pytest.approx(grad, abs=1e-6)
    # ratio 0.75 with A = -1: -min(-0.75, -0.8) = 0.8, clipped below.
    out = clipped_policy_loss(torch.full((1, 1), math.log(0.75)), old, torch.tensor([-1.0]), mask, 0.2, 0.28)
    assert out.loss.item() == pytest.approx(0.8, abs=1e-6) and out.low_clipped.item()
    # k3 with log pi = -1, log ref = -2: (r - 1) - log r with r = e^-1: e^-1 - 1 + 1 = e^-1; beta 0.5 adds half.
    out = clipped_policy_loss(torch.full((1, 1), -1.0), torch.full((1, 1), -1.0), torch.tensor([0.0]), mask, 0.2, 0.2,
                              ref_logprobs=torch.full((1, 1), -2.0), beta=0.5)
    assert out.kl.item() == pytest.approx(math.exp(-1), abs=1e-7)
    assert out.loss.item() == pytest.approx(0.5 * math.exp(-1), abs=1e-7)


def test_aggregation_constant_needs_max_tokens():
    with pytest.raises(ValueError, match="max_tokens"):
        aggregation_weights(torch.ones(2, 2, dtype=torch.bool), "constant")


# --------------------------------------------------------------------------- reward functions

def test_reward_function_checks_name_the_function_and_prompt(fixture):
    d = fixture
    rollout_like = type("R", (), {"query_ids": torch.zeros(1, 1)})()
    spec, fn = load_function(f"{d / 'rewards.py'}:short_list")
    with pytest.raises(RewardFunctionError, match=r"short_list returned 1 values for 2 completions.*'p0'"):
        RewardFunction(spec, fn)(["p0", "p0"], ["a", "b"], {}, rollout_like)
    spec, fn = load_function(f"{d / 'rewards.py'}:raises")
    with pytest.raises(RewardFunctionError, match=r"raises raised KeyError: 'no such answer'.*'p0'"):
        RewardFunction(spec, fn)(["p0"], ["a"], {}, rollout_like)
    for bad in ("nowhere_module_xyz:f", f"{d / 'rewards.py'}:missing", "no_colon", f"{d / 'absent.py'}:f"):
        with pytest.raises(ConfigError, match="--reward-fn"):
            load_function(bad)
    assert load_function("statistics:mean")[1] is statistics.mean  # a module on sys.path


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("kw,message", [
    ({"num_generations": 1}, "--num-generations must be at least 2"),
    ({"rollout_batch_size": 3, "num_generations": 4, "minibatch_size": 5}, "must divide the completions of a rollout"),
    ({"epsilon": 0.0}, "--epsilon"),
    ({"beta": -1.0}, "--beta"),
    ({"batch_size": 4}, "does not use --batch-size"),
    ({"logging_steps": 10}, "does not use --logging-steps; it logs one metrics.jsonl row per iteration"),
    ({"distributed": "fsdp"}, "fsdp"),
])
def test_bad_options_are_config_errors(kw, message):
    for cls in (GRPOConfig, RLOOConfig):
        with pytest.raises(ConfigError, match=message):
            cls(**kw)


def test_rloo_and_grpo_defaults():
    g, r = GRPOConfig(), RLOOConfig()
    assert (g.estimator, g.beta, g.kl_mode, g.scale_rewards, g.loss_aggregation) == ("grpo", 0.0, "loss", "group", "token")
    assert (r.estimator, r.beta, r.kl_mode, r.scale_rewards) == ("rloo", 0.05, "reward", "none")


@pytest.mark.parametrize("extra,message", [
    (["--num-generations", "1"], "--num-generations must be at least 2"),
    (["--rollout-batch-size", "3", "--minibatch-size", "5"], "must divide"),
    (["--reward-fn", "nowhere_module_xyz:score"], "cannot import module 'nowhere_module_xyz'"),
    (["--reward-fn", "statistics:mean", "--reward-weights", "1,2"], "--reward-weights has 2 value"),
    ([], "give a reward"),
    (["--reward-fn", "statistics:mean", "--score-cut-at-eos"], "--score-cut-at-eos changes how a reward model"),
])
def test_bad_options_refused_before_any_model_loads(tmp_path, capsys, extra, message):
    # --model names nothing: these errors must come first.
    code = cli_main(["grpo", "--model", str(tmp_path / "no-model"), "--prompts", str(tmp_path / "none.jsonl"),
                     "--output", str(tmp_path / "out"), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fn,message", [
    ("short_list", "short_list returned 3 values for 4 completions"),
    ("raises", "raised KeyError"),
    ("nan_at_second_call", "returned nan (not a finite number) for completion 2"),
])
def test_failing_reward_function_stops_with_a_checkpoint(fixture, tmp_path, capsys, fn, message):
    d = fixture
    out = tmp_path / "out"
    code = cli_main(["grpo", "--model", str(d / "base"), "--prompts", str(d / "prompts.jsonl"), "--output", str(out),
                     "--reward-fn", f"{d / 'rewards.py'}:{fn}", "--rollout-batch-size", "1", "--num-generations", "4",
                     "--minibatch-size", "4", "--max-new-tokens", "3", "--iterations", "3", "--no-progress",
                     "--sample-every", "0"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and f"rewards.py:{fn}" in err and "prompt '" in err, err
    assert "--resume" in err and "Traceback" not in err
    step = 1 if fn == "nan_at_second_call" else 0  # the iterations done before the failing call
    assert (out / "checkpoints" / f"step-{step:09d}" / "COMPLETE").exists()
    assert not (out / "summary.json").exists()


# --------------------------------------------------------------------------- the stage

def test_rloo_cli_smoke(fixture, tmp_path):
    """`prefalign rloo` as a process: KL in the reward (beta 0.05), columns reach the function."""
    d = fixture
    out = tmp_path / "rloo"
    run_cli("rloo", "--model", d / "base", "--prompts", d / "prompts.jsonl", "--output", out,
            "--reward-fn", f"{d / 'rewards.py'}:low_half,{d / 'rewards.py'}:answer_key", "--reward-weights", "1,0.5",
            "--iterations", 2, "--rollout-batch-size", 2, "--num-generations", 3, "--minibatch-size", 3,
            "--max-new-tokens", 4, "--sample-every", 1, "--no-progress", env={"OMP_NUM_THREADS": "1"})
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
                "completions/clipped_ratio", "rewards/low_half/mean", "rewards/answer_key/mean", "loss", "grad_norm"):
        assert key in rows[-1], key
    for r in rows:  # the reward is the weighted sum of the sources
        assert r["reward"] == pytest.approx(r["rewards/low_half/mean"] + 0.5 * r["rewards/answer_key/mean"], abs=1e-6)
    assert abs(rows[0]["kl"]) < 1e-5  # the policy is the reference before its first update
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "rloo" and summary["reference"] == str(d / "base")
    assert (out / "config.json").exists() and len((out / "samples.jsonl").read_text().splitlines()) == 2


def test_grpo_cli_in_process_with_k3_in_the_loss(fixture, tmp_path):
    d = fixture
    out = tmp_path / "grpo"
    assert cli_main(["grpo", "--model", str(d / "base"), "--prompts", str(d / "prompts.jsonl"), "--output", str(out),
                     "--reward-fn", f"{d / 'rewards.py'}:low_half", "--beta", "0.1", "--epsilon-high", "0.28",
                     "--scale-rewards", "batch", "--loss-aggregation", "constant", "--iterations", "2",
                     "--rollout-batch-size", "2", "--minibatch-size", "4", "--max-new-tokens", "4",
                     "--lr", "5e-3", "--no-progress", "--sample-every", "0"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    # k3 from the training forwards: 0 on the first minibatch, then growing as the policy moves
    assert 0 < rows[0]["kl"] < rows[1]["kl"] and rows[1]["kl"] > 1e-4
    assert json.loads((out / "summary.json").read_text())["stage"] == "grpo"


@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig], ids=["grpo", "rloo"])
def test_missing_eos_penalty_lowers_the_reward_of_cut_completions(fixture, tmp_path, cls):
    """--missing-eos-penalty p: the reward is the sources' sum minus p for each completion cut at
    --max-new-tokens, so the mean reward drops by p x the clipped share; the other metrics stay."""
    d = fixture
    rows = {}
    for p in (None, 2.5):
        run_group(config(d, tmp_path / f"out-{p}", cls, iterations=1, rollout_batch_size=4, num_generations=4,
                         minibatch_size=16, max_new_tokens=4, lr=1e-3, missing_eos_penalty=p))
        rows[p] = read_metrics(tmp_path / f"out-{p}" / "metrics.jsonl")
    plain, penalised = rows[None][0], rows[2.5][0]  # the first rollouts are the same draws
    assert 0 < plain["completions/clipped_ratio"] == penalised["completions/clipped_ratio"]
    assert penalised["rewards/low_half/mean"] == plain["rewards/low_half/mean"]
    assert plain["reward"] == pytest.approx(plain["rewards/low_half/mean"], abs=1e-6)
    assert penalised["reward"] == pytest.approx(plain["reward"] - 2.5 * plain["completions/clipped_ratio"], abs=1e-6)
    with pytest.raises(ConfigError, match="--missing-eos-penalty must be a finite number"):
        cls(missing_eos_penalty=float("nan"))


def test_sources_with_one_name_are_logged_apart(fixture, tmp_path):
    """Two files' functions both named low_half (the second scores 0.25 everywhere): logged as
    rewards/low_half/mean and rewards/low_half_2/mean in the order given, neither overwriting the other."""
    d = fixture
    (d / "other").mkdir(exist_ok=True)
    (d / "other" / "rewards.py").write_text("def low_half(prompts, completions, **columns):\n"
                                            "    return [0.25] * len(completions)\n")
    out = tmp_path / "same-names"
    cfg = config(d, out, reward_fn=f"{d / 'rewards.py'}:low_half,{d / 'other' / 'rewards.py'}:low_half",
                 reward_weights="1,2", iterations=1)
    assert run_group(cfg) == 0
    (row,) = read_metrics(out / "metrics.jsonl")
    assert row["rewards/low_half_2/mean"] == pytest.approx(0.25, abs=1e-7)
    assert row["rewards/low_half/mean"] != pytest.approx(0.25, abs=1e-3)  # the share of low ids, not 0.25
    assert row["reward"] == pytest.approx(row["rewards/low_half/mean"] + 2 * 0.25, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig], ids=["grpo", "rloo"])
def test_reward_rises(fixture, tmp_path, cls):
    # The share of low-half token ids starts near 0.5; 12 iterations lift it (seen: 0.54 -> 0.72 for grpo).
    run_group(config(fixture, tmp_path / "out", cls, iterations=12, rollout_batch_size=8, minibatch_size=16,
                     ppo_epochs=4))
    rewards = [r["reward"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.08, rewards


def test_packed_run_equals_padded(fixture, tmp_path):
    """Two iterations with a reference (k3 in the loss) and prompts of different lengths (left
    padding in the padded layout): the default, which packs, gives the --no-packing run's metrics and weights."""
    from transformers import AutoTokenizer
    d = fixture
    tok = AutoTokenizer.from_pretrained(d / "base")
    prompts = [json.loads(line)["prompt"] for line in (d / "prompts.jsonl").read_text().splitlines()]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1  # ragged prompts
    # A larger Adam epsilon keeps the comparison about the gradients, not Adam's amplification of
    # rounding on near-zero gradients (as in test_ppo's packed == padded run).
    kw = dict(beta=0.1, max_new_tokens=6, temperature=0.8, adam_eps=1e-5, rollout_batch_size=2)
    run_group(config(d, tmp_path / "padded", packing=False, **kw))
    run_group(config(d, tmp_path / "packed", **kw))  # auto: the tiny Llama runs per-example attention
    assert json.loads((tmp_path / "packed" / "summary.json").read_text())["layout"]["rows"] == "packed"
    assert json.loads((tmp_path / "padded" / "summary.json").read_text())["layout"] == {
        "rows": "padded", "packing": "--no-packing", "why": "--no-packing given"}
    padded, packed = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("padded", "packed"))
    for a, b in zip(padded, packed):
        for key, value in a.items():
            if not key.startswith("perf/"):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("padded", "packed"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_lora_without_merge_writes_the_adapter_only(fixture, tmp_path):
    """--lora --no-merge-lora: OUTPUT/adapter in PEFT format and no merged weights, as every stage."""
    out = tmp_path / "lora"
    run_group(config(fixture, out, lora=True, lora_r=4, iterations=1, merge_lora=False))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora"]["adapter"] and "--no-merge-lora" in summary["lora"]["note"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("kw", [{}, {"lora": True, "lora_r": 4, "lora_dropout": 0.5, "beta": 0.1}],
                         ids=["full", "lora-dropout-reference"])
def test_gradient_checkpointing_equals_a_run_without(fixture, tmp_path, checkpoint_calls, kw):
    """--gradient-checkpointing: the metrics (rel 1e-5 / abs 1e-6) and final weights (atol 1e-6) of the
    run without it; every layer of every update forward ran checkpointed, and nothing else did (not the
    sampling, not the reference or the LoRA-off reference). --lora-dropout 0.5 stays off in both runs."""
    d = fixture
    run_group(config(d, tmp_path / "plain", **kw))
    assert checkpoint_calls == []
    cfg = config(d, tmp_path / "gc", gradient_checkpointing=True, **kw)
    run_group(cfg)
    forwards = cfg.iterations * cfg.ppo_epochs * cfg.rollout_batch_size * cfg.num_generations // cfg.minibatch_size
    assert len(checkpoint_calls) == forwards * num_layers(d / "base")
    assert_same_run(tmp_path / "plain", tmp_path / "gc")


def test_gradient_checkpointing_refuses_a_model_with_dropout(fixture, tmp_path, capsys):
    d = fixture
    model = tmp_path / "dropout-model"
    model.mkdir()
    for f in (d / "base").iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config_json = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config_json, "attention_dropout": 0.1}))
    out = tmp_path / "out"
    code = cli_main(["grpo", "--model", str(model), "--prompts", str(d / "prompts.jsonl"), "--output", str(out),
                     "--reward-fn", f"{d / 'rewards.py'}:low_half", "--gradient-checkpointing", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"the policy ({model}) sets attention_dropout = 0.1" in err, err
    assert "or drop --gradient-checkpointing" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()
