"""torch.distributed set-up under torchrun: gloo on CPU, NCCL on CUDA, chosen automatically.

A single process (no torchrun) is world size 1 and never touches torch.distributed; every helper
here is then the plain single-process computation.

FSDP2 rule every caller must keep: a sharded module's forward is a collective (it all-gathers
its weights), so every rank must run the same number of forwards of it, in the same order.
``sharded_map`` does that for work split over ranks.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from prefalign.errors import InternalError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(spec)


def init_distributed(device_spec: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    if rank != 0:  # one set of progress bars and notices: rank 0's
        import transformers
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def finish(code: int) -> int:
    """End a torchrun child: leave the process group and exit the process at once with ``code``.

    A world of one (no process group) just gets ``code`` back. In a gloo world the interpreter's
    own teardown after ``destroy_process_group`` aborts about one exit in eight on a small CPU
    machine ("terminate called without an active exception", SIGABRT, after Python has
    finalised), which torchrun reports as a failed run. Nothing is left to do once the group is
    gone, so the process ends here, after flushing its output, without that teardown."""
    if not (dist.is_available() and dist.is_initialized()):
        return code
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in a single process)."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank (keeps per-rank decisions in step)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def no_grad_sync(model, sync: bool):
    """Skip the gradient all-reduce on micro-batches before the last one of a step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def _fsdp():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return _fsdp()
    return contextlib.nullcontext()


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether fully_shard (FSDP2) was applied to ``model``'s root."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, final norm, heads); in place."""
    from torch.distributed.fsdp import fully_shard
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def wrap_model(model: torch.nn.Module, info: DistInfo, strategy: str = "ddp") -> torch.nn.Module:
    """DDP, or FSDP2 (fully_shard per decoder layer, then the root), under torchrun; the model
    itself in a single process. Under FSDP2 the returned module IS ``model`` (sharded in
    place): build the optimizer after this call."""
    model.to(info.device)
    if not info.distributed:
        return model
    if strategy == "fsdp":
        from prefalign.models import is_peft_model
        inner = getattr(model, "model", model)
        if is_peft_model(model) or is_peft_model(inner):
            from prefalign.errors import ConfigError
            raise ConfigError("--lora with --distributed fsdp is not supported: LoRA trains few weights, so "
                              "use --distributed ddp (the frozen base is replicated).")
        return shard_fsdp(model)
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def prepare_frozen(model: torch.nn.Module, info: DistInfo, strategy: str = "ddp") -> torch.nn.Module:
    """A frozen model (DPO/PPO reference, PPO reward) ready for no-grad forwards on every rank.

    ddp (or one process): replicated, each rank holds the whole model on its device. fsdp under
    torchrun: sharded with fully_shard (no optimizer, weights gathered per layer during the
    forward), for models that do not fit one device; then every rank must call it equally often
    (see ``sharded_map``)."""
    model.requires_grad_(False)
    model.eval()
    model.to(info.device)
    if info.distributed and strategy == "fsdp":
        shard_fsdp(model)
    return model


def sharded_map(fn, items: list, info: DistInfo, batch_size: int) -> list:
    """``fn`` (a list of items -> a list of results, one each) over ``items`` split across ranks,
    the results gathered in order on every rank. Each item is computed once in the world, not
    once per rank (e.g. precomputed reference log-probs). Every call of ``fn`` gets exactly
    ``batch_size`` items, short chunks filled up with stand-ins (results dropped), and every rank
    makes the same number of calls: FSDP forwards inside ``fn`` stay matched across ranks."""
    if not items:
        return []
    per = -(-len(items) // info.world_size)  # ceil
    mine = items[info.rank * per:(info.rank + 1) * per]
    results: list = []
    for b in range(-(-per // batch_size)):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        out = fn(chunk + [items[0]] * (batch_size - len(chunk)))
        results.extend(out[:len(chunk)])
    if not info.distributed:
        return results
    return [r for part in all_gather_object(results) for r in part]


def rank_seed(seed: int, info: DistInfo) -> int:
    """A per-rank seed for sampling (PPO rollouts): ranks must not draw identical samples."""
    return seed + 1_000_003 * info.rank


def param_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes, in ``named_parameters`` order:
    two replicas of a model have the same digest exactly when their weights are bit-identical
    (used to check that hand-made data parallelism kept the ranks' copies equal)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        t = p.detach().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(p.shape)};".encode())
        h.update(memoryview(t.view(torch.uint8).cpu().numpy()))
    return h.hexdigest()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the ModuleList with the most parameters)."""
    best, size = [], -1
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > size:
                best, size = list(mod), n
    return best


# ----------------------------------------------------------------- hand-made data parallelism (PPO, RLOO, GRPO)

def average_gradients(parameters, world_size: int) -> None:
    """Mean of every gradient over ranks (a no-op in one process). PPO does not wrap models in DDP:
    it calls backbones and heads directly, which DDP's hooks would not see.

    A parameter that got no gradient on some rank (an MoE expert none of its tokens reached) counts
    as zeros there. The ranks first agree on which parameters have a gradient anywhere: one
    all-reduce per parameter only where ``p.grad`` is set locally would pair different tensors
    across ranks, or hang."""
    if world_size == 1:
        return
    params = list(parameters)
    if not params:
        return
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)  # (N,)
    all_reduce_sum(has_grad)
    for p, anywhere in zip(params, has_grad.tolist()):
        if not anywhere:
            continue  # None on every rank: stays None, so the optimizer leaves it alone
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce_sum(p.grad)
        p.grad /= world_size


def check_replicas(digests: list[dict[str, str]], when: str) -> None:
    """Raise InternalError when the ranks' parameter digests differ (``[rank 0's, rank 1's, ...]``,
    each ``{"policy": sha256, "value": sha256}``, see dist.param_digest). Every rank gets the same
    list from one all_gather_object, so every rank raises, or none."""
    for name in digests[0]:
        values = [d[name] for d in digests]
        if len(set(values)) > 1:
            found = ", ".join(f"rank {r} {v[:12]}" for r, v in enumerate(values))
            raise InternalError(
                f"the {name} model's parameters differ between processes {when} (sha256: {found}). The "
                f"ranks diverged, which is a bug in prefalign: please report it with the command line and "
                f"`pip list`. Each checkpoint was written only after this check passed, so --resume "
                f"continues from identical weights.")
