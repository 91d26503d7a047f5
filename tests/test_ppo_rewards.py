"""prefalign ppo's reward sources, as grpo's: --reward-fn alone, with --reward-model, weighted;
the prompt file's columns reach the function; bad sources refused before any model loads; a failing
function stops with a checkpoint, and --resume after the fix ends where a run that never failed ends
(the iteration's sampling stream is rewound before that checkpoint). The Python hook still works
(tests/test_ppo.py uses it throughout) and refuses to be mixed with the options."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from prefalign.cli import main as cli_main
from prefalign.config import PPOConfig
from prefalign.errors import ConfigError
from prefalign.stages.ppo import run_ppo
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model
from prefalign.train.logger import read_metrics

REWARDS = '''
import os

def low_half(prompts, completions, completion_ids, **columns):
    return [sum(i < 150 for i in ids) / len(ids) for ids in completion_ids]

def answer_key(prompts, completions, answer, **columns):
    assert len(answer) == len(completions) and all(a is not None for a in answer)
    return [float(a) for a in answer]

CALLS = [0]
def flaky(prompts, completions, completion_ids, **columns):
    """low_half, but raises at its second call while PREFALIGN_TEST_FLAKY is set."""
    CALLS[0] += 1
    if CALLS[0] == 2 and os.environ.get("PREFALIGN_TEST_FLAKY"):
        raise RuntimeError("answer key unavailable")
    return low_half(prompts, completions, completion_ids)

def flaky_on_rank_1(prompts, completions, completion_ids, **columns):
    """low_half, but raises at its second call on torchrun's rank 1 only while PREFALIGN_TEST_FLAKY is set."""
    CALLS[0] += 1
    if CALLS[0] == 2 and os.environ.get("PREFALIGN_TEST_FLAKY") and os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1's answer key unavailable")
    return low_half(prompts, completions, completion_ids)
'''


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo-rewards")
    save_tiny_model(d / "sft", vocab_size=300)
    prompts = [t[:12] for t in SAMPLE_TEXTS]
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": i % 3}) + "\n"
                                             for i, p in enumerate(prompts)))
    (d / "rewards.py").write_text(REWARDS)
    from prefalign.models import load_scalar_model, save_pretrained
    model, tok = load_scalar_model(str(d / "sft"), seed=1)
    save_pretrained(model, tok, str(d / "rm"))
    return d


def args(d, out, *extra):
    return ["ppo", "--model", str(d / "sft"), "--prompts", str(d / "prompts.jsonl"), "--output", str(out),
            "--iterations", "3", "--rollout-batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "1",
            "--max-new-tokens", "4", "--lr", "1e-3", "--save-steps", "1", "--sample-every", "0", "--no-progress",
            *map(str, extra)]


def test_reward_model_and_functions_weighted(fixture, tmp_path):
    d, out = fixture, tmp_path / "out"
    fns = f"{d / 'rewards.py'}:low_half,{d / 'rewards.py'}:answer_key"
    assert cli_main(args(d, out, "--reward-model", d / "rm", "--reward-fn", fns, "--reward-weights", "0.5,2,1")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # the score is the weighted sum of the sources (no whitening, clipping or penalty set)
        weighted = 0.5 * r["rewards/rm/mean"] + 2 * r["rewards/low_half/mean"] + r["rewards/answer_key/mean"]
        assert r["objective/raw_scores"] == pytest.approx(weighted, abs=1e-5)
        assert r["objective/scores"] == pytest.approx(r["objective/raw_scores"], abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_sources"] == [str(d / "rm"), f"{d / 'rewards.py'}:low_half", f"{d / 'rewards.py'}:answer_key"]
    assert summary["reward_weights"] == [0.5, 2.0, 1.0]
    assert (out / "value_model" / "config.json").exists()  # started from the reward model


def test_sources_with_one_name_are_logged_apart(fixture, tmp_path):
    """The same reward model twice (two folders named rm give the same name) and two files' functions both
    named low_half (the second scores 0.25): each source keeps a metric of its own, _2 in the order given."""
    d, out = fixture, tmp_path / "out"
    (d / "other").mkdir(exist_ok=True)
    (d / "other" / "rewards.py").write_text("def low_half(prompts, completions, **columns):\n"
                                            "    return [0.25] * len(completions)\n")
    fns = f"{d / 'rewards.py'}:low_half,{d / 'other' / 'rewards.py'}:low_half"
    assert cli_main(args(d, out, "--reward-model", f"{d / 'rm'},{d / 'rm'}", "--reward-fn", fns,
                         "--reward-weights", "1,0.5,2,4", "--iterations", 1)) == 0
    (r,) = read_metrics(out / "metrics.jsonl")
    assert r["rewards/rm/mean"] == pytest.approx(r["rewards/rm_2/mean"], abs=1e-6)  # one model, scored twice
    assert r["rewards/low_half_2/mean"] == pytest.approx(0.25, abs=1e-7)
    assert r["rewards/low_half/mean"] != pytest.approx(0.25, abs=1e-3)  # the share of low ids, not 0.25
    weighted = 1.5 * r["rewards/rm/mean"] + 2 * r["rewards/low_half/mean"] + 4 * 0.25
    assert r["objective/raw_scores"] == pytest.approx(weighted, abs=1e-5)


def test_metric_names_are_unique_in_order():
    from prefalign.rl.reward_functions import RewardFunction
    from prefalign.stages.online_rewards import metric_names

    def score(prompts, completions, **columns):
        return [0.0] * len(completions)

    def score_2(prompts, completions, **columns):
        return [0.0] * len(completions)

    sources = [RewardFunction(f"{f}.py:score", score) for f in "abc"]
    assert metric_names(sources) == ["score", "score_2", "score_3"]
    # a later source already named score_2 is not overwritten by the renamed second score either
    assert metric_names([sources[0], sources[1], RewardFunction("d.py:score_2", score_2)]) == \
        ["score", "score_2", "score_2_2"]


def test_reward_function_alone(fixture, tmp_path):
    """No reward model: the value model is a new head on the policy's backbone."""
    d, out = fixture, tmp_path / "out"
    assert cli_main(args(d, out, "--reward-fn", f"{d / 'rewards.py'}:answer_key")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    # prompt i's answer is i % 3 and every prompt is sampled once per pass: the mean of 4 of (0, 1, 2, ...)
    assert all(r["objective/raw_scores"] == r["rewards/answer_key/mean"] for r in rows)
    assert all(0 <= r["objective/raw_scores"] <= 2 for r in rows)


@pytest.mark.parametrize("extra,message", [
    ([], "give a reward"),
    (["--reward-fn", "statistics:mean", "--logging-steps", "10"],
     "does not use --logging-steps; it logs one metrics.jsonl row per iteration"),
    (["--reward-fn", "statistics:mean", "--eval-steps", "5"], "does not use --eval-steps"),
    (["--reward-fn", "nowhere_module_xyz:score"], "cannot import module 'nowhere_module_xyz'"),
    (["--reward-fn", "statistics:mean", "--reward-weights", "1,2"], "--reward-weights has 2 value"),
])
def test_bad_sources_refused_before_any_model_loads(tmp_path, capsys, extra, message):
    code = cli_main(["ppo", "--model", str(tmp_path / "no-model"), "--prompts", str(tmp_path / "none.jsonl"),
                     "--output", str(tmp_path / "out"), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [{"reward_fn": "statistics:mean"}, {"reward_model": "some/rm"},
                                    {"reward_weights": "2"}], ids=["fn", "model", "weights"])
def test_hook_and_options_are_not_mixed(fixture, tmp_path, option):
    """The Python hook is the whole reward: a source or a weight given beside it would be ignored, so it is refused."""
    cfg = PPOConfig(model=str(fixture / "sft"), prompts=str(fixture / "prompts.jsonl"), output=str(tmp_path / "o"),
                    **option)
    with pytest.raises(ConfigError, match="replaces --reward-model, --reward-fn and --reward-weights"):
        run_ppo(cfg, reward_fn=lambda prompts, completions, rollout: torch.zeros(len(prompts)))
    assert not (tmp_path / "o").exists()


def test_failing_function_checkpoints_and_resume_equals_a_run_that_never_failed(fixture, tmp_path, capsys,
                                                                               monkeypatch):
    d = fixture
    flaky = ["--reward-fn", f"{d / 'rewards.py'}:flaky"]
    assert cli_main(args(d, tmp_path / "never", *flaky)) == 0
    monkeypatch.setenv("PREFALIGN_TEST_FLAKY", "1")
    out = tmp_path / "failed"
    assert cli_main(args(d, out, *flaky)) == 2
    err = capsys.readouterr().err
    assert "rewards.py:flaky raised RuntimeError: answer key unavailable" in err and "first prompt '" in err, err
    assert "checkpoint at iteration 1" in err and "--resume" in err and "Traceback" not in err
    assert not (out / "summary.json").exists()
    monkeypatch.delenv("PREFALIGN_TEST_FLAKY")
    assert cli_main([*args(d, out, *flaky), "--resume"]) == 0
    never, resumed = (read_metrics(p / "metrics.jsonl") for p in (tmp_path / "never", out))
    strip = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in never]
    assert [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in resumed] == strip
    a, b = (load_file(p / "model.safetensors") for p in (tmp_path / "never", out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def torchrun_ppo(argv, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun -m prefalign ARGV` with 2 processes (gloo). On timeout its workers (each in a session
    of its own) and then torchrun are killed: a hang in mismatched collectives must not outlive the test."""
    from test_faults import children
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "prefalign",
           *map(str, argv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"torchrun hung for {timeout}s (mismatched collectives?)\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_function_failing_on_one_rank_stops_both_with_a_checkpoint_under_torchrun(fixture, tmp_path):
    """2 processes, --normalize-scores (whose running statistics take an all_reduce after the scores): the
    function raises on rank 1 only, at iteration 2. Both ranks stop with exit 2 and one message after a
    checkpoint at iteration 1 (no rank enters another collective first), and --resume with the function
    working again ends exactly where a run that never failed ends (the healthy rank's score statistics
    did not take in the failed iteration)."""
    d = fixture
    fn = ["--reward-fn", f"{d / 'rewards.py'}:flaky_on_rank_1", "--normalize-scores", "--rollout-batch-size", 2,
          "--minibatch-size", 1, "--save-steps", 0]
    never = torchrun_ppo([*args(d, tmp_path / "never", *fn)], env={})
    assert never.returncode == 0, never.stderr[-4000:]
    out = tmp_path / "failed"
    failed = torchrun_ppo([*args(d, out, *fn)], env={"PREFALIGN_TEST_FLAKY": "1"})
    err = failed.stderr
    assert failed.returncode != 0 and err.count("exitcode  : 2") == 2, err[-4000:]  # both ranks, status 2
    assert err.count("prefalign ppo: reward function error:") == 1, err[-4000:]
    assert "flaky_on_rank_1 raised RuntimeError: rank 1's answer key unavailable" in err
    assert "checkpoint at iteration 1" in err and "--resume" in err and "src/prefalign/" not in err
    assert (out / "checkpoints" / "step-000000001" / "COMPLETE").exists() and not (out / "summary.json").exists()
    resumed = torchrun_ppo([*args(d, out, *fn), "--resume"], env={})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    assert strip(read_metrics(out / "metrics.jsonl")) == strip(read_metrics(tmp_path / "never" / "metrics.jsonl"))
    a, b = (load_file(p / "model.safetensors") for p in (tmp_path / "never", out))
    assert all(torch.equal(a[k], b[k]) for k in a)
