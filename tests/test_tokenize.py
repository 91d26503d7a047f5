"""Tokenisation at the prompt/completion boundary with both tokenizer families, BOS on and off."""
import pytest

from prefalign.data import PreferenceExample, SFTExample
from prefalign.data.tokenize import (encode_preference, encode_prompt, encode_prompt_completion, encode_sft,
                                     encode_text, fit_lengths)
from prefalign.errors import ConfigError, ModelError
from prefalign.tiny import SAMPLE_TEXTS, tiny_tokenizer

KINDS = [("bpe", False), ("bpe", True), ("sentencepiece", False), ("sentencepiece", True)]
_CACHE = {}


@pytest.fixture(params=KINDS, ids=[f"{k}-bos{b}" for k, b in KINDS])
def tok(request):
    if request.param not in _CACHE:
        kind, bos = request.param
        _CACHE[request.param] = tiny_tokenizer(SAMPLE_TEXTS, kind=kind, add_bos=bos)
    return _CACHE[request.param]


def plain(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def bos_prefix(tok):
    return [tok.bos_token_id] if tok("a")["input_ids"][0] == tok.bos_token_id else []


def text_of(tok, ids):
    """Decoded text without the added BOS/EOS, to compare with the input strings."""
    return tok.decode([i for i in ids if i not in (tok.bos_token_id, tok.eos_token_id)])


def test_prompt_is_a_prefix_when_no_merge_crosses(tok):
    t = encode_prompt_completion(tok, "The movie was", " great", max_length=64)
    assert t.input_ids[:t.prompt_len] == encode_prompt(tok, "The movie was")
    # No merge crosses a space: the joint encoding is the whole sequence, plus EOS.
    assert t.input_ids == bos_prefix(tok) + plain(tok, "The movie was great") + [tok.eos_token_id]


def test_merge_across_the_boundary_keeps_prompt_ids_and_every_character(tok):
    prompt, completion = "The movie was gr", "eat"
    # Constructed so a merge crosses: "great" is one token jointly, so the prompt's ids are no prefix.
    joint = plain(tok, prompt + completion)
    assert joint[:len(plain(tok, prompt))] != plain(tok, prompt)
    t = encode_prompt_completion(tok, prompt, completion, max_length=64)
    assert t.input_ids[:t.prompt_len] == encode_prompt(tok, prompt)
    # Nothing shifted or dropped: the completion tokens spell "eat" (no "▁" space prepended).
    assert tok.convert_ids_to_tokens(t.completion_ids[:-1])[0].lstrip("▁Ġ") == tok.convert_ids_to_tokens(
        t.completion_ids[:-1])[0]
    assert text_of(tok, t.input_ids).replace(" ", "") == (prompt + completion).replace(" ", "")
    assert "".join(tok.convert_ids_to_tokens(t.input_ids[t.prompt_len:-1])) == "eat"


def test_eos_exactly_once_and_bos_never_doubled(tok):
    eos, bos = tok.eos_token_id, tok.bos_token_id
    for completion in (" great", " great</s>"):
        t = encode_prompt_completion(tok, "The movie was", completion, max_length=64)
        assert t.input_ids.count(eos) == 1 and t.input_ids[-1] == eos
        assert t.input_ids.count(bos) == len(bos_prefix(tok))
        assert bos not in t.completion_ids
    t = encode_text(tok, "I loved the music.", max_length=64)
    assert t.input_ids.count(eos) == 1 and t.input_ids.count(bos) == len(bos_prefix(tok))
    assert t.prompt_len == len(bos_prefix(tok))


def test_preference_pair_shares_prompt_ids(tok):
    ex = PreferenceExample("The plot was", " great", " boring and the ending felt weak")
    c, r = encode_preference(tok, ex, max_length=64)
    assert c.input_ids[:c.prompt_len] == r.input_ids[:r.prompt_len] == encode_prompt(tok, "The plot was")
    assert c.input_ids[-1] == r.input_ids[-1] == tok.eos_token_id


def test_chat_rendering_boundary(tok):
    prompt = [{"role": "user", "content": "How are you today?"}]
    reply = [{"role": "assistant", "content": "I am fine, thanks."}]
    t = encode_prompt_completion(tok, prompt, reply, max_length=128)
    rendered_prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert t.input_ids[:t.prompt_len] == plain(tok, rendered_prompt)
    # The completion is the assistant turn, closed by the template's EOS (the newline after it dropped).
    assert t.input_ids[-1] == tok.eos_token_id and t.completion_ids.count(tok.eos_token_id) == 1
    full = tok.apply_chat_template(prompt + reply, tokenize=False)
    assert plain(tok, full)[:len(t.input_ids)] == t.input_ids
    # The chat template owns specials: no BOS is added on top of it.
    assert tok.bos_token_id not in t.input_ids


def test_chat_template_with_bos_text_is_not_doubled():
    tok = tiny_tokenizer(SAMPLE_TEXTS, add_bos=True)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    t = encode_prompt_completion(tok, [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}],
                                 max_length=64)
    assert t.input_ids[0] == tok.bos_token_id and t.input_ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("p, c, L, mpl, expected", [
    (10, 10, 64, None, (10, 10)),    # fits: nothing cut
    (300, 100, 512, None, (300, 100)),  # a long prompt is not cut when the whole fits
    (400, 300, 512, None, (256, 256)),  # prompt start cut to max_length // 2, then completion end
    (400, 50, 256, None, (206, 50)),    # prompt cut only as far as needed
    (100, 600, 512, None, (100, 412)),  # short prompt kept whole, completion cut
    (400, 300, 512, 100, (212, 300)),   # explicit prompt budget is a floor, not a cap
])
def test_fit_lengths(p, c, L, mpl, expected):
    assert fit_lengths(p, c, L, mpl) == expected


def test_fit_lengths_rejects_a_budget_without_room():
    with pytest.raises(ConfigError, match="max-prompt-length"):
        fit_lengths(10, 10, 64, 64)


def test_truncation_keeps_prompt_end_and_reports_cuts(tok):
    lead = bos_prefix(tok)
    prompt = "Hello there! How are you today? I am fine, thanks."
    completion = " The movie was great and the acting was wonderful."
    full_p = encode_prompt(tok, prompt)
    full = encode_prompt_completion(tok, prompt, completion, max_length=1000)
    n_c = len(full.completion_ids)
    assert len(full_p) > 8 and n_c > 5
    # Budget: 8 prompt tokens (the floor) + all but 3 completion tokens.
    t = encode_prompt_completion(tok, prompt, completion, max_length=8 + n_c - 3, max_prompt_length=8)
    assert t.prompt_len == 8 and (t.prompt_cut, t.completion_cut) == (len(full_p) - 8, 3)
    # The prompt's END survives, with BOS still in front; the completion's START survives, without EOS.
    assert t.input_ids[:t.prompt_len] == lead + full_p[len(full_p) - (8 - len(lead)):]
    assert t.completion_ids == full.completion_ids[:n_c - 3] and tok.eos_token_id not in t.completion_ids
    assert encode_prompt(tok, prompt, max_prompt_length=5) == lead + full_p[len(full_p) - 5 + len(lead):]


def test_preference_truncation_cuts_the_prompt_once_for_both(tok):
    ex = PreferenceExample("Hello there! How are you today?", " Fine.", " I am fine, thanks. The movie was great.")
    full_c, full_r = encode_preference(tok, ex, max_length=1000)
    n_p, n_r = full_c.prompt_len, len(full_r.completion_ids)
    assert n_p > 4 and n_r > 3
    # The longer (rejected) completion sets the prompt cut, which both share; rejected loses 2 tokens.
    c, r = encode_preference(tok, ex, max_length=4 + n_r - 2, max_prompt_length=4)
    assert c.input_ids[:c.prompt_len] == r.input_ids[:r.prompt_len] and c.prompt_len == 4
    assert c.prompt_cut == r.prompt_cut == n_p - 4 and r.completion_cut == 2
    assert c.completion_ids == full_c.completion_ids and c.input_ids[-1] == tok.eos_token_id


def scored_targets(seqs, tok) -> list[int]:
    """How many next-token targets count per sequence, as the DPO, reward and SFT losses mask them."""
    from prefalign.data import pad_batch
    from prefalign.stages.batching import label_mask
    return label_mask(pad_batch(seqs, tok.pad_token_id)).sum(1).tolist()


def test_empty_prompt_scores_every_completion_token(tok, tmp_path):
    """Issue 15 A.3: an implicit pair with nothing in common splits into an empty prompt. Without an
    added BOS its first completion token (where chosen and rejected differ) used to predict nothing;
    the prompt is now the BOS token (EOS when there is none), counted as prompt."""
    from prefalign.data import load_preferences
    (tmp_path / "p.jsonl").write_text('{"chosen": "Honestly great.", "rejected": "Numbers boring."}\n')
    ex, = load_preferences(tmp_path / "p.jsonl")
    assert ex.prompt == ""
    chosen, rejected = encode_preference(tok, ex, max_length=64)
    completions = [plain(tok, ex.chosen) + [tok.eos_token_id], plain(tok, ex.rejected) + [tok.eos_token_id]]
    assert scored_targets([chosen, rejected], tok) == [len(c) for c in completions]  # every token, EOS included
    for t, completion in zip((chosen, rejected), completions):
        assert (t.input_ids, t.prompt_len) == ([tok.bos_token_id] + completion, 1)  # with add_bos: as before
    assert encode_prompt(tok, "") == [tok.bos_token_id]  # what PPO samples from: the same prefix
    t = encode_prompt_completion(tok, "", ex.chosen, max_length=3, max_prompt_length=1)  # truncation keeps it
    assert (t.input_ids, t.prompt_len, t.prompt_cut) == ([tok.bos_token_id] + completions[0][:2], 1, 0)


def test_empty_prompt_without_a_bos_token_is_conditioned_on_eos():
    tok = tiny_tokenizer(SAMPLE_TEXTS)  # GPT-2 / Qwen style: no BOS added; here no BOS token at all
    tok.bos_token = None
    c, r = encode_preference(tok, PreferenceExample("", " great", " boring"), max_length=16)
    assert scored_targets([c, r], tok) == [len(plain(tok, " great")) + 1, len(plain(tok, " boring")) + 1]
    assert c.input_ids[:c.prompt_len] == r.input_ids[:r.prompt_len] == [tok.eos_token_id]


def test_encode_text_truncates_the_end(tok):
    t = encode_text(tok, "The movie was great and the acting was wonderful.", max_length=5)
    assert len(t.input_ids) == 5 and t.completion_cut > 0 and tok.eos_token_id not in t.input_ids


def test_encode_sft_dispatches():
    tok = tiny_tokenizer(SAMPLE_TEXTS)
    assert encode_sft(tok, SFTExample(None, "I loved it."), 32) == encode_text(tok, "I loved it.", 32)
    assert encode_sft(tok, SFTExample("Q:", " A"), 32) == encode_prompt_completion(tok, "Q:", " A", 32)


def test_missing_eos_token_is_a_model_error():
    tok = tiny_tokenizer(SAMPLE_TEXTS)
    tok.eos_token = None
    with pytest.raises(ModelError, match="no EOS token"):
        encode_prompt_completion(tok, "a", " b", 16)


def test_chat_data_without_template_is_a_model_error():
    tok = tiny_tokenizer(SAMPLE_TEXTS, chat_template=False)
    with pytest.raises(ModelError, match="no chat template"):
        encode_prompt(tok, [{"role": "user", "content": "hi"}])


def test_real_hh_pairs_tokenise_with_exact_boundaries(shared_data):
    from prefalign.data import load_preferences

    tok = tiny_tokenizer(SAMPLE_TEXTS, kind="sentencepiece", add_bos=True)
    for ex in load_preferences(shared_data)[:200]:
        c, r = encode_preference(tok, ex, max_length=100_000)
        assert c.input_ids[:c.prompt_len] == r.input_ids[:r.prompt_len] == encode_prompt(tok, ex.prompt)
        assert c.input_ids.count(tok.bos_token_id) == 1 and c.input_ids[-1] == tok.eos_token_id
