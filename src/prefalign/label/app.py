"""`prefalign label`: a local Flask app where people compare two completions of a prompt.

Pages: ``/`` (labelling), ``/stats`` (per-person counts, agreement). JSON API:

    GET  /api/next?labeler=NAME     an item NAME has not labelled, A/B order drawn at random
    GET  /api/items/ID?labeler=NAME one item (404 JSON when unknown)
    POST /api/labels                {key, labeler, item_id, choice, shown_a, shown_b, comment}
    POST /api/undo                  {labeler, key?}: withdraw that (or the latest) label
    GET  /api/stats                 counts and agreement

Safety: POSTs must come from the page itself (Origin, or Referer, equal to the served origin;
otherwise 403), which stops other sites in the same browser from writing labels. Bound to a
loopback address, requests must name a loopback Host (DNS-rebinding guard).
"""
from __future__ import annotations

import ipaddress
import random
import sys
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, current_app, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from prefalign.config import LabelConfig, require
from prefalign.errors import ConfigError
from prefalign.label import store
from prefalign.label.agreement import summary
from prefalign.label.pairs import read_pairs

MAX_NAME_CHARS = 64
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _db():
    """One connection per request (sqlite3 connections are not shared between threads)."""
    if "db" not in g:
        g.db = store.connect(g.db_path)
    return g.db


def _labeler(value) -> str:
    name = value.strip() if isinstance(value, str) else ""
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ApiError(400, f"labeler must be your name: 1 to {MAX_NAME_CHARS} printable characters.")
    return name


def _present(item, shown_a: int, shown_b: int) -> dict:
    """An item as the page shows it: completion ``shown_a`` as A, ``shown_b`` as B."""
    text = {item["i"]: item["completion_i"], item["j"]: item["completion_j"]}
    return {"id": item["id"], "prompt": item["prompt"], "source": item["source"],
            "a": {"index": shown_a, "text": text[shown_a]}, "b": {"index": shown_b, "text": text[shown_b]}}


def _random_order(item) -> dict:
    """Which completion is A is drawn per presentation, so position bias averages out."""
    first, second = (item["i"], item["j"]) if random.random() < 0.5 else (item["j"], item["i"])
    return _present(item, first, second)


def _same_origin() -> bool:
    """True when the request says it comes from a page of this server."""
    origin = request.headers.get("Origin")
    if origin is None:
        referer = urlsplit(request.headers.get("Referer", ""))
        if not referer.scheme:
            return False
        origin = f"{referer.scheme}://{referer.netloc}"
    return origin == request.host_url.rstrip("/")


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "send a JSON object with Content-Type: application/json.")
    return body


def _int_field(body: dict, name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"`{name}` must be an integer.")
    return value


def _state(labeler: str) -> dict:
    conn = _db()
    return {"progress": store.progress(conn, labeler), "last_key": store.last_key(conn, labeler)}


def _max_comment() -> int:
    return current_app.config["PREFALIGN_MAX_COMMENT_CHARS"]


def _guard():
    """Before every request: know the database, refuse cross-origin writes."""
    g.db_path = current_app.config["PREFALIGN_DB"]
    if request.method == "POST" and not _same_origin():
        raise ApiError(403, "cross-origin request refused: POST from the labelling page "
                            "(Origin or Referer must equal this server's address).")


def _close(_exc):
    conn = g.pop("db", None)
    if conn is not None:
        conn.close()


def _api_error(e: ApiError):
    return jsonify(error=e.message), e.status


def _http_error(e: HTTPException):
    message = e.description
    if e.code == 413:
        message = f"request too large (comments are limited to {_max_comment()} characters)."
    return jsonify(error=message), e.code


def page():
    return render_template("label.html", max_comment_chars=_max_comment())


def stats_page():
    return render_template("stats.html", **_stats())


def stats_api():
    data = _stats()
    data["labelers"] = [dict(row) for row in data["labelers"]]
    return jsonify(data)


def next_item():
    labeler = _labeler(request.args.get("labeler"))
    item = store.next_item(_db(), labeler)
    return jsonify(item=_random_order(item) if item else None, **_state(labeler))


def one_item(item_id: int):
    try:
        item = store.get_item(_db(), item_id)
    except store.UnknownItem:
        raise ApiError(404, f"no item with id {item_id}.") from None
    return jsonify(item=_random_order(item))


def add_label():
    body = _body()
    labeler = _labeler(body.get("labeler"))
    key, comment = body.get("key"), body.get("comment", "")
    if not isinstance(key, str) or not 8 <= len(key) <= 100:
        raise ApiError(400, "`key` must be a fresh random string (8 to 100 characters) per label.")
    if not isinstance(comment, str):
        raise ApiError(400, "`comment` must be a string.")
    if len(comment) > _max_comment():
        raise ApiError(413, f"comment has {len(comment)} characters; the limit is {_max_comment()}.")
    try:
        label_id, duplicate = store.add_label(
            _db(), key=key, item_id=_int_field(body, "item_id"), labeler=labeler, choice=body.get("choice"),
            shown_a=_int_field(body, "shown_a"), shown_b=_int_field(body, "shown_b"), comment=comment.strip())
    except store.UnknownItem:
        raise ApiError(404, f"no item with id {body.get('item_id')}.") from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    except store.Conflict as e:
        raise ApiError(409, str(e)) from None
    return jsonify(ok=True, label_id=label_id, duplicate=duplicate, **_state(labeler))


def undo():
    body = _body()
    labeler, key = _labeler(body.get("labeler")), body.get("key")
    if key is not None and not isinstance(key, str):
        raise ApiError(400, "`key` must be a string or absent.")
    label = store.undo(_db(), labeler, key)
    if label is None:
        raise ApiError(404, "nothing to undo.")
    item = _present(store.get_item(_db(), label["item_id"]), label["shown_a"], label["shown_b"])
    return jsonify(ok=True, item=item, choice=label["choice"], comment=label["comment"], **_state(labeler))


def _stats() -> dict:
    conn = _db()
    ratings: dict = {}
    for lab in store.active_labels(conn):
        if lab["outcome"] != "skip":
            ratings.setdefault(lab["item_id"], {})[lab["labeler"]] = lab["outcome"]
    return {"progress": store.progress(conn), "labelers": store.labeler_counts(conn), "agreement": summary(ratings)}


ROUTES = [  # (rule, view, methods)
    ("/", page, ["GET"]),
    ("/stats", stats_page, ["GET"]),
    ("/api/stats", stats_api, ["GET"]),
    ("/api/next", next_item, ["GET"]),
    ("/api/items/<int:item_id>", one_item, ["GET"]),
    ("/api/labels", add_label, ["POST"]),
    ("/api/undo", undo, ["POST"]),
]


def create_app(db_path: str, *, max_comment_chars: int = 2000, loopback_only: bool = True) -> Flask:
    """The labelling app over an initialised database (see ``store.init_db``)."""
    app = Flask(__name__)
    app.config["PREFALIGN_DB"] = db_path
    app.config["PREFALIGN_MAX_COMMENT_CHARS"] = max_comment_chars
    # Comments are the only large field; the cap leaves room for them (in UTF-8) and the rest.
    app.config["MAX_CONTENT_LENGTH"] = 16_384 + 4 * max_comment_chars
    if loopback_only:
        app.config["TRUSTED_HOSTS"] = LOOPBACK_HOSTS
    app.before_request(_guard)
    app.teardown_appcontext(_close)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    for rule, view, methods in ROUTES:
        app.add_url_rule(rule, view_func=view, methods=methods)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_label(cfg: LabelConfig) -> int:
    """Load the pairs into the database, then serve until interrupted."""
    from werkzeug.serving import make_server

    require(cfg, "pairs", "db")
    loopback = is_loopback(cfg.host)
    if not loopback and not cfg.allow_remote:
        raise ConfigError(f"--host {cfg.host} is not a loopback address: anyone who can reach it could read "
                          "and write labels. Add --allow-remote if that is what you want.")
    if cfg.max_comment_chars < 0:
        raise ConfigError("--max-comment-chars must not be negative.")
    rows = read_pairs(cfg.pairs)
    Path(cfg.db).parent.mkdir(parents=True, exist_ok=True)
    conn = store.init_db(cfg.db)
    new = store.add_pairs(conn, rows, Path(cfg.pairs).name)
    total = store.progress(conn)["total"]
    conn.close()
    app = create_app(cfg.db, max_comment_chars=cfg.max_comment_chars, loopback_only=loopback)
    try:
        server = make_server(cfg.host, cfg.port, app, threaded=True)
    except OSError as e:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); pick another --port "
                          "(0 picks a free one).") from None
    if not loopback:
        print(f"warning: serving on {cfg.host}, reachable from other machines, without authentication "
              "or TLS. Anyone who can reach it can read prompts and write labels.", file=sys.stderr, flush=True)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"{total} comparisons ({new} new) in {cfg.db}; open http://{shown}:{server.server_port}/ "
          f"(stats at /stats). Ctrl-C stops.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
