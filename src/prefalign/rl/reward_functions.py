"""Where the online loops' rewards come from: reward models (``--reward-model DIR``) and Python
reward functions (``--reward-fn module:function``), several at once, combined by
``--reward-weights``.

A reward function is any callable ``fn(prompts, completions, **columns) -> list[float]``: one
float per completion. ``prompts`` and ``completions`` are aligned lists (a prompt repeated once per
completion); for chat prompts (lists of {role, content}) each completion is
``[{"role": "assistant", "content": text}]``, otherwise a string. ``columns`` are the prompt file's
other fields, aligned the same way (an ``answer`` column reaches the function as ``answer=[...]``),
so a math answer key works; ``completion_ids`` holds each completion's sampled token ids (its EOS
included), as TRL passes them. The user names the callable explicitly; it is imported, not built from
a registry.

A function that raises, returns the wrong number of values or a non-finite value stops the run
with a RewardFunctionError naming the function and the first prompt concerned.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from prefalign.data import load_prompts, read_records
from prefalign.errors import ConfigError, PrefalignError
from prefalign.models import load_scalar_model
from prefalign.rl.reward_scoring import reward_inputs, same_tokenizer
from prefalign.rollout import Rollout

# Fields of a prompt record that are not passed as columns (TRL drops the same).
NOT_COLUMNS = ("prompt", "completion", "completion_ids")


class RewardFunctionError(PrefalignError):
    """A reward function raised, or returned something that is not one finite float per completion."""

    label = "reward function error"


def load_function(spec: str) -> tuple[str, Callable]:
    """``module:function`` (a module importable from sys.path, e.g. ``mypkg.rewards:accuracy``) or
    ``path/to/file.py:function``. Returns (the spec, the callable); a ConfigError when either half
    cannot be found."""
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise ConfigError(f"--reward-fn {spec!r}: expected module:function or path/to/file.py:function.")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"--reward-fn {spec}: {path} is not a file.")
        mod_spec = importlib.util.spec_from_file_location(f"prefalign_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"--reward-fn {spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"--reward-fn {spec}: cannot import module {module_name!r} ({e}); give a module on "
                              f"sys.path (PYTHONPATH) or a file path ending in .py.") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"--reward-fn {spec}: {module_name} has no callable named {fn_name!r}.")
    return spec, fn


def prompt_columns(path, data_format: Optional[str] = None, **source) -> list[dict]:
    """The other fields of each prompt record, in load_prompts' order: one dict per prompt
    (``source``: data.source_options of the config, for dataset folders and Hub ids)."""
    examples = load_prompts(path, data_format, **source)
    records = [r for _, r in read_records(path, **source)]
    if len(records) != len(examples):  # every record gives one prompt today; say so if that changes
        raise ConfigError(f"--prompts {path}: {len(records)} records gave {len(examples)} prompts, so the "
                          f"records' columns cannot be passed to --reward-fn.")
    return [{k: v for k, v in r.items() if k not in NOT_COLUMNS} for r in records]


def text_of(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def short(prompt, limit: int = 120) -> str:
    text = prompt if isinstance(prompt, str) else repr(prompt)
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass
class RewardFunction:
    """A user's reward function as one reward source."""
    name: str  # the --reward-fn spec, used in messages
    fn: Callable

    @property
    def metric_name(self) -> str:
        return getattr(self.fn, "__name__", self.name.rpartition(":")[2])

    def __call__(self, prompts: list, completions: list, columns: dict[str, list], rollout: Rollout) -> torch.Tensor:
        """(N,) float32 rewards; a RewardFunctionError names this function and the prompt concerned."""
        try:
            values = self.fn(prompts, completions, **columns)
        except Exception as e:
            raise RewardFunctionError(f"--reward-fn {self.name} raised {type(e).__name__}: {e} (called on "
                                      f"{len(prompts)} completions; first prompt {short(prompts[0])}).") from e
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError) as e:
            raise RewardFunctionError(f"--reward-fn {self.name} must return a list of floats, one per completion; "
                                      f"got {type(values).__name__} ({e}); first prompt {short(prompts[0])}.") from None
        if len(values) != len(prompts):
            raise RewardFunctionError(f"--reward-fn {self.name} returned {len(values)} values for {len(prompts)} "
                                      f"completions (one float per completion is needed); first prompt "
                                      f"{short(prompts[0])}.")
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise RewardFunctionError(f"--reward-fn {self.name} returned {values[bad]} (not a finite number) for "
                                      f"completion {bad}, prompt {short(prompts[bad])}, completion "
                                      f"{short(text_of(completions[bad]))}.")
        return torch.tensor(values, dtype=torch.float32, device=rollout.query_ids.device)


@dataclass
class RewardModel:
    """A frozen sequence-classification reward model as one reward source: its normalised score
    (config.json's prefalign_reward_shift/scale) at the last real token, re-tokenised when its
    tokenizer differs from the policy's. score_cut_at_eos: a completion cut at the length cap is scored
    with an EOS after it, as an ended text (--score-cut-at-eos)."""
    name: str  # the directory
    model: torch.nn.Module
    tokenizer: object
    retokenize: bool
    score_cut_at_eos: bool = False

    @property
    def metric_name(self) -> str:
        return Path(self.name).name or self.name

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, columns: dict[str, list], rollout: Rollout) -> torch.Tensor:
        texts = [text_of(c) for c in completions]
        scores = self.model(*reward_inputs(rollout, prompts, texts, self.tokenizer, self.retokenize,
                                           end_cut=self.score_cut_at_eos))
        return self.model.normalized(scores).float()


def load_reward_models(paths: list[str], policy_tokenizer, score_cut_at_eos: bool = False,
                       **load_kw) -> list[RewardModel]:
    out = []
    for path in paths:
        model, tok = load_scalar_model(path, trainable=False, **load_kw)
        out.append(RewardModel(path, model, tok, not same_tokenizer(policy_tokenizer, tok), score_cut_at_eos))
    return out


def split_list(value: Optional[str]) -> list[str]:
    return [s.strip() for s in (value or "").split(",") if s.strip()]


def as_completions(prompts: list, texts: list[str]) -> list:
    """Completions in the prompts' form: a string, or an assistant message for chat prompts."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def combine(per_source: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """sum_s w_s r_s: (S, N) rewards of S sources and S weights -> (N,)."""
    return (per_source * torch.tensor(weights, dtype=per_source.dtype, device=per_source.device)[:, None]).sum(0)


def check_sources(n_models: int, fn_specs: list[str], weights: Optional[str]) -> list[float]:
    """The weights of the reward sources (reward models first, then functions, in the order given):
    --reward-weights, or 1 each. Before anything loads."""
    n = n_models + len(fn_specs)
    if n == 0:
        raise ConfigError("give a reward: --reward-model DIR and/or --reward-fn module:function (several may be "
                          "comma-separated).")
    if weights is None:
        return [1.0] * n
    try:
        values = [float(w) for w in split_list(weights)]
    except ValueError:
        raise ConfigError(f"--reward-weights {weights!r}: expected comma-separated numbers.") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--reward-weights has {len(values)} value(s) for {n} reward source(s) ({n_models} "
                          f"reward model(s), then {len(fn_specs)} function(s)); give one finite weight each.")
    return values

