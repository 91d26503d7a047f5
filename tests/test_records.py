"""Readers: every supported format, and one test per kind of bad input (file, line, field named)."""
import gzip
import json
import os

import pytest

from prefalign.data import FORMATS, detect_format, load_preferences, load_prompts, load_sft, read_records
from prefalign.data.formats import RecordError, split_hh, split_implicit
from prefalign.errors import DataError

USER = [{"role": "user", "content": "Hi"}]
GOOD = [{"role": "assistant", "content": "Hello!"}]
BAD = [{"role": "assistant", "content": "Go away."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("record, name", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "explicit"),
    ({"chosen": "Q? yes", "rejected": "Q? no"}, "implicit"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hey", "rejected": "\n\nHuman: Hi\n\nAssistant: No"}, "hh"),
    ({"prompt": USER, "chosen": GOOD, "rejected": BAD}, "conversational"),
    ({"chosen": USER + GOOD, "rejected": USER + BAD}, "conversational"),
    ({"prompt": "p", "completion": "c"}, "completion"),
    ({"text": "t"}, "text"),
    ({"messages": USER + GOOD}, "messages"),
    ({"prompt": "p"}, "prompt"),
    ({"prompt": USER, "id": 7}, "prompt"),
])
def test_detect_format(record, name):
    assert detect_format(record) == name


def test_every_registered_example_parses_in_its_own_format():
    for name, fmt in FORMATS.items():
        record = json.loads(fmt.example)
        assert detect_format(record) == name
        assert fmt.parse(record).skip is None


@pytest.mark.parametrize("chosen, rejected, expected", [
    # The shared prefix backs off to the start of the whitespace run: completions keep their space.
    ("Q: 2+2? A: 4", "Q: 2+2? A: 5", ("Q: 2+2? A:", " 4", " 5")),
    ("The movie was great", "The movie was grim", ("The movie was", " great", " grim")),
    ("Hello.\n\nFoo", "Hello.\n\nBar", ("Hello.", "\n\nFoo", "\n\nBar")),
    # chosen is a prefix of rejected: the split moves back so chosen's completion is non-empty.
    ("I like it", "I like it a lot", ("I like", " it", " it a lot")),
    ("abc", "abd", ("", "abc", "abd")),
])
def test_split_implicit(chosen, rejected, expected):
    assert split_implicit(chosen, rejected) == expected


def test_split_hh_at_last_assistant_turn():
    c = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help?\n\nAssistant: Sure."
    r = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help?\n\nAssistant: No."
    assert split_hh(c, r) == ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help?\n\nAssistant:", " Sure.", " No.", None)


def test_split_hh_when_dialogues_differ_earlier():
    # One dialogue has an extra turn: split at the last shared Assistant marker, with a note.
    c = "\n\nHuman: Hi\n\nAssistant: A\n\nHuman: more\n\nAssistant: B"
    r = "\n\nHuman: Hi\n\nAssistant: C"
    prompt, cc, rr, note = split_hh(c, r)
    assert prompt == "\n\nHuman: Hi\n\nAssistant:" and cc == " A\n\nHuman: more\n\nAssistant: B" and rr == " C"
    assert note is not None


def test_load_every_kind(tmp_path):
    prefs = load_preferences(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "margin": 2}]))
    assert prefs[0].prompt == "2+2=" and prefs[0].margin == 2.0 and prefs[0].source.endswith("p.jsonl:1")
    chat = load_preferences(write_jsonl(tmp_path / "c.jsonl", [{"chosen": USER + GOOD, "rejected": USER + BAD}]))
    assert (chat[0].prompt, chat[0].chosen, chat[0].rejected) == (USER, GOOD, BAD)
    sft = load_sft(write_jsonl(tmp_path / "m.jsonl", [{"messages": USER + GOOD}]))
    assert (sft[0].prompt, sft[0].completion) == (USER, GOOD)
    assert load_sft(write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}]))[0].prompt is None
    # Preference data gives SFT examples (prompt, chosen) and prompts.
    assert load_sft(tmp_path / "p.jsonl")[0].completion == " 4"
    assert load_prompts(tmp_path / "p.jsonl")[0].prompt == "2+2="
    assert load_prompts(tmp_path / "m.jsonl")[0].prompt == USER


def test_json_array_and_gzip(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    ex = load_preferences(tmp_path / "a.json")
    assert len(ex) == 3 and ex[2].source.endswith("a.json[2]")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n\n")  # blank lines are ignored
    assert len(load_preferences(tmp_path / "a.jsonl.gz")) == 3


def test_identical_pairs_are_skipped_with_a_warning(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"},
                                              {"prompt": "p", "chosen": "x", "rejected": "y"}])
    assert [e.rejected for e in load_preferences(path)] == ["y"]
    assert "chosen identical to rejected" in caplog.text


def test_forced_format(tmp_path):
    # Text pairs with HH markers but meant as plain implicit text: forcing wins over detection.
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b c", "rejected":
                                               "\n\nHuman: a\n\nAssistant: b d"}])
    assert load_preferences(path, data_format="implicit")[0].chosen == " c"
    assert load_preferences(path)[0].chosen == " b c"


# --------------------------------------------------------------------------- bad input, one test per case

def raises(path, match, loader=load_preferences, **kw) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        loader(path, **kw)
    assert str(path) in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    raises(tmp_path / "nope.jsonl", "does not exist")


def test_directory(tmp_path):
    raises(tmp_path, "is a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "x"}])
    path.chmod(0)
    raises(path, "cannot be read", loader=load_sft)


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n")
    raises(tmp_path / "e.jsonl", "is empty")


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    assert raises(path, "not valid JSON").line == 2


def test_binary_garbage(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n\x00\x01\x02\xff\xfe')
    raises(tmp_path / "b.jsonl", "not UTF-8", loader=load_sft)


def test_nul_bytes_in_utf8(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n\x00\x00\x00')
    assert raises(tmp_path / "b.jsonl", "binary data", loader=load_sft).line == 2


def test_wrong_encoding(tmp_path):
    (tmp_path / "l.jsonl").write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    err = raises(tmp_path / "l.jsonl", "not UTF-8.*iconv", loader=load_sft)
    assert err.line == 2


def test_fake_gzip(tmp_path):
    (tmp_path / "p.jsonl.gz").write_text('{"text": "x"}\n')
    raises(tmp_path / "p.jsonl.gz", "not gzip", loader=load_sft)


def test_missing_keys_name_format_and_existing_keys(tmp_path):
    # Forced format: the record lacks a key that format needs.
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b"}])
    err = raises(path, r"missing key\(s\) \['rejected'\].*`explicit`.*keys \['chosen', 'prompt'\]",
                 data_format="explicit")
    assert (err.line, err.field) == (1, "rejected")


def test_no_format_fits(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "answer": "b"}])
    raises(path, r"no known format fits keys \['answer', 'question'\].*prompt, chosen, rejected")


def test_non_string_value(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": 3, "rejected": "c"}])
    assert raises(path, "must be a string, got int").field == "chosen"


def test_empty_string(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": ""}])
    assert raises(path, "is empty").field == "rejected"


def test_bad_margin(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}])
    assert raises(path, "finite number").field == "margin"


def test_bad_message(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": USER, "chosen": [{"role": "assistant"}], "rejected": BAD}])
    assert raises(path, "`role` and `content`").field == "chosen[0]"


def test_text_and_messages_mixed_in_one_record(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": GOOD}])
    raises(path, "message lists but the other fields hold text", loader=load_sft)


def test_messages_must_end_with_assistant(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": GOOD + USER}])
    raises(path, "last message must be the assistant", loader=load_sft)


def test_json_line_that_is_not_an_object(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"text": "a"}\n["text", "b"]\n')
    assert raises(tmp_path / "p.jsonl", "is a JSON list", loader=load_sft).line == 2


def test_json_array_of_non_objects(tmp_path):
    (tmp_path / "a.json").write_text('[{"text": "a"}, "b"]')
    err = raises(tmp_path / "a.json", "record 1.*one object per record", loader=load_sft)
    assert err.line is None


def test_json_array_record_error_names_index(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a"}, {"text": 5}]))
    assert "a.json, record 1, field `text`" in str(raises(tmp_path / "a.json", "must be a string", loader=load_sft))


def test_invalid_json_array(tmp_path):
    (tmp_path / "a.json").write_text('[{"text": "a"},\n {"text": }]')
    assert raises(tmp_path / "a.json", "not valid JSON", loader=load_sft).line == 2


def test_mixed_formats(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2 +
                       [{"prompt": "a", "completion": "b"}])
    err = raises(path, "format `completion` but most records are `explicit`.*--data-format", loader=load_sft)
    assert err.line == 3


def test_wrong_kind_for_the_loader(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    raises(path, "give no preference pairs")


def test_text_records_have_no_prompts(tmp_path):
    raises(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}]), "no prompt", loader=load_prompts)


def test_hh_format_forced_on_plain_text(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "yes", "rejected": "no"}])
    assert raises(path, "not an HH dialogue", data_format="hh").field == "chosen"


def test_unknown_forced_format(tmp_path):
    with pytest.raises(DataError, match="unknown data format `jsonl`.*explicit, implicit"):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}]), data_format="jsonl")


def test_first_error_says_how_many_more(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"text": 1}\n{"text": 2}\n{"text": 3}\n')
    raises(tmp_path / "p.jsonl", r"line 1.*2 more problem\(s\).*data check", loader=load_sft)


def test_read_records_numbers_lines(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"a": 1}\n\n{"b": 2}\n')
    assert read_records(tmp_path / "p.jsonl") == [(1, {"a": 1}), (3, {"b": 2})]


# --------------------------------------------------------------------------- real data

def test_real_hh_file(shared_data):
    pairs = load_preferences(shared_data)
    assert len(pairs) == 2312
    for ex in pairs:
        assert ex.prompt.endswith("\n\nAssistant:") and ex.prompt.startswith("\n\nHuman:")
        assert ex.prompt + ex.chosen != ex.prompt + ex.rejected
    prompts = load_prompts(shared_data)
    assert [p.prompt for p in prompts] == [ex.prompt for ex in pairs]


def test_record_error_is_value_error():
    with pytest.raises(RecordError):
        detect_format({})
