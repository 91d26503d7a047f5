"""`prefalign data check`: each problem detected on a small constructed file, and the real HH file."""
import json

import pytest

from prefalign.data.audit import audit, format_report
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model, tiny_tokenizer
from conftest import run_cli


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def pair(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(SAMPLE_TEXTS)


def test_clean_file_is_usable(tmp_path, tok):
    r = audit(write(tmp_path / "p.jsonl", [pair("The movie was", " great", " boring")] * 3), tokenizer=tok)
    assert r["usable"] and r["formats"] == {"explicit": 3} and r["kind"] == "preference"
    assert r["warnings"] == [] and r["reasons"] == []
    assert r["tokens"]["chosen"] == {"min": 2, "median": 2, "p95": 2, "max": 2}  # " great" + EOS
    assert "verdict: usable" in format_report(r)


def test_identical_pairs_are_reported_as_skipped(tmp_path):
    r = audit(write(tmp_path / "p.jsonl", [pair("p", " a", " b"), pair("p", " a", " a"), pair("p", " c", " c")]))
    assert r["skipped"] == {"chosen identical to rejected": {"count": 2, "first": [2, 3]}}
    assert r["usable"] and r["usable_records"] == 1
    assert "2 record(s) skipped: chosen identical to rejected (lines 2, 3)" in r["warnings"][0]


def test_only_identical_pairs_is_not_usable(tmp_path):
    r = audit(write(tmp_path / "p.jsonl", [pair("p", " a", " a")]))
    assert not r["usable"] and "no usable records" in r["reasons"][0]


def test_empty_completions(tmp_path):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: no"}]
    r = audit(write(tmp_path / "hh.jsonl", rows))
    assert r["formats"] == {"hh": 2}
    assert r["empty_completion"] == {"count": 1, "first": [2], "chosen": 1, "rejected": 0}
    assert r["usable"] and any("empty (whitespace-only) completion" in w for w in r["warnings"])


def test_truncation_that_hides_the_difference(tmp_path, tok):
    shared = " The movie was great and the acting was wonderful. I loved the music, the story and the cast."
    rows = [pair("Hello there!", shared + " Yes.", shared + " No."), pair("Hello there!", " great", " boring")]
    path = write(tmp_path / "p.jsonl", rows)
    r = audit(path, tokenizer=tok, max_length=16)
    assert r["truncation_hides_difference"] == {"count": 1, "first": [1]}
    assert r["truncated"]["count"] == 1
    assert any("identical after truncation to max_length=16" in w for w in r["warnings"])
    assert audit(path, tokenizer=tok, max_length=512)["truncation_hides_difference"]["count"] == 0


def test_missing_eos_token_makes_data_unusable(tmp_path):
    no_eos = tiny_tokenizer(SAMPLE_TEXTS)
    no_eos.eos_token = None
    r = audit(write(tmp_path / "p.jsonl", [pair("p", " a", " b")]), tokenizer=no_eos)
    assert not r["usable"] and "no EOS token" in r["reasons"][0]


def test_length_bias(tmp_path, tok):
    rows = [pair(f"Q{i}:", " a long and detailed answer", " short") for i in range(18)]
    rows += [pair(f"R{i}:", " no", " a much longer rejected answer") for i in range(2)]
    r = audit(write(tmp_path / "p.jsonl", rows), tokenizer=tok)
    assert r["chosen_longer_chars"] == 0.9 and r["chosen_longer_tokens"] == 0.9
    assert sum("length bias" in w for w in r["warnings"]) == 2 and r["usable"]


def test_unreadable_records_are_all_listed(tmp_path):
    rows = [pair("p", " a", " b"), "{not json", {"prompt": "p", "chosen": 1, "rejected": " b"}, "[1, 2]"]
    r = audit(write(tmp_path / "p.jsonl", rows))
    assert not r["usable"] and r["errors"]["count"] == 3 and r["records"] == 4
    assert ["line 2" in r["errors"]["first"][0], "line 3" in r["errors"]["first"][1]] == [True, True]
    assert "3 record(s) cannot be used" in r["reasons"][0]


def test_missing_file_reports_instead_of_raising(tmp_path):
    r = audit(tmp_path / "nope.jsonl")
    assert not r["usable"] and "does not exist" in r["reasons"][0]
    assert "NOT usable" in format_report(r)


def test_sft_and_prompt_files(tmp_path, tok):
    r = audit(write(tmp_path / "s.jsonl", [{"text": "I loved it."}, {"text": "The plot was boring."}]), tokenizer=tok)
    assert r["usable"] and r["kind"] == "sft" and set(r["tokens"]) == {"prompt", "completion"}
    r = audit(write(tmp_path / "q.jsonl", [{"prompt": "Hello there!"}]), tokenizer=tok, max_length=8)
    assert r["usable"] and r["kind"] == "prompt" and r["tokens"]["prompt"]["max"] == 3


def test_mixed_kinds_with_forced_format(tmp_path):
    path = write(tmp_path / "m.jsonl", [{"prompt": "a", "completion": " b"}, {"prompt": "a"}])
    assert not audit(path)["usable"]
    assert audit(path, data_format="prompt")["usable"]


def test_cli_text_json_and_exit_codes(tmp_path):
    good = write(tmp_path / "p.jsonl", [pair("The movie was", " great", " boring")])
    save_tiny_model(tmp_path / "m")
    out = run_cli("data", "check", "--data", good, "--model", tmp_path / "m")
    assert "explicit 1 -> preference pairs" in out.stdout and "tokens before truncation" in out.stdout
    out = run_cli("data", "check", "--data", good, "--json")
    assert json.loads(out.stdout)["usable"] is True
    bad = write(tmp_path / "bad.jsonl", ["{oops"])
    out = run_cli("data", "check", "--data", bad, check=False)
    assert out.returncode == 2 and "line 1" in out.stdout and "NOT usable" in out.stdout
    out = run_cli("data", "check", check=False)
    assert out.returncode == 2 and "--data" in out.stderr


def test_real_hh_file(shared_data):
    out = run_cli("data", "check", "--data", shared_data)
    assert "records: 2312 (JSONL); usable: 2312" in out.stdout
    assert "formats: hh 2312 -> preference pairs" in out.stdout and "verdict: usable (exit 0)" in out.stdout
    report = audit(shared_data)
    assert report["formats"] == {"hh": 2312} and report["usable"]
    # Four real pairs whose chosen reply is empty; five whose dialogues differ before the last turn.
    assert report["empty_completion"]["first"] == [87, 517, 926, 1104]
    assert sum(f["count"] for f in report["notes"].values()) == 5
