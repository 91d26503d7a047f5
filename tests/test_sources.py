"""Every data source gives the same records: JSONL, JSON arrays, Parquet, CSV, `save_to_disk` folders,
folders laid out like a Hub dataset repo, and Hub ids read from the datasets cache while offline. Column
mapping, split and config choice, and errors that name the source, the row and the field.

Each source is built in a temporary folder; nothing is downloaded (HF_HUB_OFFLINE=1, conftest)."""
import csv
import json
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefalign import config as C
from prefalign.data import load_preferences, load_prompts, load_sft, open_source, source_digest
from prefalign.data.audit import audit
from prefalign.errors import ConfigError, DataError
from conftest import run_cli

PAIRS = [{"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "margin": 1.0},
         {"prompt": "The movie was", "chosen": " great.", "rejected": " dull.", "margin": None},
         {"prompt": "1,2,3,", "chosen": " 4", "rejected": " 7", "margin": 0.5}]
THEIRS = [{"question": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"], "id": i}
          for i, r in enumerate(PAIRS)]
MAPPING = "prompt=question,chosen=response_a,rejected=response_b"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """The datasets library writes its Arrow cache here, never into ~/.cache."""
    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------- building each kind of source

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_array(path, rows):
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return path


def write_saved(path, rows):
    """`datasets` save_to_disk of a DatasetDict with a train and a test split."""
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(path))
    return path


def write_hub_folder(path, rows):
    """A folder laid out like a Hub dataset repo: data/{split}-00000-of-00001.parquet."""
    (path / "data").mkdir(parents=True)
    write_parquet(path / "data" / "train-00000-of-00001.parquet", rows)
    write_parquet(path / "data" / "test-00000-of-00001.parquet", rows[:1])
    (path / "README.md").write_text("---\nlicense: mit\n---\n# A dataset\n")
    return path


def cache_hub_dataset(tmp_path, cache, repo, rows):
    """What an earlier online `load_dataset(repo)` leaves in the datasets cache: the Arrow tables under
    org___name/default/0.0.0/<hash>/ with dataset_info.json. Built here from a local folder named like
    the dataset, by the same builder code."""
    name = repo.split("/")[1]
    folder = write_hub_folder(tmp_path / "hub-src" / name, rows)
    builder = datasets.load_dataset_builder(str(folder))
    builder.download_and_prepare(output_dir=str(cache / repo.replace("/", "___") / "default" / "0.0.0" / "0a1b2c3d"))
    return repo


KINDS = {
    "jsonl": lambda d, rows: write_jsonl(d / "p.jsonl", rows),
    "json": lambda d, rows: write_array(d / "p.json", rows),
    "parquet": lambda d, rows: write_parquet(d / "p.parquet", rows),
    "csv": lambda d, rows: write_csv(d / "p.csv", rows),
    "saved": lambda d, rows: write_saved(d / "saved", rows),
    "hub-folder": lambda d, rows: write_hub_folder(d / "hub-folder", rows),
    "hub-id": lambda d, rows: cache_hub_dataset(d, datasets.config.HF_DATASETS_CACHE, "someorg/prefs", rows),
}
LABELS = {"jsonl": "p.jsonl", "json": "p.json", "parquet": "p.parquet", "csv": "p.csv",
          "saved": "saved (split train)", "hub-folder": "hub-folder (split train)",
          "hub-id": "someorg/prefs (split train)"}


def fields(examples):
    return [(e.prompt, e.chosen, e.rejected, e.margin) for e in examples]


# --------------------------------------------------------------------------- the same records from every source

@pytest.mark.parametrize("kind", KINDS)
def test_every_source_gives_the_jsonl_examples(tmp_path, kind):
    source = KINDS[kind](tmp_path, PAIRS)
    expected = fields(load_preferences(write_jsonl(tmp_path / "twin.jsonl", PAIRS)))
    got = load_preferences(str(source))
    assert fields(got) == expected
    assert got[1].source.endswith(LABELS[kind] + (":2" if kind == "jsonl" else "[1]"))
    # Loaded as prompts and as SFT examples (prompt + chosen) too.
    assert [p.prompt for p in load_prompts(str(source))] == [r["prompt"] for r in PAIRS]
    assert [(e.prompt, e.completion) for e in load_sft(str(source))] == [(r["prompt"], r["chosen"]) for r in PAIRS]


@pytest.mark.parametrize("kind", KINDS)
def test_columns_are_mapped_on_every_source(tmp_path, kind):
    source = KINDS[kind](tmp_path, THEIRS)
    got = load_preferences(str(source), columns=MAPPING)
    assert [(e.prompt, e.chosen, e.rejected) for e in got] == [(r["prompt"], r["chosen"], r["rejected"]) for r in PAIRS]
    with pytest.raises(DataError, match="no known format fits keys"):
        load_preferences(str(source))  # unmapped, the same rows fit no format


@pytest.mark.parametrize("kind", ["parquet", "saved", "hub-folder", "hub-id"])
def test_a_table_without_a_mapped_column_is_one_error(tmp_path, kind):
    source = KINDS[kind](tmp_path, THEIRS)
    with pytest.raises(DataError, match=r"--data-columns chosen=answer: no such column; the columns are "
                                        r"id, question, response_a, response_b"):
        load_preferences(str(source), columns="prompt=question,chosen=answer,rejected=response_b")


def test_a_json_record_without_a_mapped_key_is_an_error_for_that_record(tmp_path):
    rows = THEIRS[:1] + [{"question": "q", "response_b": "b"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2, field `response_a`: has no key for --data-columns chosen=response_a"):
        load_preferences(path, columns=MAPPING)


@pytest.mark.parametrize("kind", ["parquet", "saved", "hub-folder", "hub-id"])
def test_errors_name_the_source_the_row_and_the_field(tmp_path, kind):
    rows = [PAIRS[0], {**PAIRS[1], "rejected": None}, PAIRS[2]]
    source = KINDS[kind](tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_preferences(str(source))
    assert f"{LABELS[kind]}, row 1, field `rejected`: must be a string, got null" in str(err.value)
    report = audit(str(source))
    assert not report["usable"] and report["numbered_by"] == "row" and report["errors"]["count"] == 1


def test_csv_cells_are_text_and_margins_numbers(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,chosen,rejected,margin\n2+2=, 4, 5,1.5\n"a, quoted\nprompt",7,8,\n')
    got = load_preferences(path)
    assert fields(got) == [("2+2=", " 4", " 5", 1.5), ("a, quoted\nprompt", "7", "8", None)]
    path.write_text("prompt,chosen,rejected\np,c,r\np,c,r,extra\np,,r\n")
    report = audit(path)
    assert report["errors"]["first"] == [
        f"{path}, row 1: has 4 cells but the header names 3 columns; quote cells that hold commas.",
        f"{path}, row 2, field `chosen`: is empty; every text field needs some text (drop the record or fill it "
        "in) (format `explicit`)."]
    path.write_text("prompt,chosen,rejected,margin\np,c,r,high\n")
    with pytest.raises(DataError, match=r"row 0, field `margin`: must be a finite number"):
        load_preferences(path)
    path.write_text("question,response_a,response_b,score\np,c,r,2.5\n")  # a mapped margin is a number too
    assert fields(load_preferences(path, columns=MAPPING + ",margin=score")) == [("p", "c", "r", 2.5)]


def test_chat_messages_in_parquet(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}] * 2
    report = audit(write_parquet(tmp_path / "chat.parquet", rows))
    assert report["formats"] == {"conversational": 2} and report["usable"] and report["container"] == "Parquet"
    assert load_preferences(tmp_path / "chat.parquet")[0].chosen == [{"role": "assistant", "content": "Hello!"}]


# --------------------------------------------------------------------------- splits and configurations

def test_split_choice(tmp_path):
    saved = write_saved(tmp_path / "saved", PAIRS)
    assert len(load_preferences(saved)) == 3                       # train by default
    assert len(load_preferences(saved, split="test")) == 1
    assert len(load_preferences(saved, prefer=("test", "validation"))) == 1   # what --eval-data prefers
    with pytest.raises(DataError, match=r"saved: has no split `dev`; its splits are: train, test"):
        load_preferences(saved, split="dev")
    datasets.DatasetDict({"a": datasets.Dataset.from_list(PAIRS),
                          "b": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="has splits a, b; choose one with --data-split"):
        load_preferences(tmp_path / "two")
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "one"))
    assert fields(load_preferences(tmp_path / "one")) == fields(load_preferences(saved))
    with pytest.raises(DataError, match="one dataset without splits; drop --data-split test"):
        load_preferences(tmp_path / "one", split="test")


def test_hub_folder_configurations(tmp_path):
    d = tmp_path / "repo"
    write_parquet((d / "pairs").mkdir(parents=True) or d / "pairs" / "train.parquet", PAIRS)
    write_parquet((d / "prompts").mkdir() or d / "prompts" / "train.parquet", [{"prompt": "Hi"}, {"prompt": "Yo"}])
    (d / "README.md").write_text("---\nconfigs:\n- config_name: pairs\n  data_files: pairs/*.parquet\n"
                                 "- config_name: prompts\n  data_files: prompts/*.parquet\n---\n")
    assert len(load_preferences(d, config="pairs")) == 3
    assert [p.prompt for p in load_prompts(d, config="prompts")] == ["Hi", "Yo"]
    with pytest.raises(DataError, match=r"BuilderConfig 'nope' not found. Available: \['pairs', 'prompts'\]"):
        load_prompts(d, config="nope")


def test_hub_id_from_the_cache_and_its_configuration(tmp_path, datasets_cache):
    cache_hub_dataset(tmp_path, datasets_cache, "someorg/prefs", PAIRS)
    assert len(load_preferences("someorg/prefs", split="test")) == 1
    with pytest.raises(DataError, match="Couldn't find cache for someorg/prefs for config 'other'"):
        load_preferences("someorg/prefs", config="other")


def test_hub_id_not_cached_offline_is_one_clear_error(tmp_path, datasets_cache):
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_preferences("someorg/not-cached")
    assert time.perf_counter() - t0 < 30  # offline: no retries against an unreachable Hub
    msg = str(err.value)
    assert msg.startswith("someorg/not-cached: is not a local file or folder") and "not in the datasets cache" in msg
    assert "HF_HUB_OFFLINE=1" in msg and str(datasets_cache) in msg
    # A path that looks like a file is a missing file, not a Hub id.
    with pytest.raises(DataError, match="data/prefs.jsonl: file does not exist"):
        load_preferences("data/prefs.jsonl")


# --------------------------------------------------------------------------- folders that are not datasets

def test_folders_that_hold_no_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a directory with no data files"):
        load_preferences(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    write_jsonl(bad / "train.jsonl", PAIRS[:2])
    (bad / "train.jsonl").write_text((bad / "train.jsonl").read_text() + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=r"bad/train.jsonl, line 3: is not valid JSON"):
        load_preferences(bad)  # the datasets library's parse error, traced to the file and line
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="garbage.parquet: is not a readable Parquet file"):
        load_preferences(tmp_path / "garbage.parquet")


def test_source_digest(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    import hashlib
    assert source_digest(a) == hashlib.sha256(a.read_bytes()).hexdigest()  # the digest DPO's cache used before
    folder = write_hub_folder(tmp_path / "f", PAIRS)
    before = source_digest(folder)
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", PAIRS[:2])
    assert source_digest(folder) != before
    assert source_digest("org/x", split="train") != source_digest("org/x", split="test")


def test_open_source_rows_are_numbered_like_the_source(tmp_path):
    src = open_source(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    assert (src.container, src.numbered_by, [n for n, _ in src.rows]) == ("JSONL", "line", [1, 2, 3])
    src = open_source(write_parquet(tmp_path / "p.parquet", PAIRS))
    assert (src.container, src.numbered_by, [n for n, _ in src.rows]) == ("Parquet", "row", [0, 1, 2])


# --------------------------------------------------------------------------- options

def test_data_columns_option_from_cli_and_yaml(tmp_path):
    cfg = C.parse_config(C.DPOConfig, ["--data-columns", "chosen=response_a, rejected=response_b"])
    assert cfg.data_columns == {"chosen": "response_a", "rejected": "response_b"}
    (tmp_path / "c.yaml").write_text("data-columns:\n  prompt: question\n  chosen: response_a\ndata_split: test\n")
    cfg = C.parse_config(C.DataCheckConfig, ["--config", str(tmp_path / "c.yaml")])
    assert cfg.data_columns == {"prompt": "question", "chosen": "response_a"} and cfg.data_split == "test"
    with pytest.raises(ConfigError, match=r"`chosn` is not a field prefalign reads \(did you mean `chosen`\?\)"):
        C.parse_config(C.SFTConfig, ["--data-columns", "chosn=a"])
    with pytest.raises(ConfigError, match="OURS=THEIRS"):
        C.parse_config(C.PPOConfig, ["--data-columns", "prompt"])
    for cls in (C.SFTConfig, C.RewardConfig, C.DPOConfig, C.PPOConfig, C.ScoreConfig, C.PairsConfig,
                C.DataCheckConfig):
        assert {"data_split", "data_config", "data_revision", "data_columns"} <= set(C.fields_of(cls)), cls


def test_data_check_cli_on_sources(tmp_path, datasets_cache):
    env = {"HF_DATASETS_CACHE": str(datasets_cache)}
    folder = write_hub_folder(tmp_path / "repo", THEIRS)
    proc = run_cli("data", "check", "--data", folder, "--data-columns", MAPPING, "--data-split", "test", "--json",
                   env=env)
    report = json.loads(proc.stdout)
    assert report["path"] == f"{folder} (split test)" and report["container"] == "dataset folder"
    assert report["formats"] == {"explicit": 1} and report["usable"] and report["numbered_by"] == "row"
    proc = run_cli("data", "check", "--data", write_parquet(tmp_path / "p.parquet", PAIRS), env=env)
    assert "records: 3 (Parquet); usable: 3" in proc.stdout and "verdict: usable" in proc.stdout
    t0 = time.perf_counter()
    proc = run_cli("data", "check", "--data", "someorg/not-cached", check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "not in the datasets cache" in proc.stdout and time.perf_counter() - t0 < 60
