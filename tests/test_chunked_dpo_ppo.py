"""DPO's pair log-probs and PPO's shared-head forward on the chunked head (ops_chunked via logits) equal
the full-logits path, in values and in the gradients of every parameter, and pair_logps builds no
(N, V) tensor.

The full path is each function's own fallback branch, taken by making its chunked entry point answer
None (``head_logps`` for pair_logps, ``plain_linear_head`` for policy_forward): the code that ran
before chunking. Helpers and the bf16 tolerance come from tests/test_chunked_logps.py.
"""
import pytest
import torch

import prefalign.rl.forwards as forwards
import prefalign.stages.dpo_batch as dpo_batch
from prefalign import ops_chunked
from prefalign.data import PreferenceExample
from prefalign.models.attention import use_packed_attention
from prefalign.rl.forwards import policy_forward
from prefalign.rl.value_head import new_value_head
from prefalign.rollout import pack_sequences
from prefalign.stages.dpo_batch import pair_logps, scored_tokens
from prefalign.stages.pair_batch import collate_pairs, tokenize_pairs
from prefalign.tiny import SAMPLE_TEXTS, tiny_llama, tiny_tokenizer
from test_chunked_logps import BF16_GRAD_ATOL, assert_chunked, full_logits, largest_tensors, ragged

PREFERENCES = [("The movie was", " great and the acting was wonderful.", " boring and weak."),
               ("Honestly the plot", " was lovely.", " was dull and the ending felt weak."),
               ("I loved the", " music, the story and the cast.", " nothing at all."),
               ("The ending felt", " wonderful.", " weak but the scenes were lovely."),
               ("Hello there! How are you today?", " I am fine, thanks.", " Numbers like 12345.")]
CHUNK = 7  # tokens a chunk: fewer than any batch here scores


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)


@pytest.fixture
def small_chunks(tok, monkeypatch):
    monkeypatch.setattr(ops_chunked, "CHUNK_LOGITS", CHUNK * len(tok))


def pair_batches(tok) -> dict:
    """The same five pairs padded, packed whole and packed with shared prompts; one pair's prompts
    differ (so it is packed whole beside the shared ones) and prompts are cut at 8 tokens."""
    pairs = tokenize_pairs([PreferenceExample(*p) for p in PREFERENCES], tok, 40, 8)
    pairs[2].rejected.input_ids[0] = (pairs[2].rejected.input_ids[0] + 1) % len(tok)
    batches = {"padded": collate_pairs(pairs, tok.pad_token_id),
               "packed": collate_pairs(pairs, tok.pad_token_id, pack_tokens=48),
               "shared_prompt": collate_pairs(pairs, tok.pad_token_id, pack_tokens=48, share_prompt=True)}
    assert batches["packed"]["input_ids"].shape[0] > 1 and len(batches["shared_prompt"]["shared_prefix"]) == 4
    return batches


def pair_outputs(model, batch):
    """pair_logps and the gradients of every parameter of a weighted sum of its chosen and rejected."""
    out = pair_logps(model, batch)
    weights = torch.linspace(-1.0, 1.5, 2 * len(out.chosen))
    loss = (torch.cat([out.chosen, out.rejected]) * weights).sum()
    return out, torch.autograd.grad(loss, list(model.parameters()))


def chunked_and_full(model, batches, monkeypatch):
    chunked = {name: pair_outputs(model, b) for name, b in batches.items()}
    assert_chunked(model)
    with monkeypatch.context() as m:
        full_logits(m, dpo_batch)
        full = {name: pair_outputs(model, b) for name, b in batches.items()}
    return chunked, full


@pytest.mark.parametrize("tied", [False, True])
def test_pair_logps_chunked_equals_full_logits(tok, tied, small_chunks, monkeypatch):
    """Padded, packed and shared-prompt rows, tied and untied embeddings, chunks of 7 tokens: every
    pair's sums and token counts, and every parameter's gradient, to float32 rounding."""
    model = tiny_llama(tok, seed=2, tie_word_embeddings=tied)
    assert use_packed_attention(model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    batches = pair_batches(tok)
    assert all(len(scored_tokens(b).targets) > 3 * CHUNK for b in batches.values())
    chunked, full = chunked_and_full(model, batches, monkeypatch)
    names = [n for n, _ in model.named_parameters()]
    for name in batches:
        (out, grads), (ref, ref_grads) = chunked[name], full[name]
        assert torch.equal(out.chosen_tokens, ref.chosen_tokens) and torch.equal(out.rejected_tokens, ref.rejected_tokens)
        torch.testing.assert_close(out.chosen, ref.chosen, rtol=1e-6, atol=1e-5, msg=name)
        torch.testing.assert_close(out.rejected, ref.rejected, rtol=1e-6, atol=1e-5, msg=name)
        for n, g, g_ref in zip(names, grads, ref_grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"{name}: {n}")
    for name in ("packed", "shared_prompt"):  # and the layouts agree (the invariance tests/test_dpo.py checks)
        torch.testing.assert_close(chunked[name][0].chosen, full["padded"][0].chosen, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(chunked[name][0].rejected, full["padded"][0].rejected, rtol=1e-5, atol=2e-5)


def test_pair_logps_chunked_equals_full_logits_bf16_autocast(tok, small_chunks, monkeypatch):
    """bf16 autocast: both paths round the same bf16 logits, so the sums (up to ~115 in magnitude)
    agree to float32 summation order (rtol 1e-5, atol 1e-4); gradients to BF16_GRAD_ATOL (2^-7) of each
    parameter's largest gradient, about one bf16 ulp, as for SFT, and no further from the float32
    gradients than the full path's (within 1.5x; measured 1.03-1.06x)."""
    model = tiny_llama(tok, seed=2)
    assert use_packed_attention(model)
    batches = pair_batches(tok)
    exact = {name: pair_outputs(model, b)[1] for name, b in batches.items()}  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, full = chunked_and_full(model, batches, monkeypatch)
    names = [n for n, _ in model.named_parameters()]
    for name in batches:
        (out, grads), (ref, ref_grads) = chunked[name], full[name]
        assert out.chosen.dtype == ref.chosen.dtype == torch.float32
        torch.testing.assert_close(out.chosen, ref.chosen, rtol=1e-5, atol=1e-4, msg=name)
        torch.testing.assert_close(out.rejected, ref.rejected, rtol=1e-5, atol=1e-4, msg=name)
        for n, g, g_ref, g_32 in zip(names, grads, ref_grads, exact[name]):
            torch.testing.assert_close(g, g_ref, rtol=0, atol=BF16_GRAD_ATOL * float(g_ref.abs().max()) + 1e-8,
                                       msg=f"{name}: {n}")
            assert (g - g_32).norm() <= 1.5 * (g_ref - g_32).norm() + 1e-6, f"{name}: {n}"


def test_shared_prompt_scores_the_prompts_last_state_twice(tok):
    """The last prompt token predicts the chosen's first token and, in a shared row, the rejected's."""
    batch = pair_batches(tok)["shared_prompt"]
    scored = scored_tokens(batch)
    T, shared = batch["input_ids"].shape[1], batch["shared_prefix"]
    last = shared[:, 0] * T + shared[:, 1] + shared[:, 2] - 1  # (K,)
    assert torch.equal(scored.before[-len(shared):], last) and torch.equal(scored.sequence[-len(shared):], shared[:, 4])
    assert all(int((scored.before == i).sum()) == 2 for i in last)
    assert len(scored.targets) == int(dpo_batch.label_mask(batch).sum()) + len(shared)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_policy_forward_shared_head_chunked_equals_full_logits(tok, tied, autocast, small_chunks, monkeypatch):
    """policy_forward with a value head on the policy's backbone, padded and packed, temperature 0.7:
    log-probs, entropy, values and the gradients of the policy's and the head's parameters. fp32 to
    float32 rounding; bf16 autocast values to 1e-5 (the same bf16 logits) and gradients to BF16_GRAD_ATOL."""
    policy = tiny_llama(tok, seed=1, tie_word_embeddings=tied)
    head = new_value_head(policy.config.hidden_size, seed=0)
    seq = ragged(tok)
    assert int(seq[3].sum()) > 2 * CHUNK
    packed = pack_sequences(*seq, row_tokens=8)
    params = list(policy.parameters()) + list(head.parameters())
    g = torch.Generator().manual_seed(0)
    w_lp, w_ent, w_v = (torch.randn(seq[2].shape, generator=g) for _ in range(3))

    def run(**kw):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp, ent, values = policy_forward(policy, head, *seq, temperature=0.7, **kw)
            grads = torch.autograd.grad((lp * w_lp).sum() + (ent * w_ent).sum() + (values * w_v).sum(), params)
        return (lp.detach(), ent.detach(), values.detach()), grads

    chunked = [run(), run(packed=packed)]
    with monkeypatch.context() as m:
        m.setattr(forwards, "plain_linear_head", lambda model: None)
        full = [run(), run(packed=packed)]
    for (outs, grads), (ref_outs, ref_grads) in zip(chunked, full):
        for a, b in zip(outs, ref_outs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            assert bool((a[~seq[3]] == 0).all())
        for a, b in zip(grads, ref_grads):
            atol = BF16_GRAD_ATOL * float(b.abs().max()) + 1e-8 if autocast else 1e-5
            torch.testing.assert_close(a, b, rtol=0 if autocast else 1e-5, atol=atol)
    if not autocast:  # packed chunked == padded full
        for a, b in zip(chunked[1][0], full[0][0]):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
def test_pair_logps_builds_no_tensor_of_n_by_v(tok, layout, monkeypatch):
    """A wide vocabulary (V = 8192) over a narrow model (H = 16), pairs of the tiny tokenizer's ids: the
    largest tensor any op creates, or autograd saves, in pair_logps forward + backward is a chunk of
    logits (16 x V) or the weight (V x H), far below the N x V of full logits, which the full path creates."""
    from transformers import LlamaConfig, LlamaForCausalLM
    V, H = 8192, 16
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    assert use_packed_attention(model)
    batch = pair_batches(tok)[layout]
    N = len(scored_tokens(batch).targets)
    assert N > 4 * 16
    monkeypatch.setattr(ops_chunked, "CHUNK_LOGITS", 16 * V)  # 16 tokens a chunk

    def step():
        out = pair_logps(model, batch)
        (out.chosen - out.rejected).sum().backward()

    def measure():
        return largest_tensors(model, step)

    measure()  # the first call per model probes the head on one position; measure a later one
    created, saved = measure()
    assert created <= max(16 * V, V * H) and saved <= max(16 * V, V * H), (created, saved)
    with monkeypatch.context() as m:
        full_logits(m, dpo_batch)
        created_full, saved_full = measure()
    assert created_full >= N * V and saved_full >= N * V


def test_head_logps_takes_flat_indices_with_repeats(tok):
    """A (N,) long select picks positions b * T + t in its own order, repeats allowed: the bool mask's
    results, reordered and repeated; any other select is refused."""
    from prefalign.logits import head_logps
    model = tiny_llama(tok, seed=2)
    ids = torch.randint(7, len(tok), (2, 5), generator=torch.Generator().manual_seed(0))
    select = torch.zeros(2, 5, dtype=torch.bool)
    select[0, 1] = select[1, 3] = True  # flat 1 and 8
    targets = torch.tensor([11, 12])
    by_mask = head_logps(model, {"input_ids": ids}, select, targets, with_entropy=True)
    by_index = head_logps(model, {"input_ids": ids}, torch.tensor([8, 1, 8]), targets[[1, 0, 1]], with_entropy=True)
    torch.testing.assert_close(by_index.logps, by_mask.logps[[1, 0, 1]], rtol=0, atol=1e-6)
    torch.testing.assert_close(by_index.entropy, by_mask.entropy[[1, 0, 1]], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="bool or"):
        head_logps(model, {"input_ids": ids}, torch.tensor([1.0, 8.0]), targets)
