"""Helpers for the labelling-app tests: pairs files, a real server subprocess, HTTP calls, Chromium."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def start_server(pairs: Path, db: Path, *extra: str, log: Path | None = None):
    """`prefalign label` as a real subprocess on a free port; returns (process, base URL).

    stderr (werkzeug's request log) goes to a file: a full, undrained pipe would block the server."""
    log = log or db.with_suffix(".log")
    err = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefalign", "label", "--pairs", str(pairs), "--db", str(db),
                             "--port", "0", *extra], stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    killer = threading.Timer(60, proc.kill)  # never hang the suite if the server fails to announce itself
    killer.start()
    line = proc.stdout.readline()
    killer.cancel()
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r}\n{log.read_text()}")
    url = line.split("open ", 1)[1].split()[0].rstrip("/")
    return proc, url


def stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def http(method: str, url: str, body: dict | None = None, origin: str | None = None, timeout: float = 30):
    """(status, JSON body) of one request; ``origin`` is sent as the Origin header when given."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if origin:
        req.add_header("Origin", origin)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ensure_chromium() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver, installing them with apt-get when missing.
    Skips (with the reason) only when installing is impossible here."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chrome and driver:
        return chrome, driver
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium/chromedriver missing and apt-get is unavailable or needs root: "
                    "run `apt-get install -y chromium chromium-driver`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:  # package lists may be stale or absent: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if proc.returncode != 0 or not (chrome and driver):
        pytest.skip(f"could not install chromium and chromium-driver with apt-get: {proc.stderr[-500:]}")
    return chrome, driver


def chrome_driver(chrome: str, driver: str, profile: Path):
    """A headless Chromium under selenium, with the flags this closed network needs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))
