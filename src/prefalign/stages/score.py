"""prefalign score: score {prompt, completion} rows or preference pairs with a reward model.

Scores are normalised with the shift/scale stored by `prefalign reward`. For pairs it reports
pairwise accuracy (share of pairs where chosen scores higher); this is how users evaluate a
reward model on held-out preferences.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from prefalign.config import require
from prefalign.data import FORMATS, encode_prompt_completion, encode_text, load_preferences, load_sft, source_options
from prefalign.data.records import parse_file
from prefalign.models import load_scalar_model
from prefalign.stages.pair_batch import pair_sequences, split_pairs, tokenize_pairs
from prefalign.stages.reward import score_sequences
from prefalign.train.dist import resolve_device


def _write_jsonl(path: str, rows: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, p)


def score_pairs(model, tokenizer, examples, cfg, device) -> tuple[list[dict], dict]:
    pairs = tokenize_pairs(examples, tokenizer, cfg.max_length)
    raw = score_sequences(model, pair_sequences(pairs), tokenizer.pad_token_id, cfg.batch_size, device)  # (2N,)
    chosen, rejected = split_pairs(model.normalized(raw))  # (N,) each
    rows = [{"source": ex.source, "chosen_score": float(c), "rejected_score": float(j), "correct": bool(c > j)}
            for ex, c, j in zip(examples, chosen, rejected)]
    summary = {"pairs": len(rows), "accuracy": float((chosen > rejected).float().mean()),
               "ties": int((chosen == rejected).sum()), "mean_margin": float((chosen - rejected).mean()),
               "chosen_mean": float(chosen.mean()), "rejected_mean": float(rejected.mean())}
    return rows, summary


def score_completions(model, tokenizer, examples, cfg, device) -> tuple[list[dict], dict]:
    seqs = [encode_text(tokenizer, ex.completion, cfg.max_length) if ex.prompt is None
            else encode_prompt_completion(tokenizer, ex.prompt, ex.completion, cfg.max_length) for ex in examples]
    r = model.normalized(score_sequences(model, seqs, tokenizer.pad_token_id, cfg.batch_size, device))
    rows = [{"source": ex.source, "score": float(s)} for ex, s in zip(examples, r)]
    return rows, {"rows": len(rows), "score_mean": float(r.mean()), "score_std": float(r.std()) if len(r) > 1 else 0.0}


def file_kind(path: str, data_format=None, **source) -> str:
    """"preference" when the file holds pairs, else "sft" (scored row by row)."""
    if data_format:
        return FORMATS[data_format].kind if data_format in FORMATS else "sft"
    parsed = parse_file(path, **source)
    kinds = {FORMATS[name].kind for name in parsed.formats}
    return "preference" if kinds == {"preference"} else "sft"


def run_score(cfg) -> int:
    require(cfg, "reward_model", "data")
    device = resolve_device(cfg.device)
    kind = file_kind(cfg.data, cfg.data_format, **source_options(cfg))
    model, tokenizer = load_scalar_model(cfg.reward_model, device=device, trainable=False)
    if kind == "preference":
        rows, summary = score_pairs(model, tokenizer, load_preferences(cfg.data, cfg.data_format, **source_options(cfg)),
                                    cfg, device)
    else:
        rows, summary = score_completions(model, tokenizer, load_sft(cfg.data, cfg.data_format, **source_options(cfg)),
                                          cfg, device)
    if cfg.output:
        _write_jsonl(cfg.output, rows)
    print(json.dumps(summary, indent=2))
    return 0
