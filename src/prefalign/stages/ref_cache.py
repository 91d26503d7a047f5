"""Reference log-probs, computed once before training and cached on disk.

DPO needs log pi_ref(y|x) of every chosen and rejected completion; the reference never changes, so
they are computed in one no-grad pass before training and the reference model is then freed.
The values ride along with each pair (``TokenizedPair.ref_*_logps``), so shuffling, sharding and
resume need nothing more.

The cache file is keyed by everything the values depend on: the reference weights and config
(a content hash of the model directory), its dtype, the data file's content hash, the data format,
--max-length and --max-prompt-length, and a hash of the token ids themselves (which covers the
tokenizer and the tokenisation rules). Any change gives a new key, hence a fresh computation.

Under torchrun the work is shared, not repeated: rank 0 looks the cache up and broadcasts what it
found; on a miss every rank scores its own share of the pairs (pair i goes to rank i mod W), the
shares are summed over ranks, and rank 0 writes the file (atomically: temp file, then rename).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from array import array
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch

from prefalign.models.paths import resolve_model_path
from prefalign.stages.pair_batch import TokenizedPair
from prefalign.train import diskio
from prefalign.train.dist import DistInfo, all_reduce_sum, barrier, broadcast_object
from prefalign.train.logger import iter_progress
from prefalign.train.loop import autocast_for, to_device

CACHE_VERSION = 2  # 2: values from padded batches under autocast (1 could misplace packed pairs)
Scorer = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]  # batch -> (ref chosen, ref rejected) (B,)


def default_cache_dir() -> Path:
    from prefalign.models.gguf import cache_root
    return cache_root() / "ref_logps"


def file_digest(path) -> str:
    """sha256 of a file's bytes (the same digest checkpoints and value heads record)."""
    return diskio.file_sha256(Path(path))


def model_fingerprint(spec: str) -> str:
    """Content hash of a model directory's files (config, weights, tokenizer): a model re-saved
    with other weights in the same place gets another fingerprint. A hub name hashes as its name."""
    path = Path(resolve_model_path(spec))
    if not path.is_dir():
        return f"hub:{spec}"
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()


def sequences_digest(pairs: list[TokenizedPair]) -> str:
    """Hash of every pair's token ids and prompt/completion boundaries."""
    h = hashlib.sha256()
    for p in pairs:
        for s in (p.chosen, p.rejected):
            h.update(array("q", [s.prompt_len, len(s.input_ids), *s.input_ids]).tobytes())
    return h.hexdigest()


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True).encode()).hexdigest()[:32]


def values_digest(values: torch.Tensor) -> str:
    """sha256 of (N, 2) float64 values, recorded in the cache entry: a flipped digit still parses."""
    return hashlib.sha256(values.to(torch.float64).contiguous().numpy().tobytes()).hexdigest()


def read_cache(path: Path, n_pairs: int) -> Optional[torch.Tensor]:
    """(N, 2) float64 [chosen, rejected], or None when absent. An entry that is truncated, does not
    match its checksum or is not for these N pairs is reported and None (recomputed, overwritten)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        values = torch.tensor([data["chosen"], data["rejected"]], dtype=torch.float64).T.contiguous()
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        problem = f"cannot be read ({type(e).__name__}: truncated or damaged)"
    else:
        if "sha256" not in data:
            problem = "has no checksum (written by an older prefalign)"
        elif data["sha256"] != values_digest(values):
            problem = "does not match the sha256 recorded in it (damaged on disk)"
        elif values.shape != (n_pairs, 2):
            problem = f"holds {values.shape[0]} pairs, not {n_pairs}"
        else:
            return values
    print(f"prefalign: reference cache entry {path} {problem}; computing it again.", file=sys.stderr)
    return None


def write_cache(path: Path, values: torch.Tensor, meta: dict) -> None:
    """Write an entry atomically with its checksum; a write the disk refuses raises a DiskError."""
    body = {"meta": meta, "chosen": values[:, 0].tolist(), "rejected": values[:, 1].tolist(),
            "sha256": values_digest(values)}
    then = ("rerun (with --resume if the run has a checkpoint); or pass --ref-cache-dir on a disk with room "
            "(the cache is only reused by later runs)")
    with diskio.guarded(path, then=then):
        path.parent.mkdir(parents=True, exist_ok=True)
    diskio.write_atomic(path, json.dumps(body).encode(), then=then)


@torch.no_grad()
def score_pairs(scorer: Scorer, pairs: list[TokenizedPair], collate: Callable[[list], dict], batch_size: int,
                dist: DistInfo, desc: str, progress: bool, dtype: str = "auto") -> torch.Tensor:
    """Reference log-probs (N, 2) float64 of all pairs; each rank scores pairs i = rank mod W and
    the shares are summed over ranks. Pairs are batched longest first, so batches pad little."""
    mine = sorted(range(dist.rank, len(pairs), dist.world_size), key=lambda i: -pairs[i].n_tokens)
    values = torch.zeros(len(pairs), 2, dtype=torch.float64, device=dist.device)
    starts = range(0, len(mine), batch_size)
    for s in iter_progress(starts, len(starts), desc, enabled=progress, unit="batch"):
        idx = mine[s:s + batch_size]
        with autocast_for(dist.device, dtype):  # the same numerics as a live reference in the loop
            chosen, rejected = scorer(to_device(collate([pairs[i] for i in idx]), dist.device))
        values[idx] = torch.stack([chosen, rejected], dim=1).double()
    return all_reduce_sum(values).cpu()


def fill_reference_logps(jobs: dict[str, tuple[list[TokenizedPair], dict]],
                         open_scorer: Callable[[], ContextManager[Scorer]], collate: Callable[[list], dict],
                         batch_size: int, cache_dir: Path, dist: DistInfo, progress: bool = True,
                         dtype: str = "auto") -> dict[str, dict]:
    """Set ``ref_chosen_logps`` / ``ref_rejected_logps`` of every pair of every job.

    jobs: name -> (pairs, settings the values depend on). ``open_scorer()`` is entered only when
    some job misses the cache (so the reference model is loaded only then). Returns name -> info
    (cache file, hit or computed, seconds).
    """
    paths = {name: Path(cache_dir) / f"{cache_key(settings)}.json" for name, (_, settings) in jobs.items()}
    found = {name: read_cache(paths[name], len(jobs[name][0])) if dist.is_main else None for name in jobs}
    found = broadcast_object(found)
    info = {name: {"cache_file": str(paths[name]), "hit": found[name] is not None, "seconds": 0.0} for name in jobs}
    missing = [name for name in jobs if found[name] is None]
    if missing:
        with open_scorer() as scorer:
            for name in missing:
                t = time.perf_counter()
                pairs, settings = jobs[name]
                found[name] = score_pairs(scorer, pairs, collate, batch_size, dist, f"reference log-probs ({name})",
                                          progress and dist.is_main, dtype)
                if dist.is_main:
                    write_cache(paths[name], found[name], {**settings, "pairs": len(pairs)})
                info[name]["seconds"] = time.perf_counter() - t
        barrier()
    for name, (pairs, _) in jobs.items():
        for p, (c, r) in zip(pairs, found[name].tolist()):
            p.ref_chosen_logps, p.ref_rejected_logps = c, r
    return info
