"""The reward sources of the online loops (`prefalign ppo`, `rloo`, `grpo`, `online-dpo`), from
the options to a scored rollout: --reward-model and --reward-fn checked and loaded, the prompt
file's columns for the functions, and scoring that stops every rank, after a checkpoint, when a
reward function fails (rl/reward_functions.py says what a function must return)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch

from prefalign.data import source_options
from prefalign.errors import ConfigError, PrefalignError
from prefalign.rl.reward_functions import (RewardFunction, RewardFunctionError, check_sources, load_function,
                                           load_reward_models, prompt_columns, split_list)
from prefalign.rollout import Rollout
from prefalign.train.dist import all_gather_object
from prefalign.train.loop import autocast_for

T = TypeVar("T")


@dataclass
class RewardPlan:
    """The reward sources an options set names, checked before any model loads."""
    rm_paths: list[str]
    functions: list[RewardFunction]
    weights: list[float]  # reward models first, then functions


def plan_rewards(cfg) -> RewardPlan:
    """--reward-model, --reward-fn and --reward-weights: ConfigErrors for a missing source, a function
    that cannot be imported, or weights that do not match."""
    rm_paths, fn_specs = split_list(cfg.reward_model), split_list(cfg.reward_fn)
    weights = check_sources(len(rm_paths), fn_specs, cfg.reward_weights)
    if cfg.score_cut_at_eos and not rm_paths:
        raise ConfigError("--score-cut-at-eos changes how a reward model scores a completion cut at "
                          "--max-new-tokens, and no --reward-model is given: leave it out, or add the reward model.")
    return RewardPlan(rm_paths, [RewardFunction(*load_function(spec)) for spec in fn_specs], weights)


def columns_of(plan: RewardPlan, cfg, n_prompts: int) -> list[dict]:
    """The other fields of each prompt record (for the reward functions; empty dicts without any)."""
    if not plan.functions:
        return [{} for _ in range(n_prompts)]
    return prompt_columns(cfg.prompts, cfg.data_format, **source_options(cfg))


def load_sources(plan: RewardPlan, policy_tokenizer, cfg, device) -> list:
    """Reward models (loaded, frozen), then the functions: the order of the weights."""
    return load_reward_models(plan.rm_paths, policy_tokenizer, score_cut_at_eos=cfg.score_cut_at_eos,
                              dtype=cfg.dtype, device=device,
                              attn_implementation=cfg.attn_implementation, seed=cfg.seed) + plan.functions


def metric_names(sources: list) -> list[str]:
    """The <name> of each source's rewards/<name>/mean: its metric_name, with _2, _3, ... in order when
    an earlier source has it (reward models in folders a/rm and b/rm, two files' ``score``), so no
    source's metric overwrites another's."""
    taken, names = set(), []
    for source in sources:
        name, k = source.metric_name, 1
        while name in taken:
            k += 1
            name = f"{source.metric_name}_{k}"
        taken.add(name)
        names.append(name)
    return names


def batch_columns(columns: list[dict], prompt_indices: list[int], k: int, r: Rollout) -> dict[str, list]:
    """The columns of a rollout's completions (each prompt's repeated K times) and their ``completion_ids``."""
    names = sorted(set().union(*columns)) if columns else []
    cols = {c: [columns[i].get(c) for i in prompt_indices for _ in range(k)] for c in names}
    cols["completion_ids"] = [ids[mask].tolist() for ids, mask in zip(r.response_ids, r.response_mask)]
    return cols


def score(sources: list, prompts: list, completions: list, columns: dict, r: Rollout, dtype: str = "auto"
          ) -> torch.Tensor:
    """(S, N) rewards of every source for the N completions (reward models under --dtype's autocast)."""
    with autocast_for(r.query_ids.device, dtype):
        return torch.stack([source(prompts, completions, columns, r) for source in sources])


def agreed_error(error: Optional[PrefalignError]) -> Optional[str]:
    """The first rank's reward-function error, the same on every rank (None when no rank had one)."""
    messages = [e for e in all_gather_object(None if error is None else str(error)) if e is not None]
    return messages[0] if messages else None


def scores_or_stop(run, out: Path, compute: Callable[[], T], before_save: Optional[Callable[[], None]] = None) -> T:
    """``compute()`` (the rollout's scores); when a reward function fails on any rank, every rank
    saves the checkpoint of the iterations done (``before_save`` first, e.g. to rewind a generator
    this iteration drew from) and raises the first rank's RewardFunctionError. ``compute`` must run no
    collective and change no state the checkpoint holds: a rank whose function failed goes straight
    to the all_gather of the error."""
    error = result = None
    try:
        result = compute()
    except RewardFunctionError as e:
        error = e
    message = agreed_error(error)
    if message is not None:
        if before_save is not None:
            before_save()
        run.save()
        raise RewardFunctionError(f"{message} A checkpoint at iteration {run.step} is in "
                                  f"{out / 'checkpoints'}; fix the function, then rerun with --resume.")
    return result
