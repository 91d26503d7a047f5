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
from prefalign.errors import ConfigError, DataError, ModelError


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


def read_prompts(path: str) -> list[str]:
    """Prompts from JSONL rows with a string ``prompt`` (other fields are ignored)."""
    prompts = []
    for n, obj in _json_lines(path):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise DataError('every row needs a non-empty string "prompt".', path=path, line=n, field="prompt")
        prompts.append(prompt)
    if not prompts:
        raise DataError("no prompts found; write one JSON object with a \"prompt\" per line.", path=path)
    return prompts


def read_pairs(path: str) -> list[PairsRow]:
    """Validated rows of a pairs file: a string prompt and at least two string completions."""
    rows = []
    for n, obj in _json_lines(path):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise DataError('every row needs a non-empty string "prompt".', path=path, line=n, field="prompt")
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
    """K sampled completions per prompt. The one place that loads and samples a model, so it
    can later switch to the shared loaders and rollout without touching anything else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tqdm import tqdm

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load --model {cfg.model} (a local model directory is expected): {e}") from None
    tokenizer.padding_side = "left"  # generation continues from the last real token of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()
    torch.manual_seed(cfg.seed)
    out: list[list[str]] = []
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc="sampling", unit="batch"):
        batch = prompts[start:start + cfg.batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.n_per_prompt,
                                 pad_token_id=tokenizer.pad_token_id)  # (B * K, T_prompt + T_new)
        texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        k = cfg.n_per_prompt
        out.extend(texts[i * k:(i + 1) * k] for i in range(len(batch)))
    return out


def run_pairs(cfg: PairsConfig) -> int:
    require(cfg, "model", "prompts", "output")
    if cfg.n_per_prompt < 2:
        raise ConfigError(f"--n-per-prompt must be at least 2 (people compare pairs), got {cfg.n_per_prompt}.")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise ConfigError("--batch-size and --max-new-tokens must be at least 1.")
    prompts = read_prompts(cfg.prompts)
    completions = sample_completions(cfg, prompts)
    write_jsonl_atomic(cfg.output, ({"prompt": p, "completions": c} for p, c in zip(prompts, completions)))
    print(f"wrote {len(prompts)} prompts x {cfg.n_per_prompt} completions to {cfg.output}")
    return 0
