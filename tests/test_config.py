"""The CLI and YAML fill one dataclass schema; CLI wins; unknown keys name the closest valid key."""
import pytest

from prefalign import config as C
from prefalign.cli import COMMANDS, main
from prefalign.errors import ConfigError


def test_cli_fills_dataclass():
    cfg = C.parse_config(C.SFTConfig, ["--model", "m", "--data", "d.jsonl", "--output", "o",
                                       "--batch-size", "4", "--lr", "1e-3", "--packing"])
    assert (cfg.model, cfg.data, cfg.output, cfg.batch_size, cfg.lr, cfg.packing) == ("m", "d.jsonl", "o", 4, 1e-3, True)
    assert cfg.grad_accum == 1  # default kept


def test_yaml_then_cli_wins(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: from-yaml\nbatch-size: 2\nlr: 0.01\nbeta: 0.5\n")
    cfg = C.parse_config(C.DPOConfig, ["--config", str(y), "--lr", "0.02"])
    assert cfg.model == "from-yaml" and cfg.batch_size == 2 and cfg.lr == 0.02 and cfg.beta == 0.5


def test_unknown_yaml_key_names_closest(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("batch_sise: 2\n")
    with pytest.raises(ConfigError, match="unknown key `batch_sise`.*`batch_size`"):
        C.parse_config(C.SFTConfig, ["--config", str(y)])


def test_yaml_wrong_type(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("batch_size: many\n")
    with pytest.raises(ConfigError, match="batch_size.*int"):
        C.parse_config(C.SFTConfig, ["--config", str(y)])


def test_invalid_value_message():
    with pytest.raises(ConfigError, match="--batch-size must be at least 1"):
        C.parse_config(C.SFTConfig, ["--batch-size", "0"])


@pytest.mark.parametrize("cls", list(dict.fromkeys(cmd.config_cls for cmd in COMMANDS.values())),
                         ids=lambda cls: cls.__name__)
def test_every_option_has_help(cls):
    for name, f in C.fields_of(cls).items():
        assert f.metadata.get("help"), f"{cls.__name__}.{name} has no help text"
    C.build_parser(cls)  # builds without error


def test_cli_unknown_command(capsys):
    assert main(["sfft"]) == 2
    assert "Did you mean `prefalign sft`" in capsys.readouterr().err


def test_cli_config_error_is_one_line(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("[1, 2]\n")
    assert main(["sft", "--config", str(y)]) == 2
    err = capsys.readouterr().err
    assert "must hold a mapping" in err and "Traceback" not in err


def test_convert_takes_the_file_alone_or_as_option(tmp_path, capsys):
    alone = C.parse_config(C.ConvertConfig, ["m.gguf", "--output", "out"])
    after = C.parse_config(C.ConvertConfig, ["--output", "out", "m.gguf"])
    option = C.parse_config(C.ConvertConfig, ["--file", "m.gguf", "--output", "out"])
    both = C.parse_config(C.ConvertConfig, ["m.gguf", "--file", "m.gguf", "--output", "out"])
    assert {(c.file, c.output) for c in (alone, after, option, both)} == {("m.gguf", "out")}
    y = tmp_path / "c.yaml"
    y.write_text("file: from-yaml.gguf\n")
    assert C.parse_config(C.ConvertConfig, ["--config", str(y), "m.gguf"]).file == "m.gguf"  # CLI wins
    assert C.parse_config(C.ConvertConfig, ["--output", "out"]).file is None  # run_convert then asks for it
    with pytest.raises(ConfigError, match="a.gguf and --file b.gguf disagree"):
        C.parse_config(C.ConvertConfig, ["a.gguf", "--file", "b.gguf", "--output", "out"])
    assert main(["models", "convert", "a.gguf", "--file", "b.gguf", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "disagree" in err and "Traceback" not in err and not (tmp_path / "o").exists()
