"""Padding and packing: layouts checked by hand, and packed == separate logits on a tiny Llama."""
import pytest
import torch

from prefalign.data.collate import balanced_groups, pack_batch, pack_groups, pad_batch, pair_pack_batch
from prefalign.data.tokenize import Tokenized, encode_prompt_completion, encode_text
from prefalign.tiny import SAMPLE_TEXTS, tiny_llama, tiny_tokenizer

A = Tokenized([5, 6, 7, 8], prompt_len=2)
B = Tokenized([9, 10], prompt_len=1)


def test_pad_right():
    b = pad_batch([A, B], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert b["attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert b["completion_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.bool
    assert b["completion_mask"].dtype == torch.bool and b["position_ids"].dtype == torch.long


def test_pad_left_positions_count_real_tokens():
    b = pad_batch([A, B], pad_id=0, side="left")
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]]
    assert b["attention_mask"].tolist()[1] == [False, False, True, True]
    assert b["completion_mask"].tolist()[1] == [False, False, False, True]
    assert b["position_ids"].tolist()[1] == [0, 0, 0, 1]


def test_pad_to_multiple_of():
    assert pad_batch([A, B], pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="side"):
        pad_batch([A], pad_id=0, side="middle")


def test_pack_batch_layout():
    b = pack_batch([A, B])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]
    assert b["completion_mask"].tolist() == [[False, False, True, True, False, True]]
    assert b["n_segments"] == 2 and b["max_seqlen"] == 4
    assert b["cu_seqlens"].tolist() == [0, 4, 6] and b["cu_seqlens"].dtype == torch.int32


def test_pair_pack_interleaves_chosen_and_rejected():
    c0, r0, c1, r1 = (Tokenized([i] * (i + 1), prompt_len=1) for i in range(4))
    b = pair_pack_batch([c0, c1], [r0, r1])
    assert b["input_ids"].tolist() == [[0, 1, 1, 2, 2, 2, 3, 3, 3, 3]]
    assert b["segment_ids"].tolist() == [[0, 1, 1, 2, 2, 2, 3, 3, 3, 3]]  # chosen at even ids
    assert b["n_segments"] == 4
    with pytest.raises(ValueError):
        pair_pack_batch([c0], [])


@pytest.mark.parametrize("lengths, max_tokens, expected", [
    ([5, 3, 4, 2], 8, [[0, 1], [2, 3]]),      # first-fit decreasing: 5, then 4 (new row), 3 -> row 0, 2 -> row 1
    ([2, 2, 2, 2], 4, [[0, 1], [2, 3]]),
    ([10, 1], 4, [[0], [1]]),                # too long for a row: a row of its own
    ([], 4, []),
])
def test_pack_groups(lengths, max_tokens, expected):
    groups = pack_groups(lengths, max_tokens)
    assert groups == expected
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))


def test_pack_groups_respects_the_budget_like_a_loop():
    lengths = [7, 3, 9, 1, 4, 4, 6, 2, 8, 5]
    groups = pack_groups(lengths, 10)
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    # First-fit decreasing never needs more rows than items / ceil(total / budget) * 11/9 + 1.
    assert len(groups) <= -(-sum(lengths) // 10) * 11 // 9 + 1


def test_balanced_groups_by_hand():
    # total 24, budget 10 -> 3 rows. Longest first, each to the least-loaded row: 9 -> r0, 7 -> r1, 5 -> r2,
    # 3 -> r2 (loads 9, 7, 5), then 0 -> r1 (loads 9, 7, 8).
    assert balanced_groups([3, 9, 5, 7, 0], 10) == [[1], [3, 4], [0, 2]]


def test_balanced_groups_rows_are_near_equal():
    lengths = [7, 3, 9, 1, 4, 4, 6, 2, 8, 5, 30, 11]
    groups = balanced_groups(lengths, 25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert len(groups) == -(-sum(lengths) // 25)
    loads = [sum(lengths[i] for i in g) for g in groups]
    assert max(loads) < 25 + max(lengths)  # LPT: over budget by less than one item
    assert balanced_groups([], 4) == [] and balanced_groups([5], 1) == [[0]]


@pytest.fixture(scope="module")
def llama():
    tok = tiny_tokenizer(SAMPLE_TEXTS)
    return tok, tiny_llama(tok, hidden=32, layers=2).eval()


def _seqs(tok):
    return [encode_prompt_completion(tok, "The movie was", " great and the acting was wonderful.", 64),
            encode_prompt_completion(tok, "Hello there!", " How are you?", 64),
            encode_text(tok, "I loved the music, the story and the cast.", 64)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_matches_separate_runs(llama, attn):
    tok, model = llama
    model.config._attn_implementation = attn
    seqs = _seqs(tok)
    with torch.no_grad():
        separate = torch.cat([model(torch.tensor([s.input_ids])).logits[0] for s in seqs])     # (T, V)
        b = pack_batch(seqs)
        # transformers finds the segments from the position resets (attention_mask=None, no cache).
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=None,
                       use_cache=False).logits[0]                                              # (T, V)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)


def test_packed_row_leaks_across_segments_when_a_cache_is_built(llama):
    """Why callers must pass use_cache=False: with a cache the packed-sequence detection is off."""
    tok, model = llama
    model.config._attn_implementation = "sdpa"
    seqs = _seqs(tok)
    with torch.no_grad():
        separate = torch.cat([model(torch.tensor([s.input_ids])).logits[0] for s in seqs])
        b = pack_batch(seqs)
        leaky = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=True).logits[0]
    assert (leaky - separate).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_separate_runs(llama, side):
    tok, model = llama
    model.config._attn_implementation = "sdpa"
    seqs = _seqs(tok)
    with torch.no_grad():
        b = pad_batch(seqs, tok.pad_token_id, side=side)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits                                   # (B, T, V)
        for i, s in enumerate(seqs):
            alone = model(torch.tensor([s.input_ids])).logits[0]
            torch.testing.assert_close(logits[i][b["attention_mask"][i]], alone, atol=1e-5, rtol=0)
