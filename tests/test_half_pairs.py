"""Records with a prompt and a chosen reply but no rejected one (or the reverse) are usable as prompts,
but they look like preference pairs missing a field: `data check` and the loaders say so."""
import json
import logging

import pytest

from prefalign.data import load_preferences, load_prompts
from prefalign.data.audit import audit, format_report
from prefalign.errors import DataError
from conftest import run_cli


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_check_warns_about_half_pairs(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "2+2=", "chosen": " 4"}, {"prompt": "1+1=", "chosen": " 2"},
                                        {"prompt": "Hi", "rejected": " Go away."}, {"prompt": "Write a haiku."}])
    report = audit(path)
    assert report["usable"] and report["formats"] == {"prompt": 4}  # still usable as prompts
    assert report["half_pairs"] == {"have `prompt` and `chosen` but no `rejected`": {"count": 2, "first": [1, 2]},
                                    "have `prompt` and `rejected` but no `chosen`": {"count": 1, "first": [3]}}
    assert report["warnings"] == [
        "2 record(s) have `prompt` and `chosen` but no `rejected`: they look like preference pairs missing a field, "
        "and are read as prompts only (the reply is ignored) (lines 1, 2). Add the missing field to train on pairs, "
        "or drop the reply to silence this.",
        "1 record(s) have `prompt` and `rejected` but no `chosen`: they look like preference pairs missing a field, "
        "and are read as prompts only (the reply is ignored) (line 3). Add the missing field to train on pairs, "
        "or drop the reply to silence this."]
    assert "warning: 2 record(s) have `prompt` and `chosen` but no `rejected`" in format_report(report)


def test_prompt_only_records_get_no_warning(tmp_path):
    report = audit(write(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "id": 3}]))
    assert report["usable"] and report["warnings"] == [] and report["half_pairs"] == {}


def test_loaders_say_it_too(tmp_path, caplog):
    path = write(tmp_path / "p.jsonl", [{"prompt": "2+2=", "chosen": " 4"}] * 3)
    with pytest.raises(DataError, match=r"holds `prompt` records, which give no preference pairs.*3 record\(s\) have "
                                        r"`prompt` and `chosen` but no `rejected`: they look like preference pairs"):
        load_preferences(path)
    with caplog.at_level(logging.WARNING, logger="prefalign.data.records"):
        assert [p.prompt for p in load_prompts(path)] == ["2+2="] * 3
    assert "look like preference pairs missing a field" in caplog.text


def test_data_check_cli(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "2+2=", "chosen": " 4"}])
    proc = run_cli("data", "check", "--data", path)
    assert "formats: prompt 1 -> prompts" in proc.stdout
    assert "warning: 1 record(s) have `prompt` and `chosen` but no `rejected`" in proc.stdout
    assert "verdict: usable (exit 0)" in proc.stdout
