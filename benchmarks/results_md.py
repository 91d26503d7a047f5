"""Helpers for benchmark scripts that write benchmarks/RESULTS.md: machine and version lines,
and replacing one "## " section while leaving the others (written by other scripts) alone."""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from pathlib import Path

TITLE = "# Benchmarks\n\nSide-by-side runs against peer libraries on the same fixture and machine. " \
        "Each section is written by the script it names.\n"


def machine_line() -> str:
    """CPU model name and core count from lscpu (falls back to os.cpu_count)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def _versions(python: str, modules: list[str], env: dict) -> dict:
    code = "import importlib; " + "; ".join(f"print(importlib.import_module('{m}').__version__)" for m in modules)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    return dict(zip(modules, out))


def versions(ours_python: str, peer_python: str, env: dict) -> dict:
    return {"date": datetime.date.today().isoformat(), "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "ours": _versions(ours_python, ["torch", "transformers"], env),
            "peer": _versions(peer_python, ["trl", "torch", "transformers"], env)}


def update_section(path: Path, header: str, text: str) -> None:
    """Replace the section starting at ``header`` (up to the next '## ' line) with ``text``, or append it."""
    old = path.read_text() if path.exists() else TITLE
    lines = old.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == header), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text.rstrip("\n") + "\n" + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.write_text(new)
