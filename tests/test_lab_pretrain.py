"""Tokenizer and prefix prompts for the lab's base model."""
import pytest

from prefalign.lab.corpus import generate_reviews
from prefalign.lab.pretrain import build_tokenizer, prompts_from_reviews, split_prefix


@pytest.fixture(scope="module")
def corpus_and_tokenizer():
    reviews = generate_reviews(600, seed=0)
    return reviews, build_tokenizer([r.text for r in reviews], vocab_size=800)


def test_tokenizer_specials_and_roundtrip(corpus_and_tokenizer):
    reviews, tok = corpus_and_tokenizer
    assert len(tok) == 800
    for special in ("<s>", "</s>", "<pad>", "<unk>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id or special == "<unk>"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tok(reviews[0].text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == reviews[0].text


def test_prompts_are_clean_token_prefixes(corpus_and_tokenizer):
    reviews, tok = corpus_and_tokenizer
    rows = prompts_from_reviews(reviews, tok, min_tokens=2, max_tokens=8, seed=1)
    assert len(rows) > 0.9 * len(reviews)
    texts = {r.text for r in reviews}
    lengths = set()
    for row in rows:
        assert row["prompt"] + row["completion"] in texts
        ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert 2 <= len(ids) <= 8
        assert tok.decode(ids) == row["prompt"]
        lengths.add(len(ids))
    assert lengths == set(range(2, 9))
    assert rows == prompts_from_reviews(reviews, tok, seed=1)


def test_unclean_cuts_are_skipped(corpus_and_tokenizer):
    _, tok = corpus_and_tokenizer
    text = "Wow 🎬 great"      # the clapper board is 4 bytes, 4 byte-level tokens unseen in training
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cuts = [split_prefix(tok, text, k) for k in range(1, len(ids))]
    inside_emoji = [c for c in cuts if c is None]
    assert inside_emoji and all(c is None or c[0] + c[1] == text for c in cuts)
    assert split_prefix(tok, "Great.", 50) is None
