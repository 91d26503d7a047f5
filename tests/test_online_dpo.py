"""prefalign online-dpo: the judge by hand (deterministic and Bradley-Terry), its draws independent
of how the prompts are sharded, the first step's loss by hand, option checks before any model loads,
a failing judge function stopping with a checkpoint, the CLI on a tiny model (with LoRA too),
packed == padded, and --gradient-checkpointing == without it.

Resume after SIGKILL is in tests/test_resume.py (stage online-dpo); 2 processes == 1 process with
twice the prompts in tests/test_distributed.py.
"""
import json
import math

import pytest
import torch

from prefalign.cli import main as cli_main
from prefalign.config import OnlineDPOConfig
from prefalign.errors import ConfigError
from prefalign.rl.judge import judge_pairs, preference_probability
from prefalign.stages.online_dpo import judge, pair_rows, run_online_dpo
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model
from prefalign.train.logger import read_metrics
from conftest import assert_same_run, num_layers, run_cli

REWARDS = '''
def low_half(prompts, completions, completion_ids, **columns):
    """Share of sampled token ids below 150 (about 0.5 at initialisation)."""
    return [sum(i < 150 for i in ids) / len(ids) for ids in completion_ids]

def answer_key(prompts, completions, answer, **columns):
    assert len(answer) == len(completions) and all(a is not None for a in answer)
    return [float(a) for a in answer]

def constant(prompts, completions, **columns):
    return [1.0] * len(completions)

def short_list(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)
'''


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("online-dpo")
    save_tiny_model(d / "base", vocab_size=300)
    prompts = [t[:12] for t in SAMPLE_TEXTS] * 2  # 48 short prompts
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": i % 3}) + "\n"
                                             for i, p in enumerate(prompts)))
    (d / "rewards.py").write_text(REWARDS)
    from prefalign.models import load_scalar_model, save_pretrained
    model, tok = load_scalar_model(str(d / "base"), seed=1)
    save_pretrained(model, tok, str(d / "rm"))
    return d


def config(d, out, fn="low_half", **kw):
    base = dict(model=str(d / "base"), prompts=str(d / "prompts.jsonl"), output=str(out),
                reward_fn=f"{d / 'rewards.py'}:{fn}", iterations=2, rollout_batch_size=4, minibatch_size=2,
                max_new_tokens=5, lr=5e-3, lr_schedule="constant", progress=False, sample_every=0)
    return OnlineDPOConfig(**{**base, **kw})


# --------------------------------------------------------------------------- the judge

def test_deterministic_judge_fixed_values():
    # Pairs (1, 0): first wins; (0, 1): second wins; (2, 2): a tie goes to the first sample (TRL's >=).
    first, second = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])
    j = judge_pairs(first, second, tau=0.0)
    assert j.first_chosen.tolist() == [True, False, True]
    assert j.p_first.tolist() == [1.0, 0.0, 1.0]
    rows = pair_rows(j.first_chosen)  # pair p's completions are rollout rows 2p and 2p + 1
    assert rows.chosen.tolist() == [0, 3, 4] and rows.rejected.tolist() == [1, 2, 5]


def test_bradley_terry_judge_fixed_values():
    # tau 0.5 and s1 - s2 = 0.5 ln 3: P(y1 > y2) = sigma(ln 3) = 3 / (3 + 1) = 3/4; the reverse pair 1/4;
    # a tie 1/2. y1 is chosen exactly when the pair's uniform is below P.
    tau, d = 0.5, 0.5 * math.log(3)
    first, second = (torch.tensor(x, dtype=torch.float64) for x in ([d, 0.0, 1.0], [0.0, d, 1.0]))
    torch.testing.assert_close(preference_probability(first, second, tau),
                               torch.tensor([0.75, 0.25, 0.5], dtype=torch.float64), rtol=0, atol=1e-12)
    below = judge_pairs(first, second, tau, torch.tensor([0.74, 0.24, 0.49]))
    above = judge_pairs(first, second, tau, torch.tensor([0.76, 0.26, 0.51]))
    assert below.first_chosen.tolist() == [True, True, True] and above.first_chosen.tolist() == [False] * 3
    with pytest.raises(ValueError, match="one uniform per pair"):
        judge_pairs(first, second, tau)


def test_bradley_terry_frequencies_and_seeding():
    """The stage's draws: the share of first-chosen pairs is sigma(d / tau) (5 binomial sigmas), the
    draws depend on (seed, iteration, place) only (so on no sharding of the prompts), and change with
    the iteration."""
    cfg = OnlineDPOConfig(judge_temperature=2.0, seed=3)
    n, d = 20000, 2.0 * math.log(3)  # P = 3/4
    scores = torch.tensor([d, 0.0] * n)  # rows 2p, 2p + 1
    j = judge(cfg, scores, list(range(n)), iteration=0)
    share, sd = j.first_chosen.double().mean().item(), math.sqrt(0.75 * 0.25 / n)
    assert abs(share - 0.75) < 5 * sd, share
    halves = [judge(cfg, scores[:n], list(range(n // 2)), 0), judge(cfg, scores[n:], list(range(n // 2, n)), 0)]
    assert torch.equal(torch.cat([h.first_chosen for h in halves]), j.first_chosen)
    assert not torch.equal(judge(cfg, scores, list(range(n)), iteration=1).first_chosen, j.first_chosen)


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("kw,message", [
    ({"judge_temperature": -0.5}, "--judge-temperature must be a finite number >= 0"),
    ({"rollout_batch_size": 6, "minibatch_size": 4}, "--minibatch-size 4 must divide --rollout-batch-size 6"),
    ({"beta": 0.0}, "--beta must be a positive number"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "--label-smoothing applies to --loss sigmoid and robust only"),
    ({"missing_eos_penalty": float("nan")}, "--missing-eos-penalty"),
    ({"batch_size": 4}, "does not use --batch-size"),
    ({"max_steps": 3}, "does not use --max-steps; use --iterations"),
    ({"logging_steps": 5}, "does not use --logging-steps; it logs one metrics.jsonl row per iteration"),
    ({"distributed": "fsdp"}, "fsdp"),
    ({"lora": True, "lora_dropout": 0.1}, "without dropout"),
])
def test_bad_options_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        OnlineDPOConfig(**kw)


@pytest.mark.parametrize("extra,message", [
    (["--judge-temperature", "-1", "--reward-fn", "statistics:mean"], "--judge-temperature must be"),
    (["--rollout-batch-size", "3", "--minibatch-size", "2", "--reward-fn", "statistics:mean"], "must divide"),
    (["--reward-fn", "nowhere_module_xyz:score"], "cannot import module 'nowhere_module_xyz'"),
    (["--reward-fn", "statistics:mean", "--reward-weights", "1,2"], "--reward-weights has 2 value"),
    ([], "give a reward"),
])
def test_bad_options_refused_before_any_model_loads(tmp_path, capsys, extra, message):
    # --model names nothing: these errors must come first.
    code = cli_main(["online-dpo", "--model", str(tmp_path / "no-model"), "--prompts", str(tmp_path / "none.jsonl"),
                     "--output", str(tmp_path / "out"), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failing_judge_function_stops_with_a_checkpoint(fixture, tmp_path, capsys):
    d, out = fixture, tmp_path / "out"
    code = cli_main(["online-dpo", "--model", str(d / "base"), "--prompts", str(d / "prompts.jsonl"), "--output",
                     str(out), "--reward-fn", f"{d / 'rewards.py'}:short_list", "--rollout-batch-size", "2",
                     "--minibatch-size", "2", "--max-new-tokens", "3", "--iterations", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "short_list returned 3 values for 4 completions" in err and "prompt '" in err, err
    assert "--resume" in err and "Traceback" not in err
    assert (out / "checkpoints" / "step-000000000" / "COMPLETE").exists() and not (out / "summary.json").exists()


# --------------------------------------------------------------------------- the stage

def test_minibatch_loss_by_hand_with_known_log_ratios(fixture, tmp_path):
    """The DPO step of two pairs with reference log-probs chosen so that each completion's log-ratio
    log pi/ref is known: the reference is the policy's own log-probs minus ``offset`` on the first token,
    so log pi(y|x) - log ref(y|x) = offset. Pair 0 is rows 0 > 1 (the first sample chosen), pair 1 rows
    3 > 2 (the second). h = ratio(chosen) - ratio(rejected): pair 0: 0.7 - (-0.3) = 1.0, pair 1:
    -0.2 - 0.4 = -0.6. With beta 0.5 the sigmoid loss is the mean of -log sigma(beta h) =
    (softplus(-0.5) + softplus(0.3)) / 2; implicit rewards beta x ratio: chosen (0.35, -0.1), rejected
    (-0.15, 0.2), margins (0.5, -0.3), one pair of two ranked right. Chosen and rejected swapped anywhere
    would flip every sign (and give (softplus(0.5) + softplus(-0.3)) / 2)."""
    from prefalign.rl.forwards import policy_forward
    from prefalign.stages.online_dpo import minibatch_loss
    from prefalign.stages.policy_rollout import SEQ_KEYS, load_policy
    cfg = config(fixture, tmp_path / "unused", beta=0.5)
    m = load_policy(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    query_ids, response_ids = torch.randint(3, 300, (4, 5), generator=g), torch.randint(3, 300, (4, 6), generator=g)
    query_mask = torch.ones(4, 5, dtype=torch.bool)
    query_mask[1, :2] = query_mask[3, :1] = False  # left padding
    response_mask = torch.arange(6)[None] < torch.tensor([6, 4, 5, 3])[:, None]  # right padding
    batch = {"query_ids": query_ids, "query_mask": query_mask, "response_ids": response_ids,
             "response_mask": response_mask, "scores": torch.tensor([1.0, 0.0, 0.0, 2.0])}
    with torch.no_grad():
        policy_logprobs = policy_forward(m.policy, None, *(batch[k] for k in SEQ_KEYS), temperature=1.0)[0]  # (4, 6)
    offset = torch.tensor([0.7, -0.3, 0.4, -0.2])  # log pi - log ref of rows 0..3
    batch["ref_logprobs"] = policy_logprobs.clone()
    batch["ref_logprobs"][:, 0] -= offset
    rows = pair_rows(torch.tensor([True, False]))
    assert rows.chosen.tolist() == [0, 3] and rows.rejected.tolist() == [1, 2]
    loss, value, metrics = minibatch_loss(cfg, m, batch, rows, torch.arange(2), n_pairs=2, world_size=1)
    softplus = lambda x: math.log1p(math.exp(x))
    assert value == pytest.approx((softplus(-0.5) + softplus(0.3)) / 2, abs=1e-5)
    assert loss.item() == pytest.approx(value, abs=1e-7) and loss.requires_grad
    for key, (total, count) in {"rewards/chosen": (0.35 - 0.1, 2), "rewards/rejected": (-0.15 + 0.2, 2),
                                "rewards/margins": (0.5 - 0.3, 2), "rewards/accuracies": (1, 2),
                                "objective/kl": (0.7 - 0.3 + 0.4 - 0.2, 4)}.items():
        assert metrics[key][0] == pytest.approx(total, abs=1e-5) and metrics[key][1] == count, key
    logps = policy_logprobs.sum(1)  # (4,)
    assert metrics["logps/chosen"][0] == pytest.approx(float(logps[0] + logps[3]), abs=1e-4)
    assert metrics["logps/rejected"][0] == pytest.approx(float(logps[1] + logps[2]), abs=1e-4)
    # rlhf reward: score - beta x log-ratio, summed over the 4 completions
    assert metrics["objective/rlhf_reward"][0] == pytest.approx(3.0 - 0.5 * 0.6, abs=1e-5)


@pytest.mark.parametrize("loss,first_loss", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_first_step_loss_by_hand(fixture, tmp_path, loss, first_loss):
    """Before its first step the policy is the reference, so every pair's h = 0: the sigmoid loss is
    -log sigma(0) = ln 2, IPO's (0 - 1 / (2 beta))^2 = 25 at beta 0.1, and the log-ratios (KL, implicit
    rewards) are 0. One minibatch per iteration: the logged step-1 metrics are exactly these."""
    out = tmp_path / loss
    run_online_dpo(config(fixture, out, loss=loss, beta=0.1, iterations=1, minibatch_size=4))
    (row,) = read_metrics(out / "metrics.jsonl")
    assert row["loss"] == pytest.approx(first_loss, rel=1e-6)
    for key in ("objective/kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "objective/non_score_reward"):
        assert abs(row[key]) < 1e-5, key
    assert row["objective/rlhf_reward"] == pytest.approx(row["objective/scores"], abs=1e-6)
    # the deterministic judge (--judge-temperature 0) chooses the higher score: no pair is flipped
    assert row["judge/flipped"] == 0 and row["objective/scores_margin"] > 0


def test_online_dpo_cli_smoke(fixture, tmp_path):
    """`prefalign online-dpo` as a process: a reward model and two functions with weights, a noisy
    judge, the missing-EOS penalty, columns reaching the function."""
    d = fixture
    out = tmp_path / "odpo"
    run_cli("online-dpo", "--model", d / "base", "--prompts", d / "prompts.jsonl", "--output", out,
            "--reward-model", d / "rm", "--reward-fn", f"{d / 'rewards.py'}:low_half,{d / 'rewards.py'}:answer_key",
            "--reward-weights", "1,2,0.5", "--judge-temperature", "0.5", "--missing-eos-penalty", "1",
            "--iterations", 2, "--rollout-batch-size", 4, "--minibatch-size", 2, "--max-new-tokens", 4,
            "--lr", "1e-3", "--sample-every", 1, "--no-progress", env={"OMP_NUM_THREADS": "1"})
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token",
                "beta", "loss", "grad_norm", "lr", "judge/ties", "judge/flipped", "rewards/rm/mean",
                "rewards/low_half/mean", "rewards/answer_key/mean", "completions/mean_length", "sequences"):
        assert key in rows[-1], key
    for r in rows:  # the score is the weighted sum of the sources minus the penalty of completions without EOS
        weighted = r["rewards/rm/mean"] + 2 * r["rewards/low_half/mean"] + 0.5 * r["rewards/answer_key/mean"]
        assert r["objective/scores"] == pytest.approx(weighted - (1 - r["val/contain_eos_token"]), abs=1e-5)
        assert r["sequences"] == 8 and r["beta"] == 0.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "online-dpo" and summary["reference"] == str(d / "base")
    assert summary["reward_weights"] == [1.0, 2.0, 0.5] and summary["judge_temperature"] == 0.5
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "chosen", "rejected", "score_chosen", "p_chosen"} <= samples[0]["samples"][0].keys()
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_constant_judge_ties_and_lora_outputs(fixture, tmp_path):
    """Every pair ties under a constant reward and the first sample is chosen, with probability 1: the
    logged pairs are the iteration's draws (sampled again here from the same seeds) in sample order.
    --lora without --ref-model scores the reference with the adapters off and writes OUTPUT/adapter."""
    from prefalign.data import encode_prompt, load_prompts
    from prefalign.stages.policy_rollout import load_policy, plan_iterations, prompt_shard, rollout
    from prefalign.train.dist import DistInfo
    out = tmp_path / "lora"
    cfg = config(fixture, out, fn="constant", lora=True, lora_r=4, iterations=1, minibatch_size=4, sample_every=1)
    run_online_dpo(cfg)
    (row,) = read_metrics(out / "metrics.jsonl")
    assert row["objective/scores_margin"] == 0.0 and abs(row["objective/kl"]) < 1e-5  # adapters start as the identity
    # iteration 0's completions drawn again: the policy before its first step (LoRA's B = 0), the same seeds
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    m, examples = load_policy(cfg, cpu.device), load_prompts(cfg.prompts)
    mine = prompt_shard(len(examples), 0, plan_iterations(cfg, len(examples), 1)[0], cfg, cpu)
    r = rollout(cfg, m, [encode_prompt(m.tokenizer, examples[i].prompt, cfg.max_prompt_length) for i in mine],
                list(range(len(mine))), 0, cpu.device)
    texts = [m.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
             for ids, mask in zip(r.response_ids, r.response_mask)]
    (logged,) = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    pairs = logged["samples"]
    assert len(pairs) == 4 and any(texts[2 * p] != texts[2 * p + 1] for p in range(4))  # the order shows
    for p, pair in enumerate(pairs):
        assert pair["prompt"] == examples[mine[p]].prompt and pair["p_chosen"] == 1.0
        assert (pair["chosen"], pair["rejected"]) == (texts[2 * p], texts[2 * p + 1]), p
        assert pair["score_chosen"] == pair["score_rejected"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == "adapters off" and summary["lora"]["adapter"]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "model.safetensors").exists()


def test_packed_run_equals_padded(fixture, tmp_path):
    """Two iterations of two minibatches each, prompts of different lengths (left padding in the padded
    layout), a noisy judge: the default, which packs, gives the --no-packing run's metrics and weights."""
    from safetensors.torch import load_file
    d = fixture
    kw = dict(max_new_tokens=6, temperature=0.8, adam_eps=1e-5, judge_temperature=0.3, beta=0.5)
    run_online_dpo(config(d, tmp_path / "padded", packing=False, **kw))
    run_online_dpo(config(d, tmp_path / "packed", **kw))  # auto: the tiny Llama runs per-example attention
    assert json.loads((tmp_path / "packed" / "summary.json").read_text())["layout"]["rows"] == "packed"
    assert json.loads((tmp_path / "padded" / "summary.json").read_text())["layout"]["rows"] == "padded"
    padded, packed = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("padded", "packed"))
    assert len(padded) == len(packed) == 2
    for a, b in zip(padded, packed):
        for key, value in a.items():
            if not key.startswith("perf/"):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("padded", "packed"))
    base = load_file(d / "base" / "model.safetensors")
    assert any((a[k] - base[k]).abs().max() > 1e-4 for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("kw", [{}, {"lora": True, "lora_r": 4}], ids=["full", "lora"])
def test_gradient_checkpointing_equals_a_run_without(fixture, tmp_path, checkpoint_calls, kw):
    """--gradient-checkpointing: the metrics (rel 1e-5 / abs 1e-6) and final weights (atol 1e-6) of the
    run without it (a noisy judge, two minibatches an iteration); every layer of every update forward
    ran checkpointed, and neither the sampling nor the reference's forwards did."""
    d = fixture
    kw = dict(judge_temperature=0.3, beta=0.5, **kw)
    run_online_dpo(config(d, tmp_path / "plain", **kw))
    assert checkpoint_calls == []
    cfg = config(d, tmp_path / "gc", gradient_checkpointing=True, **kw)
    run_online_dpo(cfg)
    forwards = cfg.iterations * cfg.rollout_batch_size // cfg.minibatch_size
    assert len(checkpoint_calls) == forwards * num_layers(d / "base")
    assert_same_run(tmp_path / "plain", tmp_path / "gc")


@pytest.mark.slow
def test_score_rises(fixture, tmp_path):
    # The share of low-half token ids starts near 0.5; 16 iterations of one DPO step on 8 fresh pairs
    # lift it (seen: 0.53 over the first four iterations -> 0.77 over the last four, KL 6.4).
    out = tmp_path / "out"
    run_online_dpo(config(fixture, out, iterations=16, rollout_batch_size=8, minibatch_size=8, lr=5e-2, beta=0.5))
    scores = [r["objective/scores"] for r in read_metrics(out / "metrics.jsonl")]
    assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4 + 0.1, scores
