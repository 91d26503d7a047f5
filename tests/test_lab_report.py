"""report.html, results.json and the plots, from synthetic results."""
import json
import math
import re

import numpy as np
import pytest

from prefalign.lab.frontier import best_of_n, gain_share, optimum_frontier
from prefalign.lab.report import write_report


def fake_inputs():
    """Numbers shaped like a demo run: SFT at 0.55, PPO/DPO climbing towards the optimum."""
    rng = np.random.default_rng(0)
    gold = np.clip(rng.normal(0.55, 0.2, size=(32, 64)), 0, 1)                      # (P, N) SFT samples
    frontier = optimum_frontier(gold, [3.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03])
    sft = float(gold.mean())
    methods = [{"method": "sft", "beta": None, "gold_reward": sft, "kl": 0.0, "win_rate_vs_sft": 0.5,
                "gain_share": math.nan}]
    for step, (r, kl) in enumerate([(0.6, 0.3), (0.68, 0.9), (0.74, 1.6), (0.78, 2.4)]):
        methods.append({"method": "ppo", "beta": 0.05, "step": (step + 1) * 50, "gold_reward": r, "kl": kl,
                        "win_rate_vs_sft": 0.5 + r - sft, "gain_share": gain_share(r, kl, frontier, sft)})
    for beta, r, kl in [(0.5, 0.62, 0.4), (0.1, 0.72, 1.2), (0.05, 0.77, 2.0)]:
        methods.append({"method": "dpo", "beta": beta, "gold_reward": r, "kl": kl, "win_rate_vs_sft": 0.5 + r - sft,
                        "gain_share": gain_share(r, kl, frontier, sft)})
    for n in (2, 4, 8, 16):
        r, kl = best_of_n(gold, n)
        methods.append({"method": "best-of-n", "beta": None, "n": n, "gold_reward": r, "kl": kl,
                        "win_rate_vs_sft": None, "gain_share": gain_share(r, kl, frontier, sft)})
    # N = 64 SFT samples per prompt: the points at beta <= 0.1 have a harmonic-mean ESS under 10 (untrusted).
    results = {"methods": methods, "reward_model": {"heldout_accuracy": 0.71, "bayes_optimal_accuracy": 0.78},
               "frontier": [p._asdict() for p in frontier], "settings": {"frontier_samples": 64, "tau": 0.1},
               "frontier_pool": {"proposals": {"sft": 64}, "samples_per_prompt": 64, "min_ess": 10.0},
               "dpo_targets": [{"dpo_beta": 0.5, "frontier_beta": 0.05, "tau": 0.1, "target_reward": 0.937,
                                "target_kl": 2.6, "target_ess_hmean": 2.8, "target_trusted": False,
                                "dpo_gold_reward": 0.62, "dpo_kl": 0.4}]}
    curves = {"sft": [{"step": s, "loss": 5 * math.exp(-s / 80) + 1, "lr": 1e-3} for s in range(0, 400, 10)],
              "reward": [{"step": s, "loss": 0.69 - 0.1 * s / 100, "accuracy": 0.5 + s / 500} for s in range(0, 100, 5)],
              "dpo beta=0.1": [{"step": s, "loss": 0.69 - 0.002 * s, "rewards/margins": 0.01 * s} for s in range(50)],
              "ppo": [{"step": s, "policy_loss": -0.01 * s, "kl": 0.02 * s, "score": 0.5 + 0.005 * s} for s in range(60)]}
    samples = [{"prompt": "The acting", "completions": {"sft": " was fine.", "ppo": " was superb!",
                                                          "dpo": " <script>alert(1)</script> was lovely."},
                "rewards": {"sft": 0.6, "ppo": 0.95, "dpo": 0.9}},
               {"prompt": "I watched <b>", "completions": {"sft": " it twice.", "ppo": " a gem.", "dpo": " a joy."}}]
    return results, curves, samples


def test_report_is_self_contained_and_escaped(tmp_path):
    results, curves, samples = fake_inputs()
    path = write_report(tmp_path, results, curves, samples)
    page = path.read_text(encoding="utf-8")
    assert path == tmp_path / "report.html"
    for href in re.findall(r'href="([^"]+)"', page):           # every linked image exists on disk
        assert (tmp_path / href).is_file() and (tmp_path / href).read_bytes()[:4] == b"\x89PNG"
    assert {"reward_vs_kl.png", "curves_sft.png", "curves_reward.png", "curves_dpo_beta_0_1.png",
            "curves_ppo.png"} <= {p.name for p in tmp_path.glob("*.png")}
    assert page.count("data:image/png;base64,") == 5            # embedded: opens without the PNG files
    assert "http://" not in page and "https://" not in page     # nothing fetched from the network
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "I watched &lt;b&gt;" in page
    # The methods table: one row per method, with the numbers.
    assert page.count("<tr><td>dpo</td>") == 3 and page.count("<tr><td>ppo</td>") == 4
    assert "0.710" in page and "0.780" in page                  # RM accuracy next to the Bayes ceiling


def test_results_json_is_strict_json_with_schema(tmp_path):
    results, curves, samples = fake_inputs()
    write_report(tmp_path, results, curves, samples)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert set(data) == {"methods", "reward_model", "frontier", "settings", "frontier_pool", "dpo_targets"}
    for m in data["methods"]:
        assert {"method", "beta", "gold_reward", "kl", "win_rate_vs_sft", "gain_share"} <= set(m)
    assert data["methods"][0]["gain_share"] is None
    assert set(data["frontier"][0]) == {"beta", "mean_reward", "mean_kl", "ess_mean", "ess_min", "ess_hmean", "trusted"}
    assert [p["trusted"] for p in data["frontier"]] == [True] * 5 + [False] * 3
    assert data["dpo_targets"][0]["frontier_beta"] == 0.05


def test_untrusted_frontier_points_are_drawn_hollow(tmp_path, monkeypatch):
    """The plot marks the frontier's points with ESS below the threshold by hollow markers, the
    trusted ones filled, and says so in the legend; the HTML shows DPO's target on the frontier."""
    from prefalign.lab import report
    results, curves, samples = fake_inputs()
    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)              # keep the figure to inspect it
    report.plot_reward_vs_kl(results, tmp_path / "reward_vs_kl.png")
    (ax,) = figures[0].axes
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "white"]
    assert len(hollow) == 1
    untrusted = [(p["mean_kl"], p["mean_reward"]) for p in results["frontier"] if not p["trusted"]]
    assert sorted(zip(*hollow[0].get_data())) == sorted(untrusted)
    assert "ESS < 10" in hollow[0].get_label()
    filled = [line for line in ax.lines if line.get_marker() == "o" and line.get_markerfacecolor() == "gray"]
    assert len(filled) == 1 and len(filled[0].get_xdata()) == 5
    monkeypatch.undo()
    page = write_report(tmp_path, results, curves, samples).read_text(encoding="utf-8")
    assert "frontier β = τ β" in page and "(ESS too small)" in page


@pytest.mark.parametrize("curves", [{}, {"sft": []}, {"sft": [{"step": 1, "note": "x"}]}])
def test_report_survives_missing_curves(tmp_path, curves):
    results, _, samples = fake_inputs()
    page = write_report(tmp_path, results, curves, samples).read_text()
    assert "Training curves" in page


def test_the_report_leads_with_the_reward_vs_kl_figure_and_what_it_shows(tmp_path):
    """First the figure, then one sentence naming each method's best share (± its SE), then the rest."""
    results, curves, samples = fake_inputs()
    results["gain_share_by_method"] = {"ppo": {"gain_share": 0.61, "gain_share_se": 0.04, "kl": 2.4, "step": 200},
                                       "dpo": {"gain_share": 0.55, "kl": 1.2, "beta": 0.1, "upper_bound": True}}
    page = write_report(tmp_path, results, curves, samples).read_text(encoding="utf-8")
    body = page[page.index("<body>"):]
    first_figure, lead, methods = body.index("<figure>"), body.index("class='lead'"), body.index("<h2>Methods</h2>")
    assert first_figure < lead < methods and body.count("<h2>", 0, lead) == 0
    assert 'alt="gold reward vs KL"' in body[first_figure:lead]
    sentence = body[lead:body.index("</p>", lead)]
    assert "PPO 0.61 ± 0.04 (KL 2.4)" in sentence and "DPO ≤ 0.55 (KL 1.2)" in sentence
    assert sentence.index("PPO 0.61") < sentence.index("DPO ≤")    # best first


def test_dpo_runs_are_joined_to_the_optimum_they_target_on_the_plot(tmp_path, monkeypatch):
    """Each DPO beta's target (the frontier at tau * beta) is an x on the plot, a dotted line from the run."""
    from prefalign.lab import report
    results, _, _ = fake_inputs()
    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)
    report.plot_reward_vs_kl(results, tmp_path / "reward_vs_kl.png")
    (ax,) = figures[0].axes
    (target,) = [line for line in ax.lines if line.get_marker() == "x"]
    assert list(zip(*target.get_data())) == [(2.6, 0.937)] and "τβ" in target.get_label()
    (joined,) = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert list(zip(*joined.get_data())) == [(0.4, 0.62), (2.6, 0.937)]
    dpo = next(line for line in ax.lines if line.get_label().startswith("DPO ("))
    assert list(dpo.get_xdata()) == [0.4, 1.2, 2.0]                 # a curve from large beta to small


def test_shares_are_shown_with_their_standard_error(tmp_path):
    results, curves, samples = fake_inputs()
    ppo = next(m for m in results["methods"] if m["method"] == "ppo")
    ppo.update(gain_share=0.5, gain_share_se=0.034, beyond_frontier=True)
    page = write_report(tmp_path, results, curves, samples).read_text(encoding="utf-8")
    assert "<td>≤ 0.50 ± 0.03</td>" in page


def test_the_reward_models_optimum_is_drawn_and_tabled_where_trusted(tmp_path, monkeypatch):
    """results.json's reward_model_optimum: its trusted points are a dash-dot line on the plot (the untrusted one left
    out), a table under the reward model, and the lead sentence gives their range of shares."""
    from prefalign.lab import report
    results, curves, samples = fake_inputs()
    points = [{"beta": 5.0, "gold_reward": 0.62, "proxy_reward": 0.4, "mean_kl": 0.3, "ess_hmean": 40.0,
               "trusted": True, "gain_share": 0.81},
              {"beta": 1.0, "gold_reward": 0.71, "proxy_reward": 1.5, "mean_kl": 1.1, "ess_hmean": 12.0,
               "trusted": True, "gain_share": 0.77},
              {"beta": 0.3, "gold_reward": 0.80, "proxy_reward": 2.9, "mean_kl": 2.9, "ess_hmean": 3.0,
               "trusted": False, "gain_share": 0.9}]
    results["reward_model_optimum"] = {"beta_scale": 10.0, "points": points}
    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)
    report.plot_reward_vs_kl(results, tmp_path / "reward_vs_kl.png")
    (line,) = [x for x in figures[0].axes[0].lines if x.get_linestyle() == "-."]
    assert list(zip(*line.get_data())) == [(0.3, 0.62), (1.1, 0.71)] and "reward model" in line.get_label()
    page = write_report(tmp_path, results, curves, samples).read_text(encoding="utf-8")
    table = page[page.index("reward model's own optimum π"):]
    assert "<td>0.77</td>" in table and "<td>0.81</td>" in table and "<td>0.9</td>" not in table
    lead = page[page.index("class='lead'"):]
    assert "share 0.77-0.81 where trusted" in lead[:lead.index("</p>")]
