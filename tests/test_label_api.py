"""The labelling API through Flask's test client, and export's majority vote."""
import json

import pytest
from conftest import run_cli
from label_helpers import write_pairs

from prefalign.label import store
from prefalign.label.app import create_app
from prefalign.label.export import preference_rows
from prefalign.label.pairs import read_pairs

ORIGIN = {"Origin": "http://localhost"}  # the test client's own origin
PAIRS = [{"prompt": "P1", "completions": ["c0", "c1", "c2"]},   # items (0,1) (0,2) (1,2)
         {"prompt": "P2", "completions": ["d0", "d1"]}]          # item (0,1)


@pytest.fixture
def env(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    db = tmp_path / "labels.sqlite"
    conn = store.init_db(str(db))
    assert store.add_pairs(conn, read_pairs(str(pairs)), "pairs.jsonl") == 4
    assert store.add_pairs(conn, read_pairs(str(pairs)), "pairs.jsonl") == 0  # same file again: nothing new
    conn.close()
    app = create_app(str(db), max_comment_chars=50)
    return app.test_client(), db


def submit(client, labeler, item, choice, key=None, comment="", headers=ORIGIN):
    body = {"key": key or f"{labeler}-{item['id']}-{choice}-key", "labeler": labeler, "item_id": item["id"],
            "choice": choice, "shown_a": item["a"]["index"], "shown_b": item["b"]["index"], "comment": comment}
    return client.post("/api/labels", json=body, headers=headers)


def item_by_id(client, item_id):
    return client.get(f"/api/items/{item_id}").get_json()["item"]


def test_labeler_is_served_each_item_once(env):
    client, _ = env
    seen = []
    while (r := client.get("/api/next?labeler=ann").get_json())["item"]:
        seen.append(r["item"]["id"])
        assert submit(client, "ann", r["item"], "skip").status_code == 200
    assert sorted(seen) == [1, 2, 3, 4]
    assert r["progress"] == {"total": 4, "labelled": 0, "mine": 4}   # skips are not answers
    assert client.get("/api/next?labeler=bob").get_json()["item"] is not None  # others still get them


def test_order_is_random_and_recorded(env):
    client, db = env
    orders = {tuple((i["a"]["index"], i["b"]["index"])) for i in (item_by_id(client, 3) for _ in range(40))}
    assert orders == {(1, 2), (2, 1)}  # both orders appear (chance of failure 2 * 2^-40)
    item = item_by_id(client, 3)
    assert submit(client, "ann", item, "b").status_code == 200
    conn = store.connect(str(db))
    row = conn.execute("SELECT shown_a, shown_b, choice, outcome FROM labels").fetchone()
    # B won; B was completion shown_b; outcome names it in item order (i = 1, j = 2).
    assert (row["shown_a"], row["shown_b"]) == (item["a"]["index"], item["b"]["index"])
    assert row["outcome"] == ("i" if item["b"]["index"] == 1 else "j")


def test_retried_key_is_stored_once_and_double_labels_conflict(env):
    client, db = env
    item = item_by_id(client, 1)
    first = submit(client, "ann", item, "a", key="retry-key-1").get_json()
    again = submit(client, "ann", item, "a", key="retry-key-1").get_json()
    assert not first["duplicate"] and again["duplicate"] and first["label_id"] == again["label_id"]
    r = submit(client, "ann", item, "b", key="another-key")
    assert r.status_code == 409 and "already labelled" in r.get_json()["error"]
    r = submit(client, "bob", item_by_id(client, 2), "a", key="retry-key-1")  # key reused for something else
    assert r.status_code == 409
    assert store.connect(str(db)).execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 1


def test_undo(env):
    client, _ = env
    r1 = submit(client, "ann", item_by_id(client, 1), "a", key="k-first-1").get_json()
    item2 = item_by_id(client, 2)
    r2 = submit(client, "ann", item2, "tie", key="k-second", comment="close").get_json()
    assert r2["last_key"] == "k-second" and r1["last_key"] == "k-first-1"
    u = client.post("/api/undo", json={"labeler": "ann", "key": "k-second"}, headers=ORIGIN).get_json()
    # The undone item comes back in the order it was shown, with the comment to edit.
    assert u["item"] == item2 and u["choice"] == "tie" and u["comment"] == "close"
    assert u["last_key"] == "k-first-1" and u["progress"]["mine"] == 1
    again = client.post("/api/undo", json={"labeler": "ann", "key": "k-second"}, headers=ORIGIN)
    assert again.status_code == 200 and again.get_json()["progress"]["mine"] == 1  # retry: no second undo
    assert submit(client, "ann", item2, "a", key="k-third-1").status_code == 200     # relabel after undo
    assert client.post("/api/undo", json={"labeler": "bob"}, headers=ORIGIN).status_code == 404


@pytest.mark.parametrize("body, status, match", [
    ({"item_id": 99}, 404, "no item with id 99"),
    ({"choice": "maybe"}, 400, "choice must be one of"),
    ({"shown_a": 0, "shown_b": 2}, 400, "shown_a/shown_b must be"),
    ({"labeler": ""}, 400, "labeler must be your name"),
    ({"labeler": "x" * 65}, 400, "labeler must be your name"),
    ({"key": "short"}, 400, "`key` must be"),
    ({"item_id": "1"}, 400, "`item_id` must be an integer"),
    ({"comment": "x" * 51}, 413, "comment has 51 characters; the limit is 50"),
])
def test_bad_submissions(env, body, status, match):
    client, _ = env
    good = {"key": "abcdefgh12", "labeler": "ann", "item_id": 1, "choice": "a", "shown_a": 0, "shown_b": 1}
    r = client.post("/api/labels", json={**good, **body}, headers=ORIGIN)
    assert r.status_code == status and match in r.get_json()["error"]


def test_errors_are_json(env):
    client, _ = env
    r = client.get("/api/items/12345")
    assert r.status_code == 404 and r.get_json()["error"] == "no item with id 12345."
    r = client.post("/api/labels", data=b"x" * 100_000, headers={**ORIGIN, "Content-Type": "application/json"})
    assert r.status_code == 413 and "too large" in r.get_json()["error"]
    r = client.post("/api/labels", data="not json", headers={**ORIGIN, "Content-Type": "text/plain"})
    assert r.status_code == 400 and "JSON object" in r.get_json()["error"]


@pytest.mark.parametrize("headers, status", [
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "http://localhost:9999"}, 403),            # another port is another origin
    ({"Origin": "null"}, 403),
    ({}, 403),                                             # no Origin nor Referer: refused
    ({"Referer": "http://evil.example/page"}, 403),
    ({"Referer": "http://localhost/"}, 200),               # browsers that omit Origin send Referer
    (ORIGIN, 200),
])
def test_state_changes_need_same_origin(env, headers, status):
    client, db = env
    assert submit(client, "ann", item_by_id(client, 1), "a", headers=headers).status_code == status
    n = store.connect(str(db)).execute("SELECT COUNT(*) FROM labels").fetchone()[0]
    assert n == (status == 200)
    assert client.post("/api/undo", json={"labeler": "ann"}, headers=headers).status_code in (status, 404)


def test_foreign_host_header_refused(env):
    client, _ = env
    assert client.get("/", headers={"Host": "attacker.example"}).status_code == 400  # DNS rebinding guard
    assert client.get("/", headers={"Host": "127.0.0.1:8765"}).status_code == 200


def test_pages_escape_html(env):
    client, _ = env
    page = client.get("/").get_data(as_text=True)
    assert "api/next" not in page and 'src="/static/label.js"' in page  # data arrive as JSON, shown as text
    item = item_by_id(client, 1)
    assert submit(client, "<script>alert(1)</script>", item, "a").status_code == 200
    stats = client.get("/stats").get_data(as_text=True)
    assert "<script>alert(1)</script>" not in stats and "&lt;script&gt;alert(1)&lt;/script&gt;" in stats


def _vote(client, item_id, votes):
    item = item_by_id(client, item_id)
    for who, choice in votes.items():
        assert submit(client, who, item, choice).status_code == 200
    return item


def test_stats_and_export_majority(env, tmp_path):
    client, db = env
    # Item 1 (c0 vs c1): two say c1 better, one says c0 -> c1 chosen, agreement 2/3.
    item = item_by_id(client, 1)
    better_c1 = "a" if item["a"]["index"] == 1 else "b"
    worse = "b" if better_c1 == "a" else "a"
    for who, choice in {"ann": better_c1, "bob": better_c1, "cy": worse, "dee": "skip"}.items():
        assert submit(client, who, item, choice).status_code == 200
    _vote(client, 2, {"ann": "tie", "bob": "tie"})            # tie majority
    _vote(client, 3, {"ann": "both_bad"})                      # both bad
    _vote(client, 4, {"ann": "tie", "bob": "both_bad"})       # no majority
    conn = store.connect(str(db))
    rows, dropped = preference_rows(conn)
    assert rows == [{"prompt": "P1", "chosen": "c1", "rejected": "c0", "n_labels": 3, "agreement": 0.6667,
                     "outcome": "preference"}]
    assert dropped == {"tie": 1, "both_bad": 1, "no majority": 1}
    assert preference_rows(conn, min_agreement=0.7)[0] == []
    kept, _ = preference_rows(conn, keep_ties=True, keep_both_bad=True)
    assert [(r["chosen"], r["rejected"], r["outcome"]) for r in kept] == [
        ("c1", "c0", "preference"), ("c0", "c2", "tie"), ("c1", "c2", "both_bad")]
    stats = client.get("/api/stats").get_json()
    assert {r["labeler"]: r["answers"] for r in stats["labelers"]} == {"ann": 4, "bob": 3, "cy": 1, "dee": 0}
    # Rater pairs: item 1 has 3 raters (1 of 3 pairs agree), item 2 (1 of 1), item 4 (0 of 1).
    assert stats["agreement"]["rater_pairs"] == 5 and stats["agreement"]["percent_agreement"] == pytest.approx(2 / 5)
    assert "Fleiss" in client.get("/stats").get_data(as_text=True)

    out = tmp_path / "prefs.jsonl"
    proc = run_cli("label", "export", "--db", db, "--output", out, "--keep-ties")
    assert "wrote 2 preference rows" in proc.stdout
    assert [json.loads(line)["outcome"] for line in out.read_text().splitlines()] == ["preference", "tie"]


def test_export_errors(tmp_path):
    proc = run_cli("label", "export", "--db", tmp_path / "none.sqlite", "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "junk.sqlite").write_text("not a database" * 100)
    proc = run_cli("label", "export", "--db", tmp_path / "junk.sqlite", "--output", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "junk.sqlite" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("label", "export", "--db", tmp_path / "x", "--output", tmp_path / "o", "--min-agreement", "2",
                   check=False)
    assert proc.returncode == 2 and "--min-agreement" in proc.stderr
