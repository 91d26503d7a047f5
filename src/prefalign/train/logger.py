"""metrics.jsonl (one JSON object per logged step, with `step`), summary.json, progress bars.

A MetricsLogger given ``trackers`` (train/trackers.py, --report-to) forwards every row it writes;
write_summary hands the summary to the run's open trackers and closes them.

Keys under `perf/` (wall-clock rates) are the only ones that differ between two identical
runs; everything else is deterministic on CPU and compared by the resume tests.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm

from prefalign.train.trackers import Trackers, finish_run


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def _step_of(line: str) -> Optional[int]:
    """The step of one metrics.jsonl row; None for a blank or torn line (a kill mid-write)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None


class MetricsLogger:
    """Appends rows to OUTPUT/metrics.jsonl; only the main process writes."""

    def __init__(self, out_dir: Path, enabled: bool = True, filename: str = "metrics.jsonl",
                 trackers: Optional[Trackers] = None):
        self.path = Path(out_dir) / filename
        self.enabled = enabled
        self.trackers = trackers  # every row written here goes to them too

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they are produced again)."""
        if self.enabled and self.trackers is not None:
            self.trackers.rewind(step)
        if not self.enabled or not self.path.exists():
            return
        keep = [l for l in self.path.read_text().splitlines() if (_step_of(l) or step + 1) <= step]
        self._atomic_write("".join(l + "\n" for l in keep))

    def _atomic_write(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
            f.flush()
        if self.trackers is not None:
            self.trackers.log(row)


def read_metrics(path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


def versions() -> dict[str, str]:
    import torch
    import transformers

    from prefalign import __version__
    return {"prefalign": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


def write_summary(out_dir, summary: dict[str, Any]) -> Path:
    """OUTPUT/summary.json, written atomically, with versions added; then the run's trackers
    (--report-to) get it and are closed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {**summary, "versions": versions()}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, out / "summary.json")
    finish_run(out, json.loads(json.dumps(data, default=_jsonable)))
    return out / "summary.json"


def progress(total: Optional[int], desc: str, initial: int = 0, enabled: bool = True, unit: str = "step"):
    """A tqdm bar with ETA on stderr (disabled off the main process or with --no-progress)."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                leave=True, file=sys.stderr)


def iter_progress(items: Iterable, total: Optional[int], desc: str, enabled: bool = True, unit: str = "it"):
    return tqdm(items, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
