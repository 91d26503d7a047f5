"""SQLite storage of comparisons (items) and labels.

Durability: the database runs in WAL mode with ``synchronous=FULL``. In WAL mode FULL fsyncs
the write-ahead log at every commit, and the app commits before it answers HTTP 200, so an
acknowledged label survives a crash of the server process and also a power loss or OS crash.
(``NORMAL`` with WAL would survive a process crash but could lose the last commits on power
loss; a label costs a person several seconds of thought, one fsync is cheap next to that.)

Concurrency: every request opens its own connection; writes run in ``BEGIN IMMEDIATE``
transactions (one writer at a time, waiting up to ``busy_timeout``), so concurrent labelers
never interleave half-done writes. Each submission carries a client-made idempotency ``key``
(UNIQUE), so a retried request is recognised instead of stored twice.
"""
from __future__ import annotations

import hashlib
import sqlite3
import time
from typing import Iterable, Optional

CHOICES = ("a", "b", "tie", "both_bad", "skip")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,          -- sha256 of prompt and both completions: same comparison, same id
    prompt TEXT NOT NULL,
    i INTEGER NOT NULL,                   -- indices of the two completions in their pairs row, i < j
    j INTEGER NOT NULL,
    completion_i TEXT NOT NULL,
    completion_j TEXT NOT NULL,
    source TEXT NOT NULL                  -- "pairs.jsonl:LINE" where the comparison came from
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,             -- idempotency key made by the browser per submission
    item_id INTEGER NOT NULL REFERENCES items(id),
    labeler TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad', 'skip')),
    shown_a INTEGER NOT NULL,             -- completion index (i or j) the person saw as A
    shown_b INTEGER NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('i', 'j', 'tie', 'both_bad', 'skip')),  -- choice in item order
    comment TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    undone_at REAL                        -- set by undo; undone labels stay for the record, count nowhere
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_label_per_person ON labels(item_id, labeler) WHERE undone_at IS NULL;
CREATE INDEX IF NOT EXISTS labels_by_labeler ON labels(labeler, created_at);
"""


class UnknownItem(LookupError):
    """No comparison has this id."""


class Conflict(Exception):
    """The request contradicts what is stored (already labelled, key reused for another item)."""


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with durable settings."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def init_db(path: str) -> sqlite3.Connection:
    conn = connect(path)
    conn.executescript(SCHEMA)
    return conn


def _digest(prompt: str, a: str, b: str) -> str:
    h = hashlib.sha256()
    for part in (prompt, a, b):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")  # separator: ("ab", "c") and ("a", "bc") must differ
    return h.hexdigest()


def add_pairs(conn: sqlite3.Connection, rows, source: str) -> int:
    """Insert one item per completion pair i < j of every row; existing items are kept as
    they are (so serving the same file again changes nothing). Returns how many are new."""
    before = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        for row in rows:
            for i in range(len(row.completions)):
                for j in range(i + 1, len(row.completions)):
                    ci, cj = row.completions[i], row.completions[j]
                    conn.execute("INSERT OR IGNORE INTO items (digest, prompt, i, j, completion_i, completion_j, source)"
                                 " VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (_digest(row.prompt, ci, cj), row.prompt, i, j, ci, cj, f"{source}:{row.line}"))
    return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] - before


def get_item(conn: sqlite3.Connection, item_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
    if row is None:
        raise UnknownItem(item_id)
    return row


def next_item(conn: sqlite3.Connection, labeler: str) -> Optional[sqlite3.Row]:
    """An item this person has not labelled: the least-labelled first (spreads coverage across
    people), random among equals (so people working at once rarely get the same one)."""
    return conn.execute(
        "SELECT it.* FROM items it WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = it.id"
        " AND l.labeler = ? AND l.undone_at IS NULL)"
        " ORDER BY (SELECT COUNT(*) FROM labels l WHERE l.item_id = it.id AND l.undone_at IS NULL"
        " AND l.outcome != 'skip'), random() LIMIT 1", (labeler,)).fetchone()


def _outcome(item: sqlite3.Row, choice: str, shown_a: int, shown_b: int) -> str:
    """Map A/B (what the person saw) back to i/j (the item's own order)."""
    if choice in ("tie", "both_bad", "skip"):
        return choice
    winner = shown_a if choice == "a" else shown_b
    return "i" if winner == item["i"] else "j"


def add_label(conn: sqlite3.Connection, *, key: str, item_id: int, labeler: str, choice: str,
              shown_a: int, shown_b: int, comment: str = "") -> tuple[int, bool]:
    """Store one label; returns (label id, duplicate). A repeated key returns the stored label
    (duplicate=True) without writing. Raises UnknownItem, ValueError or Conflict."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}; got {choice!r}.")
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        item = get_item(conn, item_id)
        if sorted((shown_a, shown_b)) != [item["i"], item["j"]]:
            raise ValueError(f"shown_a/shown_b must be the completion indices {item['i']} and {item['j']} "
                             f"of item {item_id}; got {shown_a} and {shown_b}.")
        old = conn.execute("SELECT id, item_id, labeler FROM labels WHERE key = ?", (key,)).fetchone()
        if old is not None:
            if (old["item_id"], old["labeler"]) != (item_id, labeler):
                raise Conflict("this idempotency key was already used for another label; make a new key per label.")
            return old["id"], True
        try:
            cur = conn.execute(
                "INSERT INTO labels (key, item_id, labeler, choice, shown_a, shown_b, outcome, comment, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, item_id, labeler, choice, shown_a, shown_b, _outcome(item, choice, shown_a, shown_b),
                 comment, time.time()))
        except sqlite3.IntegrityError:
            raise Conflict(f"{labeler} has already labelled item {item_id}; undo that label first.") from None
        return cur.lastrowid, False


def undo(conn: sqlite3.Connection, labeler: str, key: Optional[str] = None) -> Optional[sqlite3.Row]:
    """Withdraw a label of ``labeler``: the one with ``key`` (idempotent: undoing it twice is a
    no-op that returns it again) or, without a key, the latest active one. Returns the label."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        if key is not None:
            row = conn.execute("SELECT * FROM labels WHERE key = ? AND labeler = ?", (key, labeler)).fetchone()
        else:
            row = conn.execute("SELECT * FROM labels WHERE labeler = ? AND undone_at IS NULL"
                               " ORDER BY created_at DESC, id DESC LIMIT 1", (labeler,)).fetchone()
        if row is None or row["undone_at"] is not None:
            return row
        conn.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (time.time(), row["id"]))
        return row


def last_key(conn: sqlite3.Connection, labeler: str) -> Optional[str]:
    row = conn.execute("SELECT key FROM labels WHERE labeler = ? AND undone_at IS NULL"
                       " ORDER BY created_at DESC, id DESC LIMIT 1", (labeler,)).fetchone()
    return row["key"] if row else None


def progress(conn: sqlite3.Connection, labeler: Optional[str] = None) -> dict:
    """Items in total, items with at least one answer (not a skip), and this person's answers."""
    total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    labelled = conn.execute("SELECT COUNT(DISTINCT item_id) FROM labels WHERE undone_at IS NULL"
                            " AND outcome != 'skip'").fetchone()[0]
    mine = 0
    if labeler:
        mine = conn.execute("SELECT COUNT(*) FROM labels WHERE labeler = ? AND undone_at IS NULL",
                            (labeler,)).fetchone()[0]
    return {"total": total, "labelled": labelled, "mine": mine}


def active_labels(conn: sqlite3.Connection) -> Iterable[sqlite3.Row]:
    """Every label that counts (not undone), with its item, in item order."""
    return conn.execute(
        "SELECT l.item_id, l.labeler, l.outcome, l.comment, it.prompt, it.completion_i, it.completion_j"
        " FROM labels l JOIN items it ON it.id = l.item_id WHERE l.undone_at IS NULL"
        " ORDER BY l.item_id, l.id").fetchall()


def labeler_counts(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Per person: answers by kind (skips counted apart) and undone labels."""
    return conn.execute(
        "SELECT labeler, SUM(undone_at IS NULL AND outcome != 'skip') AS answers,"
        " SUM(undone_at IS NULL AND outcome = 'skip') AS skips,"
        " SUM(undone_at IS NULL AND outcome IN ('tie', 'both_bad')) AS ties_or_bad,"
        " SUM(undone_at IS NOT NULL) AS undone FROM labels GROUP BY labeler ORDER BY labeler").fetchall()
