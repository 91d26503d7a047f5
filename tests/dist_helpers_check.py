"""Checks of train/dist.py helpers across ranks; run by tests/test_distributed.py as

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_helpers_check.py

Exits non-zero (an AssertionError on some rank) when a helper differs from the same
computation done in one process over the whole global batch.
"""
import torch

from prefalign.errors import InternalError
from prefalign.losses.advantage import global_moments, whiten
from prefalign.ops import masked_mean, masked_var
from prefalign.tiny import SAMPLE_TEXTS, tiny_llama, tiny_tokenizer
from prefalign.train.dist import (all_gather_object, any_rank, average_gradients, check_replicas, finish,
                                  init_distributed, param_digest, prepare_frozen, sharded_map)


def check_global_whitening(info):
    g = torch.Generator().manual_seed(100 + info.rank)  # each rank has its own rollouts
    x = torch.randn(3 + info.rank, 6, generator=g) * 3 + info.rank  # (B_r, T), ranks differ in B and mean
    mask = torch.rand(x.shape, generator=g) > 0.3
    parts = all_gather_object((x, mask))
    all_x, all_mask = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    start = sum(p[0].shape[0] for p in parts[:info.rank])
    # The one-process formula over the whole batch, written out (whiten itself reduces over ranks here).
    mean_all, var_all = masked_mean(all_x, all_mask), masked_var(all_x, all_mask)
    expected = torch.where(all_mask, (all_x - mean_all) * torch.rsqrt(var_all + 1e-8), 0.0)[start:start + x.shape[0]]
    torch.testing.assert_close(whiten(x, mask), expected, rtol=1e-6, atol=1e-6)
    mean, var, n = global_moments(x, mask)
    torch.testing.assert_close(mean, mean_all, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var, var_all, rtol=1e-6, atol=1e-7)
    assert n.item() == all_mask.sum().item()
    # the bug this prevents: statistics of one rank's share only
    local = torch.where(mask, (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + 1e-8), 0.0)
    assert not torch.allclose(local, expected, atol=1e-3)


def check_sharded_frozen_model(info):
    """A frozen FSDP2-sharded model computes what the whole model computes, each item once in
    the world, with uneven work per rank (7 items, batches of 2) and no hang."""
    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)
    whole = tiny_llama(tok, seed=4).eval()
    frozen = prepare_frozen(tiny_llama(tok, seed=4), info, "fsdp")
    assert not any(p.requires_grad for p in frozen.parameters())
    items = [tok(t)["input_ids"][:12] for t in SAMPLE_TEXTS[:7]]
    calls = []

    def last_logit_sums(model, record):
        def fn(chunk):
            record.append(len(chunk))
            with torch.no_grad():
                return [float(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].sum())
                        for ids in chunk]
        return fn

    got = sharded_map(last_logit_sums(frozen, calls), items, info, batch_size=2)
    want = last_logit_sums(whole, [])(items)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    counts = all_gather_object(len(calls))
    assert counts[0] == counts[1], counts  # the same number of (collective) forwards per rank
    assert sum(all_gather_object(sum(calls))) >= len(items)


def check_meter_with_an_idle_rank(info):
    """Rank 1 saw no examples (an eval set shorter than the world): the means are rank 0's."""
    from prefalign.train.harness import Meter
    meter = Meter()
    if info.rank == 0:
        meter.add({"loss": (6.0, 3.0), "accuracy": (1.0, 2.0)})
    assert meter.reduce(info.device) == {"accuracy": 0.5, "loss": 2.0}


def check_gradients_missing_on_one_rank(info):
    """PPO's average_gradients when rank 1 has no gradient for `b` (an MoE expert its tokens
    missed): `b` averages with zeros, `c` (no gradient anywhere) stays None, and the ranks' next
    collectives still pair up (one all-reduce per locally present gradient would not)."""
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), 2.0 + 4 * info.rank)
    if info.rank == 0:
        b.grad = torch.tensor([1.0, -2.0, 6.0])
    average_gradients([a, b, c], info.world_size)
    assert torch.equal(a.grad, torch.full((3,), 4.0))  # (2 + 6) / 2
    assert torch.equal(b.grad, torch.tensor([0.5, -1.0, 3.0])) and c.grad is None
    assert all_gather_object(info.rank) == [0, 1]


def check_replica_guard(info):
    """Replicas that agree pass; one ulp changed on rank 1 makes every rank raise (no rank waits)."""
    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)
    model = tiny_llama(tok, seed=4)
    check_replicas(all_gather_object({"policy": param_digest(model)}), "at iteration 1")
    if info.rank == 1:
        with torch.no_grad():
            w = model.get_input_embeddings().weight
            w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    try:
        check_replicas(all_gather_object({"policy": param_digest(model)}), "at iteration 2")
    except InternalError as e:
        assert "policy model's parameters differ between processes at iteration 2" in str(e), e
    else:
        raise AssertionError(f"rank {info.rank}: diverged replicas passed the check")


def main():
    info = init_distributed("cpu")
    assert info.world_size == 2
    assert any_rank(info.rank == 1, info.device) and not any_rank(False, info.device)
    check_global_whitening(info)
    check_sharded_frozen_model(info)
    check_meter_with_an_idle_rank(info)
    check_gradients_missing_on_one_rank(info)
    check_replica_guard(info)
    finish(0)


if __name__ == "__main__":
    main()
