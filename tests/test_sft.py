"""prefalign sft: learning, EOS, packing == padding, CLI with YAML."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.data import encode_prompt_completion, encode_text
from prefalign.stages.batching import collate_packed_rows, collate_padded
from prefalign.stages.sft import SFTObjective
from prefalign.tiny import save_tiny_model, tiny_llama, tiny_tokenizer, SAMPLE_TEXTS
from conftest import run_cli

PAIRS = [("The movie was", " great and the cast was wonderful."),
         ("Honestly the plot", " was boring and weak."),
         ("I loved the", " music and the story."),
         ("The ending felt", " dull but lovely.")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)


def test_packed_loss_equals_padded(tok):
    model = tiny_llama(tok, seed=2)
    seqs = [encode_prompt_completion(tok, p, c, 64) for p, c in PAIRS] + [encode_text(tok, SAMPLE_TEXTS[4], 64)]
    obj = SFTObjective()
    padded = collate_padded(seqs, tok.pad_token_id)
    packed = collate_packed_rows([seqs[:3], seqs[3:]], tok.pad_token_id)  # two rows, right-padded
    assert obj.units(padded) == obj.units(packed)
    lp, lk = obj(model, padded), obj(model, packed)
    torch.testing.assert_close(lk.loss, lp.loss, rtol=1e-5, atol=1e-5)
    gp = torch.autograd.grad(lp.loss, list(model.parameters()))
    gk = torch.autograd.grad(obj(model, packed).loss, list(model.parameters()))
    for a, b in zip(gp, gk):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_prompt_tokens_do_not_count(tok):
    seqs = [encode_prompt_completion(tok, p, c, 64) for p, c in PAIRS]
    batch = collate_padded(seqs, tok.pad_token_id)
    completion_tokens = sum(len(s.input_ids) - s.prompt_len for s in seqs)
    assert SFTObjective().units(batch) == completion_tokens


def test_sft_cli_learns_and_emits_eos(tmp_path, tok):
    save_tiny_model(tmp_path / "base", hidden=48, layers=2)
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS] * 8
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    (tmp_path / "sft.yaml").write_text("lr: 0.01\nbatch-size: 8\nmax_steps: 40\nlogging_steps: 5\nwarmup_steps: 2\n")
    run_cli("sft", "--model", tmp_path / "base", "--data", tmp_path / "train.jsonl", "--eval-data",
            tmp_path / "eval.jsonl", "--output", tmp_path / "out", "--config", tmp_path / "sft.yaml",
            "--eval-steps", "20", "--no-progress")
    out = tmp_path / "out"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 5 and rows[-1]["step"] == 40
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < 0.5 * rows[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lr"] == 0.01 and summary["steps"] == 40 and "versions" in summary
    model = AutoModelForCausalLM.from_pretrained(out)
    t = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([t(PAIRS[0][0])["input_ids"]])
    gen = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=t.pad_token_id)[0, ids.shape[1]:]
    assert t.eos_token_id in gen.tolist()
    assert t.decode(gen, skip_special_tokens=True).strip() == PAIRS[0][1].strip()


def test_sft_packing_cli(tmp_path):
    save_tiny_model(tmp_path / "base")
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in SAMPLE_TEXTS])
    run_cli("sft", "--model", tmp_path / "base", "--data", tmp_path / "train.jsonl", "--output", tmp_path / "out",
            "--packing", "--max-length", "64", "--batch-size", "2", "--max-steps", "3", "--no-progress")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train_rows"] < summary["train_examples"]


def test_existing_output_needs_resume(tmp_path):
    save_tiny_model(tmp_path / "base")
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in SAMPLE_TEXTS])
    args = ["sft", "--model", tmp_path / "base", "--data", tmp_path / "train.jsonl", "--output", tmp_path / "out",
            "--max-steps", "1", "--no-progress"]
    run_cli(*args)
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr
