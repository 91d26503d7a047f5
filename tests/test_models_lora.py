"""LoRA: the disabled adapter is exactly the base model, before and after training; saving merges
(and writes the adapter: tests/test_lora_outputs.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

pytest.importorskip("peft")

from prefalign.errors import ModelError
from prefalign.models import (ScalarModel, apply_lora, default_lora_targets, disabled_adapter, is_peft_model,
                              load_causal_lm, save_pretrained)
from prefalign.tiny import save_tiny_model

LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "m"
    save_tiny_model(path)
    return path


def _batch(tok):
    return torch.tensor([tok("The movie was great and the acting was wonderful.")["input_ids"]])


def _train_step(model, x, lr=1e-2):
    """One SGD step on the LM loss; returns the number of parameters that were trained."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = model(x, labels=x).loss if not isinstance(model, ScalarModel) else model(x).square().sum()
    loss.backward()
    with torch.no_grad():
        for p in trainable:
            p -= lr * p.grad
    return len(trainable)


def test_default_targets_are_attention_and_mlp_linears(tiny_dir):
    model, _ = load_causal_lm(str(tiny_dir))
    assert default_lora_targets(model) == LLAMA_TARGETS


def test_disabled_adapter_is_the_base_model_before_and_after_training(tiny_dir):
    model, tok = load_causal_lm(str(tiny_dir))
    x = _batch(tok)
    with torch.no_grad():
        base = model(x).logits
    model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad(), disabled_adapter(model):
        torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)
    assert _train_step(model, x) == 2 * 2 * len(LLAMA_TARGETS)  # A and B per target per layer
    with torch.no_grad():
        enabled = model(x).logits
        with disabled_adapter(model):
            disabled = model(x).logits
    assert (enabled - base).abs().max() > 1e-4
    torch.testing.assert_close(disabled, base, rtol=0, atol=0)


def test_save_merges_adapters_into_a_plain_checkpoint(tiny_dir, tmp_path):
    model, tok = load_causal_lm(str(tiny_dir))
    x = _batch(tok)
    model = apply_lora(model, r=4, alpha=8, target_modules="q_proj, v_proj")
    _train_step(model, x)
    save_pretrained(model, tok, str(tmp_path))  # merged, and the adapter in tmp_path/adapter
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not any("lora" in k for k in json.loads((tmp_path / "config.json").read_text()))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=0, atol=1e-5)
    assert any("lora" in name for name, _ in model.named_parameters())  # the training model is untouched


def test_scalar_model_lora_trains_the_head_and_saves_plain(tiny_dir, tmp_path):
    model = apply_lora(ScalarModel.from_causal_lm(str(tiny_dir)), r=4, alpha=8)
    assert isinstance(model, ScalarModel)
    _, tok = load_causal_lm(str(tiny_dir))
    x = _batch(tok)
    with torch.no_grad():
        before = model(x)
    head_before = model.head.weight.detach().clone()
    _train_step(model, x)
    assert not torch.equal(model.head.weight, head_before)
    with torch.no_grad(), disabled_adapter(model):
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    save_pretrained(model, tok, str(tmp_path))
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits[:, 0], model(x), rtol=0, atol=1e-5)


def test_lora_errors(tiny_dir, monkeypatch):
    model, _ = load_causal_lm(str(tiny_dir))
    with pytest.raises(ModelError, match="qkv_proj.*its linear layers are down_proj"):
        apply_lora(model, r=4, alpha=8, target_modules="qkv_proj")
    with pytest.raises(ModelError, match="no copy|without LoRA"):
        with disabled_adapter(model):
            pass
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ModelError, match=r"pip install 'prefalign\[peft\]'"):
        apply_lora(model, r=4, alpha=8)


def test_lora_with_gradient_checkpointing(tiny_dir):
    model, tok = load_causal_lm(str(tiny_dir))
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model = apply_lora(model, r=4, alpha=8)
    model.train()
    x = _batch(tok)
    _train_step(model, x)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if p.requires_grad and "lora_B" in n)
    assert model.get_base_model().model.layers[0].gradient_checkpointing


def test_is_peft_model_without_and_with_peft(tiny_dir):
    """A process that never imported peft holds no PeftModel: the check answers without importing it
    (a run without LoRA skips peft's import); once peft is in, wrapped models are recognised."""
    code = ("import sys, torch; from prefalign.models import is_peft_model; "
            "assert not is_peft_model(torch.nn.Linear(2, 2)); assert 'peft' not in sys.modules; print('ok')")
    src = Path(__file__).resolve().parents[1] / "src"  # this tree's prefalign, as conftest.py puts first
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(src)})
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    model, _ = load_causal_lm(str(tiny_dir))
    assert not is_peft_model(model)
    assert is_peft_model(apply_lora(model, 2, 4, 0.0, None))
