"""--gradient-checkpointing in the online loops (ppo, rloo, grpo, online-dpo; models/checkpointing.py).

Their trainable models stay in eval mode, and transformers checkpoints a decoder layer only in
training mode, so enabling checkpointing alone keeps every activation. Here, for each kind of update
forward (policy padded and packed, a shared value head, a separate value model, a LoRA policy): the
bytes autograd saves for backward fall to a fraction inside recompute_in_backward (and stay as they
were without it: the training-mode flip is what makes it work), every layer is recomputed in
backward, values and gradients are unchanged; dropout below the layers (attention, LoRA) stays off;
sampling with a KV cache is unchanged and never checkpoints; configs with dropout are refused.
Whole runs with == without the option: tests/test_grpo.py, test_ppo.py, test_online_dpo.py.
"""
import json

import pytest
import torch

from prefalign.errors import ConfigError
from prefalign.models import (apply_lora, checkpointed_layers, dropout_fields, load_causal_lm, load_scalar_model,
                              prepare_checkpointing, recompute_in_backward)
from prefalign.models.checkpointing import transformers_model
from prefalign.models.hf import enable_activation_checkpointing
from prefalign.rl.forwards import policy_forward, token_values
from prefalign.rl.value_head import new_value_head
from prefalign.rollout import pack_sequences, sample
from prefalign.tiny import save_tiny_model

LAYERS = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gc") / "m"
    save_tiny_model(path, vocab_size=300, layers=LAYERS)
    return path


def rollout_like():
    """Left-padded queries (3, 7) and right-padded responses (3, 5), as a rollout holds them."""
    q = torch.randint(5, 300, (3, 7), generator=torch.Generator().manual_seed(0))
    qm = torch.ones_like(q, dtype=torch.bool)
    qm[0, :2] = False
    r = torch.randint(5, 300, (3, 5), generator=torch.Generator().manual_seed(1))
    rm = torch.ones_like(r, dtype=torch.bool)
    rm[1, 3:] = False
    return q, qm, r, rm


def saved_bytes(fn):
    """(bytes autograd saves for backward while ``fn`` runs, fn's result). Inside a non-reentrant
    checkpoint torch's own hooks replace saved tensors by handles, so those do not count."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def attention_calls(model) -> list:
    """A list that grows by one at every call of a checkpointed layer's attention (a forward or its recompute)."""
    calls = []
    for layer in checkpointed_layers(model):
        layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    return calls


def build(kind, tiny_dir):
    """(model to checkpoint, trainable modules, forward -> tensors whose sum is the loss)."""
    seq = rollout_like()
    if kind == "value-model":
        vm, _ = load_scalar_model(str(tiny_dir), seed=3)
        return vm, vm, lambda: (token_values(vm, *seq),)
    policy, _ = load_causal_lm(str(tiny_dir))
    head = None
    if kind == "lora":
        policy = apply_lora(policy, r=4, alpha=8)
    if kind == "shared-head":
        head = new_value_head(policy.config.hidden_size, seed=3)
    packed = pack_sequences(*seq) if kind == "packed" else None
    modules = torch.nn.ModuleDict({"policy": policy, **({"value": head} if head is not None else {})})

    def forward():
        return tuple(x for x in policy_forward(policy, head, *seq, temperature=0.7, packed=packed) if x is not None)
    return policy, modules, forward


@pytest.mark.parametrize("kind", ["policy", "packed", "shared-head", "value-model", "lora"])
def test_update_forward_keeps_less_and_recomputes_every_layer(tiny_dir, kind):
    model, modules, forward = build(kind, tiny_dir)
    modules.eval()  # as the online loops hold them
    params = [p for p in modules.parameters() if p.requires_grad]

    def grads():
        g = torch.autograd.grad(sum(x.sum() for x in out), params)
        return [x.clone() for x in g]

    plain_bytes, out = saved_bytes(forward)
    plain_out, plain_grads = [x.detach() for x in out], grads()

    prepare_checkpointing(model, kind, str(tiny_dir))
    calls = attention_calls(model)
    assert len(checkpointed_layers(modules)) == LAYERS
    # enabled but without the flip (the models stay in eval mode): nothing is checkpointed
    off_bytes, out = saved_bytes(forward)
    del calls[:]
    grads()
    assert off_bytes > 0.9 * plain_bytes and calls == []
    # the update's forward inside recompute_in_backward: only the layers' inputs are kept
    with recompute_in_backward(modules):
        gc_bytes, out = saved_bytes(forward)
    assert not any(m.training for m in modules.modules())  # modes restored
    del calls[:]
    gc_grads = grads()
    assert gc_bytes < 0.5 * plain_bytes, (gc_bytes, plain_bytes)
    assert len(calls) == LAYERS  # each layer recomputed once in backward
    for a, b in zip(plain_out, out):
        assert torch.equal(a, b.detach())
    for a, b in zip(plain_grads, gc_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_dropout_below_the_layers_stays_off(tiny_dir, tmp_path):
    """A model with attention dropout 0.5 and LoRA dropout 0.5 (refused by prepare_checkpointing, which
    cannot know where an architecture applies its config's dropout; enabled here underneath it): the
    checkpointed forward equals the eval forward, since only the layer modules run in training mode.
    The whole model in training mode shows the dropout is there to be switched on."""
    path = tmp_path / "dropout"
    save_tiny_model(path, vocab_size=300, layers=LAYERS)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    policy, _ = load_causal_lm(str(path))
    policy = apply_lora(policy, r=4, alpha=8, dropout=0.5)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters (and their dropout) count
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    policy.eval()
    with pytest.raises(ConfigError, match="attention_dropout = 0.5"):
        prepare_checkpointing(policy, "policy", str(path))
    enable_activation_checkpointing(transformers_model(policy))
    calls = attention_calls(policy)
    seq = rollout_like()
    with torch.no_grad():
        eval_logps = policy_forward(policy, None, *seq, temperature=1.0)[0]
    with recompute_in_backward(policy):
        gc_logps = policy_forward(policy, None, *seq, temperature=1.0)[0]
    del calls[:]
    gc_logps.sum().backward()
    assert len(calls) == LAYERS  # it was checkpointed
    assert torch.equal(gc_logps.detach(), eval_logps)
    policy.train()
    train_logps = policy_forward(policy, None, *seq, temperature=1.0)[0]
    assert (train_logps - eval_logps).abs().max() > 1e-3


def test_sampling_and_scoring_never_checkpoint(tiny_dir, checkpoint_calls):
    """With checkpointing enabled, KV-cache sampling draws the same tokens and log-probs as without,
    and neither it nor a no-grad scoring forward (even inside recompute_in_backward) checkpoints."""
    plain, tok = load_causal_lm(str(tiny_dir))
    model, _ = load_causal_lm(str(tiny_dir))
    plain.eval()
    model.eval()
    prepare_checkpointing(model, "policy", str(tiny_dir))
    prompts = [tok(t)["input_ids"] for t in ["The movie was", "Hello there! How are you"]]
    kw = dict(max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0.9)
    with torch.no_grad():
        a = sample(plain, prompts, generator=torch.Generator().manual_seed(5), **kw)
        b = sample(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
        with recompute_in_backward(model):
            scored = policy_forward(model, None, b.query_ids, b.query_mask, b.response_ids, b.response_mask, 0.9)[0]
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    torch.testing.assert_close(scored, b.logprobs, rtol=0, atol=1e-5)
    assert checkpoint_calls == []


def test_dropout_fields_and_the_refusal(tiny_dir):
    from transformers import GPT2Config, LlamaConfig
    assert dropout_fields(LlamaConfig()) == {}
    assert dropout_fields(LlamaConfig(attention_dropout=0.1)) == {"attention_dropout": 0.1}
    assert dropout_fields(GPT2Config()) == {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
                                            "summary_first_dropout": 0.1}
    vm, _ = load_scalar_model(str(tiny_dir), seed=3)
    vm.config.hidden_dropout = 0.2
    with pytest.raises(ConfigError, match=r"the value model \(.*m\) sets hidden_dropout = 0.2 .*Set hidden_dropout "
                                          r"to 0 in .*config.json.*or drop --gradient-checkpointing"):
        prepare_checkpointing(vm, "value model", str(tiny_dir))
    assert checkpointed_layers(vm) == []  # refused before anything was enabled


def test_a_model_class_without_checkpointing_is_a_clear_error(tiny_dir, monkeypatch):
    """transformers raises a plain ValueError for classes with supports_gradient_checkpointing = False
    (e.g. JetMoE); the stage says which model and what to do instead of a traceback."""
    from prefalign.errors import ModelError
    policy, _ = load_causal_lm(str(tiny_dir))
    monkeypatch.setattr(type(policy), "supports_gradient_checkpointing", False)
    with pytest.raises(ModelError, match=r"the policy \(.*m, LlamaForCausalLM\) has no decoder layer .*does not "
                                         r"support .*checkpointing.*drop --gradient-checkpointing"):
        prepare_checkpointing(policy, "policy", str(tiny_dir))


def test_scalar_model_checkpointing_takes_the_offline_loops_keyword(tiny_dir):
    """fit() (sft, reward, dpo) calls gradient_checkpointing_enable(gradient_checkpointing_kwargs=...);
    a ScalarModel (`prefalign reward --gradient-checkpointing`) passed it on under a name transformers 5
    does not take (a TypeError)."""
    vm, _ = load_scalar_model(str(tiny_dir), seed=3)
    vm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert len(checkpointed_layers(vm)) == LAYERS
