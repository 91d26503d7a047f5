"""Runs several prefalign commands in ONE torchrun launch (tests/test_distributed.py).

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py RUNS.json

RUNS.json is a list of argument lists, e.g. [["sft", "--model", ...], ...]. Each is parsed and
run exactly as `prefalign ARGS` runs it, in the same process group: starting two processes
and importing torch and transformers once instead of once per run keeps the tests short on
small CI machines. `torchrun -m prefalign` itself is exercised by a test of its own.
"""
import json
import sys

from prefalign import config as C
from prefalign.cli import find_command
from prefalign.train.dist import finish


def main(path: str) -> int:
    for argv in json.loads(open(path).read()):
        words, cmd, rest = find_command(argv)
        cmd.run(C.parse_config(cmd.config_cls, rest, prog="prefalign " + " ".join(words)))
    return finish(0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
