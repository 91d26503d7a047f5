"""examples/hh_split.py: the deterministic 2000 / 312 split of HH harmless-base test (real file; skipped without it)."""
import json
import subprocess
import sys

from conftest import ROOT


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_hh_split_is_2000_312_disjoint_and_deterministic(shared_data, tmp_path):
    outs = []
    for name in ("a", "b"):
        subprocess.run([sys.executable, str(ROOT / "examples" / "hh_split.py"), "--source", str(shared_data),
                        "--out", str(tmp_path / name)], check=True, capture_output=True, text=True, timeout=60)
        outs.append((read(tmp_path / name / "hh-harmless-train.jsonl"),
                     read(tmp_path / name / "hh-harmless-heldout.jsonl")))
    (train, heldout), again = outs[0], outs[1]
    assert (len(train), len(heldout)) == (2000, 312)
    train_ids, heldout_ids = {r["id"] for r in train}, {r["id"] for r in heldout}
    assert not train_ids & heldout_ids and train_ids | heldout_ids == set(range(2312))
    assert (train, heldout) == again  # same seeded rule, same files
    assert set(heldout[0]) == {"id", "chosen", "rejected"}  # the hh format, read by every stage


def test_length_baselines_count_ties_as_wrong(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    from hh_baselines import length_accuracy
    # pairs (chosen, rejected) lengths: longer wins, shorter wins, tie, shorter wins
    report = length_accuracy([5, 2, 3, 1], [3, 4, 3, 9])
    assert report == {"pairs": 4, "pick_longer": 1 / 4, "pick_shorter": 2 / 4, "ties": 1}
