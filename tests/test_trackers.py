"""--report-to: every metrics.jsonl row reaches each tracker with the config and the summary, read back from
each tracker's own local store and compared with metrics.jsonl: TensorBoard event files, a W&B offline run
(its .wandb transaction log), trackio's SQLite store and an MLflow SQLite store. All offline, in tmp_path.
Only rank 0 reports; a missing tracker is a ConfigError naming its extra; a failing one is dropped."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prefalign import config as C
from prefalign.errors import ConfigError
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model
from prefalign.train.logger import MetricsLogger, read_metrics, write_summary
from prefalign.train.trackers import Trackers, open_trackers
from conftest import run_cli

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("trackers")
    save_tiny_model(d / "base", hidden=32, layers=2, vocab_size=300)
    rows = [{"prompt": t[:10], "completion": t[10:30]} for t in SAMPLE_TEXTS]
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def sft_args(base, out, *extra):
    return ["sft", "--model", base / "base", "--data", base / "sft.jsonl", "--output", out, "--max-steps", 6,
            "--batch-size", 4, "--logging-steps", 2, "--eval-fraction", "0.25", "--eval-steps", 3, "--lr", "1e-3",
            "--max-length", 32, "--no-progress", *extra]


def numeric_rows(out):
    """(step, key, value) of every number metrics.jsonl holds, step itself aside."""
    return [(r["step"], k, v) for r in read_metrics(out / "metrics.jsonl") for k, v in r.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]


# --------------------------------------------------------------------------- reading each store back

def tensorboard_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    texts = {tag: acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    return scalars, texts


def wandb_records(path):
    """The Record protobufs of a W&B transaction log (run-ID.wandb): a 7-byte header (":W&B", magic 0xBEE1,
    version), then LevelDB-log blocks of 32 KiB whose chunks carry (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last) headers. wandb 0.31 ships no reader of its own."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:   # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def wandb_run_history(log):
    """{(step, key): value} of every history row of a .wandb log (W&B's own `_step`, `_runtime` aside)."""
    out = {}
    for rec in wandb_records(log):
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out.update({(items["_step"], k): v for k, v in items.items() if not k.startswith("_")})
    return out


def wandb_run(wandb_dir):
    (log,) = Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")
    history, summary, config = wandb_run_history(log), {}, {}
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "summary":
            summary.update({u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in rec.summary.update})
        elif kind in ("run", "config"):  # the config given to wandb.init comes with the run record
            updates = rec.run.config.update if kind == "run" else rec.config.update
            config.update({u.key: json.loads(u.value_json) for u in updates})
    return history, summary, config


TRACKIO_READ = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps({"logs": SQLiteStorage.get_logs(sys.argv[1], sys.argv[2]),
                  "config": SQLiteStorage.get_run_config(sys.argv[1], sys.argv[2])}, default=str))
"""


def trackio_run(trackio_dir, project, name):
    """trackio reads TRACKIO_DIR when imported: read its store in a process of its own."""
    proc = subprocess.run([sys.executable, "-c", TRACKIO_READ, project, name], capture_output=True, text=True,
                          env={**os.environ, "TRACKIO_DIR": str(trackio_dir)}, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- every tracker, one run

@pytest.mark.slow
def test_every_tracker_gets_every_row_the_config_and_the_summary(base, tmp_path):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true",
           "TRACKIO_DIR": str(tmp_path / "trackio"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    (tmp_path / "wandb").mkdir()
    run_cli(*sft_args(base, out, "--report-to", "tensorboard,wandb,trackio,mlflow", "--run-name", "r1",
                      "--project", "tests"), env=env)
    rows = numeric_rows(out)
    summary = json.loads((out / "summary.json").read_text())
    assert {k for _, k, _ in rows} >= {"loss", "lr", "eval/loss", "perf/tokens_per_s"} and len(rows) > 20
    ids = json.loads((out / "trackers.json").read_text())
    assert set(ids) == {"wandb", "trackio", "mlflow"}

    # TensorBoard stores float32 scalars: each equals the float32 of the metrics.jsonl value.
    scalars, texts = tensorboard_scalars(out / "tensorboard")
    assert scalars == {(s, k): np.float32(v) for s, k, v in rows}
    assert json.loads(texts["config/text_summary"].strip("`\n"))["lr"] == 1e-3
    assert json.loads(texts["summary/text_summary"].strip("`\n"))["final_metrics"] == summary["final_metrics"]

    history, wb_summary, wb_config = wandb_run(tmp_path / "wandb")
    assert history == {(s, k): v for s, k, v in rows}
    assert wb_config["lr"] == 1e-3 and wb_config["report_to"] == "tensorboard,wandb,trackio,mlflow"
    assert wb_summary["final_metrics"] == summary["final_metrics"] and wb_summary["steps"] == 6

    run = trackio_run(tmp_path / "trackio", "tests", "r1")
    logged = {(log["step"], k): v for log in run["logs"] for k, v in log.items() if k not in ("step", "timestamp")}
    summary_md = logged.pop((6, "summary"))
    assert logged == {(s, k): v for s, k, v in rows}
    assert json.loads(summary_md["_value"].strip("`json\n"))["final_metrics"] == summary["final_metrics"]
    assert run["config"]["lr"] == 1e-3

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    ml = client.get_run(ids["mlflow"])
    assert ml.info.status == "FINISHED" and ml.info.run_name == "r1"
    got = {(m.step, key): m.value for key in ml.data.metrics for m in client.get_metric_history(ids["mlflow"], key)}
    assert got == {(s, k): v for s, k, v in rows}
    assert ml.data.params["lr"] == "0.001" and ml.data.tags["summary.steps"] == "6"
    assert float(ml.data.tags["summary.final_metrics.loss"]) == summary["final_metrics"]["loss"]


# --------------------------------------------------------------------------- the hook, rewinding, failures

def test_ppo_rows_reach_tensorboard(base, tmp_path):
    from prefalign.stages.ppo import run_ppo
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t[:8]}) + "\n" for t in SAMPLE_TEXTS[:8]))
    cfg = C.PPOConfig(model=str(base / "base"), prompts=str(tmp_path / "prompts.jsonl"), output=str(tmp_path / "ppo"),
                      iterations=2, rollout_batch_size=8, minibatch_size=8, max_new_tokens=3, ppo_epochs=1,
                      progress=False, sample_every=0, report_to="tensorboard")
    run_ppo(cfg, reward_fn=lambda prompts, completions, rollout: rollout.response_mask.sum(1).float())
    scalars, texts = tensorboard_scalars(tmp_path / "ppo" / "tensorboard")
    rows = numeric_rows(tmp_path / "ppo")
    assert {k for _, k, _ in rows} >= {"objective/scores", "objective/kl"}
    assert scalars == {(s, k): np.float32(v) for s, k, v in rows}
    assert json.loads(texts["summary/text_summary"].strip("`\n"))["stage"] == "ppo"


def test_resume_rewinds_tensorboard_and_write_summary_closes(tmp_path):
    cfg = C.SFTConfig(output=str(tmp_path), report_to="tensorboard")
    logger = MetricsLogger(tmp_path, trackers=open_trackers(cfg, tmp_path, is_main=True))
    for step in (1, 2, 3, 4):
        logger.log({"step": step, "loss": float(step)})
    # A resume from the checkpoint at step 2: rows 3 and 4 are produced again, with other values.
    cfg = C.SFTConfig(output=str(tmp_path), report_to="tensorboard", resume=True)
    logger = MetricsLogger(tmp_path, trackers=open_trackers(cfg, tmp_path, is_main=True))
    logger.truncate_after(2)
    for step in (3, 4):
        logger.log({"step": step, "loss": 10.0 * step})
    write_summary(tmp_path, {"stage": "sft", "final_metrics": {"loss": 40.0}})
    assert logger.trackers.trackers == {}  # closed by write_summary
    scalars, texts = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {(1, "loss"): 1.0, (2, "loss"): 2.0, (3, "loss"): 30.0, (4, "loss"): 40.0}
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 30.0, 40.0]


def test_only_the_main_process_reports(tmp_path):
    cfg = C.SFTConfig(output=str(tmp_path), report_to="tensorboard")
    assert open_trackers(cfg, tmp_path, is_main=False) is None
    assert open_trackers(C.SFTConfig(output=str(tmp_path)), tmp_path, is_main=True) is None  # --report-to none
    assert not (tmp_path / "tensorboard").exists()


class Broken:
    run_id = None

    def log(self, metrics, step):
        raise OSError("server gone")

    def close(self, ok):
        pass


def test_a_failing_tracker_is_dropped_and_training_goes_on(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, trackers=Trackers(tmp_path, {"mlflow": Broken()}))
    logger.log({"step": 1, "loss": 1.0})
    logger.log({"step": 2, "loss": 0.5})
    assert "--report-to mlflow: log failed (OSError: server gone)" in capsys.readouterr().err
    assert logger.trackers.trackers == {} and len(read_metrics(tmp_path / "metrics.jsonl")) == 2


def test_a_missing_tracker_names_its_extra(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report-to wandb needs the wandb extra: pip install 'prefalign\[wandb\]'"):
        C.parse_config(C.DPOConfig, ["--report-to", "tensorboard,wandb"])
    monkeypatch.undo()
    cfg = C.SFTConfig(output=str(tmp_path), report_to="trackio")
    monkeypatch.setitem(sys.modules, "trackio", None)  # installed when the config was made, gone at open
    with pytest.raises(ConfigError, match=r"--report-to trackio needs the trackio extra: pip install "
                                          r"'prefalign\[trackio\]'"):
        open_trackers(cfg, tmp_path, is_main=True)
    with pytest.raises(ConfigError, match="--report-to must be none or a comma-separated list"):
        C.SFTConfig(report_to="tensorboard,comet")


def test_cli_error_for_a_missing_extra_has_no_traceback(base, tmp_path):
    code = "import sys, runpy; sys.modules['mlflow'] = None; sys.argv = ['prefalign'] + sys.argv[1:]; " \
           "runpy.run_module('prefalign', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, sft_args(base, tmp_path / "o", "--report-to",
                                                                          "mlflow"))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--report-to mlflow needs the mlflow extra: pip install 'prefalign[mlflow]'" in proc.stderr


@pytest.mark.slow
def test_under_torchrun_only_rank_zero_reports(base, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "prefalign", *map(str, sft_args(base, out, "--report-to", "tensorboard"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    scalars, _ = tensorboard_scalars(out / "tensorboard")
    assert scalars == {(s, k): np.float32(v) for s, k, v in numeric_rows(out)}


@pytest.mark.slow
def test_resume_continues_the_same_wandb_and_mlflow_runs(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                       "MLFLOW_TRACKING_URI": uri}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    cfg = C.SFTConfig(output=str(out), report_to="wandb,mlflow", run_name="r")
    logger = MetricsLogger(out, trackers=open_trackers(cfg, out, is_main=True))
    logger.log({"step": 1, "loss": 2.0})
    logger.trackers.close(ok=False)  # the process died: no summary
    ids = json.loads((out / "trackers.json").read_text())
    assert MlflowClient(uri).get_run(ids["mlflow"]).info.status == "FAILED"
    logger = MetricsLogger(out, trackers=open_trackers(C.SFTConfig(output=str(out), report_to="wandb,mlflow",
                                                                   run_name="r", resume=True), out, is_main=True))
    assert json.loads((out / "trackers.json").read_text()) == ids  # the same runs, continued
    logger.log({"step": 2, "loss": 1.0})
    write_summary(out, {"stage": "sft", "steps": 2})
    run = MlflowClient(uri).get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.data.tags["summary.steps"] == "2"
    assert [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(ids["mlflow"], "loss")] == [(1, 2.0),
                                                                                                     (2, 1.0)]
    logs = sorted(tmp_path.glob(f"wandb/offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(logs) == 2  # offline, W&B writes each session of the run (one id) in a folder of its own
    history = [wandb_run_history(log) for log in logs]
    assert history == [{(1, "loss"): 2.0}, {(2, "loss"): 1.0}]



def test_starting_a_tracker_leaves_prefalign_warnings_on(tmp_path):
    """MLflow's SQLite store runs alembic's fileConfig, which disables every existing logger:
    after it, `data check`-style warnings of prefalign.data.records must still reach the log."""
    import logging
    import logging.config
    from prefalign.train.trackers import loggers_kept_enabled
    records = logging.getLogger("prefalign.data.records")
    records.disabled = False  # as a fresh process has it
    with loggers_kept_enabled():
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": True})
    assert not records.disabled
