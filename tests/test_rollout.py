"""rollout: sampled log-probs equal teacher-forced ones, EOS masking, padding invariance, determinism."""
import pytest
import torch

from prefalign.rollout import draw_tokens, filter_logits, forward_logps, generate_texts, left_pad, sample, sample_groups
from prefalign.tiny import SAMPLE_TEXTS, tiny_llama, tiny_tokenizer

EOS_BOOST = 2.5  # EOS logit bias: a few percent EOS per step, so some rows stop early and others do not


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(SAMPLE_TEXTS, vocab_size=384)


def with_eos_bias(m, eos_token_id):
    """Replace lm_head by a biased copy that makes EOS a likely token."""
    old = m.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_token_id] = EOS_BOOST
    m.lm_head = head
    return m.eval()


@pytest.fixture(scope="module")
def models(tok):
    """Llama (rotary: shifting a row's positions changes nothing) and GPT-2 (absolute positions: it does)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    return {"llama": with_eos_bias(tiny_llama(tok, hidden=32, layers=2), tok.eos_token_id),
            "gpt2": with_eos_bias(gpt2, tok.eos_token_id)}


@pytest.fixture
def model(models):
    return models["llama"]


def prompts(tok):
    texts = ["The movie", "I loved the music, the story and", "Hello", "Numbers like 12345 and symbols", "The plot was"]
    return [tok(t)["input_ids"] for t in texts]


def run(model, tok, ps, seed=0, **kw):
    kw = {"max_new_tokens": 12, "temperature": 0.7, **kw}
    return sample(model, ps, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  generator=torch.Generator().manual_seed(seed), **kw)


def check_layout(out, tok):
    """Masks are a prefix of True ending at the first EOS; pad and zero log-prob after it."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    R = out.response_ids.shape[1]
    for ids, mask, logps, ended in zip(out.response_ids.tolist(), out.response_mask.tolist(), out.logprobs,
                                       out.ended_with_eos.tolist()):
        n = sum(mask)
        assert mask == [True] * n + [False] * (R - n)
        assert eos not in ids[:n - 1]  # no EOS before the last real token
        assert ended == (ids[n - 1] == eos)
        assert not ended and n == R or ended
        assert ids[n:] == [pad] * (R - n) and (logps[n:] == 0).all() and (logps[:n] < 0).all()


@pytest.mark.parametrize("arch, top_k, top_p", [("llama", 0, 1.0), ("llama", 300, 0.9), ("gpt2", 0, 1.0)])
def test_sampled_logprobs_equal_forward_logps(models, tok, arch, top_k, top_p):
    model, ps = models[arch], prompts(tok)
    out = run(model, tok, ps, top_k=top_k, top_p=top_p)
    check_layout(out, tok)
    lengths = out.response_mask.sum(1)
    # The point of this test: some rows stopped at EOS early, at least one ran to max_new_tokens.
    assert out.ended_with_eos.any() and (lengths < out.response_ids.shape[1]).any() and (~out.ended_with_eos).any()
    assert out.query_mask.sum(1).tolist() == [len(p) for p in ps]  # left padding, prompts of different lengths
    with torch.no_grad():
        logps, entropy = forward_logps(model, out.query_ids, out.query_mask, out.response_ids, out.response_mask,
                                       temperature=0.7)
    # Filtering (top-k / top-p) does not enter the recorded log-probs: both are log softmax(logits / T).
    torch.testing.assert_close(logps, out.logprobs, rtol=1e-5, atol=1e-5)
    assert (entropy[out.response_mask] > 0).all() and (entropy[~out.response_mask] == 0).all()


def test_sampling_is_deterministic_with_a_generator(model, tok):
    a, b = run(model, tok, prompts(tok), seed=3), run(model, tok, prompts(tok), seed=3)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    greedy = [run(model, tok, prompts(tok), seed=s, top_k=1, temperature=1.0) for s in (1, 2)]
    assert torch.equal(greedy[0].response_ids, greedy[1].response_ids)  # top_k=1 is greedy whatever the seed


@pytest.mark.parametrize("arch, top_k, top_p", [("llama", 0, 1.0), ("llama", 300, 0.9), ("gpt2", 0, 1.0)])
def test_sample_groups_equal_one_sample_call_per_prompt(models, tok, arch, top_k, top_p):
    """All groups in one generate call, each drawn from its own generator: the tokens of one call per
    prompt, the log-probs to float precision (padding and batch size only reorder the sums)."""
    model, ps = models[arch], prompts(tok)  # prompts of different lengths: left padding in the shared call
    kw = {"max_new_tokens": 12, "temperature": 0.7, "top_k": top_k, "top_p": top_p,
          "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    K, seeds = 3, [11, 12, 13, 14, 15]
    alone = [sample(model, [p] * K, generator=torch.Generator().manual_seed(s), **kw) for p, s in zip(ps, seeds)]
    together = sample_groups(model, ps, K, [torch.Generator().manual_seed(s) for s in seeds], **kw)
    assert len({a.response_ids.shape[1] for a in alone}) > 1  # the point: groups stop at different steps
    R = max(a.response_ids.shape[1] for a in alone)
    assert together.response_ids.shape == (len(ps) * K, R)
    for i, (p, a) in enumerate(zip(ps, alone)):
        rows, r = slice(i * K, (i + 1) * K), a.response_ids.shape[1]
        assert (together.query_ids[rows, -len(p):] == torch.tensor(p)).all()
        assert together.query_mask[rows].sum(1).tolist() == [len(p)] * K
        assert torch.equal(together.response_ids[rows, :r], a.response_ids)
        assert torch.equal(together.response_mask[rows, :r], a.response_mask)
        assert not together.response_mask[rows, r:].any() and torch.equal(together.ended_with_eos[rows], a.ended_with_eos)
        torch.testing.assert_close(together.logprobs[rows, :r], a.logprobs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 generators"):
        sample_groups(model, ps[:2], K, [None], **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_invariance_greedy(models, tok, arch):
    """Each prompt sampled alone (no padding) gives the same tokens and log-probs as in the padded batch."""
    model, ps = models[arch], prompts(tok)
    batch = run(model, tok, ps, top_k=1)
    for row, p in enumerate(ps):
        alone = run(model, tok, [p], top_k=1)
        n = int(alone.response_mask.sum())
        assert batch.response_ids[row, :n].tolist() == alone.response_ids[0, :n].tolist()
        assert int(batch.response_mask[row].sum()) == n
        torch.testing.assert_close(batch.logprobs[row, :n], alone.logprobs[0, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_invariance_teacher_forced(models, tok, arch):
    """Recorded batch log-probs equal forward_logps of each row alone, unpadded and trimmed at EOS."""
    model = models[arch]
    out = run(model, tok, prompts(tok), temperature=1.3)
    with torch.no_grad():
        for row in range(len(out.query_ids)):
            q, qm = out.query_ids[row:row + 1], out.query_mask[row:row + 1]
            n = int(out.response_mask[row].sum())
            logps, _ = forward_logps(model, q[qm].unsqueeze(0), qm[qm].unsqueeze(0), out.response_ids[row:row + 1, :n],
                                     out.response_mask[row:row + 1, :n], temperature=1.3)
            torch.testing.assert_close(logps[0], out.logprobs[row, :n], rtol=1e-5, atol=1e-5)


def test_forward_logps_keeps_gradients(model, tok):
    out = run(model, tok, prompts(tok)[:2], max_new_tokens=4)
    logps, _ = forward_logps(model, out.query_ids, out.query_mask, out.response_ids, out.response_mask)
    logps.sum().backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()
    model.zero_grad(set_to_none=True)


def test_stops_at_max_new_tokens_without_eos(model, tok):
    out = sample(model, prompts(tok)[:2], max_new_tokens=3, eos_token_id=None, pad_token_id=tok.pad_token_id,
                 generator=torch.Generator().manual_seed(0))
    assert out.response_ids.shape == (2, 3) and out.response_mask.all() and not out.ended_with_eos.any()


def test_filter_logits_hand_derived():
    # probs (0.5, 0.3, 0.2): top_p 0.6 keeps the two tokens needed to reach 0.6; top_p 0.5 only the first.
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    inf = float("-inf")
    assert filter_logits(logits, top_p=0.6).isinf().tolist() == [[False, False, True]]
    assert filter_logits(logits, top_p=0.5).isinf().tolist() == [[False, True, True]]
    shuffled = torch.tensor([[0.2, 0.5, 0.3]]).log()
    assert filter_logits(shuffled, top_k=2).tolist()[0][0] == inf
    assert filter_logits(shuffled, top_k=2, top_p=0.4).isinf().tolist() == [[True, False, True]]


def test_draw_tokens_hand_derived():
    # weights (0, 1, 0, 3, 0), total 4: a uniform below 1/4 draws token 1, from 1/4 up token 3, never a weight-0 one
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]]).repeat(5, 1)
    top = 1 - 2.0 ** -53  # the largest float64 below 1
    uniform = torch.tensor([0.0, 0.2499, 0.25, 0.9, top], dtype=torch.float64)
    assert draw_tokens(weights, uniform).tolist() == [1, 1, 3, 3, 3]
    assert draw_tokens(weights / 4, uniform).tolist() == [1, 1, 3, 3, 3]
    # the largest uniform on a total just above 1 still draws the last token of positive weight
    assert draw_tokens(torch.tensor([[0.3, 0.7 + 2 ** -40, 0.0]]), torch.tensor([top], dtype=torch.float64)).tolist() == [1]


def test_draw_tokens_frequencies_match_the_probabilities():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(12, generator=g) * 2, dim=-1)
    n = 200_000
    drawn = draw_tokens(probs.expand(n, -1), torch.rand(n, generator=g, dtype=torch.float64))
    freq = torch.bincount(drawn, minlength=12).double() / n
    sd = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * sd + 1e-12).all(), (freq, probs)


def test_left_pad_and_argument_errors(model, tok):
    ids, mask = left_pad([[5, 6], [7]], pad_token_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[True, True], [False, True]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[5], []], pad_token_id=0)
    with pytest.raises(ValueError, match="top_k=1"):
        run(model, tok, [[5]], temperature=0.0)


def test_generate_texts(model, tok):
    kw = dict(max_new_tokens=6, batch_size=2)
    a = generate_texts(model, tok, ["The movie", "Hello", "The plot"], generator=torch.Generator().manual_seed(0), **kw)
    b = generate_texts(model, tok, ["The movie", "Hello", "The plot"], generator=torch.Generator().manual_seed(0), **kw)
    assert len(a) == 3 and all(isinstance(t, str) for t in a) and a == b
    assert all("</s>" not in t for t in a)
