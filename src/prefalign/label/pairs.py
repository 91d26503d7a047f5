"""`prefalign pairs`: sample K completions per prompt for people to compare, and read them back.

A pairs file is JSONL, one row per prompt: ``{"prompt": str, "completions": [str, str, ...]}``.
`prefalign pairs` writes it; people may also write it by hand. ``read_pairs`` validates it for
the labelling app and names the file, line and field of anything wrong.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefalign.config import PairsConfig, require
from prefalign.data import load_prompts, source_options
from prefalign.errors import ConfigError, DataError


@dataclass
class PairsRow:
    prompt: str
    completions: list[str]
    line: int  # 1-based line in the pairs file, for messages


def _json_lines(path: str):
    """Yield (line number, parsed object) for every non-blank line of a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise DataError("file does not exist (or is not a file).", path=path)
    with p.open(encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object.",
                                path=path, line=n) from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}.", path=path, line=n)
            yield n, obj


def _prompt_of(obj: dict, path: str, line: int) -> str:
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise DataError('every row needs a non-empty string "prompt".', path=path, line=line, field="prompt")
    return prompt


def read_prompts(path: str) -> list[str]:
    """Prompts from JSONL rows with a string ``prompt`` (other fields are ignored)."""
    prompts = []
    for n, obj in _json_lines(path):
        prompt = _prompt_of(obj, path, n)
        prompts.append(prompt)
    if not prompts:
        raise DataError("no prompts found; write one JSON object with a \"prompt\" per line.", path=path)
    return prompts


def read_pairs(path: str) -> list[PairsRow]:
    """Validated rows of a pairs file: a string prompt and at least two string completions."""
    rows = []
    for n, obj in _json_lines(path):
        prompt = _prompt_of(obj, path, n)
        completions = obj.get("completions")
        if not isinstance(completions, list):
            raise DataError('every row needs "completions": a list of at least 2 strings.',
                            path=path, line=n, field="completions")
        if len(completions) < 2:
            raise DataError(f"{len(completions)} completion(s); people need at least 2 to compare.",
                            path=path, line=n, field="completions")
        for k, c in enumerate(completions):
            if not isinstance(c, str):
                raise DataError(f"item {k} is {type(c).__name__}; completions must be strings.",
                                path=path, line=n, field=f"completions[{k}]")
        rows.append(PairsRow(prompt, completions, n))
    if not rows:
        raise DataError('no rows found; write {"prompt": ..., "completions": [...]} per line.', path=path)
    return rows


def write_jsonl_atomic(path: str, rows) -> None:
    """Write rows as JSONL to a temporary file beside ``path``, fsync, then rename over it,
    so a crash never leaves a half-written file where a finished one is expected."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sample_completions(cfg: PairsConfig, prompts: list[str]) -> list[list[str]]:
    """K sampled completions per prompt, with the shared loader and the KV-cache sampler."""
    import torch

    from prefalign.models import load_causal_lm, resolve_device
    from prefalign.rollout import generate_texts
    from prefalign.train.logger import iter_progress

    device = resolve_device(cfg.device)
    model, tokenizer = load_causal_lm(cfg.model, device=device, trainable=False)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    k = cfg.n_per_prompt
    out: list[list[str]] = []
    with torch.no_grad():
        for start in iter_progress(range(0, len(prompts), cfg.batch_size), None, "sampling", unit="batch"):
            batch = [p for p in prompts[start:start + cfg.batch_size] for _ in range(k)]  # each prompt K times
            texts = generate_texts(model, tokenizer, batch, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_p=cfg.top_p, batch_size=len(batch),
                                   generator=generator)
            out.extend(texts[i * k:(i + 1) * k] for i in range(len(batch) // k))
    return out


def run_pairs(cfg: PairsConfig) -> int:
    require(cfg, "model", "prompts", "output")
    if cfg.n_per_prompt < 2:
        raise ConfigError(f"--n-per-prompt must be at least 2 (people compare pairs), got {cfg.n_per_prompt}.")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise ConfigError("--batch-size and --max-new-tokens must be at least 1.")
    prompts = [ex.prompt for ex in load_prompts(cfg.prompts, text_only=True, **source_options(cfg))]
    completions = sample_completions(cfg, prompts)
    write_jsonl_atomic(cfg.output, ({"prompt": p, "completions": c} for p, c in zip(prompts, completions)))
    print(f"wrote {len(prompts)} prompts x {cfg.n_per_prompt} completions to {cfg.output}")
    return 0
