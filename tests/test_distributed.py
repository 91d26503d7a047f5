"""1 vs N processes: data sharding, global statistics, and torchrun runs (gloo, 2 CPU processes)
that must equal one process with the same global batch.

For each stage one module fixture trains the same tiny model on the same data for 6 steps with
a global batch of 8: one process with --batch-size 8 (in this process), and in ONE torchrun
launch (tests/dist_worker.py) DDP with --batch-size 4 per process, FSDP2 with --batch-size 2
and --grad-accum 2 (micro-batches without gradient sync), and an FSDP2 resume of the
one-process checkpoint. Then one process resumes the FSDP2
checkpoint. Every run must end at the same metrics and weights to fp32 summation-order noise.

PPO samples with a seed per rank, so 2 processes do not draw 1 process's rollouts: its torchrun
test checks that the ranks' weights stay bit-identical (the stage compares sha256 digests), that
the logs describe the global batch, and that a resume with 2 processes is exact.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefalign.cli import main as cli_main
from prefalign.errors import ConfigError, InternalError
from prefalign.losses.advantage import global_moments
from prefalign.ops import masked_mean, masked_var
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model, tiny_llama, tiny_tokenizer
from prefalign.train.checkpoint import check_global_batch
from prefalign.train.dist import DistInfo, check_replicas, param_digest, sharded_map
from prefalign.train.logger import read_metrics
from prefalign.train.loop import epoch_order, rank_batch_indices

TESTS = Path(__file__).resolve().parent
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# Add "dpo" once stages/dpo.py lands: its data and options are below.
EQUIV_STAGES = ["sft", "reward", "dpo"]
STAGE_ARGS = {
    "sft": ["--lr", "3e-3"],
    "reward": ["--lr", "3e-3", "--normalize", "std"],
    "dpo": ["--lr", "3e-3", "--beta", "0.5"],
}
STEPS, SAVE_AT = 6, 3  # logging every 2 steps: a checkpoint at 3 holds step 3's metric sums
# Adam's step lr * g / (|g| + eps) is ~lr whatever |g| is, so where a gradient nearly cancels
# (one lm_head entry had g = -9.6e-8, beside entries of 0.14) summation-order noise of ~2e-9
# (2% of it) moved that weight 4e-6 apart with eps 1e-8 or 1e-6. eps 1e-4 bounds the
# sensitivity by lr / eps while leaving the updates of real gradients (1e-3 and up) alone.
ADAM = ["--adam-eps", "1e-4"]
POSITIVE = "great wonderful lovely brilliant charming superb".split()
NEGATIVE = "awful boring dull terrible weak bland".split()


# ----------------------------------------------------------------------------- sharding (in-process)

@pytest.mark.parametrize("n,B,A,W", [(48, 4, 1, 2), (50, 2, 3, 2), (97, 3, 2, 4), (30, 5, 1, 3)])
def test_rank_slices_partition_the_global_batch(n, B, A, W):
    order = epoch_order(n, seed=7, epoch=2)
    assert order == epoch_order(n, seed=7, epoch=2)  # deterministic for (seed, epoch)
    G = B * A * W
    for offset in range(n // G):
        slices = [rank_batch_indices(order, offset, B, A, r, W) for r in range(W)]
        flat = [i for s in slices for i in s]
        assert all(len(s) == B * A for s in slices)
        assert len(set(flat)) == len(flat)  # no overlap
        assert flat == order[offset * G:(offset + 1) * G]  # nothing lost, in global order
        # one process with W times the batch trains on exactly the same examples
        assert flat == rank_batch_indices(order, offset, B * W, A, 0, 1)


def test_resume_with_another_global_batch_is_a_config_error():
    state = {"global_batch": 8, "world_size": 2, "path": "out/checkpoints/step-000000003"}
    check_global_batch(state, 8, 1, 1, "out")  # 1 process x 8 or 2 x 4 x 1 or 1 x 2 x 4: fine
    check_global_batch(state, 2, 1, 4, "out")
    with pytest.raises(ConfigError, match="global batch of 8.*this run's is 4.*use --batch-size 8"):
        check_global_batch(state, 4, 1, 1, "out")
    with pytest.raises(ConfigError, match="this run's is 16 .* 2 process.*use --batch-size 4"):
        check_global_batch(state, 8, 1, 2, "out")


def test_world_of_one_helpers_are_the_local_computations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    mean, var, n = global_moments(x, mask)  # in one process: the local masked mean and variance
    torch.testing.assert_close(mean, masked_mean(x, mask), rtol=1e-6, atol=0)  # float64 sums, rounded once
    torch.testing.assert_close(var, masked_var(x, mask), rtol=1e-6, atol=0)
    assert n.item() == mask.sum().item()
    assert sharded_map(lambda c: [v * 10 for v in c], list(range(7)), CPU, 3) == [v * 10 for v in range(7)]


def test_param_digest_sees_one_ulp_and_replica_check_names_the_model():
    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)
    a, b = tiny_llama(tok, seed=4), tiny_llama(tok, seed=4)
    assert param_digest(a) == param_digest(b)
    with torch.no_grad():  # the smallest possible change to one weight of one replica
        w = b.get_input_embeddings().weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))
    policy = [param_digest(a), param_digest(b)]
    same = {"value": "0" * 64}
    check_replicas([{"policy": policy[0], **same}, {"policy": policy[0], **same}], "at iteration 2")
    with pytest.raises(InternalError, match=rf"the policy model's parameters differ between processes at "
                                            rf"iteration 2 \(sha256: rank 0 {policy[0][:12]}, rank 1 "
                                            rf"{policy[1][:12]}\).*ranks diverged, which is a bug"):
        check_replicas([{"policy": policy[0], **same}, {"policy": policy[1], **same}], "at iteration 2")
    with pytest.raises(InternalError, match="the value model's parameters differ"):
        check_replicas([same, same, {"value": "1" * 64}], "at the end")


# ----------------------------------------------------------------------------- torchrun helpers

def torchrun(args, nproc=2, timeout=420):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc


def check(proc):
    if proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-8000:]}")
    return proc


def cut_back(src: Path, dst: Path, step: int) -> Path:
    """A copy of run ``src`` as if it had been killed just after its checkpoint at ``step``."""
    shutil.copytree(src, dst)
    for ck in (dst / "checkpoints").glob("step-*"):
        if int(ck.name.split("-")[1]) > step:
            shutil.rmtree(ck)
    return dst


def stage_data(stage: str, d: Path) -> Path:
    import random
    rng = random.Random(0)
    rows = []
    for i in range(64):
        prompt = f"The {rng.choice(['movie', 'plot', 'cast', 'music'])} was"
        good = f" {rng.choice(POSITIVE)} and {rng.choice(POSITIVE)}."
        bad = f" {rng.choice(NEGATIVE)} and {rng.choice(NEGATIVE)}."
        rows.append({"prompt": prompt, "completion": good} if stage == "sft" else
                    {"prompt": prompt, "chosen": good, "rejected": bad})
    path = d / f"{stage}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_args(stage, d, out, batch, *extra):
    return [stage, "--model", str(d / "base"), "--data", str(d / f"{stage}.jsonl"), "--output", str(out),
            "--batch-size", str(batch), "--max-steps", str(STEPS), "--logging-steps", "2", "--seed", "3",
            "--max-length", "32", "--save-steps", str(SAVE_AT), "--eval-fraction", "0.1", "--eval-steps", "3",
            "--no-progress", *ADAM, *STAGE_ARGS[stage], *extra]


def single(args):
    assert cli_main(args) == 0, args


@pytest.fixture(scope="module", params=EQUIV_STAGES)
def runs(request, tmp_path_factory):
    stage = request.param
    d = tmp_path_factory.mktemp(f"dist-{stage}")
    save_tiny_model(d / "base", hidden=32, layers=2, vocab_size=300,
                    texts=SAMPLE_TEXTS + [" ".join(POSITIVE + NEGATIVE)])
    stage_data(stage, d)
    single(run_args(stage, d, d / "one", 8))
    cut_back(d / "one", d / "one-then-two", SAVE_AT)
    batch = [run_args(stage, d, d / "ddp", 4),
             run_args(stage, d, d / "fsdp", 2, "--grad-accum", "2", "--distributed", "fsdp"),
             run_args(stage, d, d / "one-then-two", 4, "--distributed", "fsdp", "--resume")]
    (d / "runs.json").write_text(json.dumps(batch))
    check(torchrun([TESTS / "dist_worker.py", d / "runs.json"]))
    cut_back(d / "fsdp", d / "two-then-one", SAVE_AT)
    single(run_args(stage, d, d / "two-then-one", 8, "--resume"))
    return stage, d


def metrics(out: Path):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(out / "metrics.jsonl")]


def assert_same_run(a: Path, b: Path):
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [2, 3, 4, 6]  # 3: evaluation
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.slow
def test_ddp_equals_one_process_with_the_global_batch(runs):
    stage, d = runs
    assert_same_run(d / "one", d / "ddp")
    s1, s2 = (json.loads((d / r / "summary.json").read_text()) for r in ("one", "ddp"))
    assert s1["global_batch_size"] == s2["global_batch_size"] == 8 and s2["world_size"] == 2
    base = load_file(d / "base" / "model.safetensors")
    moved = load_file(d / "ddp" / "model.safetensors")
    assert any(not torch.equal(base[k], moved[k]) for k in base if k in moved)  # it trained


@pytest.mark.slow
def test_fsdp_equals_ddp(runs):
    stage, d = runs
    assert_same_run(d / "ddp", d / "fsdp")
    if stage == "reward":  # normalisation is computed over ranks' shares, gathered
        c1, c2 = (json.loads((d / r / "config.json").read_text()) for r in ("one", "fsdp"))
        for key in ("prefalign_reward_shift", "prefalign_reward_scale"):
            assert c2[key] == pytest.approx(c1[key], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_checkpoints_move_between_world_sizes(runs):
    """FSDP2 checkpoint (2 processes) resumed in 1; 1-process checkpoint resumed under FSDP2 in 2."""
    stage, d = runs
    state = torch.load(d / "fsdp" / "checkpoints" / f"step-{SAVE_AT:09d}" / "state.pt", weights_only=False)
    full = load_file(d / "base" / "model.safetensors")
    assert state["global_batch"] == 8 and state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    for k, v in state["model"].items():  # full tensors, not shards
        hf_key = k[len("model."):] if stage == "reward" else k
        if hf_key in full:
            assert v.shape == full[hf_key].shape, k
    assert_same_run(d / "one", d / "two-then-one")
    assert_same_run(d / "one", d / "one-then-two")
    s = json.loads((d / "two-then-one" / "summary.json").read_text())
    assert s["resumed_from_step"] == SAVE_AT and s["world_size"] == 1


@pytest.mark.slow
def test_only_rank_zero_writes(runs):
    stage, d = runs
    names = {p.name for p in (d / "ddp").iterdir()}
    assert {"metrics.jsonl", "summary.json", "config.json", "model.safetensors", "checkpoints"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary folders left by any rank
    assert sorted(p.name for p in (d / "ddp" / "checkpoints").iterdir()) == [f"step-{SAVE_AT:09d}",
                                                                           f"step-{STEPS:09d}"]


@pytest.mark.slow
def test_resume_with_another_global_batch_fails_clearly(runs, capsys):
    stage, d = runs
    cut_back(d / "ddp", d / "bad-resume", SAVE_AT)
    assert cli_main(run_args(stage, d, d / "bad-resume", 4, "--resume")) == 2
    err = capsys.readouterr().err
    assert "global batch of 8" in err and "this run's is 4" in err and "Traceback" not in err


@pytest.mark.slow
def test_torchrun_cli_error_exits_cleanly_once(runs):
    """`torchrun -m prefalign`: an error every rank raises (here a resume with another global
    batch) ends both processes with status 2, reported once, with no hang and no traceback."""
    stage, d = runs
    if stage != "sft":
        pytest.skip("one stage suffices")
    cut_back(d / "one", d / "cli-bad-resume", SAVE_AT)
    proc = torchrun(["-m", "prefalign", *run_args(stage, d, d / "cli-bad-resume", 8, "--resume")], timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("prefalign sft: error:") == 1, proc.stderr[-3000:]
    assert "global batch of 8" in proc.stderr and "this run's is 16" in proc.stderr
    assert "exitcode  : 2" in proc.stderr
    assert "src/prefalign/" not in proc.stderr  # no traceback from our code on any rank


@pytest.mark.slow
def test_dist_helpers_across_two_ranks():
    """Global whitening and mean/var equal the one-process values over the global batch;
    sharded_map over a frozen FSDP2 model equals the whole model; PPO's gradient averaging with a
    gradient missing on one rank and its replica check (tests/dist_helpers_check.py)."""
    check(torchrun([TESTS / "dist_helpers_check.py"], timeout=240))


# ----------------------------------------------------------------------------- PPO under torchrun

PPO_ITERATIONS, PPO_ROLLOUT = 4, 2  # 2 prompts per process: a global batch of 4


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory):
    """One torchrun launch, 2 processes: `prefalign ppo` for 4 iterations (checkpoints at 2 and 4),
    then the same run stopped after iteration 2 and resumed to 4. A saved scalar model over the
    policy's tokenizer is the reward model and the initial value model."""
    from prefalign.models import load_scalar_model, save_pretrained
    d = tmp_path_factory.mktemp("dist-ppo")
    save_tiny_model(d / "base", vocab_size=300)
    rm, rm_tok = load_scalar_model(str(d / "base"), seed=5)
    save_pretrained(rm, rm_tok, d / "rm")
    prompts = [t[:12] for t in SAMPLE_TEXTS[:16]]  # 4 global batches
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    def ppo(out, iterations, *extra):
        return ["ppo", "--model", d / "base", "--reward-model", d / "rm", "--prompts", d / "prompts.jsonl",
                "--output", out, "--iterations", iterations, "--rollout-batch-size", PPO_ROLLOUT,
                "--minibatch-size", 1, "--ppo-epochs", 2, "--max-new-tokens", 8, "--save-steps", 2,
                "--lr", "3e-3", "--lr-schedule", "constant", "--normalize-scores", "--seed", 3,
                "--sample-every", 0, "--no-progress", *extra]

    batch = [ppo(d / "two", PPO_ITERATIONS), ppo(d / "cut", 2), ppo(d / "cut", PPO_ITERATIONS, "--resume")]
    (d / "runs.json").write_text(json.dumps([[str(a) for a in args] for args in batch]))
    check(torchrun([TESTS / "dist_worker.py", d / "runs.json"], timeout=300))
    return d


@pytest.mark.slow
def test_ppo_ranks_stay_identical_and_log_the_global_batch(ppo_runs):
    from transformers import AutoModelForCausalLM
    d = ppo_runs
    rows = read_metrics(d / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, PPO_ITERATIONS + 1))
    for r in rows:
        assert r["sequences"] == 2 * PPO_ROLLOUT  # counted over both ranks' rollouts
        assert all(math.isfinite(v) for v in r.values()), r
    s = json.loads((d / "two" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["global_batch_size"] == 2 * PPO_ROLLOUT and s["steps"] == PPO_ITERATIONS
    # Digests compared across ranks before the checkpoints at 2 and 4 and at the end: all equal.
    assert s["replica_checks"] == 3
    policy = AutoModelForCausalLM.from_pretrained(d / "two")  # a plain HF checkpoint
    assert param_digest(policy) == s["parameter_sha256"]["policy"]  # the weights the ranks agreed on
    base = AutoModelForCausalLM.from_pretrained(d / "base")
    assert param_digest(base) != param_digest(policy)  # it trained
    assert (d / "two" / "value_model" / "config.json").exists()
    assert sorted(p.name for p in (d / "two" / "checkpoints").iterdir()) == ["step-000000002", "step-000000004"]


@pytest.mark.slow
def test_ppo_resume_under_torchrun_is_exact(ppo_runs):
    """Each rank's sampling and shuffling streams come back from the checkpoint: the resumed run
    logs and ends exactly as the uninterrupted one."""
    d = ppo_runs
    assert metrics(d / "cut") == metrics(d / "two")
    full, resumed = (json.loads((d / r / "summary.json").read_text()) for r in ("two", "cut"))
    assert resumed["resumed_from_step"] == 2 and resumed["replica_checks"] == 2  # checkpoint 4, end
    assert resumed["parameter_sha256"] == full["parameter_sha256"]


# ----------------------------------------------------------------------------- RLOO / GRPO under torchrun

GROUP_ITERATIONS = 3
GROUP_REWARD = '''
def low_half(prompts, completions, completion_ids, **columns):
    return [sum(i < 150 for i in ids) / len(ids) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory):
    """`prefalign grpo` (k3 in the loss, batch-scaled rewards) and `prefalign rloo` (KL in the reward):
    2 processes with 2 prompts each in one torchrun launch, and 1 process with 4 prompts. Draws are
    seeded by each prompt's place in the global batch and the minibatches are slices of one global
    permutation, so both must end at the same metrics and weights."""
    d = tmp_path_factory.mktemp("dist-grpo")
    save_tiny_model(d / "base", vocab_size=300)
    prompts = [t[:12] for t in SAMPLE_TEXTS[:12]]  # 3 global batches of 4
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (d / "rewards.py").write_text(GROUP_REWARD)

    def run(command, out, prompts_per_process, minibatch, *extra):
        return [command, "--model", d / "base", "--reward-fn", f"{d / 'rewards.py'}:low_half",
                "--prompts", d / "prompts.jsonl", "--output", out, "--iterations", GROUP_ITERATIONS,
                "--rollout-batch-size", prompts_per_process, "--num-generations", 3, "--minibatch-size", minibatch,
                "--ppo-epochs", 2, "--max-new-tokens", 6, "--lr", "3e-3", "--lr-schedule", "constant", "--seed", 3,
                "--sample-every", 0, "--no-progress", *ADAM, *extra]

    grpo = ("--beta", "0.05", "--scale-rewards", "batch", "--epsilon-high", "0.28")
    batch = [run("grpo", d / "grpo-two", 2, 3, *grpo), run("rloo", d / "rloo-two", 2, 3)]
    (d / "runs.json").write_text(json.dumps([[str(a) for a in args] for args in batch]))
    check(torchrun([TESTS / "dist_worker.py", d / "runs.json"], timeout=300))
    single([str(a) for a in run("grpo", d / "grpo-one", 4, 6, *grpo)])
    single([str(a) for a in run("rloo", d / "rloo-one", 4, 6)])
    return d


@pytest.mark.slow
@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_group_two_processes_equal_one_with_twice_the_prompts(group_runs, command):
    d = group_runs
    one, two = metrics(d / f"{command}-one"), metrics(d / f"{command}-two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, GROUP_ITERATIONS + 1))
    for ra, rb in zip(one, two):
        assert ra.keys() == rb.keys() and rb["sequences"] == 12
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    wa, wb = load_file(d / f"{command}-one" / "model.safetensors"), load_file(d / f"{command}-two" / "model.safetensors")
    base = load_file(d / "base" / "model.safetensors")
    assert any((wa[k] - base[k]).abs().max() > 1e-3 for k in wa)  # it trained
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    s = json.loads((d / f"{command}-two" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["replica_checks"] == 1 and s["completions_per_iteration"] == 12


# ----------------------------------------------------------------------------- online DPO under torchrun

@pytest.fixture(scope="module")
def online_dpo_runs(tmp_path_factory):
    """`prefalign online-dpo` with a noisy judge and two minibatches per iteration: 2 processes with 4
    prompts each, and 1 process with 8 prompts and twice the minibatch. Draws and judge uniforms are
    seeded by each prompt's place in the global batch and the minibatches are slices of one global
    permutation, so both must end at the same metrics and weights."""
    d = tmp_path_factory.mktemp("dist-online-dpo")
    save_tiny_model(d / "base", vocab_size=300)
    prompts = [t[:12] for t in SAMPLE_TEXTS[:16]]  # 2 global batches of 8
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (d / "rewards.py").write_text(GROUP_REWARD)

    def run(out, prompts_per_process, minibatch):
        return ["online-dpo", "--model", d / "base", "--reward-fn", f"{d / 'rewards.py'}:low_half",
                "--prompts", d / "prompts.jsonl", "--output", out, "--iterations", GROUP_ITERATIONS,
                "--rollout-batch-size", prompts_per_process, "--minibatch-size", minibatch, "--judge-temperature",
                "0.3", "--beta", "0.5", "--max-new-tokens", 6, "--lr", "3e-3", "--lr-schedule", "constant", "--seed",
                3, "--sample-every", 0, "--no-progress", *ADAM]

    (d / "runs.json").write_text(json.dumps([[str(a) for a in run(d / "two", 4, 2)]]))
    check(torchrun([TESTS / "dist_worker.py", d / "runs.json"], timeout=300))
    single([str(a) for a in run(d / "one", 8, 4)])
    return d


@pytest.mark.slow
def test_online_dpo_two_processes_equal_one_with_twice_the_prompts(online_dpo_runs):
    d = online_dpo_runs
    one, two = metrics(d / "one"), metrics(d / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, GROUP_ITERATIONS + 1))
    for ra, rb in zip(one, two):
        assert ra.keys() == rb.keys() and rb["sequences"] == 16
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    wa, wb = load_file(d / "one" / "model.safetensors"), load_file(d / "two" / "model.safetensors")
    base = load_file(d / "base" / "model.safetensors")
    assert any((wa[k] - base[k]).abs().max() > 1e-3 for k in wa)  # it trained
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    s = json.loads((d / "two" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["replica_checks"] == 1 and s["pairs_per_iteration"] == 8
