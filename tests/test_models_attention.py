"""prefalign_packed attention: packed rows computed example by example equal each example run alone,
and without a layout the switched model is transformers' SDPA model bit for bit."""
import json

import pytest
import torch

from prefalign.models.attention import NAME, build_layout, packed_kwargs, use_packed_attention
from prefalign.models.scalar import ScalarModel
from prefalign.stages.batching import collate_packed_rows
from prefalign.data import Tokenized


def tiny_model(kind="llama", kv_heads=2, sliding_window=None, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(seed)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def sequences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Tokenized(input_ids=torch.randint(3, 97, (n,), generator=g).tolist(), prompt_len=0)
            for n in lengths]


# rows of uneven length (right padding), examples from 1 to 40 tokens: several length buckets
ROWS = [[40, 3, 9], [17, 1, 12, 5], [26]]


def packed(rows):
    seqs = [sequences(r, seed=i) for i, r in enumerate(rows)]
    return seqs, collate_packed_rows(seqs, pad_id=0)


def alone_logits(model, seq):
    ids = torch.tensor([seq.input_ids], device=model.device)
    return model(input_ids=ids, use_cache=False).logits[0]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kv_heads, device, tol", [(4, "cpu", 1e-5), (2, "cpu", 1e-5),  # MHA and GQA
                                                   pytest.param(2, "cuda", 1e-4, marks=CUDA)])
def test_packed_rows_equal_each_example_alone(kv_heads, device, tol):
    model = tiny_model(kv_heads=kv_heads).to(device)
    seqs, batch = packed(ROWS)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    want = [[alone_logits(model, s) for s in row] for row in seqs]
    assert use_packed_attention(model) and model.config._attn_implementation == NAME
    kwargs = packed_kwargs(model, batch["segment_ids"])
    assert len(kwargs) == 1 and len(next(iter(kwargs.values())).buckets) > 1
    got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **kwargs).logits
    for r, row in enumerate(seqs):
        start = 0
        for s, w in zip(row, want[r]):
            n = len(s.input_ids)
            torch.testing.assert_close(got[r, start:start + n], w, rtol=tol, atol=tol)
            start += n


def test_packed_gradients_equal_sdpa_with_the_block_mask():
    ref, ours = tiny_model(kv_heads=2), tiny_model(kv_heads=2)
    use_packed_attention(ours)
    _, batch = packed(ROWS)
    real = batch["segment_ids"] >= 0
    for model, extra in ((ref, {}), (ours, packed_kwargs(ours, batch["segment_ids"]))):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra).logits
        (logits.logsumexp(-1) * real).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_without_a_layout_the_model_is_sdpa_bit_for_bit():
    ref, ours = tiny_model(), tiny_model()
    use_packed_attention(ours)
    ids = torch.randint(3, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)
    _, batch = packed(ROWS)  # packed rows without a layout: transformers' block-diagonal mask
    args = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    assert torch.equal(ours(**args).logits, ref(**args).logits)
    gen = dict(input_ids=ids[1:], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**gen), ref.generate(**gen))


def test_sliding_window_models_are_not_switched():
    """Mistral with a 4-token window keeps SDPA and transformers' windowed block mask."""
    ours = tiny_model("mistral", sliding_window=4)
    assert not use_packed_attention(ours) and ours.config._attn_implementation == "sdpa"
    assert packed_kwargs(ours, torch.zeros(1, 3, dtype=torch.long)) == {}
    full = tiny_model("mistral", sliding_window=None)
    assert use_packed_attention(full)  # no window: plain causal attention, switched


def test_layout_ignored_on_a_batch_of_padding_only():
    ref, ours = tiny_model(), tiny_model()
    use_packed_attention(ours)
    ids = torch.zeros(2, 5, dtype=torch.long)
    args = dict(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False)
    layout = packed_kwargs(ours, torch.full((2, 5), -1))
    assert torch.equal(ours(**args, **layout).logits, ref(**args).logits)


def test_layout_places_every_real_token_once():
    seg = torch.tensor([[0, 0, 0, 1, 2, 2, -1], [0, 0, 0, 0, 0, 0, 0], [3, 3, 5, -1, -1, -1, -1]])
    layout = build_layout(seg, bucket_ratio=0.5)
    assert sorted(layout.targets.tolist()) == torch.nonzero(seg.flatten() >= 0).squeeze(1).tolist()
    assert [tuple(ix.shape) for ix, _, _ in layout.buckets] == [(1, 7), (3, 3), (2, 1)]  # 7 | 3, 2, 2 | 1, 1
    for index, valid, write in layout.buckets:
        assert torch.equal(valid, write)
        for row_index, row_valid in zip(index, valid):
            pos = row_index[row_valid]
            assert len(set(seg.flatten()[pos].tolist())) == 1 and torch.all(pos.diff() == 1)  # one example, in order


def test_saved_model_loads_as_plain_sdpa(tmp_path):
    from transformers import AutoModelForCausalLM
    model = tiny_model()
    use_packed_attention(model)
    model.save_pretrained(tmp_path)
    assert "prefalign" not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_other_implementations_are_left_alone():
    from transformers import LlamaConfig, LlamaForCausalLM
    eager = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attn_implementation="eager"))
    assert not use_packed_attention(eager) and eager.config._attn_implementation == "eager"
    assert packed_kwargs(eager, torch.zeros(1, 3, dtype=torch.long)) == {}


def test_scalar_model_packed_scores_equal_padded():
    hf_lm = tiny_model(kv_heads=2)
    from transformers import LlamaForSequenceClassification
    cfg = hf_lm.config
    cfg.num_labels, cfg.pad_token_id = 1, 0
    torch.manual_seed(3)
    model = ScalarModel(LlamaForSequenceClassification(cfg)).eval()
    seqs = sequences([30, 4, 11, 19, 7], seed=5)
    want = torch.stack([model(input_ids=torch.tensor([s.input_ids]))[0] for s in seqs])
    assert use_packed_attention(model)
    from prefalign.stages.batching import collate_packed_flat
    batch = collate_packed_flat(seqs, pad_id=0, max_tokens=40)
    got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
                n_segments=batch["n_segments"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layout_with_a_shared_prompt():
    """Row 0 holds prompt (3 tokens) + chosen (2) as segment 0 and the rejected completion (2) as
    segment 1, which also attends to the prompt; only its own outputs are written back."""
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, -1]])
    shared = torch.tensor([[0, 0, 3, 5, 1]])  # row, prompt start, prompt length, first rejected column, segment
    layout = build_layout(seg, shared)
    assert layout.shared and sorted(layout.targets.tolist()) == [0, 1, 2, 3, 4, 5, 6]
    examples = {tuple(ix[v].tolist()): ix[w].tolist() for index, valid, write in layout.buckets
                for ix, v, w in zip(index, valid, write)}
    assert examples == {(0, 1, 2, 3, 4): [0, 1, 2, 3, 4], (0, 1, 2, 5, 6): [5, 6]}
