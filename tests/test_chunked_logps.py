"""Chunked head log-probs (ops_chunked, logits.head_logps) equal the full-logits path, in values and
gradients, and never build an (N, V) tensor.

The full path is log_softmax(lm_head(h).float() / temperature): for the op, written out here; for
SFT and rollout scoring, the same function with ``head_logps`` patched to return None (its
full-logits branch, the code that ran before chunking).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import prefalign.logits as logits_mod
from prefalign import ops_chunked
from prefalign.data import encode_prompt_completion, encode_text
from prefalign.logits import head_logps, plain_linear_head
from prefalign.ops import entropy_from_logits, token_logps
from prefalign.ops_chunked import chunked_token_logps
from prefalign.rollout import forward_logps, forward_logps_packed, pack_sequences
from prefalign.stages.batching import collate_packed_rows, collate_padded
from prefalign.stages.sft import SFTObjective
from prefalign.tiny import SAMPLE_TEXTS, tiny_llama, tiny_tokenizer

PAIRS = [("The movie was", " great and the cast was wonderful."), ("Honestly the plot", " was boring and weak."),
         ("I loved the", " music and the story."), ("The ending felt", " dull but lovely.")]
# bf16 keeps 8 significant bits (eps 2^-8 = 0.0039). Both paths round the same bf16 logits, so values
# agree to float32 rounding; the weight gradient is summed chunk by chunk (one bf16 rounding per chunk
# instead of one for the whole sum), so it agrees to about one bf16 ulp of its largest entry.
BF16_GRAD_ATOL = 2 ** -7


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)


def full_path(h, weight, bias, targets, temperature):
    z = F.linear(h, weight, bias).float() / temperature  # (N, V)
    return token_logps(z[None], targets[None])[0], entropy_from_logits(z[None])[0], z.argmax(-1)


def op_inputs(N=37, H=16, V=101, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    return h, weight, b, torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g), torch.randn(N, generator=g)


def grads_of(logps, entropy, params, g_lp, g_ent):
    return torch.autograd.grad((logps * g_lp).sum() + (entropy * g_ent).sum(), params)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_tokens", [5, None])  # 5 does not divide N = 37; None: one chunk
@pytest.mark.parametrize("bias", [True, False])
def test_op_equals_full_logits_fp32(temperature, chunk_tokens, bias):
    h, weight, b, y, g_lp, g_ent = op_inputs(bias=bias)
    params = [p for p in (h, weight, b) if p is not None]
    lp, ent, top = full_path(h, weight, b, y, temperature)
    out = chunked_token_logps(h, weight, b, y, temperature=temperature, chunk_tokens=chunk_tokens,
                              with_entropy=True, with_argmax=True)
    torch.testing.assert_close(out.logps, lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy, ent, rtol=0, atol=1e-5)
    assert torch.equal(out.argmax, top)
    for a, c in zip(grads_of(lp, ent, params, g_lp, g_ent), grads_of(out.logps, out.entropy, params, g_lp, g_ent)):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
    # Log-probs alone (no entropy asked for): the same values and gradients.
    only = chunked_token_logps(h, weight, b, y, temperature=temperature, chunk_tokens=chunk_tokens)
    assert only.entropy is None and only.argmax is None
    lp = full_path(h, weight, b, y, temperature)[0]
    for a, c in zip(torch.autograd.grad((lp * g_lp).sum(), params), torch.autograd.grad((only.logps * g_lp).sum(), params)):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_op_equals_full_logits_bf16_autocast():
    h, weight, b, y, g_lp, g_ent = op_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent, top = full_path(h, weight, b, y, 0.7)
        ref = grads_of(lp, ent, [h, weight, b], g_lp, g_ent)
        out = chunked_token_logps(h, weight, b, y, temperature=0.7, chunk_tokens=8, with_entropy=True,
                                  with_argmax=True)
        got = grads_of(out.logps, out.entropy, [h, weight, b], g_lp, g_ent)
    torch.testing.assert_close(out.logps, lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy, ent, rtol=0, atol=1e-5)
    assert torch.equal(out.argmax, top)
    for a, c in zip(ref, got):
        torch.testing.assert_close(c, a, rtol=0, atol=BF16_GRAD_ATOL * float(a.abs().max()))
    fp32 = grads_of(*full_path(h, weight, b, y, 0.7)[:2], [h, weight, b], g_lp, g_ent)
    for a, c, exact in zip(ref, got, fp32):  # and no further from the float32 gradients than the full path
        assert (c - exact).norm() <= 1.5 * (a - exact).norm() + 1e-6


def test_op_ignores_negative_targets():
    h, weight, b, y, g_lp, _ = op_inputs()
    y = y.clone()
    y[::3] = -100
    out = chunked_token_logps(h, weight, b, y, chunk_tokens=4)
    assert bool((out.logps[::3] == 0).all())
    grad_h, = torch.autograd.grad((out.logps * g_lp).sum(), [h])
    assert bool((grad_h[::3] == 0).all())
    lp = full_path(h, weight, b, y.clamp(min=0), 1.0)[0]
    torch.testing.assert_close(out.logps[y >= 0], lp[y >= 0], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- SFT


def sft_batches(tok):
    seqs = [encode_prompt_completion(tok, p, c, 64) for p, c in PAIRS] + [encode_text(tok, SAMPLE_TEXTS[4], 64)]
    return collate_padded(seqs, tok.pad_token_id), collate_packed_rows([seqs[:3], seqs[3:]], tok.pad_token_id)


def full_logits(monkeypatch, module):
    """Make ``module``'s head_logps answer None: the caller takes its full-logits branch."""
    monkeypatch.setattr(module, "head_logps", lambda *a, **k: None)


@pytest.fixture(params=[7, None], ids=["chunks_of_7", "one_chunk"])
def chunks(request, tok, monkeypatch):
    """Chunks of 7 tokens (no batch here has a multiple of 7 targets) or the default (one chunk)."""
    if request.param is not None:
        monkeypatch.setattr(ops_chunked, "CHUNK_LOGITS", request.param * len(tok))
    return request.param


def assert_chunked(model):
    """The model took the chunked path: its head passed the checks and the probe."""
    lm = logits_mod.causal_lm(model)
    assert lm in logits_mod._probed and logits_mod._verdicts[lm] is None


def loss_and_grads(model, batch, obj=SFTObjective()):
    out = obj(model, batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    return out, dict(zip([n for n, _ in model.named_parameters()], grads))


@pytest.mark.parametrize("tied", [False, True])
def test_sft_chunked_equals_full_logits(tok, tied, chunks, monkeypatch):
    """Padded and packed batches, tied and untied embeddings: loss, accuracy and every gradient."""
    import prefalign.stages.sft as sft
    model = tiny_llama(tok, seed=2, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    padded, packed = sft_batches(tok)
    chunked = {name: loss_and_grads(model, b) for name, b in (("padded", padded), ("packed", packed))}
    assert_chunked(model)
    with monkeypatch.context() as m:
        full_logits(m, sft)
        full = {name: loss_and_grads(model, b) for name, b in (("padded", padded), ("packed", packed))}
    for name in ("padded", "packed"):
        (out, grads), (ref, ref_grads) = chunked[name], full[name]
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-5)
        assert [int(x) for x in out.metrics["token_accuracy"]] == [int(x) for x in ref.metrics["token_accuracy"]]
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(chunked["packed"][0].loss, full["padded"][0].loss, rtol=1e-5, atol=1e-5)


def test_sft_chunked_equals_full_logits_bf16_autocast(tok, chunks, monkeypatch):
    import prefalign.stages.sft as sft
    model = tiny_llama(tok, seed=2)
    padded, _ = sft_batches(tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = loss_and_grads(model, padded)
        assert_chunked(model)
        with monkeypatch.context() as m:
            full_logits(m, sft)
            ref, ref_grads = loss_and_grads(model, padded)
    # The backbone and the bf16 logits are the same; the two sums of N float32 log-probs differ in order.
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-4)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=0,
                                   atol=BF16_GRAD_ATOL * float(ref_grads[n].abs().max()) + 1e-8, msg=n)


# --------------------------------------------------------------------------- rollout scoring


def ragged(tok, B=4, P=6, R=7, seed=3):
    """Left-padded prompts of 1..P tokens, right-padded responses of 1..R tokens."""
    g = torch.Generator().manual_seed(seed)
    V, pad = len(tok), tok.pad_token_id
    q, qm = torch.full((B, P), pad), torch.zeros(B, P, dtype=torch.bool)
    r, rm = torch.full((B, R), pad), torch.zeros(B, R, dtype=torch.bool)
    for b, (p, n) in enumerate(zip([6, 1, 3, 4], [7, 3, 1, 5])):
        q[b, P - p:] = torch.randint(7, V, (p,), generator=g)
        qm[b, P - p:] = True
        r[b, :n] = torch.randint(7, V, (n,), generator=g)
        rm[b, :n] = True
    return q, qm, r, rm


def scored(fn, model, *args):
    lp, ent = fn(model, *args, temperature=0.7)
    grads = torch.autograd.grad(lp.sum() + 0.3 * ent.sum(), [p for p in model.parameters() if p.requires_grad])
    return lp.detach(), ent.detach(), grads


def gpt2_with_head_bias(tok):
    """GPT-2 (tied embeddings, absolute positions) with a biased head."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)).eval()  # eval: no dropout
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_()
    model.lm_head = head
    return model


ROLLOUT_MODELS = {"llama": lambda tok: tiny_llama(tok, seed=1),
                  "llama-tied": lambda tok: tiny_llama(tok, seed=1, tie_word_embeddings=True),
                  "gpt2-head-bias": gpt2_with_head_bias}


@pytest.mark.parametrize("arch", list(ROLLOUT_MODELS))
def test_forward_logps_chunked_equals_full_logits(tok, arch, chunks, monkeypatch):
    """forward_logps and forward_logps_packed, temperature 0.7: log-probs, entropy and gradients."""
    import prefalign.rollout as rollout
    model = ROLLOUT_MODELS[arch](tok)
    seq = ragged(tok)
    packed = pack_sequences(*seq, row_tokens=8)
    padded_args, packed_args = seq, (packed, seq[2], seq[3])
    chunked = [scored(forward_logps, model, *padded_args), scored(forward_logps_packed, model, *packed_args)]
    assert_chunked(model)
    with monkeypatch.context() as m:
        full_logits(m, rollout)
        full = [scored(forward_logps, model, *padded_args), scored(forward_logps_packed, model, *packed_args)]
    for (lp, ent, grads), (lp_f, ent_f, grads_f) in zip(chunked, full):
        torch.testing.assert_close(lp, lp_f, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent, ent_f, rtol=0, atol=1e-5)
        assert bool((lp[~seq[3]] == 0).all() and (ent[~seq[3]] == 0).all())
        for a, c in zip(grads_f, grads):
            # atol scales with the tensor: chunks and BLAS threads reorder sums, so an entry near 0 in a
            # tensor whose largest entry is ~13 (GPT-2's projection biases) differs by its rounding, ~2e-6
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6 * max(1.0, a.abs().max().item()))
    torch.testing.assert_close(chunked[1][0], full[0][0], rtol=0, atol=2e-5)  # packed chunked == padded full


def test_lora_model_is_chunked_and_a_lora_head_is_not(tok, monkeypatch, capsys):
    pytest.importorskip("peft")
    import prefalign.rollout as rollout
    from prefalign.models import apply_lora
    seq = ragged(tok)
    model = apply_lora(tiny_llama(tok, seed=1), r=4, alpha=8)
    assert plain_linear_head(model) is not None
    lp, ent, grads = scored(forward_logps, model, *seq)
    assert_chunked(model)
    with monkeypatch.context() as m:
        full_logits(m, rollout)
        lp_f, ent_f, grads_f = scored(forward_logps, model, *seq)
    torch.testing.assert_close(lp, lp_f, rtol=0, atol=1e-5)
    for a, c in zip(grads_f, grads):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
    head_adapted = apply_lora(tiny_llama(tok, seed=1), r=4, alpha=8, target_modules=["q_proj", "lm_head"])
    capsys.readouterr()
    assert plain_linear_head(head_adapted) is None
    assert "is not a plain linear layer" in capsys.readouterr().err


# --------------------------------------------------------------------------- fallback


def tiny_gemma2(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                       max_position_embeddings=128, final_logit_softcapping=0.5, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return Gemma2ForCausalLM(cfg)


class DoubledLogits(torch.nn.Module):
    """A causal LM whose forward doubles its head's logits, with nothing in its config to say so."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config = lm, lm.config

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.lm(**kwargs)
        out.logits = 2 * out.logits
        return out


def full_sft_loss(model, batch):
    """SFT's loss written out on the model's own logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, :-1]  # (B, T-1, V)
    mask = batch["completion_mask"][:, 1:]
    return -(token_logps(logits, batch["input_ids"][:, 1:]) * mask).sum()


@pytest.mark.parametrize("build, reason", [
    (tiny_gemma2, "Gemma2ForCausalLM post-processes its logits (final_logit_softcapping=0.5); using full logits"),
    (lambda tok: DoubledLogits(tiny_llama(tok, seed=2)),
     "DoubledLogits post-processes its logits (they differ from its head's output); using full logits")])
def test_models_that_change_their_logits_fall_back_with_one_notice(tok, build, reason, capsys):
    model = build(tok)
    padded, _ = sft_batches(tok)
    capsys.readouterr()
    losses = [SFTObjective()(model, padded).loss for _ in range(2)]
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prefalign:")]
    assert notices == ["prefalign: " + reason]  # once per model
    assert plain_linear_head(model) is None
    for loss in losses:
        torch.testing.assert_close(loss, full_sft_loss(model, padded), rtol=1e-6, atol=1e-6)


def test_plain_model_probe_passes_silently(tok, capsys):
    model = tiny_llama(tok, seed=2)
    padded, _ = sft_batches(tok)
    capsys.readouterr()
    loss = SFTObjective()(model, padded).loss
    assert capsys.readouterr().err == ""
    assert_chunked(model)
    torch.testing.assert_close(loss, full_sft_loss(model, padded), rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- memory


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (its element count), forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def largest_tensors(model, step) -> tuple[int, int]:
    """The element counts of the largest tensor ``step()`` creates and of the largest one autograd
    saves for backward; the model's gradients are cleared after."""
    saved = []
    with LargestTensor() as created, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t):
        step()
    model.zero_grad(set_to_none=True)
    return created.numel, max(saved)


def test_no_tensor_of_n_by_v_in_forward_or_backward(monkeypatch):
    """A wide vocabulary (V = 8192) and a narrow model (H = 16): the largest tensor any op creates,
    or autograd saves, in forward + backward is a chunk of logits (16 x V) or a weight (V x H),
    far below the N x V = 126 x V of full logits; the full path does create one."""
    import prefalign.stages.sft as sft
    from transformers import LlamaConfig, LlamaForCausalLM
    V, H, B, T = 8192, 16, 2, 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    ids = torch.randint(1, V, (B, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.bool),
             "position_ids": torch.arange(T).expand(B, T), "completion_mask": torch.ones(B, T, dtype=torch.bool)}
    N = B * (T - 1)
    monkeypatch.setattr(ops_chunked, "CHUNK_LOGITS", 16 * V)  # 16 tokens a chunk

    def measure():
        return largest_tensors(model, lambda: SFTObjective()(model, batch).loss.backward())

    measure()  # the first call per model probes the head on one position; measure a later one
    created, saved = measure()
    assert created <= max(16 * V, V * H) and saved <= max(16 * V, V * H), (created, saved)
    with monkeypatch.context() as m:
        full_logits(m, sft)
        created_full, saved_full = measure()
    assert created_full >= N * V and saved_full >= N * V


def test_head_logps_checks_select_shape(tok):
    model = tiny_llama(tok, seed=2)
    ids = torch.randint(7, len(tok), (2, 5))
    with pytest.raises(ValueError, match="does not match the model's final hidden states"):
        head_logps(model, {"input_ids": ids}, torch.ones(2, 4, dtype=torch.bool), torch.zeros(8, dtype=torch.long))
