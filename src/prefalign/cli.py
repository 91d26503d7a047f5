"""Command line: options -> config dataclass -> the stage's run function. No training logic here.

Each command is one entry of ``COMMANDS``: its words, its config dataclass and a small
function that imports the stage lazily (so ``--help`` does not import torch).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from prefalign import config as C
from prefalign.errors import PrefalignError
from prefalign.train import diskio


def _sft(cfg):
    from prefalign.stages.sft import run_sft
    return run_sft(cfg)


def _reward(cfg):
    from prefalign.stages.reward import run_reward
    return run_reward(cfg)


def _score(cfg):
    from prefalign.stages.score import run_score
    return run_score(cfg)


def _dpo(cfg):
    from prefalign.stages.dpo import run_dpo
    return run_dpo(cfg)


def _ppo(cfg):
    from prefalign.stages.ppo import run_ppo
    return run_ppo(cfg)


def _group(cfg):
    from prefalign.stages.grpo import run_group
    return run_group(cfg)


def _online_dpo(cfg):
    from prefalign.stages.online_dpo import run_online_dpo
    return run_online_dpo(cfg)


def _data_check(cfg):
    from prefalign.stages.data_check import run_data_check
    return run_data_check(cfg)


def _pairs(cfg):
    from prefalign.label.pairs import run_pairs
    return run_pairs(cfg)


def _label(cfg):
    from prefalign.label.app import run_label
    return run_label(cfg)


def _label_export(cfg):
    from prefalign.label.export import run_export
    return run_export(cfg)


def _convert(cfg):
    from prefalign.stages.convert import run_convert
    return run_convert(cfg)


def _plot(cfg):
    from prefalign.plot import run_plot
    return run_plot(cfg)


def _demo(cfg):
    from prefalign.lab.demo import run_demo
    return run_demo(cfg)


@dataclass(frozen=True)
class Command:
    config_cls: type
    run: Callable[[Any], Optional[int]]
    summary: str


COMMANDS: dict[tuple[str, ...], Command] = {
    ("sft",): Command(C.SFTConfig, _sft, "Supervised fine-tuning of a causal LM."),
    ("reward",): Command(C.RewardConfig, _reward, "Train a Bradley-Terry reward model on preference pairs."),
    ("score",): Command(C.ScoreConfig, _score, "Score completions or pairs with a reward model."),
    ("dpo",): Command(C.DPOConfig, _dpo, "Direct Preference Optimization (and variants)."),
    ("ppo",): Command(C.PPOConfig, _ppo, "RLHF with PPO against reward models and/or reward functions."),
    ("rloo",): Command(C.RLOOConfig, _group, "RLOO: K completions per prompt, leave-one-out baseline, no critic."),
    ("grpo",): Command(C.GRPOConfig, _group, "GRPO (and Dr. GRPO, DAPO options): group-normalised advantages."),
    ("online-dpo",): Command(C.OnlineDPOConfig, _online_dpo, "Online DPO: two samples per prompt, a judge orders "
                                                             "them, a DPO step."),
    ("data", "check"): Command(C.DataCheckConfig, _data_check, "Audit a data file before training."),
    ("pairs",): Command(C.PairsConfig, _pairs, "Sample completions per prompt for human labelling."),
    ("label",): Command(C.LabelConfig, _label, "Serve the labelling web app."),
    ("label", "export"): Command(C.LabelExportConfig, _label_export, "Export labels as preference pairs."),
    ("models", "convert"): Command(C.ConvertConfig, _convert, "Convert a GGUF file to an HF checkpoint."),
    ("plot",): Command(C.PlotConfig, _plot, "Draw the training curves of one or several runs (PNG)."),
    ("demo",): Command(C.DemoConfig, _demo, "The whole pipeline on the embedded sentiment lab."),
}


def _usage() -> str:
    lines = ["usage: prefalign COMMAND [options]   (prefalign COMMAND --help for its options)", "", "commands:"]
    for words, cmd in COMMANDS.items():
        lines.append(f"  {' '.join(words):<16} {cmd.summary}")
    return "\n".join(lines)


def find_command(argv: list[str]) -> tuple[tuple[str, ...], Command, list[str]]:
    """The longest registered command that prefixes argv, and the remaining arguments."""
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            return words, COMMANDS[words], argv[n:]
    raise KeyError(argv[0] if argv else "")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from prefalign import __version__
        print(__version__)
        return 0
    try:
        words, cmd, rest = find_command(argv)
    except KeyError:
        import difflib
        names = [" ".join(w) for w in COMMANDS]
        close = difflib.get_close_matches(" ".join(argv[:2]), names, n=1) or difflib.get_close_matches(argv[0], names, n=1)
        hint = f" Did you mean `prefalign {close[0]}`?" if close else ""
        print(f"prefalign: unknown command `{argv[0]}`.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    # Under torchrun every rank raises the same PrefalignError (they read the same inputs and
    # agree on stops): rank 0 alone reports it.
    quiet = os.environ.get("RANK", "0") != "0"
    try:
        cfg = C.parse_config(cmd.config_cls, rest, prog="prefalign " + " ".join(words))
        code = int(cmd.run(cfg) or 0)
    except PrefalignError as e:
        if not quiet:
            print(f"prefalign {' '.join(words)}: {e.label}: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        if not quiet:
            print(f"prefalign {' '.join(words)}: interrupted.", file=sys.stderr)
        code = 130
    except Exception as e:  # a full or read-only disk under a write that no guard of diskio covers
        err = diskio.os_error_of(e)
        if err is None or err.errno not in diskio.WRITE_ERRNOS:
            raise
        error = diskio.disk_error(err, Path(err.filename) if err.filename else None, then="rerun")
        if not quiet:
            print(f"prefalign {' '.join(words)}: {error.label}: {error}", file=sys.stderr)
        code = error.exit_code
    # Any other exception propagates with its traceback and torchrun stops the other ranks.
    if "prefalign.train.trackers" in sys.modules:  # runs that ended without a summary (an error, a signal)
        from prefalign.train.trackers import close_open
        close_open(ok=code == 0)
    if "torch.distributed" in sys.modules:  # only a stage that trained imported it
        from prefalign.train.dist import finish
        return finish(code)  # under torchrun, the process ends here
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
