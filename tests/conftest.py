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


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """A list that grows by one each time a decoder layer runs under torch.utils.checkpoint, for the
    models whose checkpointing is enabled after this fixture (transformers binds the function then)."""
    import transformers.modeling_utils

    calls, real = [], transformers.modeling_utils.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    return calls


def assert_same_run(a, b, rel=1e-5, absolute=1e-6, weights_atol=1e-6):
    """Two runs' metrics.jsonl rows (all but perf/ timings; numbers within rel or absolute, the rest
    equal) and their saved policies (OUTPUT/model.safetensors) within weights_atol, tensor by tensor."""
    import torch
    from safetensors.torch import load_file

    from prefalign.train.logger import read_metrics

    rows_a, rows_b = read_metrics(Path(a) / "metrics.jsonl"), read_metrics(Path(b) / "metrics.jsonl")
    assert len(rows_a) == len(rows_b) > 0
    for x, y in zip(rows_a, rows_b):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if isinstance(value, (int, float)) and not key.startswith("perf/"):
                assert y[key] == pytest.approx(value, rel=rel, abs=absolute), (x["step"], key)
            elif not key.startswith("perf/"):
                assert y[key] == value, (x["step"], key)
    wa, wb = (load_file(Path(run) / "model.safetensors") for run in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wb[k], wa[k], rtol=0, atol=weights_atol), k


def num_layers(model_dir) -> int:
    """Decoder layers of a saved model (config.json's num_hidden_layers)."""
    import json
    return json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
