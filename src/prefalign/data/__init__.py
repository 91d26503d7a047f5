"""Data: readers and format detection, tokenisation at the prompt/completion boundary,
collation (padding, packing) and the `prefalign data check` auditor. Knows nothing of training."""
from prefalign.data.records import (FORMATS, PreferenceExample, PromptExample, SFTExample, detect_format,
                                    load_preferences, load_prompts, load_sft, read_records)

__all__ = ["FORMATS", "PreferenceExample", "PromptExample", "SFTExample", "detect_format", "load_preferences",
           "load_prompts", "load_sft", "read_records"]
