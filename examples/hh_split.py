"""Split Anthropic HH-RLHF harmless-base *test* (2,312 pairs) into 2,000 training and 312 held-out pairs.

The rule is deterministic and depends only on the record order of the split:

    order = list(range(n)); random.Random(SEED).shuffle(order)   # SEED = 0
    train = order[:2000] (kept in file order), heldout = the other n - 2000 (in file order)

Each output line is the original record ({"chosen", "rejected"}, HH raw text) plus "id", its
0-based position in the source. Python's seeded shuffle is stable across versions (3.2+), so the
split is the same everywhere.

Offline (the file shipped beside the project):

    python examples/hh_split.py --source ../shared/data/hh-harmless-base-test.jsonl.gz --out /tmp/hh

Online, the same split from the hub (needs `pip install datasets`; the hub's rows are in the
same order as Anthropic's harmless-base/test.jsonl.gz):

    python examples/hh_split.py --hub --out /tmp/hh

Writes OUT/hh-harmless-train.jsonl and OUT/hh-harmless-heldout.jsonl and prints their sizes.
Keep OUT outside the repository: the data is not ours to commit.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

SEED = 0
N_TRAIN = 2000
DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-harmless-base-test.jsonl.gz"


def read_jsonl(path: str) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_hub() -> list[dict]:
    from datasets import load_dataset  # optional: only for --hub
    ds = load_dataset("Anthropic/hh-rlhf", data_dir="harmless-base", split="test")
    return [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in ds]


def split(records: list[dict], n_train: int = N_TRAIN, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, heldout): a seeded shuffle of the positions picks the training pairs; both keep file order."""
    if not 0 < n_train < len(records):
        raise SystemExit(f"hh_split: --train {n_train} must be between 1 and {len(records) - 1} "
                         f"(the source has {len(records)} pairs).")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    train_ids = set(order[:n_train])
    rows = [{"id": i, "chosen": r["chosen"], "rejected": r["rejected"]} for i, r in enumerate(records)]
    return [r for r in rows if r["id"] in train_ids], [r for r in rows if r["id"] not in train_ids]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=str(DEFAULT_SOURCE), help="harmless-base test JSONL(.gz)")
    ap.add_argument("--hub", action="store_true", help="read Anthropic/hh-rlhf harmless-base test from the hub")
    ap.add_argument("--out", required=True, help="output directory (outside the repository)")
    ap.add_argument("--train", type=int, default=N_TRAIN, help="training pairs (default 2000)")
    ap.add_argument("--seed", type=int, default=SEED, help="shuffle seed (default 0)")
    args = ap.parse_args(argv)

    records = read_hub() if args.hub else read_jsonl(args.source)
    train, heldout = split(records, args.train, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "hh-harmless-train.jsonl", train)
    write_jsonl(out / "hh-harmless-heldout.jsonl", heldout)
    print(f"hh_split: {len(records)} pairs -> {len(train)} train ({out / 'hh-harmless-train.jsonl'}), "
          f"{len(heldout)} held out ({out / 'hh-harmless-heldout.jsonl'}); seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
