"""prefalign models convert: dequantise a GGUF file into a plain HF checkpoint directory.

The conversion itself is ``prefalign.models.convert_gguf`` (the same one ``--model FILE.gguf``
runs into the cache); this command only checks its options and reports what it wrote.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefalign.config import require
from prefalign.errors import ModelError
from prefalign.models import convert_gguf


def run_convert(cfg) -> int:
    """``prefalign models convert FILE.gguf --output DIR`` (or ``--file FILE.gguf``)."""
    require(cfg, "file", "output")
    if not str(cfg.file).lower().endswith(".gguf"):
        raise ModelError(f"{cfg.file} is not a .gguf file; pass the GGUF file to convert.")
    out = convert_gguf(cfg.file, cfg.output)
    config = json.loads((Path(out) / "config.json").read_text())
    print(f"wrote {config.get('architectures', ['?'])[0]} ({config.get('num_hidden_layers', '?')} layers, "
          f"hidden {config.get('hidden_size', '?')}, float32) with its tokenizer to {out}")
    return 0
