"""Every stage reads every source: dpo (CLI) from a save_to_disk folder with its test split as --eval-data and
mapped columns, sft from Parquet with a CSV eval file, ppo and pairs from prompts in a Hub-layout folder,
score's kind detection on Parquet. Nothing is downloaded."""
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefalign import config as C
from prefalign.label.pairs import run_pairs
from prefalign.stages.ppo import run_ppo
from prefalign.stages.score import file_kind
from prefalign.stages.sft import run_sft
from prefalign.tiny import SAMPLE_TEXTS, save_tiny_model
from prefalign.train.logger import read_metrics
from conftest import run_cli

PAIRS = [{"q": f"The movie {i} was", "a": " great and lovely.", "b": " dull."} for i in range(16)]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    save_tiny_model(d / "base", vocab_size=300)
    return d


@pytest.fixture(autouse=True)
def datasets_cache(fx, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", fx / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(fx / "hf-cache"))


def test_dpo_cli_from_a_saved_dataset_with_its_test_split_as_eval(fx, tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS),
                          "test": datasets.Dataset.from_list(PAIRS[:4])}).save_to_disk(str(tmp_path / "saved"))
    run_cli("dpo", "--model", fx / "base", "--data", tmp_path / "saved", "--eval-data", tmp_path / "saved",
            "--data-columns", "prompt=q,chosen=a,rejected=b", "--output", tmp_path / "out", "--max-steps", 2,
            "--batch-size", 8, "--ref-cache-dir", tmp_path / "cache", "--no-progress",
            env={"HF_DATASETS_CACHE": str(fx / "hf-cache")})
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train_pairs"] == 16 and summary["eval_pairs"] == 4  # --eval-data took the test split
    assert summary["config"]["data_columns"] == {"prompt": "q", "chosen": "a", "rejected": "b"}


def test_sft_from_parquet_with_csv_eval(fx, tmp_path):
    rows = [{"prompt": r["q"], "completion": r["a"]} for r in PAIRS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "eval.csv").write_text("prompt,completion\nThe plot was, thin.\nThe cast was, fine.\n")
    cfg = C.SFTConfig(model=str(fx / "base"), data=str(tmp_path / "train.parquet"), eval_data=str(tmp_path / "eval.csv"),
                      output=str(tmp_path / "out"), max_steps=2, batch_size=8, progress=False)
    run_sft(cfg)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train_examples"] == 16 and summary["eval_examples"] == 2


def hub_prompts(folder):
    (folder / "data").mkdir(parents=True)
    prompts = [{"instruction": t[:12]} for t in SAMPLE_TEXTS[:8]]
    pq.write_table(pa.Table.from_pylist(prompts), folder / "data" / "train-00000-of-00001.parquet")
    return [p["instruction"] for p in prompts]


def test_ppo_and_pairs_from_prompts_in_a_hub_folder(fx, tmp_path):
    expected = hub_prompts(tmp_path / "repo")
    cfg = C.PPOConfig(model=str(fx / "base"), prompts=str(tmp_path / "repo"), data_columns="prompt=instruction",
                      output=str(tmp_path / "ppo"), iterations=1, rollout_batch_size=8, minibatch_size=8,
                      max_new_tokens=3, ppo_epochs=1, progress=False, sample_every=0)
    run_ppo(cfg, reward_fn=lambda prompts, completions, rollout: rollout.response_mask.sum(1).float())
    assert len(read_metrics(tmp_path / "ppo" / "metrics.jsonl")) == 1
    pairs = C.PairsConfig(model=str(fx / "base"), prompts=str(tmp_path / "repo"), data_columns="prompt=instruction",
                          output=str(tmp_path / "pairs.jsonl"), max_new_tokens=3, n_per_prompt=2)
    run_pairs(pairs)
    rows = [json.loads(l) for l in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == expected and all(len(r["completions"]) == 2 for r in rows)


def test_score_detects_the_kind_of_any_source(tmp_path):
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "p.parquet")
    assert file_kind(str(tmp_path / "p.parquet"), columns="prompt=q,chosen=a,rejected=b") == "preference"
    assert file_kind(str(tmp_path / "p.parquet"), columns="prompt=q,completion=a") == "sft"
