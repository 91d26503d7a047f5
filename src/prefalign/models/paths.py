"""What ``--model`` may name: a model directory, a .gguf file, or a Hugging Face Hub name."""
from __future__ import annotations

import os
import re
from pathlib import Path

from prefalign.errors import ModelError
from prefalign.models.gguf import cached_gguf_checkpoint

# "org/name" or "name": what the hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_model_path(spec) -> str:
    """A path transformers can load from: a checked local directory, a hub name, or for a .gguf
    file the directory of its dequantised HF checkpoint (converted once, then cached).

    Raises ModelError for a path that does not exist, a file that is not .gguf, or a directory
    without config.json.
    """
    if spec is None or str(spec).strip() == "":
        raise ModelError("no model given: pass --model DIR (an HF model directory, a .gguf file or a hub name).")
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return cached_gguf_checkpoint(path)
        raise ModelError(f"{spec} is a file, not a model: pass the directory that holds config.json "
                         f"and the weights, or a .gguf file.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" It holds {ggufs[0].name}: pass that file instead." if ggufs else (
                " Pass the directory written by save_pretrained (or by a prefalign stage), or a .gguf file.")
            raise ModelError(f"{spec} has no config.json, so it is not a Hugging Face model directory.{hint}")
        return str(path)
    if spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")) or os.sep + os.sep in spec \
            or not _HUB_ID.match(spec):
        raise ModelError(f"{spec} does not exist. Check the path (for a hub model, pass its name as org/name).")
    return spec  # a hub name: the loaders turn a failed download into a ModelError
