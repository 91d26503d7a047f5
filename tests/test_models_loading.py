"""Loading causal LMs and tokenizers: round trips, pad tokens, devices, dtypes, and errors for people."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, T5Config

from prefalign.errors import ModelError
from prefalign.models import (ensure_pad_token, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype,
                              resolve_model_path, save_pretrained)
from prefalign.tiny import save_tiny_model, tiny_llama, tiny_tokenizer, SAMPLE_TEXTS

from conftest import run_cli

TEXT = "The movie was great and the acting was wonderful."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "m"
    save_tiny_model(path)
    return path


def test_load_save_roundtrip_plain_transformers(tiny_dir, tmp_path):
    model, tok = load_causal_lm(str(tiny_dir))
    # SDPA, switched to prefalign_packed: SDPA itself whenever no packed layout is passed
    assert model.dtype == torch.float32 and model.config._attn_implementation == "prefalign_packed"
    x = torch.tensor([tok(TEXT)["input_ids"]])
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir)(x).logits
    torch.testing.assert_close(model(x).logits, reference, rtol=0, atol=0)

    save_pretrained(model, tok, str(tmp_path / "out"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(TEXT)["input_ids"] == x[0].tolist()
    torch.testing.assert_close(again(x).logits, reference, rtol=0, atol=0)


def test_frozen_and_dtype(tiny_dir):
    model, _ = load_causal_lm(str(tiny_dir), dtype="bfloat16", trainable=False, attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "eager"


def test_resolve_device_and_dtype():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no GPU"):
            resolve_device("cuda")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu", trainable=False) == torch.float32
    assert resolve_dtype("auto", "cuda", trainable=True) == torch.float32  # fp32 masters under autocast
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ModelError, match="--dtype"):
        resolve_dtype("fp8")


def _tokenizer_without(*names):
    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)
    for name in names:
        setattr(tok, name, None)
    return tok


def test_pad_token_prefers_unk_then_spare_row_then_eos():
    tok = _tokenizer_without("pad_token")
    assert ensure_pad_token(tok) == "unk" and tok.pad_token == "<unk>"

    tok = _tokenizer_without("pad_token", "unk_token")
    model = tiny_llama(tok)
    model.resize_token_embeddings(len(tok) + 8)  # like checkpoints whose embedding is padded to a multiple
    rows = model.get_input_embeddings().weight.shape[0]
    assert ensure_pad_token(tok, model) == "added"
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == len(tok) - 1 < rows
    assert model.get_input_embeddings().weight.shape[0] == rows  # never resized
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id

    tok = _tokenizer_without("pad_token", "unk_token")
    model = tiny_llama(tok)  # no spare row: EOS it is, and the model agrees
    assert ensure_pad_token(tok, model) == "eos"
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id

    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)
    assert ensure_pad_token(tok) == "existing" and tok.pad_token == "<pad>"


def test_load_tokenizer_sets_pad(tmp_path):
    tok = _tokenizer_without("pad_token", "unk_token")
    model = tiny_llama(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).pad_token == "</s>"


def test_errors_name_the_path_and_the_fix(tiny_dir, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no model given"):
        resolve_model_path(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty has no config.json"):
        load_causal_lm(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file, not a model"):
        load_causal_lm(str(tmp_path / "weights.bin"))

    no_tok = tmp_path / "no_tok"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(no_tok)
    with pytest.raises(ModelError, match="no_tok has no tokenizer files"):
        load_causal_lm(str(no_tok))

    t5 = tmp_path / "t5"
    T5Config(vocab_size=50, d_model=8, num_layers=1, num_heads=2, d_ff=8).save_pretrained(t5)
    with pytest.raises(ModelError, match="not a causal"):
        load_causal_lm(str(t5))


def test_reward_model_is_not_a_policy(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "config.json").read_text())
    reward = tmp_path / "rm"
    reward.mkdir()
    (reward / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(ModelError, match="reward/value model"):
        load_causal_lm(str(reward))


def test_mismatched_tokenizer(tiny_dir, tmp_path):
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path)
    tiny_tokenizer(SAMPLE_TEXTS, vocab_size=450).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="does not belong"):
        load_causal_lm(str(tmp_path))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not a local directory.*Hub"):
        load_causal_lm("no-such-org/no-such-model-xyz")


def test_cli_convert_error_has_no_traceback(tmp_path):
    proc = run_cli("models", "convert", "--file", tmp_path / "missing.gguf", "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2
    assert "missing.gguf does not exist" in proc.stderr and "Traceback" not in proc.stderr
