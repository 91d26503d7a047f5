"""Bad input at scale: every malformed file, model or option gives a one-paragraph error that
names the file or field, a non-zero exit, no traceback, and no OUTPUT directory left behind.

The corpus is generated here (nothing binary is committed). Most cases run in-process through
prefalign.cli.main for speed; a few also run as real processes.
"""
import importlib
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification, ViTConfig

from prefalign.cli import main
from prefalign.errors import ModelError
from prefalign.models import check_same_vocab, load_tokenizer
from prefalign.tiny import save_tiny_model
from conftest import run_cli

PAIR = {"prompt": "The movie was", "chosen": " great.", "rejected": " awful."}
SFT = {"prompt": "The movie was", "completion": " great."}


class Corpus:
    """A folder of models and files; ``file`` writes one data file and returns its path."""

    def __init__(self, root: Path):
        self.root = root

    def file(self, name, content) -> Path:
        path = self.root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def jsonl(self, name, rows) -> Path:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def model_copy(self, name, drop=()) -> Path:
        path = self.root / name
        if not path.exists():
            shutil.copytree(self.root / "base", path)
            for f in drop:
                (path / f).unlink()
        return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    c = Corpus(root)
    save_tiny_model(root / "base")
    save_tiny_model(root / "other-vocab", texts=["completely different words here"] * 8, vocab_size=280)
    c.jsonl("sft.jsonl", [SFT] * 8)
    c.jsonl("prefs.jsonl", [PAIR] * 8)
    # Not a causal LM: a vision transformer config.
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        root / "vit")
    # A saved reward model passed where a policy is expected.
    rm = AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=1)
    rm.save_pretrained(root / "reward-model")
    load_tokenizer(str(root / "base")).save_pretrained(root / "reward-model")
    # The model's embedding has fewer rows than its tokenizer has tokens.
    small = c.model_copy("small-embedding")
    save_tiny_model(root / "tmp-small", texts=["a b c"] * 4, vocab_size=270)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(root / "tmp-small" / f, small / f)
    return c


def data_case(content, name="data.jsonl", stage="sft", *expect):
    """A training run on a generated data file that is wrong; the error names the file."""
    def build(c: Corpus):
        model = c.root / "base"
        path = c.file(name, content) if content is not None else c.root / name
        return [stage, "--model", model, "--data", path], [path.name, *expect]
    return build


def model_case(model, *expect, stage="sft", extra=()):
    def build(c: Corpus):
        path = model(c) if callable(model) else c.root / model
        return [stage, "--model", path, "--data", c.root / ("prefs.jsonl" if stage != "sft" else "sft.jsonl"),
                *extra], [str(Path(path).name), *expect]
    return build


def option_case(*args, expect, stage="sft"):
    def build(c: Corpus):
        data = c.root / ("prefs.jsonl" if stage != "sft" else "sft.jsonl")
        return [stage, "--model", c.root / "base", "--data", data, *[a(c) if callable(a) else a for a in args]], expect
    return build


def yaml(name, text):
    return lambda c: c.file(name, text)


def mkdir(c, name):
    (c.root / name).mkdir(exist_ok=True)
    return name


def garbage_config(c):
    path = c.model_copy("garbage-config")
    (path / "config.json").write_text("{oops")
    return path


def huge_line(c):
    return '{"text": "' + "word " * 800_000 + "\n"  # 4 MB, never closed


CASES = {
    "truncated-json": data_case(json.dumps(SFT) + '\n{"prompt": "The movie', "t.jsonl", "sft", "line 2",
                                "not valid JSON"),
    "wrong-type": data_case('{"text": 5}\n', "w.jsonl", "sft", "field `text`", "must be a string"),
    "binary-garbage": data_case(bytes(range(256)) * 64, "g.jsonl", "sft", "not UTF-8"),
    "nul-bytes": data_case(b'{"text": "a"}\n\x00\x00\x00\n', "n.jsonl", "sft", "binary"),
    "empty-string": data_case('{"text": ""}\n', "e.jsonl", "sft", "field `text`", "is empty"),
    "huge-unclosed-record": lambda c: data_case(huge_line(c), "huge.jsonl", "sft", "line 1", "not valid JSON")(c),
    "unknown-format": data_case('{"question": "a", "answer": "b"}\n', "u.jsonl", "sft", "no known format"),
    "latin-1": data_case('{"text": "café crème"}\n'.encode("latin-1"), "l1.jsonl", "sft", "not UTF-8", "iconv"),
    "utf-16": data_case('{"text": "hello"}\n'.encode("utf-16"), "u16.jsonl", "sft", "not UTF-8"),
    "empty-file": data_case("", "empty.jsonl", "sft", "is empty"),
    "directory": lambda c: data_case(None, mkdir(c, "a-directory"), "sft", "is a directory")(c),
    "missing-file": data_case(None, "nowhere.jsonl", "sft", "does not exist"),
    "array-non-object": data_case('[{"text": "a"}, 3]', "arr.json", "sft", "record 1"),
    "fake-gzip": data_case('{"text": "a"}\n', "fake.jsonl.gz", "sft", "not gzip"),
    "pretty-printed": data_case('{\n  "text": "a"\n}\n', "pretty.jsonl", "sft", "one object per line"),
    "mixed-formats": data_case('{"text": "a"}\n' + json.dumps(SFT) + "\n", "mixed.jsonl", "sft", "one format"),
    "reward-on-text": data_case('{"text": "a b"}\n' * 8, "text.jsonl", "reward", "no preference pairs"),
    "reward-bad-margin": data_case(json.dumps({**PAIR, "margin": "high"}) + "\n", "m.jsonl", "reward",
                                   "field `margin`"),
    "reward-chosen-ints": data_case(json.dumps({**PAIR, "chosen": [1, 2]}) + "\n", "ints.jsonl", "reward",
                                    "field `chosen`"),
    "all-pairs-identical": data_case(json.dumps({**PAIR, "rejected": PAIR["chosen"]}) + "\n", "same.jsonl",
                                     "reward", "all 1 record(s) were skipped", "identical"),
    "bad-eval-data": option_case("--eval-data", lambda c: c.file("ev.jsonl", b"\xff\xfe\x00"), expect=["ev.jsonl"]),
    "unknown-data-format": option_case("--data-format", "nope", expect=["unknown data format `nope`"]),
    "model-missing": model_case("no-such-model", "does not exist"),
    "model-no-config": model_case(lambda c: c.model_copy("no-config", ["config.json"]), "no config.json"),
    "model-no-tokenizer": model_case(lambda c: c.model_copy("no-tok", ["tokenizer.json", "tokenizer_config.json"]),
                                     "no tokenizer files"),
    "model-not-causal": model_case("vit", "not a causal"),
    "reward-model-as-policy": model_case("reward-model", "reward/value model"),
    "model-is-a-file": model_case(lambda c: c.root / "sft.jsonl", "is a file, not a model"),
    "model-config-garbage": model_case(lambda c: garbage_config(c), "config.json"),
    "tokenizer-bigger-than-embedding": model_case("small-embedding", "tokenizer has"),
    "reward-not-causal": model_case("vit", "not a causal", stage="reward"),
    "yaml-missing": option_case("--config", lambda c: c.root / "nope.yaml", expect=["nope.yaml", "does not exist"]),
    "yaml-unknown-key": option_case("--config", yaml("k.yaml", "batch_sise: 2\n"), expect=["k.yaml", "batch_size"]),
    "yaml-syntax": option_case("--config", yaml("s.yaml", "lr: [1, 2\n"), expect=["s.yaml", "not valid YAML"]),
    "yaml-wrong-type": option_case("--config", yaml("t.yaml", "batch_size: many\n"), expect=["t.yaml", "batch_size"]),
    "yaml-not-mapping": option_case("--config", yaml("l.yaml", "- 1\n- 2\n"), expect=["l.yaml", "mapping"]),
    "negative-batch-size": option_case("--batch-size", "-4", expect=["--batch-size"]),
    "nan-lr": option_case("--lr", "nan", expect=["--lr"]),
    "negative-keep-checkpoints": option_case("--keep-checkpoints", "-1", expect=["--keep-checkpoints"]),
    "zero-max-length": option_case("--max-length", "0", expect=["--max-length"]),
    "eval-fraction-above-one": option_case("--eval-fraction", "1.5", expect=["--eval-fraction"]),
    "too-little-data": option_case("--batch-size", "64", expect=["fewer than one global batch"]),
    "unknown-option": option_case("--bogus", "1", expect=["unrecognized arguments: --bogus"]),
    "dpo-negative-nll-weight": option_case("--nll-weight", "-1", expect=["--nll-weight"], stage="dpo"),
    "missing-data-option": lambda c: (["sft", "--model", c.root / "base"], ["--data"]),
    "output-is-a-file": lambda c: (["sft", "--model", c.root / "base", "--data", c.root / "sft.jsonl", "--output",
                                    c.root / "sft.jsonl"], ["exists and is not a directory"]),
}
assert len(CASES) >= 40


def call(argv, capsys) -> tuple[int, str]:
    """prefalign.cli.main in-process: (exit code, stderr). argparse exits via SystemExit."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def check(rc, err, expect, out):
    assert rc not in (0, None), err
    assert "Traceback" not in err
    for text in expect:
        assert text in err, f"{text!r} not in: {err}"
    assert len(err) < 3000, "an error is one paragraph, not a dump of the input"
    assert not out.exists(), "OUTPUT was created although the run never started"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(corpus, case, capsys, tmp_path):
    argv, expect = CASES[case](corpus)
    out = tmp_path / "out"
    if "--output" not in map(str, argv):
        argv = [*argv, "--output", out, "--no-progress"]
    rc, err = call(argv, capsys)
    check(rc, err, expect, out)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["binary-garbage", "model-no-config", "model-not-causal", "yaml-unknown-key",
                                  "huge-unclosed-record"])
def test_bad_input_real_process(corpus, case, tmp_path):
    argv, expect = CASES[case](corpus)
    out = tmp_path / "out"
    proc = run_cli(*argv, "--output", out, "--no-progress", check=False)
    check(proc.returncode, proc.stderr, expect, out)


@pytest.mark.parametrize("stage,flag", [("dpo", "--ref-model"), ("ppo", "--ref-model")])
def test_reference_with_another_vocabulary(corpus, stage, flag, capsys, tmp_path):
    try:
        importlib.import_module(f"prefalign.stages.{stage}")
    except ImportError:
        pytest.skip(f"prefalign.stages.{stage} is not written yet")
    data = ["--data", corpus.root / "prefs.jsonl"] if stage == "dpo" else \
        ["--prompts", corpus.root / "prefs.jsonl", "--reward-model", corpus.root / "reward-model"]
    rc, err = call([stage, "--model", corpus.root / "base", flag, corpus.root / "other-vocab", *data,
                    "--output", tmp_path / "out", "--no-progress"], capsys)
    check(rc, err, ["other-vocab", "vocabulary"], tmp_path / "out")


def test_check_same_vocab(corpus):
    base = load_tokenizer(str(corpus.root / "base"))
    check_same_vocab(base, load_tokenizer(str(corpus.root / "base")), "base", "base-again")
    with pytest.raises(ModelError, match=r"other: the reference model does not share .* has \d+ tokens"):
        check_same_vocab(base, load_tokenizer(str(corpus.root / "other-vocab")), "base", "other")
    shuffled = load_tokenizer(str(corpus.root / "base"))
    vocab = shuffled.get_vocab()
    a, b = sorted(vocab)[10:12]
    fake = type("Tok", (), {"__len__": lambda self: len(vocab),
                            "get_vocab": lambda self: {**vocab, a: vocab[b], b: vocab[a]}})()
    with pytest.raises(ModelError, match="maps them to other ids"):
        check_same_vocab(base, fake, "base", "swapped", role="reward")
