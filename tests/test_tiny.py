"""The in-process tiny models the rest of the suite relies on."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.tiny import save_tiny_model


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_tiny_model_roundtrip(tmp_path, kind):
    model, tok = save_tiny_model(tmp_path / "m", kind=kind)
    ids = tok("The movie was great.")["input_ids"]
    assert tok.decode(ids) == "The movie was great."
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok2("The movie was great.")["input_ids"] == ids
    x = torch.tensor([ids])
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
