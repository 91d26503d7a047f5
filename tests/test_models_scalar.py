"""Scalar-head reward/value models: the score is read at the last real token, whatever the padding."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from prefalign.errors import ModelError
from prefalign.models import ScalarModel, load_scalar_model, save_pretrained
from prefalign.models.scalar import last_token_index, segment_last_index
from prefalign.tiny import save_tiny_model

TEXTS = ["The movie was great.", "Boring plot, weak ending and dull script overall.", "I loved it"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "m"
    save_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def scalar(tiny_dir):
    model, tok = load_scalar_model(str(tiny_dir), seed=3)
    return model, tok


def _ids(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


def _pad(seqs, pad_id, side):
    """input_ids (B, T) and attention_mask (B, T) bool for one padding side."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl], mask[i, sl] = torch.tensor(s), True
    return ids, mask


def test_index_helpers():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [1, 3, 3]
    segments = torch.tensor([0, 0, 1, 2, 2, 2, -1, -1])
    assert segment_last_index(segments, 3).tolist() == [1, 2, 5]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[False, False]]))


@torch.no_grad()
def test_left_and_right_padding_agree_with_unpadded(scalar):
    model, tok = scalar
    seqs = _ids(tok)
    alone = torch.stack([model(torch.tensor([s]))[0] for s in seqs])  # (B,)
    for side in ("right", "left"):
        ids, mask = _pad(seqs, tok.pad_token_id, side)
        torch.testing.assert_close(model(ids, mask), alone, rtol=0, atol=1e-5)
    assert alone.std() > 1e-3  # the rows really score differently


@torch.no_grad()
def test_pad_equal_to_eos_does_not_move_the_score(scalar):
    """Completions end with EOS and padding uses EOS too: transformers' pad-id rule would read the
    first EOS; the mask-based rule reads the real last token (the EOS that ends the text)."""
    model, tok = scalar
    seqs = [s + [tok.eos_token_id] for s in _ids(tok)]
    alone = torch.stack([model(torch.tensor([s]))[0] for s in seqs])
    ids, mask = _pad(seqs, tok.eos_token_id, "right")
    torch.testing.assert_close(model(ids, mask), alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_scores_equal_per_sequence_scores(tiny_dir, attn):
    model = ScalarModel.from_causal_lm(str(tiny_dir), attn_implementation=attn, seed=1)
    from prefalign.models import load_tokenizer
    tok = load_tokenizer(str(tiny_dir))
    seqs = _ids(tok)
    alone = torch.stack([model(torch.tensor([s]))[0] for s in seqs])
    ids = torch.tensor([sum(seqs, []) + [tok.pad_token_id] * 2])
    positions = torch.tensor([sum((list(range(len(s))) for s in seqs), []) + [0, 0]])
    segments = torch.tensor([sum(([i] * len(s) for i, s in enumerate(seqs)), []) + [-1, -1]])
    packed = model(ids, position_ids=positions, segment_ids=segments, n_segments=len(seqs))
    assert packed.shape == (len(seqs),)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_packed_rows_with_global_segment_ids(scalar):
    """Several packed rows at once: segment ids are global, scores come back in id order."""
    model, tok = scalar
    seqs = _ids(tok)
    alone = torch.stack([model(torch.tensor([s]))[0] for s in seqs])
    rows = [[2, 0], [1]]  # row 0 holds sequences 2 then 0, row 1 holds sequence 1
    T = max(sum(len(seqs[i]) for i in r) for r in rows)
    ids = torch.full((2, T), tok.pad_token_id)
    positions = torch.zeros(2, T, dtype=torch.long)
    segments = torch.full((2, T), -1)
    for r, members in enumerate(rows):
        t = 0
        for i in members:
            n = len(seqs[i])
            ids[r, t:t + n], positions[r, t:t + n], segments[r, t:t + n] = torch.tensor(seqs[i]), torch.arange(n), i
            t += n
    packed = model(ids, position_ids=positions, segment_ids=segments, n_segments=len(seqs))
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_from_causal_lm_copies_backbone_and_seeds_head(tiny_dir):
    a = ScalarModel.from_causal_lm(str(tiny_dir), seed=7)
    b = ScalarModel.from_causal_lm(str(tiny_dir), seed=7)
    c = ScalarModel.from_causal_lm(str(tiny_dir), seed=8)
    torch.testing.assert_close(a.head.weight, b.head.weight, rtol=0, atol=0)
    assert not torch.equal(a.head.weight, c.head.weight)
    H = a.head.weight.shape[1]
    assert a.head.weight.shape == (1, H) and abs(a.head.weight.std().item() - (H + 1) ** -0.5) < 0.5 * (H + 1) ** -0.5
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.testing.assert_close(a.backbone.layers[1].mlp.down_proj.weight, lm.model.layers[1].mlp.down_proj.weight,
                               rtol=0, atol=0)


def test_save_load_keeps_normalization_and_plain_transformers_agrees(scalar, tmp_path):
    model, tok = scalar
    assert (model.shift, model.scale) == (0.0, 1.0)
    model.set_normalization(0.25, 2.0)
    try:
        save_pretrained(model, tok, str(tmp_path))
    finally:
        model.set_normalization(0.0, 1.0)
    loaded, tok2 = load_scalar_model(str(tmp_path))
    assert (loaded.shift, loaded.scale) == (0.25, 2.0)
    raw = torch.tensor([1.25, -0.75])
    torch.testing.assert_close(loaded.normalized(raw), torch.tensor([0.5, -0.5]))

    assert tok.pad_token_id != tok.eos_token_id
    ids, mask = _pad(_ids(tok), tok.pad_token_id, "right")
    with torch.no_grad():
        ours = loaded(ids, mask)
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)(input_ids=ids, attention_mask=mask.long())
    assert plain.logits.shape == (3, 1)
    torch.testing.assert_close(plain.logits[:, 0], ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(ids, mask).detach(), ours, rtol=0, atol=1e-6)


def test_set_normalization_validates(scalar):
    with pytest.raises(ValueError, match="positive scale"):
        scalar[0].set_normalization(0.0, 0.0)


def test_from_pretrained_rejects_a_causal_lm(tiny_dir):
    with pytest.raises(ModelError, match="not a reward/value model"):
        ScalarModel.from_pretrained(str(tiny_dir))


@torch.no_grad()
def test_absolute_position_model_left_padding(tmp_path):
    """GPT-2 learns absolute positions, so left padding only agrees because position_ids count real tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefalign.models import load_tokenizer
    from prefalign.tiny import SAMPLE_TEXTS, tiny_tokenizer

    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = ScalarModel.from_causal_lm(str(tmp_path), seed=0)
    seqs = _ids(load_tokenizer(str(tmp_path)))
    alone = torch.stack([model(torch.tensor([s]))[0] for s in seqs])
    ids, mask = _pad(seqs, tok.pad_token_id, "left")
    torch.testing.assert_close(model(ids, mask), alone, rtol=0, atol=1e-5)
    arange = torch.arange(ids.shape[1]).expand_as(ids)
    assert not torch.allclose(model(ids, mask, position_ids=arange), alone, atol=1e-3)
