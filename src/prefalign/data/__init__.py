"""Data: sources (files, dataset folders, Hub ids), readers and format detection, tokenisation at the prompt/completion boundary,
collation (padding, packing) and the `prefalign data check` auditor. Knows nothing of training.

The collators need torch; they are imported on first use so that reading and auditing data
(`prefalign data check` without --model) stays torch-free and quick.
"""
from prefalign.data.audit import audit, format_report
from prefalign.data.formats import FORMATS, RecordFormat, detect_format
from prefalign.data.records import (PreferenceExample, PromptExample, SFTExample, load_preferences, load_prompts,
                                    load_sft, read_records)
from prefalign.data.sources import open_source, source_digest, source_options
from prefalign.data.tokenize import (Tokenized, encode_preference, encode_prompt, encode_prompt_completion,
                                     encode_sft, encode_text, fit_lengths)

_COLLATE = ("pad_batch", "pack_batch", "pair_pack_batch", "pair_pack_shared", "shared_prompt_len", "pack_groups")

__all__ = ["FORMATS", "RecordFormat", "detect_format", "PreferenceExample", "PromptExample", "SFTExample",
           "load_preferences", "load_prompts", "load_sft", "read_records", "Tokenized", "encode_preference",
           "encode_prompt", "encode_prompt_completion", "encode_sft", "encode_text", "fit_lengths", "audit",
           "format_report", "open_source", "source_digest", "source_options", *_COLLATE]


def __getattr__(name):
    if name in _COLLATE:
        from prefalign.data import collate
        return getattr(collate, name)
    raise AttributeError(f"module 'prefalign.data' has no attribute {name!r}")
