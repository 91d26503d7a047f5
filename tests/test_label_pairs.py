"""`prefalign pairs` on a tiny model, and the pairs/prompts readers' errors (file, line, field)."""
import json

import pytest
from conftest import run_cli

from prefalign import config as C
from prefalign.errors import DataError
from prefalign.label.pairs import read_pairs, read_prompts, run_pairs, write_jsonl_atomic


@pytest.mark.parametrize("text, line, match", [
    ('{"prompt": "p", "completions": ["a", "b"]}\n{"prompt": "q", "completions": ["a" "b"]}\n', 2, "invalid JSON"),
    ('{"completions": ["a", "b"]}\n', 1, "field `prompt`"),
    ('{"prompt": 3, "completions": ["a", "b"]}\n', 1, "field `prompt`"),
    ('{"prompt": "p"}\n', 1, "field `completions`.*list of at least 2"),
    ('{"prompt": "p", "completions": "ab"}\n', 1, "field `completions`"),
    ('\n{"prompt": "p", "completions": ["only one"]}\n', 2, "1 completion.*at least 2"),
    ('{"prompt": "p", "completions": ["a", {"text": "b"}]}\n', 1, r"field `completions\[1\]`.*dict"),
    ('["prompt", "completions"]\n', 1, "expected a JSON object"),
])
def test_bad_pairs_files_name_file_line_field(tmp_path, text, line, match):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        read_pairs(str(path))
    assert err.value.line == line and str(path) in str(err.value)


def test_pairs_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_pairs(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_pairs(str(tmp_path / "empty.jsonl"))


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "id": 1}\n\n{"prompt": "b"}\n')
    assert read_prompts(str(path)) == ["a", "b"]
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match="line 2, field `prompt`"):
        read_prompts(str(path))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(str(out), rows())
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.slow  # two model loads: ~20 s on a busy 2-core machine
def test_pairs_cli_samples_k_completions(tmp_path):
    from prefalign.tiny import save_tiny_model

    save_tiny_model(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["The movie was", "Hello there!", "I"]))
    args = ["--model", tmp_path / "model", "--prompts", prompts, "--n-per-prompt", 3, "--max-new-tokens", 6,
            "--batch-size", 2, "--seed", 7]
    run_cli("pairs", *args, "--output", tmp_path / "a.jsonl")
    # Seeded: the library call gives the very file the CLI wrote.
    run_pairs(C.parse_config(C.PairsConfig, [*map(str, args), "--output", str(tmp_path / "b.jsonl")]))
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    rows = read_pairs(str(tmp_path / "a.jsonl"))  # the labelling app accepts what `pairs` writes
    assert [r.prompt for r in rows] == ["The movie was", "Hello there!", "I"]
    assert all(len(r.completions) == 3 and all(isinstance(c, str) for c in r.completions) for r in rows)
    # An untrained model sampling 6 tokens at temperature 1 should not repeat itself three times.
    assert any(len(set(r.completions)) > 1 for r in rows)


def test_pairs_cli_errors(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    proc = run_cli("pairs", "--model", tmp_path, "--prompts", prompts, "--output", tmp_path / "o.jsonl",
                   "--n-per-prompt", 1, check=False)
    assert proc.returncode == 2 and "--n-per-prompt must be at least 2" in proc.stderr
    proc = run_cli("pairs", "--model", tmp_path / "missing", "--prompts", prompts, "--output", tmp_path / "o.jsonl",
                   check=False)
    assert proc.returncode == 2 and str(tmp_path / "missing") in proc.stderr and "Traceback" not in proc.stderr
