"""prefalign plot: the curves of several runs from their metrics.jsonl alone: the drawn lines are the logged
values, eval/ twins dashed in their training panel, a torn last line left out, clear errors; the CLI
writes a PNG."""
import json

import pytest

from prefalign import config as C
from prefalign.errors import ConfigError, DataError
from prefalign.plot import choose_metrics, draw_runs, moving_average, read_run, run_plot
from conftest import run_cli


def write_run(folder, rows, torn=False):
    folder.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(text + ('{"step": 9, "lo' if torn else ""))
    return folder


def dpo_rows(beta):
    rows = [{"step": s, "loss": 0.7 - beta * s, "rewards/margins": beta * s, "lr": 1e-3, "epoch": s / 4,
             "perf/tokens_per_s": 100.0 + s} for s in (2, 4, 6, 8)]
    rows[1].update({"eval/loss": 0.65 - beta, "eval/rewards/margins": beta})
    rows[3].update({"eval/loss": 0.6 - beta, "eval/rewards/margins": 2 * beta, "nan_metric": "nan"})
    return rows


def lines(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle())
            for line in ax.get_lines()}


def test_two_runs_one_panel_per_metric_with_eval_dashed(tmp_path):
    runs = {"b01": read_run(write_run(tmp_path / "b01", dpo_rows(0.01))),
            "b03": read_run(write_run(tmp_path / "b03", dpo_rows(0.03), torn=True))}  # still writing
    keys = choose_metrics(runs, None)
    assert keys == ["loss", "rewards/margins", "lr"]  # no perf/, no epoch, eval/ folded, the text "nan" no curve
    fig = draw_runs(runs, keys)
    loss, margins, lr = fig.axes[:3]
    assert loss.get_title() == "loss (eval/ dashed)" and lr.get_title() == "lr"
    got = lines(loss)
    assert got["b01"] == ([2, 4, 6, 8], [0.7 - 0.01 * s for s in (2, 4, 6, 8)], "-")
    assert got["b03 (eval)"] == ([4, 8], [0.65 - 0.03, 0.6 - 0.03], "--")
    assert set(got) == {"b01", "b01 (eval)", "b03", "b03 (eval)"}
    assert lines(margins)["b03 (eval)"][1] == [0.03, 0.06]
    assert len(fig.axes) == 3  # one row: up to 4 panels side by side, as in the demo report


def test_metrics_option(tmp_path):
    runs = {"a": read_run(write_run(tmp_path / "a", dpo_rows(0.1)))}
    assert choose_metrics(runs, "all") == ["loss", "rewards/margins", "lr", "perf/tokens_per_s"]
    assert choose_metrics(runs, "eval/loss,perf/tokens_per_s") == ["eval/loss", "perf/tokens_per_s"]
    with pytest.raises(ConfigError, match=r"--metrics rewards/margin: no run logged it. Did you mean rewards/margins"):
        choose_metrics(runs, "rewards/margin")


def test_smoothing_keeps_the_raw_curve_faded():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    runs = {"a": [{"step": s, "loss": float(s % 2)} for s in range(1, 7)]}
    fig = draw_runs(runs, ["loss"], smooth=3)
    raw, smooth = fig.axes[0].get_lines()
    assert raw.get_alpha() == 0.3 and list(smooth.get_ydata()) == moving_average([1, 0, 1, 0, 1, 0], 3)


def test_errors_name_the_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: has no metrics.jsonl"):
        read_run(tmp_path / "empty")
    write_run(tmp_path / "bad", [{"step": 1, "loss": 1.0}])
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl, line 1: is not valid JSON"):
        read_run(tmp_path / "bad")
    cfg = C.PlotConfig(runs=[str(tmp_path / "x"), str(tmp_path / "y")], labels="one")
    with pytest.raises(ConfigError, match="--labels names 1 run"):
        run_plot(cfg)


def test_cli_writes_a_png(tmp_path):
    a = write_run(tmp_path / "runs" / "dpo", dpo_rows(0.1))
    b = write_run(tmp_path / "other" / "dpo", dpo_rows(0.3))
    proc = run_cli("plot", a, b, "--output", tmp_path / "cmp.png", "--smooth", 2)
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 metric(s) of 2 run(s)" in proc.stdout
    proc = run_cli("plot", tmp_path / "nowhere", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert C.parse_config(C.PlotConfig, [str(a), str(b), "--labels", "x,y"]).runs == [str(a), str(b)]
