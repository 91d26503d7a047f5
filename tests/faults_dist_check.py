"""Run by tests/test_faults.py under torchrun (2 processes, gloo): a checkpoint or final model that rank 0
cannot write (a file-size limit on rank 0 alone) raises the same DiskError on every rank, and no rank is
left waiting. Writes, per rank, what it raised to OUT/rank-R.json.

    python -m torch.distributed.run --nproc-per-node 2 tests/faults_dist_check.py OUT
"""
import json
import resource
import signal
import sys
from pathlib import Path

import torch

from prefalign.errors import DiskError
from prefalign.stages.common import save_final
from prefalign.train import checkpoint as ckpt
from prefalign.train.dist import barrier, finish, init_distributed


def main(out: Path) -> int:
    info = init_distributed("cpu")
    state = {"model": {"w": torch.zeros(64 * 1024)}, "optimizer": {}, "scheduler": {}, "rng": ckpt.rng_state(),
             "position": {"step": 1}}
    ckpt.save_checkpoint_collective(out / "run", 1, state if info.is_main else None, 2, info)
    if info.is_main:  # rank 0 writes; only its writes are refused
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    raised = {}
    try:
        ckpt.save_checkpoint_collective(out / "run", 2, state if info.is_main else None, 2, info)
    except DiskError as e:
        raised["checkpoint"] = [str(e), e.exit_code]
    try:
        save_final(out / "run", info, lambda d: torch.save(state, d / "big.pt") if d.mkdir() is None else None)
    except DiskError as e:
        raised["final"] = [str(e), e.exit_code]
    if info.is_main:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    barrier()  # nobody was left behind in a collective
    (out / f"rank-{info.rank}.json").write_text(json.dumps(raised))
    return finish(0)


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
