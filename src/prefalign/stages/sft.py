"""prefalign sft: supervised fine-tuning.

{prompt, completion} and chat data: loss on completion tokens only (prompt masked), EOS
appended so the model learns to stop. {text}: plain LM loss on every token. Packed rows hold
several examples with per-example position ids and no attention across them; the loss equals
the padded loss of the same examples (tests/test_sft.py). By default (packing auto, models that
support it: stages/packing.py) each batch's examples are packed, so a step sees the examples a
padded step sees; --packing fills rows of --max-length tokens from the whole data set and
--batch-size counts rows.
"""
from __future__ import annotations

from functools import partial

import torch

from prefalign.data import encode_prompt_completion, encode_text, load_sft, pack_groups, source_options
from prefalign.logits import head_logps
from prefalign.models import load_causal_lm
from prefalign.models.attention import packed_kwargs
from prefalign.ops import next_token_inputs, token_logps
from prefalign.stages.batching import collate_packed_flat, collate_packed_rows, collate_padded, label_mask
from prefalign.stages.common import finish, report, save_model_final, split_eval, start
from prefalign.stages.packing import announce, choose_layout
from prefalign.train.dist import wrap_model
from prefalign.train.loop import LossOutput, fit


class SFTObjective:
    """Sum of next-token NLL over completion tokens; the unit is one predicted token.

    The head runs chunk by chunk on the final hidden states of the positions with a target
    (``logits.head_logps``), so no (B, T, V) logits exist; models that post-process their logits
    take the full path.
    """

    def units(self, batch: dict) -> float:
        return float(label_mask(batch).sum())

    def __call__(self, model, batch: dict) -> LossOutput:
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      position_ids=batch["position_ids"], use_cache=False,
                      **packed_kwargs(model, batch.get("segment_ids")))
        mask = label_mask(batch)  # (B, T-1)
        labels = batch["input_ids"][:, 1:][mask]  # (N,)
        select = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)  # (B, T): position t predicts t + 1
        chunked = head_logps(model, inputs, select, labels, with_argmax=True)
        if chunked is None:
            return self._full_logits(model, inputs, batch, mask)
        correct = chunked.argmax == labels
        return LossOutput(-chunked.logps.sum(), {"token_accuracy": (correct.sum(), mask.sum())})

    @staticmethod
    def _full_logits(model, inputs: dict, batch: dict, mask) -> LossOutput:
        logits = model(**inputs).logits  # (B, T, V)
        logits, labels, _ = next_token_inputs(logits, batch["input_ids"], batch["completion_mask"])
        logps = token_logps(logits, labels)  # (B, T-1)
        correct = (logits.argmax(-1) == labels) & mask
        return LossOutput(-(logps * mask).sum(), {"token_accuracy": (correct.sum(), mask.sum())})


def tokenize_sft(examples, tokenizer, max_length: int, max_prompt_length=None):
    out = []
    for ex in examples:
        if ex.prompt is None:
            out.append(encode_text(tokenizer, ex.completion, max_length))
        else:
            out.append(encode_prompt_completion(tokenizer, ex.prompt, ex.completion, max_length, max_prompt_length))
    return out


def run_sft(cfg) -> int:
    dist, out, t0 = start(cfg, "model", "data", "output")
    train_ex = load_sft(cfg.data, cfg.data_format, **source_options(cfg))
    eval_ex = (load_sft(cfg.eval_data, cfg.data_format, **source_options(cfg, eval=True))
               if cfg.eval_data else None)
    model, tokenizer = load_causal_lm(cfg.model, dtype=cfg.dtype, device="cpu",
                                      attn_implementation=cfg.attn_implementation)
    if cfg.lora:
        from prefalign.models import apply_lora
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    train_tok = tokenize_sft(train_ex, tokenizer, cfg.max_length, cfg.max_prompt_length)
    eval_tok = tokenize_sft(eval_ex, tokenizer, cfg.max_length, cfg.max_prompt_length) if eval_ex else None
    if not cfg.completion_only:
        for t in train_tok + (eval_tok or []):
            t.prompt_len = 0
    train_tok, eval_tok = split_eval(train_tok, eval_tok, cfg.eval_fraction, cfg.seed)
    pad_id = tokenizer.pad_token_id
    layout = choose_layout(cfg.packing, {"policy": model})
    if cfg.packing:  # rows of --max-length tokens from the whole data set: --batch-size counts rows
        train_set = [[train_tok[i] for i in g] for g in pack_groups([len(t.input_ids) for t in train_tok], cfg.max_length)]
        collate = partial(collate_packed_rows, pad_id=pad_id)
        detail = f", {len(train_tok)} examples in {len(train_set)} rows of up to {cfg.max_length} tokens"
    elif layout.packed:  # each batch's examples padding-free: --batch-size still counts examples
        train_set = train_tok
        collate = partial(collate_packed_flat, pad_id=pad_id, max_tokens=cfg.max_length)
        detail = f", each batch's examples in rows of about {cfg.max_length} tokens"
    else:
        train_set, detail = train_tok, ""
        collate = partial(collate_padded, pad_id=pad_id)
    announce("sft", layout, detail, show=dist.is_main)
    eval_collate = partial(collate_padded, pad_id=pad_id)
    wrapped = wrap_model(model, dist, cfg.distributed)
    result = fit(cfg, wrapped, SFTObjective(), train_set, collate, out_dir=out, dist=dist,
                 eval_set=eval_tok or None, desc="sft", trainable=model, eval_collate=eval_collate)
    saved = save_model_final(out, dist, model, tokenizer, base=cfg.model, merge=cfg.merge_lora)
    summary = finish(cfg, out, dist, "sft", t0, result, train_examples=len(train_tok),
                     train_rows=len(train_set), eval_examples=len(eval_tok or []), layout=layout.info(), **saved)
    if dist.is_main:
        report(summary, ["loss", "token_accuracy", "eval/loss", "eval/token_accuracy"])
    return 0
