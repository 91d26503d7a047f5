"""metrics.jsonl (one JSON object per logged step, with `step`), summary.json, progress bars.

A MetricsLogger given ``trackers`` (train/trackers.py, --report-to) forwards every row it writes;
write_summary hands the summary to the run's open trackers and closes them.

Keys under `perf/` (wall-clock rates) are the only ones that differ between two identical
runs; everything else is deterministic on CPU and compared by the resume tests.

Every write goes through train/diskio.py: a full disk or an OUTPUT that became read-only or
disappeared stops the run with one DiskError, and a row the disk refused halfway is cut off again.
"""
from __future__ import annotations

import functools
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm

from prefalign.train.trackers import Trackers, finish_run
from prefalign.train import diskio
from prefalign.train.checkpoint import resume_hint


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
        diskio.start_run(out_dir)  # a logger is made when a run starts: OUTPUT may be created anew

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they are produced again)."""
        if self.enabled and self.trackers is not None:
            self.trackers.rewind(step)
        if not self.enabled or not self.path.exists():
            return
        keep = [l for l in self.path.read_text().splitlines() if (_step_of(l) or step + 1) <= step]
        diskio.write_atomic(self.path, "".join(l + "\n" for l in keep).encode(), then=self._then)

    def _then(self) -> str:
        return resume_hint(self.path.parent)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        diskio.output_dir(self.path.parent, then=self._then)
        line = json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n"
        diskio.append(self.path, line.encode(), then=self._then)
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
    then = functools.partial(resume_hint, out_dir)
    out = diskio.output_dir(out_dir, then=then)
    data = {**summary, "versions": versions()}
    diskio.write_atomic(out / "summary.json", (json.dumps(data, indent=2, default=_jsonable) + "\n").encode(),
                        then=then)
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
