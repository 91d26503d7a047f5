"""`prefalign label export`: majority vote over labelers -> {prompt, chosen, rejected} JSONL.

The rows are the explicit-prompt preference format that `prefalign reward` and `prefalign dpo`
read directly, with extra fields: ``n_labels`` (answers counted, skips excluded), ``agreement``
(share of them that voted with the majority) and ``outcome`` ("preference", or "tie" /
"both_bad" for rows kept by --keep-ties / --keep-both-bad, written in the item's own order).
"""
from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

from prefalign.config import LabelExportConfig, require
from prefalign.errors import ConfigError, DataError
from prefalign.label import store
from prefalign.label.agreement import majority
from prefalign.label.pairs import write_jsonl_atomic


def preference_rows(conn, min_agreement: float = 0.0, keep_ties: bool = False,
                    keep_both_bad: bool = False) -> tuple[list[dict], Counter]:
    """Exported rows in item order, and how many items were left out for which reason."""
    by_item: dict[int, list] = {}
    for label in store.active_labels(conn):
        if label["outcome"] != "skip":
            by_item.setdefault(label["item_id"], []).append(label)
    rows, dropped = [], Counter()
    for labels in by_item.values():
        outcome, share = majority([lab["outcome"] for lab in labels])
        first = labels[0]
        if outcome is None:
            dropped["no majority"] += 1
            continue
        if share < min_agreement:
            dropped["below --min-agreement"] += 1
            continue
        if (outcome == "tie" and not keep_ties) or (outcome == "both_bad" and not keep_both_bad):
            dropped[outcome] += 1
            continue
        chosen, rejected = first["completion_i"], first["completion_j"]
        if outcome == "j":
            chosen, rejected = rejected, chosen
        rows.append({"prompt": first["prompt"], "chosen": chosen, "rejected": rejected,
                     "n_labels": len(labels), "agreement": round(share, 4),
                     "outcome": "preference" if outcome in ("i", "j") else outcome})
    return rows, dropped


def run_export(cfg: LabelExportConfig) -> int:
    require(cfg, "db", "output")
    if not 0.0 <= cfg.min_agreement <= 1.0:
        raise ConfigError(f"--min-agreement is a share of votes between 0 and 1, got {cfg.min_agreement}.")
    if not Path(cfg.db).is_file():
        raise DataError("label database does not exist; run `prefalign label --db ...` first.", path=cfg.db)
    try:
        conn = store.connect(cfg.db)
        try:
            if conn.execute("SELECT name FROM sqlite_master WHERE name = 'labels'").fetchone() is None:
                raise DataError("not a prefalign label database (no `labels` table).", path=cfg.db)
            rows, dropped = preference_rows(conn, cfg.min_agreement, cfg.keep_ties, cfg.keep_both_bad)
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise DataError(f"cannot read the label database: {e}.", path=cfg.db) from None
    write_jsonl_atomic(cfg.output, rows)
    left_out = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())) or "none"
    print(f"wrote {len(rows)} preference rows to {cfg.output} (items left out: {left_out})")
    return 0
