"""The demo's report: results.json, PNG plots and one self-contained report.html.

report.html opens from disk with no server and no network: every plot is embedded as a base64
PNG and also written next to it (the image links to its file, for a full-size view).

results.json schema::

    {"methods": [{"method": "sft"|"ppo"|"dpo"|"best-of-n"|..., "beta": float|null, "gold_reward": float,
                  "kl": float, "win_rate_vs_sft": float|null, "gain_share": float|null,
                  ... optional "step" (PPO checkpoints), "n" (best-of-n)}],
     "reward_model": {"heldout_accuracy": float, "bayes_optimal_accuracy": float},
     "frontier": [{"beta": float, "mean_reward": float, "mean_kl": float, "ess_mean": float, "ess_min": float,
                   "ess_hmean": float, "trusted": bool}],
     ... optional "frontier_pool": {"proposals": {name: samples per prompt}, "min_ess": float, ...},
     "dpo_targets": [{"dpo_beta", "frontier_beta", "target_reward", "target_kl", "target_trusted", ...}],
     ... optional "reward_model_optimum": {"beta_scale": float, "points": [{"beta", "gold_reward", "proxy_reward",
                                           "mean_kl", "ess_hmean", "trusted", "gain_share"}]},
     "settings": {...}}
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")   # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

# The training-curve panels are `prefalign plot`'s (one style for the report and the command).
from prefalign.plot import NOT_CURVES, curve_keys, panel_grid, save_figure, style_panel  # noqa: E402,F401
from prefalign.plot import number as _num  # noqa: E402

MAX_CURVES_PER_STAGE = 8
STYLE = {"ppo": ("tab:blue", "o"), "dpo": ("tab:orange", "s"), "best-of-n": ("tab:green", "^"),
         "rloo": ("tab:purple", "v"), "grpo": ("tab:red", "P"), "online-dpo": ("tab:brown", "X"),
         "sft": ("black", "*")}


def _frontier_points(frontier: Sequence) -> list[dict]:
    """Frontier points as dicts (from dicts or FrontierPoint tuples), sorted by KL; ``trusted``
    defaults to True for points that do not say."""
    pts = [dict(p) if isinstance(p, dict) else p._asdict() for p in frontier]
    return sorted(({**p, "trusted": p.get("trusted", True) is not False} for p in pts), key=lambda p: p["mean_kl"])


def _frontier_label(results: dict) -> str:
    pool = results.get("frontier_pool")
    if pool and len(pool.get("proposals", {})) > 1:
        scored = f", {pool['scored_per_prompt']:.0f} scored" if "scored_per_prompt" in pool else ""
        return (f"KL-regularised optimum (IS from SFT + {len(pool['proposals']) - 1} policies, "
                f"{pool.get('samples_per_prompt')} samples/prompt{scored})")
    if pool:
        return f"KL-regularised optimum (SNIS, N={pool.get('samples_per_prompt')})"
    n = results.get("settings", {}).get("frontier_samples")
    return "KL-regularised optimum (SNIS" + (f", N={n})" if n else ")")


def plot_reward_vs_kl(results: dict, path: Path) -> Path:
    """Gold reward vs KL(pi || pi_SFT): every method family as one series, plus the optimum, whose
    points with too few effective samples to trust (lab.frontier) are drawn hollow."""
    fig, ax = plt.subplots(figsize=(10.5, 5), dpi=110)
    pts = _frontier_points(results.get("frontier", []))
    if pts:
        xs, ys = [p["mean_kl"] for p in pts], [p["mean_reward"] for p in pts]
        ax.plot(xs, ys, "--", color="gray", lw=2, label=_frontier_label(results))
        trusted = [p for p in pts if p["trusted"]]
        untrusted = [p for p in pts if not p["trusted"]]
        ax.plot([p["mean_kl"] for p in trusted], [p["mean_reward"] for p in trusted], "o", color="gray", ms=4)
        if untrusted:
            min_ess = results.get("frontier_pool", {}).get("min_ess")
            ax.plot([p["mean_kl"] for p in untrusted], [p["mean_reward"] for p in untrusted], "o", ms=6, zorder=3,
                    markerfacecolor="white", markeredgecolor="gray",
                    label="optimum, too few effective samples" + (f" (ESS < {min_ess:g})" if min_ess else ""))
    _plot_reward_model_optimum(ax, results.get("reward_model_optimum", {}).get("points", []))
    families: dict[str, list[dict]] = {}
    for m in results.get("methods", []):
        families.setdefault(m["method"], []).append(m)
    for name, rows in families.items():
        color, marker = STYLE.get(name, (None, "D"))
        # Each method's curve over its own knob: checkpoints in training order, DPO from large beta to small.
        rows = sorted(rows, key=lambda m: m["step"] if m.get("step") is not None else m["n"] if m.get("n") is not None
                      else -m["beta"] if m.get("beta") is not None else m["kl"])
        xs, ys = [m["kl"] for m in rows], [m["gold_reward"] for m in rows]
        ax.plot(xs, ys, marker=marker, color=color, ms=8 if name == "sft" else 6, ls="none" if name == "sft" else "-",
                label=_series_label(name, rows))
        for m in rows:   # annotate DPO beta and best-of-n n so points can be told apart
            tag = f"β={m['beta']:g}" if name == "dpo" and m.get("beta") is not None else (
                f"n={m['n']}" if m.get("n") else None)
            if tag:
                ax.annotate(tag, (m["kl"], m["gold_reward"]), textcoords="offset points", xytext=(5, -11), fontsize=8)
    _plot_dpo_targets(ax, results.get("dpo_targets", []))
    kls = [m["kl"] for m in results.get("methods", [])] + [p["mean_kl"] for p in pts if p["trusted"]]
    kls += [t["target_kl"] for t in results.get("dpo_targets", []) if _num(t.get("target_kl")) is not None]
    if kls:   # the untrusted far end of the optimum (small beta) would squeeze every method to the left;
        # the axis ends a little past the methods, the trusted optimum and DPO's targets
        ax.set_xlim(left=-0.05 * max(kls), right=1.15 * max(kls))
    ax.set_xlabel("KL(π ‖ π_SFT)  [nats per completion]")
    ax.set_ylabel("gold reward r* (VADER, 0..1)")
    ax.set_title("Gold reward vs KL on held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)   # beside the axes: never over a curve
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _series_label(name: str, rows: Sequence[dict]) -> str:
    label = name.upper() if len(name) <= 4 else name
    if name == "dpo" and len(rows) > 1:
        return f"{label} (over β)"
    if any(m.get("step") is not None for m in rows) and len(rows) > 1:
        return f"{label} (checkpoints)"
    return label


def _plot_reward_model_optimum(ax, points: Sequence[dict]) -> None:
    """The gold reward of the reward model's own optimum pi_SFT exp(r_RM / beta) / Z: the most an exact optimiser of
    the reward model gets. Its trusted points only (SNIS from the SFT samples), so the line ends where they do."""
    pts = sorted((p for p in points if p.get("trusted")), key=lambda p: p["mean_kl"])
    if pts:
        ax.plot([p["mean_kl"] for p in pts], [p["gold_reward"] for p in pts], "-.", color="goldenrod", lw=2.5, zorder=4,
                label="reward model's optimum π_SFT·exp(r_RM/β)/Z, gold reward (trusted range)")


def _plot_dpo_targets(ax, targets: Sequence[dict]) -> None:
    """Each DPO beta's target, the optimum at tau * beta (labels ~ sigma((r1 - r2) / tau)), joined to the run."""
    color = STYLE["dpo"][0]
    for i, t in enumerate(targets):
        if _num(t.get("target_kl")) is None or _num(t.get("target_reward")) is None:
            continue
        ax.plot([t["dpo_kl"], t["target_kl"]], [t["dpo_gold_reward"], t["target_reward"]], ":", color=color, lw=1)
        ax.plot([t["target_kl"]], [t["target_reward"]], "x", color=color, ms=8, mew=2,
                label=f"DPO β's target: optimum at τβ (τ = {t['tau']:g})" if i == 0 else None)
        ax.annotate(f"τβ={t['frontier_beta']:g}", (t["target_kl"], t["target_reward"]), textcoords="offset points",
                    xytext=(4, 5), fontsize=7, color=color)


def plot_curves(stage: str, rows: Sequence[dict], path: Path) -> Path | None:
    """One panel per logged metric of one stage, vs step. None when nothing numeric was logged."""
    keys = curve_keys(rows)[:MAX_CURVES_PER_STAGE]
    if not keys:
        return None
    fig, axes = panel_grid(len(keys))
    for ax, key in zip(axes, keys):
        pts = [(r.get("step", i), _num(r.get(key))) for i, r in enumerate(rows) if _num(r.get(key)) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5)
        style_panel(ax, key)
    save_figure(fig, f"{stage}: training curves", path)
    return path


def lead_sentence(results: dict) -> str:
    """What the lead figure shows, with the numbers a reader should take away (each method's best share)."""
    n = results.get("settings", {}).get("heldout_prompts")
    best = sorted(results.get("gain_share_by_method", {}).items(), key=lambda kv: -(kv[1].get("gain_share") or 0))
    names = {"best-of-n": "best-of-n"}
    shares = [f"{names.get(k, k.upper())} {'≤ ' if b.get('upper_bound') else ''}{b['gain_share']:.2f}"
              + (f" ± {b['gain_share_se']:.2f}" if _num(b.get("gain_share_se")) is not None else "")
              + f" (KL {b['kl']:.1f})" for k, b in best if _num(b.get("gain_share")) is not None]
    where = f"the {n} held-out prompts" if n else "held-out prompts"
    text = (f"Gold reward against KL(π ‖ π_SFT) on {where}: each method's curve over its own knob (DPO's β; the "
            f"checkpoints of PPO and the other online methods), best-of-n, and the dashed optimum π*_β, the most "
            f"any policy can reach at that KL (hollow: too few effective samples to trust).")
    rm_shares = [p["gain_share"] for p in results.get("reward_model_optimum", {}).get("points", [])
                 if p.get("trusted") and _num(p.get("gain_share")) is not None]
    if rm_shares:
        text += (f" The dash-dot line is the reward model's own optimum, the policy that maximises it exactly, in gold "
                 f"reward (share {min(rm_shares):.2f}-{max(rm_shares):.2f} where trusted): a method that optimises the "
                 f"reward model and stays below it loses the difference to its optimiser, not to the reward model.")
    if shares:
        text += (" Best share of the optimum's gain at equal KL (1 = on the optimum; ± a standard error over "
                 f"prompts): {', '.join(shares)}.")
    return text


def _fmt(x: Any, digits: int = 3) -> str:
    v = _num(x)
    return "–" if v is None else f"{v:.{digits}f}"


def _figure(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><a href="{html.escape(path.name)}"><img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{data}"></a></figure>')


def _methods_table(methods: Sequence[dict]) -> str:
    head = ("<tr><th>method</th><th>β / n / step</th><th>gold reward</th><th>KL (nats)</th>"
            "<th>win rate vs SFT</th><th>share of optimum gain at equal KL</th></tr>")
    rows = []
    for m in methods:
        knob = (f"iteration {m['step']}" if m.get("step") is not None else f"n = {m['n']}" if m.get("n") is not None
                else f"β = {m['beta']:g}" if m.get("beta") is not None else "")
        rows.append(f"<tr><td>{html.escape(str(m['method']))}</td><td>{html.escape(str(knob))}</td>"
                    f"<td>{_fmt(m.get('gold_reward'))}</td><td>{_fmt(m.get('kl'))}</td>"
                    f"<td>{_fmt(m.get('win_rate_vs_sft'))}</td><td>{_share(m)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _share(m: dict) -> str:
    """'≤ ' past the trusted frontier, the share, '± SE' over prompts when known."""
    se = _num(m.get("gain_share_se"))
    return (f"{'≤ ' if m.get('beyond_frontier') or m.get('upper_bound') else ''}{_fmt(m.get('gain_share'), 2)}"
            + (f" ± {se:.2f}" if se is not None and _num(m.get("gain_share")) is not None else ""))


def _targets_table(results: dict) -> str:
    """The run's targets (results["targets"]: name -> {met, measured values}) and each method's headline share."""
    rows = []
    for name, t in results.get("targets", {}).items():
        values = ", ".join(f"{k} = {_fmt(v)}" for k, v in t.items() if k != "met")
        rows.append(f"<tr><td>{html.escape(name.replace('_', ' '))}</td><td>{html.escape(values)}</td>"
                    f"<td>{'met' if t.get('met') else '<b>missed</b>'}</td></tr>")
    for method, best in results.get("gain_share_by_method", {}).items():
        where = ", ".join(f"{k} = {best[k]:g}" for k in ("beta", "n", "step") if best.get(k) is not None)
        bound = " (upper bound: past the frontier's KL range)" if best.get("upper_bound") else ""
        rows.append(f"<tr><td>best share of the optimum's gain: {html.escape(method)}</td>"
                    f"<td>{_share({**best, 'upper_bound': False})} at KL {_fmt(best.get('kl'), 2)} ({html.escape(where)})"
                    f"{bound}</td><td></td></tr>")
    return f"<table><tr><th>target</th><th>measured</th><th></th></tr>{''.join(rows)}</table>" if rows else ""


def _dpo_targets_table(targets: Sequence[dict]) -> str:
    """Each DPO beta next to the optimum it aims at: labels ~ sigma((r1 - r2) / tau) make DPO's optimum pi*_{tau beta}."""
    if not targets:
        return ""
    rows = "".join(f"<tr><td>β = {t['dpo_beta']:g}</td><td>{t['frontier_beta']:g}</td>"
                   f"<td>{_fmt(t.get('target_reward'))}{'' if t.get('target_trusted', True) else ' (ESS too small)'}</td>"
                   f"<td>{_fmt(t.get('target_kl'), 2)}</td><td>{_fmt(t.get('dpo_gold_reward'))}</td>"
                   f"<td>{_fmt(t.get('dpo_kl'), 2)}</td></tr>" for t in targets)
    return ("<p>What each DPO run aims at: the labeler prefers with probability σ((r<sub>1</sub> − r<sub>2</sub>)/τ), "
            "so DPO with β targets the optimum at β<sub>frontier</sub> = τ β.</p>"
            "<table><tr><th>DPO</th><th>frontier β = τ β</th><th>optimum's gold reward</th><th>optimum's KL</th>"
            f"<th>DPO's gold reward</th><th>DPO's KL</th></tr>{rows}</table>")


def _reward_model_optimum_table(points: Sequence[dict]) -> str:
    """The reward model's own optimum at each trusted beta: what maximising it exactly would get in gold."""
    pts = sorted((p for p in points if p.get("trusted") and _num(p.get("gain_share")) is not None),
                 key=lambda p: p["mean_kl"])
    if not pts:
        return ""
    rows = "".join(f"<tr><td>{p['beta']:.3g}</td><td>{_fmt(p['mean_kl'], 2)}</td><td>{_fmt(p['proxy_reward'], 2)}</td>"
                   f"<td>{_fmt(p['gold_reward'])}</td><td>{_fmt(p['gain_share'], 2)}</td></tr>" for p in pts)
    return ("<p>The reward model's own optimum π<sub>SFT</sub> exp(r<sub>RM</sub>/β) / Z, the policy that maximises "
            "E[r<sub>RM</sub>] − β KL exactly (estimated from the SFT samples; trusted points only), measured in the "
            "gold reward. Its share of the optimum's gain is the most a method that optimises this reward model can "
            "get: below it, the method's optimiser loses the rest; above the reward model's share, the reward model "
            "does.</p><table><tr><th>β (reward-model units)</th><th>KL</th><th>reward-model score</th>"
            f"<th>gold reward</th><th>share of the optimum's gain</th></tr>{rows}</table>")


def _samples_table(samples: Sequence[dict]) -> str:
    """samples: [{"prompt": str, "completions": {method: text}, "rewards": {method: float} (optional)}]."""
    if not samples:
        return "<p>No samples.</p>"
    methods: list[str] = []
    for s in samples:
        methods += [m for m in s.get("completions", {}) if m not in methods]
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in methods) + "</tr>"
    rows = []
    for s in samples:
        cells = []
        for m in methods:
            text = html.escape(str(s.get("completions", {}).get(m, "")))
            r = s.get("rewards", {}).get(m)
            cells.append(f"<td>{text}" + (f"<br><small>r* = {_fmt(r, 2)}</small>" if _num(r) is not None else "") + "</td>")
        rows.append(f"<tr><td><b>{html.escape(str(s['prompt']))}</b></td>{''.join(cells)}</tr>")
    return f'<table class="samples">{head}{"".join(rows)}</table>'


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}img{max-width:100%}table.samples td{max-width:320px;font-size:90%}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto}p.lead{font-size:110%;max-width:760px}"""


def _json_safe(x: Any) -> Any:
    """NaN/inf -> null so results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(out_dir, results: dict, curves: dict[str, list[dict]], samples: list[dict]) -> Path:
    """Write results.json, the PNG plots and report.html into ``out_dir``; returns report.html's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n", encoding="utf-8")
    parts = [_figure(plot_reward_vs_kl(results, out / "reward_vs_kl.png"), "gold reward vs KL"),
             f"<p class='lead'>{html.escape(lead_sentence(results))}</p>",
             "<h2>Methods</h2>", _methods_table(results.get("methods", [])),
             "<p>Share = (r<sub>method</sub> − r<sub>SFT</sub>) / (optimum at the method's KL − r<sub>SFT</sub>). "
             "The optimum π*<sub>β</sub> ∝ π<sub>SFT</sub> exp(r*/β) is estimated per prompt by self-normalised "
             "importance sampling from the mixture of π<sub>SFT</sub> and the trained policies (every pooled sample "
             "scored under every policy: the balance heuristic). It is biased for a finite pool; each point's "
             "effective sample size (ESS) says how far to trust it, and points with too few are drawn hollow. Past "
             "the last trusted point a share (marked ≤) is an upper bound.</p>",
             _targets_table(results), _dpo_targets_table(results.get("dpo_targets", []))]
    rm = results.get("reward_model")
    if rm:
        parts += ["<h2>Reward model</h2>",
                  f"<table><tr><th>held-out pairwise accuracy</th><td>{_fmt(rm.get('heldout_accuracy'))}</td></tr>"
                  f"<tr><th>Bayes-optimal accuracy (ceiling for any reward model on these labels)</th>"
                  f"<td>{_fmt(rm.get('bayes_optimal_accuracy'))}</td></tr></table>",
                  _reward_model_optimum_table(results.get("reward_model_optimum", {}).get("points", []))]
    parts.append("<h2>Training curves</h2>")
    for stage, rows in curves.items():
        png = plot_curves(stage, rows, out / f"curves_{''.join(c if c.isalnum() else '_' for c in stage)}.png")
        parts.append(_figure(png, f"{stage} curves") if png else f"<p>{html.escape(stage)}: no metrics logged.</p>")
    parts += ["<h2>Sample completions (same prompts)</h2>", _samples_table(samples),
              "<h2>Settings</h2>", f"<pre>{html.escape(json.dumps(_json_safe(results.get('settings', {})), indent=2))}</pre>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>prefalign sentiment lab</title>"
            f"<style>{CSS}</style></head><body><h1>prefalign sentiment lab</h1>{''.join(parts)}</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
