"""Nothing lost: every stage, killed (SIGKILL) or stopped (SIGTERM) and resumed as a real process,
ends bit for bit where an uninterrupted run ends (metrics.jsonl row by row, ignoring perf/
timings, and the final weights), on CPU in float32.

The harness is generic over stages: a stage is a module to import and a function that builds
its command line for a tiny run. A stage whose module is not importable yet is skipped.
The base model has attention dropout, so the RNG states must be restored too, not only the
weights and the data position.
"""
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model
from conftest import run_cli

pytestmark = pytest.mark.slow

STEPS = 8           # optimizer steps of every run (two epochs: the data order after resume is checked too)
KILL_AFTER = 2      # SIGKILL once this step's checkpoint is complete
COMMON = ["--max-steps", STEPS, "--batch-size", 2, "--grad-accum", 2, "--logging-steps", 1, "--eval-steps", 3,
          "--eval-fraction", 0.25, "--save-steps", 1, "--keep-checkpoints", 2, "--max-length", 48, "--seed", 5,
          "--no-progress"]
# One thread: bitwise equality needs the same reduction order in every run, and the test
# machine is shared.
ENV = {"OMP_NUM_THREADS": "1"}
GOOD = "great wonderful superb lovely brilliant charming".split()
BAD = "awful boring dull terrible weak bland".split()


def pairs(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": "The movie was", "chosen": f" {rng.choice(GOOD)} and {rng.choice(GOOD)}.",
             "rejected": f" {rng.choice(BAD)} and {rng.choice(BAD)}."} for _ in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- stages

@dataclass
class Stage:
    module: str                              # skipped while this cannot be imported
    args: Callable[[Path], list]             # workspace -> command line without --output
    weights: tuple = ("model.safetensors",)  # files under OUTPUT compared tensor by tensor
    has_eval: bool = True                    # logs eval/ metrics (from --eval-fraction)


def sft_args(w):
    return ["sft", "--model", w / "base", "--data", w / "sft.jsonl", "--lr", "3e-3", *COMMON]


def reward_args(w):
    return ["reward", "--model", w / "base", "--data", w / "prefs.jsonl", "--lr", "3e-3", *COMMON]


def dpo_args(w):
    return ["dpo", "--model", w / "base", "--data", w / "prefs.jsonl", "--lr", "3e-3", "--beta", "0.1", *COMMON]


def ppo_args(w):
    # PPO counts iterations (rollout + update); the lead may tune these when the stage lands.
    rm = reward_model(w)
    return ["ppo", "--model", w / "base", "--reward-model", rm, "--prompts", w / "prompts.jsonl", "--lr", "3e-3",
            "--iterations", STEPS, "--rollout-batch-size", 4, "--minibatch-size", 2, "--ppo-epochs", 1,
            "--max-new-tokens", 6, "--save-steps", 1, "--keep-checkpoints", 2, "--logging-steps", 1,
            "--seed", 5, "--no-progress"]


def group_args(command):
    def args(w):  # K = 2 completions of 2 prompts per iteration, two minibatches, two passes, a reference
        return [command, "--model", w / "base", "--reward-model", reward_model(w), "--prompts", w / "prompts.jsonl",
                "--lr", "3e-3", "--iterations", STEPS, "--rollout-batch-size", 2, "--num-generations", 2,
                "--minibatch-size", 2, "--ppo-epochs", 2, "--beta", "0.05", "--max-new-tokens", 6, "--save-steps", 1,
                "--keep-checkpoints", 2, "--logging-steps", 1, "--seed", 5, "--no-progress"]
    return args

def online_dpo_args(w):  # 4 prompts per iteration, two minibatches of 2 pairs, a noisy judge
    return ["online-dpo", "--model", w / "base", "--reward-model", reward_model(w), "--prompts", w / "prompts.jsonl",
            "--lr", "3e-3", "--iterations", STEPS, "--rollout-batch-size", 4, "--minibatch-size", 2,
            "--judge-temperature", "0.5", "--max-new-tokens", 6, "--save-steps", 1, "--keep-checkpoints", 2,
            "--logging-steps", 1, "--seed", 5, "--no-progress"]


LORA = ["--lora", "--lora-r", 4]
LORA_WEIGHTS = ("model.safetensors", "adapter/adapter_model.safetensors")

STAGES = {"sft": Stage("prefalign.stages.sft", sft_args),
          "reward": Stage("prefalign.stages.reward", reward_args),
          "dpo": Stage("prefalign.stages.dpo", dpo_args),
          "ppo": Stage("prefalign.stages.ppo", ppo_args, has_eval=False),
          "grpo": Stage("prefalign.stages.grpo", group_args("grpo"), has_eval=False),
          "rloo": Stage("prefalign.stages.grpo", group_args("rloo"), has_eval=False),
          "online-dpo": Stage("prefalign.stages.online_dpo", online_dpo_args, has_eval=False),
          # checkpoints of LoRA runs hold the trainable weights only; the frozen base comes from --model
          "sft-lora": Stage("prefalign.stages.sft", lambda w: [*sft_args(w), *LORA], weights=LORA_WEIGHTS),
          "reward-lora": Stage("prefalign.stages.reward", lambda w: [*reward_args(w), *LORA], weights=LORA_WEIGHTS)}


def reward_model(w):
    path = w / "rm"
    if not path.exists():
        from prefalign.models import load_scalar_model, save_pretrained
        model, tok = load_scalar_model(str(w / "base"), seed=1)
        save_pretrained(model, tok, str(path))
    return path


def stage_or_skip(name) -> Stage:
    stage = STAGES[name]
    try:
        importlib.import_module(stage.module)
    except ImportError:
        pytest.skip(f"{stage.module} is not written yet")
    return stage


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("resume")
    # A reference cache of this session only: entries left on this machine by other runs of the same
    # tiny model must not stand in for the ones these runs compute.
    ENV["PREFALIGN_CACHE"] = str(w / "cache")
    rows = pairs(24)
    save_tiny_model(w / "base", hidden=32, layers=2, texts=SAMPLE_TEXTS + [r["chosen"] + r["rejected"] for r in rows])
    config = json.loads((w / "base" / "config.json").read_text())
    config["attention_dropout"] = 0.1  # training then draws from the torch RNG
    (w / "base" / "config.json").write_text(json.dumps(config))
    write_jsonl(w / "prefs.jsonl", rows)
    write_jsonl(w / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    write_jsonl(w / "prompts.jsonl", [{"prompt": f"The {t} was"} for t in "movie plot cast music".split()])
    return w


_uninterrupted: dict = {}


def uninterrupted(work, name) -> Path:
    """One uninterrupted reference run per stage, shared by the tests of this module."""
    if name not in _uninterrupted:
        out = work / f"{name}-reference"
        run_cli(*STAGES[name].args(work), "--output", out, env=ENV)
        _uninterrupted[name] = out
    return _uninterrupted[name]


# ----------------------------------------------------------------------------- helpers

def start(args, out):
    """The CLI as a background process; its output goes to files (a full pipe would block it)."""
    log = open(out.with_name(out.name + ".log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "prefalign", *map(str, args), "--output", str(out)],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **ENV})
    return proc, log


def wait_until(proc, log, ready, timeout=300):
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the run ended (exit {proc.returncode}) before it could be interrupted:\n{log.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the run to reach the interruption point")
        time.sleep(0.005)


def checkpoint_done(out, step):
    return lambda: (out / "checkpoints" / f"step-{step:09d}" / "COMPLETE").exists()


def rows_written(out):
    """Whole rows in metrics.jsonl so far (the writer may be halfway through the next one)."""
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def metric_rows(out):
    """metrics.jsonl without the perf/ keys (wall-clock rates, the only non-deterministic ones)."""
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def assert_same_run(a: Path, b: Path, stage: Stage):
    ra, rb = metric_rows(a), metric_rows(b)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb):
        assert x == y, f"step {x['step']}: {x} != {y}"
    assert any("eval/loss" in r for r in ra) or not stage.has_eval
    for name in stage.weights:
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: tensor {k} differs"
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("steps", "final_metrics", "eval_metrics", "normalization", "train_pairs", "eval_pairs",
                "train_examples", "eval_examples"):
        va, vb = sa.get(key), sb.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):  # wall-clock rates differ between any two runs
            va, vb = ({k: v for k, v in d.items() if not k.startswith("perf/")} for d in (va, vb))
        assert va == vb, key
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca == cb  # reward shift/scale live here


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", list(STAGES))
def test_sigkill_then_resume_equals_uninterrupted(work, name):
    stage = stage_or_skip(name)
    ref = uninterrupted(work, name)
    out = work / f"{name}-killed"
    proc, log = start(stage.args(work), out)
    wait_until(proc, log, checkpoint_done(out, KILL_AFTER))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "summary.json").exists()  # it really was cut short
    done = run_cli(*stage.args(work), "--output", out, "--resume", env=ENV)
    assert "resumed from" in done.stderr
    assert_same_run(ref, out, stage)


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(work):
    stage = stage_or_skip("sft")
    ref = uninterrupted(work, "sft")
    out = work / "sft-sigterm"
    args = [*stage.args(work), "--save-steps", 0]  # the only checkpoint is the one SIGTERM asks for
    proc, log = start(args, out)
    wait_until(proc, log, lambda: rows_written(out) >= 2)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    log.seek(0)
    text = log.read()
    assert "SIGTERM received: saved a checkpoint at step" in text and "--resume" in text
    assert "Traceback" not in text
    saved = list((out / "checkpoints").glob("step-*/COMPLETE"))
    assert len(saved) == 1 and not (out / "summary.json").exists()
    run_cli(*args, "--output", out, "--resume", env=ENV)
    assert_same_run(ref, out, stage)


def test_same_seed_same_metrics(work):
    """Two independent runs with one seed and config: identical metrics.jsonl and weights."""
    stage = stage_or_skip("sft")
    ref = uninterrupted(work, "sft")
    again = work / "sft-again"
    run_cli(*stage.args(work), "--output", again, env=ENV)
    assert_same_run(ref, again, stage)


def test_nonfinite_training_stops_with_checkpoint(work):
    """--lr 1e30 blows the weights up after one step: later steps are skipped, then the run stops."""
    out = work / "sft-blowup"
    proc = run_cli(*sft_args(work), "--lr", "1e30", "--max-bad-steps", 2, "--save-steps", 0, "--output", out,
                   check=False, env=ENV)
    assert proc.returncode == 3, proc.stderr
    assert "stopped at step" in proc.stderr and "--max-bad-steps 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    rows = metric_rows(out)
    assert rows[0]["bad_steps"] == 0 and rows[-1]["bad_steps"] == 3 and rows[-1]["step"] == 4
    (saved,) = (out / "checkpoints").glob("step-*")
    state = torch.load(saved / "state.pt", weights_only=False)
    assert state["position"]["bad_steps"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_lora_checkpoints_hold_only_trainable_weights(work):
    """A LoRA checkpoint: adapters (and a reward model's head), their AdamW moments, no frozen base
    weight; resuming onto another base model is refused instead of mixing the two."""
    ref = uninterrupted(work, "sft-lora")
    state = torch.load(next((ref / "checkpoints").glob("step-*")) / "state.pt", weights_only=False)
    assert state["model"] and all("lora_" in k for k in state["model"])
    assert state["frozen"]["parameters"] > 0 and len(state["frozen"]["sha256"]) == 64
    assert len(state["optimizer"]["state"]) == len(state["model"])
    other = work / "other-base"
    if not other.exists():
        save_tiny_model(other, hidden=32, layers=2, seed=9,
                        texts=SAMPLE_TEXTS + [r["chosen"] + r["rejected"] for r in pairs(24)])
    out = work / "sft-lora-other-base"
    shutil.copytree(ref, out)
    (out / "summary.json").unlink()
    args = [*STAGES["sft-lora"].args(work), "--output", out, "--resume"]
    args[args.index("--model") + 1] = other
    proc = run_cli(*args, check=False, env=ENV)
    assert proc.returncode == 2 and "frozen parameters" in proc.stderr and "same --model" in proc.stderr
    assert "Traceback" not in proc.stderr
