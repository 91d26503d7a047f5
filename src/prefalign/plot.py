"""`prefalign plot OUTPUT [OUTPUT ...]`: the training curves of one or several runs in one PNG.

It reads each run's metrics.jsonl and nothing else, so it works on a run still training or one
copied from another machine. One panel per metric, one colour per run; a metric's `eval/` twin is
drawn dashed in the same panel. The panel style (grid, sizes, fonts) is the demo report's:
lab/report.py draws its training curves with the helpers below.
"""
from __future__ import annotations

import difflib
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")   # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from prefalign.errors import ConfigError, DataError  # noqa: E402

__all__ = ["NOT_CURVES", "number", "curve_keys", "panel_grid", "style_panel", "save_figure", "read_run",
           "draw_runs", "run_plot"]

# Keys of metrics.jsonl rows that are bookkeeping, not curves.
NOT_CURVES = {"step", "epoch", "time", "elapsed", "elapsed_s", "tokens", "samples", "iteration"}
# Drawn only when asked for by name (or with --metrics all): rates of the machine, not of the run.
QUIET = ("perf/", "bad_steps")
MAX_PANELS = 12
EVAL = "eval/"


def number(x: Any) -> Optional[float]:
    """A finite int or float as float; None for anything else (text, NaN written as "nan", bools)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


# --------------------------------------------------------------------------- the report's panel style

def curve_keys(rows: Iterable[dict]) -> list[str]:
    """Keys with a numeric value in some row, in first-seen order with losses first."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in NOT_CURVES and k not in keys and number(v) is not None]
    return sorted(keys, key=lambda k: (0 if "loss" in k else 1, keys.index(k)))


def panel_grid(n: int):
    """A figure of ``n`` panels, at most 4 per row (3.4 x 2.6 inches each); panels beyond ``n`` are off."""
    cols = max(1, min(4, n))
    rows = math.ceil(n / cols) if n else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), dpi=100, squeeze=False)
    axes = list(axes.flat)
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n]


def style_panel(ax, title: str, xlabel: str = "step") -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def save_figure(fig, title: str, path) -> Path:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- runs

def read_run(path) -> list[dict]:
    """The rows of a run's metrics.jsonl (``path`` is its OUTPUT folder or the file). A torn last
    line (a run killed mid-write, or one still writing) is left out."""
    p = Path(path)
    file = p / "metrics.jsonl" if p.is_dir() else p
    if not file.is_file():
        what = "has no metrics.jsonl (is it a training run's --output folder?)" if p.is_dir() else "does not exist"
        raise DataError(f"{what}; give OUTPUT folders of sft, reward, dpo or ppo runs.", path=str(p))
    rows = []
    lines = file.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # torn last line
            raise DataError("is not valid JSON; metrics.jsonl holds one JSON object per line.", path=str(file),
                            line=n) from None
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        raise DataError("holds no rows yet.", path=str(file))
    return rows


def run_labels(paths: Sequence[str]) -> list[str]:
    """Each run's folder name; parent/name where two runs share a name."""
    names = [Path(p).resolve().name if Path(p).is_dir() else Path(p).resolve().parent.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(Path(*Path(p).resolve().parts[-2:])) if Path(p).is_dir() else
            str(Path(*Path(p).resolve().parent.parts[-2:])) for p in paths]


def choose_metrics(runs: dict[str, list[dict]], asked: Optional[str]) -> list[str]:
    """Panel keys: the asked ones (checked), all, or the default (every curve but perf/, eval/ twins
    folded into their training panel, at most MAX_PANELS)."""
    every = curve_keys(row for rows in runs.values() for row in rows)
    if asked and asked.strip() != "all":
        wanted = [k.strip() for k in asked.split(",") if k.strip()]
        for k in wanted:
            if k not in every:
                close = difflib.get_close_matches(k, every, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"--metrics {k}: no run logged it.{hint} They logged: {', '.join(every)}.")
        return wanted
    keys = [k for k in every if not (k.startswith(EVAL) and k[len(EVAL):] in every)]
    if asked is None:
        keys = [k for k in keys if not k.startswith(QUIET)]
        if len(keys) > MAX_PANELS:
            print(f"prefalign plot: drawing {MAX_PANELS} of {len(keys)} metrics; left out: "
                  f"{', '.join(keys[MAX_PANELS:])} (--metrics picks them, --metrics all draws every one).",
                  file=sys.stderr)
            keys = keys[:MAX_PANELS]
    return keys


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r.get("step", i), number(r.get(key))) for i, r in enumerate(rows) if number(r.get(key)) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def moving_average(ys: list[float], n: int) -> list[float]:
    """The mean of each point and up to n - 1 before it."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y - (ys[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def draw_runs(runs: dict[str, list[dict]], keys: Sequence[str], smooth: int = 0):
    """A figure with one panel per key and one line per run (its eval/ twin dashed, when it has one)."""
    fig, axes = panel_grid(len(keys))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    every = set(curve_keys(row for rows in runs.values() for row in rows))
    for n, (ax, key) in enumerate(zip(axes, keys)):
        twin = EVAL + key if EVAL + key in every and not key.startswith(EVAL) else None
        for i, (label, rows) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            xs, ys = _series(rows, key)
            if xs and smooth > 1:  # the raw curve stays, faded, under its moving average
                ax.plot(xs, ys, "-", color=color, lw=1, alpha=0.3)
                ys = moving_average(ys, smooth)
            if xs:
                ax.plot(xs, ys, "-", color=color, lw=1.5, label=label, marker="." if len(xs) == 1 else None)
            xs, ys = _series(rows, twin) if twin else ([], [])
            if xs:  # evaluations are few: drawn as logged, never smoothed
                ax.plot(xs, ys, "--", color=color, lw=1.5, label=f"{label} (eval)", marker=".")
        style_panel(ax, f"{key} (eval/ dashed)" if twin else key)
        if n == 0 and (len(runs) > 1 or twin):  # one legend: colours are runs in every panel
            ax.legend(fontsize=7)
    return fig


def run_plot(cfg) -> int:
    """The `prefalign plot` command: read every run, draw, write the PNG."""
    if not cfg.runs:
        raise ConfigError("give one or more run folders: prefalign plot OUTPUT [OUTPUT ...].")
    labels = [s.strip() for s in cfg.labels.split(",")] if cfg.labels else run_labels(cfg.runs)
    if len(labels) != len(cfg.runs):
        raise ConfigError(f"--labels names {len(labels)} run(s) but {len(cfg.runs)} were given.")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--labels must name each run once; got {', '.join(labels)}.")
    runs = {label: read_run(path) for label, path in zip(labels, cfg.runs)}
    keys = choose_metrics(runs, cfg.metrics)
    if not keys:
        raise DataError(f"the runs logged no curves (only {', '.join(sorted(set().union(*map(set, runs.values()))))}).")
    title = cfg.title or ("training curves: " + " vs ".join(labels) if len(labels) > 1 else
                          f"{labels[0]}: training curves")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(draw_runs(runs, keys, cfg.smooth), title, out)
    print(f"prefalign plot: {len(keys)} metric(s) of {len(runs)} run(s) -> {out}")
    return 0
