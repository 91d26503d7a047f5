import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SHARED = ROOT.parent / "shared"

# Subprocesses (CLI tests) import the same source tree as the tests.
os.environ["PYTHONPATH"] = str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(*args, check=True, timeout=600, env=None):
    """Run `python -m prefalign ARGS` in a subprocess; returns CompletedProcess (text)."""
    proc = subprocess.run([sys.executable, "-m", "prefalign", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"prefalign {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def shared_data():
    path = SHARED / "data" / "hh-harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip("../shared/data is absent")
    return path
