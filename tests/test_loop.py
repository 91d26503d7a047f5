"""The shared training loop: batch-split invariance, exact resume, non-finite guard."""

import pytest
import torch
import torch.nn.functional as F

from prefalign import config as C
from prefalign.tiny import tiny_llama, tiny_tokenizer, SAMPLE_TEXTS
from prefalign.train.dist import DistInfo
from prefalign.train.loop import LossOutput, TrainingStopped, backward_step, fit
from prefalign.train.logger import read_metrics

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class TokenLM:
    """Next-token loss summed over real tokens: the unit is a predicted token."""

    def units(self, batch):
        return float(batch["attention_mask"][:, 1:].sum())

    def __call__(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = batch["attention_mask"][:, 1:]
        nll = F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="none")
        nll = nll.view_as(mask) * mask
        return LossOutput(nll.sum(), {"tokens": (mask.sum(), 1)})


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)
    texts = [t for t in SAMPLE_TEXTS[:6]] * 4  # 24 examples of different lengths
    data = [tok(t)["input_ids"] for t in texts]
    return tok, data


def collate(rows):
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return {"input_ids": ids, "attention_mask": mask}


def grads_of(tok, data, split):
    model = tiny_llama(tok, seed=1)
    micro = [collate(data[a:b]) for a, b in split]
    backward_step(model, TokenLM(), micro, CPU)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_microbatch_times_accumulation_invariant(setup):
    tok, data = setup
    full = grads_of(tok, data, [(0, 8)])
    split = grads_of(tok, data, [(0, 4), (4, 8)])
    uneven = grads_of(tok, data, [(0, 3), (3, 5), (5, 8)])
    for n in full:
        torch.testing.assert_close(split[n], full[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(uneven[n], full[n], rtol=1e-5, atol=1e-7)


def test_wrong_normalisation_would_be_caught(setup):
    """Per-micro-batch mean (the common bug) differs from the token-weighted mean."""
    tok, data = setup
    full = grads_of(tok, data, [(0, 8)])
    model = tiny_llama(tok, seed=1)
    obj = TokenLM()
    for a, b in [(0, 3), (3, 8)]:
        mb = collate(data[a:b])
        (obj(model, mb).loss / obj.units(mb) / 2).backward()
    n = "lm_head.weight"
    assert not torch.allclose(model.get_parameter(n).grad, full[n], rtol=1e-3, atol=1e-6)


def make_cfg(out, **kw):
    base = dict(output=str(out), batch_size=4, grad_accum=2, lr=1e-3, max_steps=6, logging_steps=1,
                progress=False, seed=3)
    base.update(kw)
    return C.SFTConfig(**base)


def test_resume_equals_uninterrupted(setup, tmp_path):
    tok, data = setup
    ref_model = tiny_llama(tok, seed=1)
    fit(make_cfg(tmp_path / "a"), ref_model, TokenLM(), data, collate, out_dir=tmp_path / "a", dist=CPU)
    # Interrupted run: 4 of 6 steps with a checkpoint at step 2 and rows logged past it.
    cfg_b = make_cfg(tmp_path / "b", save_steps=2)
    m1 = tiny_llama(tok, seed=1)
    with pytest.raises(_Stop):
        fit(cfg_b, m1, _StopAfter(TokenLM(), 7), data, collate, out_dir=tmp_path / "b", dist=CPU)
    m2 = tiny_llama(tok, seed=99)  # different init: everything must come from the checkpoint
    fit(make_cfg(tmp_path / "b", save_steps=2, resume=True), m2, TokenLM(), data, collate,
        out_dir=tmp_path / "b", dist=CPU)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    a, b = strip(read_metrics(tmp_path / "a" / "metrics.jsonl")), strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, 7))
    assert a == b
    for (n, p), (_, q) in zip(ref_model.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n


class _Stop(Exception):
    pass


class _StopAfter:
    """Simulates a crash: raises on the n-th micro-batch forward (after step 3's checkpoint at 2)."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0

    def units(self, batch):
        return self.inner.units(batch)

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.n:
            raise _Stop()
        return self.inner(model, batch)


class NaNAt:
    def __init__(self, inner, bad_calls):
        self.inner, self.bad, self.calls = inner, set(bad_calls), 0

    def units(self, batch):
        return self.inner.units(batch)

    def __call__(self, model, batch):
        self.calls += 1
        out = self.inner(model, batch)
        if self.calls in self.bad:
            return LossOutput(out.loss * float("nan"), out.metrics)
        return out


def test_nonfinite_step_is_skipped(setup, tmp_path):
    tok, data = setup
    model = tiny_llama(tok, seed=1)
    before = {n: p.clone() for n, p in model.named_parameters()}
    res = fit(make_cfg(tmp_path, max_steps=1, grad_accum=1), model, NaNAt(TokenLM(), {1}), data, collate,
              out_dir=tmp_path, dist=CPU)
    assert res.bad_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_bad_steps_stops_with_checkpoint(setup, tmp_path):
    tok, data = setup
    model = tiny_llama(tok, seed=1)
    with pytest.raises(TrainingStopped, match="max-bad-steps"):
        fit(make_cfg(tmp_path, max_steps=6, grad_accum=1, max_bad_steps=1), model,
            NaNAt(TokenLM(), {2, 3}), data, collate, out_dir=tmp_path, dist=CPU)
    assert list((tmp_path / "checkpoints").glob("step-*/COMPLETE"))


def test_too_little_data_is_a_clear_error(setup, tmp_path):
    tok, data = setup
    from prefalign.errors import ConfigError
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        fit(make_cfg(tmp_path, batch_size=32), tiny_llama(tok), TokenLM(), data, collate, out_dir=tmp_path, dist=CPU)
