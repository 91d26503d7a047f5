"""Experiment trackers for --report-to: TensorBoard, Weights & Biases, trackio and MLflow.

Every row MetricsLogger writes to metrics.jsonl goes to each tracker (``MetricsLogger.log`` is the
only way rows reach them), the run's config goes at the start, and summary.json at the end
(``write_summary`` hands it over and closes the run). Only the main process opens trackers.

Where each one writes:

    tensorboard  OUTPUT/tensorboard (event files: `tensorboard --logdir OUTPUT/tensorboard`)
    wandb        the W&B project --project; local files under $WANDB_DIR, else OUTPUT/wandb
                 (WANDB_MODE=offline keeps everything local; `wandb sync` uploads it later)
    trackio      the trackio project --project, in $TRACKIO_DIR (default ~/.cache/huggingface/trackio)
    mlflow       the experiment --project at $MLFLOW_TRACKING_URI (default: MLflow's own, sqlite:///mlflow.db)

Each tracker's run id is kept in OUTPUT/trackers.json so that --resume continues the same run.
A tracker that fails while logging (a server gone away) is reported once on stderr and dropped:
training goes on, and metrics.jsonl keeps every row. A missing library is a ConfigError naming
the extra to install, raised before training starts.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefalign.config import REPORT_TO
from prefalign.errors import ConfigError

__all__ = ["Trackers", "open_trackers", "finish_run", "close_open", "TRACKERS"]

IDS_FILE = "trackers.json"


@dataclass
class RunInfo:
    """What every tracker needs to open (or continue) one run."""
    name: str                    # --run-name, default the OUTPUT folder's name
    project: str                 # --project, default "prefalign"
    out_dir: Path
    previous_id: Optional[str]   # the run this tracker started before --resume, if any


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics row (0-d tensors included), without `step`."""
    out = {}
    for key, value in row.items():
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: for trackers whose params and tags are flat strings."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _json(d: dict) -> str:
    return json.dumps(d, indent=2, default=str)


def _summary_only(summary: dict) -> dict:
    """The summary without the config (logged at the start) and with non-finite floats as text."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return repr(v) if isinstance(v, float) and not math.isfinite(v) else v
    return {k: clean(v) for k, v in summary.items() if k != "config"}


# --------------------------------------------------------------------------- one class per tracker

class TensorBoardTracker:
    """Scalars per metric, the config and summary as text, in OUTPUT/tensorboard."""

    def __init__(self, run: RunInfo, config: dict):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        self.SummaryWriter, self.dir, self.run_id = SummaryWriter, run.out_dir / "tensorboard", None
        self.writer = SummaryWriter(str(self.dir))
        self.writer.add_text("config", f"```\n{_json(config)}\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def rewind(self, step: int) -> None:
        """On resume: TensorBoard hides the events logged after ``step`` (they are logged again)."""
        self.writer.close()
        self.writer = self.SummaryWriter(str(self.dir), purge_step=step + 1)

    def log_summary(self, summary: dict, step: int) -> None:
        self.writer.add_text("summary", f"```\n{_json(summary)}\n```", step)

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run: rows as history at their step, the config, the summary as run.summary."""

    def __init__(self, run: RunInfo, config: dict):
        import wandb
        resume = {"id": run.previous_id, "resume": "allow"} if run.previous_id else {}
        self.run = wandb.init(project=run.project, name=run.name, config=config,
                              dir=None if os.environ.get("WANDB_DIR") else str(run.out_dir), **resume)
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def rewind(self, step: int) -> None:
        pass  # W&B keeps a run's steps increasing: rows logged again after a resume are dropped by W&B

    def log_summary(self, summary: dict, step: int) -> None:
        self.run.summary.update(summary)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class TrackioTracker:
    """A trackio run (local-first, HF's tracker): rows at their step, the config, the summary as
    Markdown under `summary` at the last step (trackio has no separate summary)."""

    def __init__(self, run: RunInfo, config: dict):
        import trackio
        self.trackio = trackio
        kw = {"auto_log_cpu": False, "auto_log_gpu": False}  # metrics.jsonl rows only, not system metrics
        accepted = inspect.signature(trackio.init).parameters
        with contextlib.redirect_stdout(sys.stderr):  # its banner is not the stage's output
            self.run = trackio.init(project=run.project, name=run.name, config=config,
                                    resume="allow" if run.previous_id else "never",
                                    **{k: v for k, v in kw.items() if k in accepted})
        self.run_id = run.name

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def rewind(self, step: int) -> None:
        pass  # rows logged again after a resume are added at their steps

    def log_summary(self, summary: dict, step: int) -> None:
        self.run.log({"summary": self.trackio.Markdown(f"```json\n{_json(summary)}\n```")}, step=step)

    def close(self, ok: bool) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.finish()  # the current run is this one; finish() also clears it (no second finish at exit)


class MlflowTracker:
    """An MLflow run in experiment --project: rows as metrics, the config as params, the summary as
    `summary.*` tags; FINISHED, or FAILED when the run ended without a summary."""

    def __init__(self, run: RunInfo, config: dict):
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient()  # $MLFLOW_TRACKING_URI, else MLflow's default store
        from mlflow.entities import Metric, Param, RunTag
        self.Metric, self.RunTag = Metric, RunTag
        if run.previous_id:
            self.run_id = run.previous_id
            self.client.update_run(self.run_id, status="RUNNING")
            return  # its params were logged when it started (MLflow params cannot change)
        experiment = self.client.get_experiment_by_name(run.project)
        eid = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
        self.run_id = self.client.create_run(eid, run_name=run.name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in metrics.items()])

    def rewind(self, step: int) -> None:
        pass  # MLflow keeps every value: rows logged again after a resume appear twice at their steps

    def log_summary(self, summary: dict, step: int) -> None:
        tags = [self.RunTag(f"summary.{k}", str(v)[:5000]) for k, v in _flat(summary).items()]
        for i in range(0, len(tags), 100):
            self.client.log_batch(self.run_id, tags=tags[i:i + 100])

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker,
            "mlflow": MlflowTracker}
assert set(TRACKERS) == set(REPORT_TO), "config.REPORT_TO and TRACKERS name the same trackers"


# --------------------------------------------------------------------------- the trackers of one run

class Trackers:
    """The open trackers of one run. ``MetricsLogger`` feeds ``log`` and ``rewind``; ``write_summary``
    calls ``finish_run``, which logs the summary and closes them."""

    def __init__(self, out_dir: Path, trackers: dict[str, Any]):
        self.out_dir, self.trackers, self.last_step = out_dir, trackers, 0

    def log(self, row: dict[str, Any], step: Optional[int] = None) -> None:
        step = int(row["step"] if step is None else step)
        self.last_step = max(self.last_step, step)
        metrics = _numbers(row)
        self._each("log", metrics, step)

    def rewind(self, step: int) -> None:
        self.last_step = step
        self._each("rewind", step)

    def log_summary(self, summary: dict) -> None:
        self._each("log_summary", _summary_only(summary), self.last_step)

    def close(self, ok: bool = True) -> None:
        for name in list(self.trackers):
            self._each("close", ok, only=name)
        self.trackers.clear()
        if _OPEN.get(self.out_dir) is self:
            del _OPEN[self.out_dir]

    def _each(self, method: str, *args, only: Optional[str] = None) -> None:
        """Call ``method`` on every tracker; one that fails is named on stderr and dropped."""
        for name, tracker in list(self.trackers.items()):
            if only is not None and name != only:
                continue
            try:
                with loggers_kept_enabled():
                    getattr(tracker, method)(*args)
            except Exception as e:  # a tracker outage must not end a training run
                print(f"prefalign: --report-to {name}: {method} failed ({type(e).__name__}: {e}); it gets no more "
                      f"rows (metrics.jsonl has them all).", file=sys.stderr)
                self.trackers.pop(name, None)


# Runs whose trackers are open, by output folder: write_summary finds its run here. A run that ends
# without a summary (an error, a stop signal) is closed as failed when the process exits.
_OPEN: dict[Path, Trackers] = {}
_AT_EXIT = False


@contextlib.contextmanager
def loggers_kept_enabled():
    """Trackers may configure logging as they start (MLflow's SQLite store runs alembic, whose
    fileConfig disables every existing logger): prefalign's warnings must survive that."""
    enabled = [lg for lg in logging.Logger.manager.loggerDict.values()
               if isinstance(lg, logging.Logger) and not lg.disabled]
    try:
        yield
    finally:
        for lg in enabled:
            lg.disabled = False


def open_trackers(cfg, out_dir, is_main: bool) -> Optional[Trackers]:
    """The trackers --report-to names, opened with the run's config; None when there are none or
    off the main process. --resume continues the runs recorded in OUTPUT/trackers.json."""
    global _AT_EXIT
    names = [n for n in getattr(cfg, "report_to", "none").split(",") if n not in ("", "none")]
    if not names or not is_main:
        return None
    out = Path(out_dir).resolve()
    if out in _OPEN:  # an earlier run into this folder, in this process, that never wrote its summary
        _OPEN.pop(out).close(ok=False)
    ids_path = out / IDS_FILE
    previous = json.loads(ids_path.read_text()) if getattr(cfg, "resume", False) and ids_path.exists() else {}
    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
    opened: dict[str, Any] = {}
    for name in names:
        run = RunInfo(cfg.run_name or out.name, cfg.project or "prefalign", out, previous.get(name))
        try:
            with loggers_kept_enabled():
                opened[name] = TRACKERS[name](run, config)
        except ImportError as e:
            Trackers(out, opened).close(ok=False)
            raise ConfigError(f"--report-to {name} needs the {name} extra: pip install 'prefalign[{name}]' "
                              f"({e}).") from None
        except Exception as e:  # not logged in, a bad tracking URI, ...: before training starts
            Trackers(out, opened).close(ok=False)
            raise ConfigError(f"--report-to {name}: cannot start the run: {type(e).__name__}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    ids_path.write_text(json.dumps({n: t.run_id for n, t in opened.items() if t.run_id}, indent=2) + "\n")
    trackers = _OPEN[out] = Trackers(out, opened)
    if not _AT_EXIT:  # registered after the trackers' own libraries, so it runs before their exit hooks
        atexit.register(close_open, ok=False)
        _AT_EXIT = True
    return trackers


def finish_run(out_dir, summary: dict) -> None:
    """Log the summary to the run's trackers and close them (called by write_summary)."""
    trackers = _OPEN.get(Path(out_dir).resolve())
    if trackers is not None:
        trackers.log_summary(summary)
        trackers.close(ok=True)


def close_open(ok: bool = False) -> None:
    """Close every run still open (they ended without a summary: failed, unless ``ok``)."""
    for trackers in list(_OPEN.values()):
        trackers.close(ok=ok)
