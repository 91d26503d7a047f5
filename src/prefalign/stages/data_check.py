"""`prefalign data check`: audit a data file (data/audit.py) and print the report."""
from __future__ import annotations

import json

from prefalign.config import require
from prefalign.data import audit, format_report, source_options
from prefalign.errors import ModelError


def run_data_check(cfg) -> int:
    """The `prefalign data check` command: print the report; 0 when usable, 2 when not."""
    require(cfg, "data")
    tokenizer = None
    if cfg.model:
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a tokenizer from {cfg.model}: {e}") from None
    report = audit(cfg.data, cfg.data_format, tokenizer, cfg.max_length, cfg.max_prompt_length,
                   **source_options(cfg))
    print(json.dumps(report, indent=2) if cfg.json else format_report(report))
    return 0 if report["usable"] else 2
