"""The real server process: acknowledged labels survive SIGKILL; concurrent labelers lose and
duplicate nothing; bind-address and bad-input checks of `prefalign label`."""
import json
import signal
import sqlite3
import threading
import time

from conftest import run_cli
from label_helpers import http, start_server, stop, write_pairs

# 12 prompts x 4 completions -> 12 * 6 = 72 comparisons
PAIRS = [{"prompt": f"prompt {p}", "completions": [f"answer {p}.{k}" for k in range(4)]} for p in range(12)]


def label_body(item, labeler, choice, key):
    return {"key": key, "labeler": labeler, "item_id": item["id"], "choice": choice,
            "shown_a": item["a"]["index"], "shown_b": item["b"]["index"], "comment": f"by {labeler}"}


def stored_keys(db):
    conn = sqlite3.connect(db)
    try:
        return [row[0] for row in conn.execute("SELECT key FROM labels")]
    finally:
        conn.close()


def test_acknowledged_labels_survive_sigkill(tmp_path):
    pairs, db = write_pairs(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "labels.sqlite"
    proc, url = start_server(pairs, db)
    acked, stop_writing = [], threading.Event()

    def writer():
        n = 0
        while not stop_writing.is_set():
            try:
                item = http("GET", f"{url}/api/next?labeler=w{n % 3}")[1]["item"]
                status, body = http("POST", f"{url}/api/labels", label_body(item, f"w{n % 3}", "a", f"crash-{n:04d}"),
                                    origin=url, timeout=10)
            except OSError:
                return  # the server is gone
            if status == 200:
                acked.append(f"crash-{n:04d}")
            n += 1

    thread = threading.Thread(target=writer)
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while len(acked) < 25 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-stream: a request may be in flight right now
        proc.wait(timeout=30)
    finally:
        stop_writing.set()
        thread.join(timeout=30)
        stop(proc)
    assert len(acked) >= 25, "the server acknowledged too few labels before the deadline"
    missing = set(acked) - set(stored_keys(db))
    assert not missing, f"acknowledged labels lost in the crash: {sorted(missing)}"


def test_concurrent_labelers_lose_and_duplicate_nothing(tmp_path):
    pairs, db = write_pairs(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "labels.sqlite"
    proc, url = start_server(pairs, db)
    n_clients, per_client, time_limit = 24, 20, 120
    acked: dict[str, tuple] = {}
    lock, errors, conflicts = threading.Lock(), [], []
    start_at = time.monotonic()

    def client(c):
        labeler = f"person{c % 12}"  # two clients (two browser tabs) per person: they can collide
        for n in range(per_client):
            if time.monotonic() - start_at > time_limit:
                return
            status, data = http("GET", f"{url}/api/next?labeler={labeler}")
            if status != 200:
                errors.append((status, data))
            if status != 200 or data["item"] is None:
                return
            key, choice = f"load-c{c:02d}-n{n:02d}", ("a", "b", "tie", "skip")[(c + n) % 4]
            body = label_body(data["item"], labeler, choice, key)
            status, first = http("POST", f"{url}/api/labels", body, origin=url)
            if status == 409:  # the other tab of this person labelled it first
                conflicts.append(key)
                continue
            # Retry as a browser would after a lost response: same key, no second row.
            status2, again = http("POST", f"{url}/api/labels", body, origin=url)
            if status != 200 or status2 != 200 or not again["duplicate"] or again["label_id"] != first["label_id"]:
                errors.append((status, first, status2, again))
                return
            with lock:
                acked[key] = (first["label_id"], data["item"]["id"], labeler, choice)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=time_limit + 60)
        elapsed = time.monotonic() - start_at
    finally:
        stop(proc)
    assert not errors, errors[:3]
    assert len(acked) >= n_clients * per_client // 2, f"only {len(acked)} labels in {elapsed:.0f} s"
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT key, id, item_id, labeler, choice FROM labels").fetchall()
    assert sorted(r[0] for r in rows) == sorted(acked), "stored labels differ from acknowledged ones"
    assert {r[0]: tuple(r[1:]) for r in rows} == acked
    per_person_item = conn.execute("SELECT COUNT(*) FROM labels GROUP BY item_id, labeler HAVING COUNT(*) > 1")
    assert per_person_item.fetchall() == []
    assert not set(conflicts) & set(acked)
    print(f"load: {n_clients} clients, {len(acked)} labels (each sent twice), {len(conflicts)} same-person "
          f"collisions refused, in {elapsed:.1f} s")

    out = tmp_path / "prefs.jsonl"
    run_cli("label", "export", "--db", db, "--output", out, "--keep-ties")
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert exported and all(r["n_labels"] >= 1 and 0 < r["agreement"] <= 1 for r in exported)


def test_remote_host_needs_allow_remote(tmp_path):
    pairs, db = write_pairs(tmp_path / "pairs.jsonl", PAIRS[:1]), tmp_path / "labels.sqlite"
    proc = run_cli("label", "--pairs", pairs, "--db", db, "--host", "0.0.0.0", check=False, timeout=60)
    assert proc.returncode == 2 and "--allow-remote" in proc.stderr and not db.exists()
    server, url = start_server(pairs, db, "--host", "0.0.0.0", "--allow-remote", log=tmp_path / "err.log")
    stop(server)
    assert "warning: serving on 0.0.0.0" in (tmp_path / "err.log").read_text()


def test_label_rejects_bad_pairs_file(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "p", "completions": ["a", "b"]}\n{"prompt": "q", "completions": ["a"]}\n')
    proc = run_cli("label", "--pairs", bad, "--db", tmp_path / "l.sqlite", "--port", "0", check=False, timeout=60)
    assert proc.returncode == 2 and f"{bad}, line 2, field `completions`" in proc.stderr
    assert "Traceback" not in proc.stderr
