"""Scalar-head models for reward and value: a transformers sequence-classification model
(num_labels=1) whose score we read ourselves at the last real token.

The checkpoint on disk (written by ``saving.save_pretrained``) is a standard
``*ForSequenceClassification`` that plain transformers and TRL load. We do not use its forward:
transformers finds the last token through ``pad_token_id``, which is wrong when pad == eos and for
left padding. Here the last real token comes from ``attention_mask`` (or, for packed rows, from
``segment_ids``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from prefalign.errors import ModelError
from prefalign.models.attention import packed_kwargs, use_packed_attention
from prefalign.models.causal_lm import load_tokenizer
from prefalign.models.hf import (check_causal_lm_config, check_vocab, enable_activation_checkpointing, ensure_pad_token,
                                 load_config, quiet_transformers, resolve_device, resolve_dtype)
from prefalign.models.paths import resolve_model_path

SHIFT_KEY, SCALE_KEY = "prefalign_reward_shift", "prefalign_reward_scale"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B,) index of the last True per row; works for left and right padding."""
    B, T = attention_mask.shape
    if not attention_mask.any(dim=1).all():
        raise ValueError("a row of attention_mask has no real token")
    positions = torch.arange(T, device=attention_mask.device).expand(B, T)
    return torch.where(attention_mask, positions, -1).amax(dim=1)


def segment_last_index(segment_ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(T,) long segment ids (-1 = padding) -> (n_segments,) index of each segment's last token."""
    T = segment_ids.shape[0]
    positions = torch.arange(T, device=segment_ids.device)
    real = segment_ids >= 0
    last = torch.full((n_segments,), -1, dtype=torch.long, device=segment_ids.device)
    last = last.scatter_reduce(0, segment_ids[real], positions[real], reduce="amax")
    if (last < 0).any():
        raise ValueError(f"segment_ids lacks segment(s) {(last < 0).nonzero().flatten().tolist()} of {n_segments}")
    return last


class ScalarModel(nn.Module):
    """Reward / value model: backbone final hidden state at the last real token -> linear head -> scalar.

    ``self.model`` is the wrapped ``AutoModelForSequenceClassification`` (optionally LoRA-wrapped).
    """

    def __init__(self, model):
        super().__init__()
        if getattr(model.config, "num_labels", None) != 1:
            raise ModelError(f"a scalar model needs num_labels=1, this one has {model.config.num_labels}.")
        self.model = model
        _ = self.head  # an unsupported architecture fails here, not at the first forward

    # ---------------------------------------------------------------- parts
    @property
    def _hf(self):
        """The transformers model under any peft wrapper."""
        inner = self.model
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    @property
    def backbone(self) -> nn.Module:
        return getattr(self._hf, self._hf.base_model_prefix)

    @property
    def head(self) -> nn.Module:
        head = getattr(self._hf, "score", None)
        if head is None:
            raise ModelError(f"{type(self._hf).__name__} has no `score` head; prefalign's reward and value "
                             f"models support Llama-like architectures (Llama, Qwen2, Mistral, GPT-2, ...).")
        return head

    @property
    def config(self):
        return self._hf.config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None):
        """Recompute activations in backward (transformers 5 calls it activation checkpointing);
        ``gradient_checkpointing_kwargs`` go to torch.utils.checkpoint (default: non-reentrant)."""
        enable_activation_checkpointing(self._hf, gradient_checkpointing_kwargs)

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None,
                n_segments: Optional[int] = None, shared_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw scores (float32).

        Padded batch: input_ids (B, T), attention_mask (B, T) bool (left or right padding) -> (B,).
        position_ids default to the count of real tokens before each position, so left and right
        padding give the same scores.
        Packed rows: input_ids (R, T), position_ids (R, T) restarting at 0 per segment, segment_ids
        (R, T) long with -1 for padding and ids 0..n-1 unique across the rows -> (n_segments,) in
        segment-id order. attention_mask is ignored there: no mask is
        passed on, and transformers derives the block-diagonal causal mask from the restarting
        position_ids (tested for sdpa and eager attention). ``shared_prefix`` (K, 5): segments that
        also attend to a prompt packed once for a pair (``stages.batching.collate_pairs_shared``;
        needs prefalign_packed attention).
        """
        if segment_ids is not None:
            if position_ids is None:
                raise ValueError("packed rows need position_ids that restart at 0 for each segment")
            n = int(segment_ids.max()) + 1 if n_segments is None else n_segments
            extra = packed_kwargs(self, segment_ids, shared_prefix)
            if shared_prefix is not None and not extra:
                raise ValueError("rows with shared prompts need prefalign_packed attention (use_packed_attention)")
            hidden = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                   **extra).last_hidden_state
            last = hidden.flatten(0, 1)[segment_last_index(segment_ids.flatten(), n)]  # (R*T, H) -> (n, H)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            attention_mask = attention_mask.bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask.long(),
                                   position_ids=position_ids, use_cache=False).last_hidden_state  # (B, T, H)
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            last = hidden[rows, last_token_index(attention_mask)]  # (B, H)
        return self.head(last).squeeze(-1).float()

    # ---------------------------------------------------------------- normalisation
    @property
    def shift(self) -> float:
        return float(getattr(self.config, SHIFT_KEY, 0.0))

    @property
    def scale(self) -> float:
        return float(getattr(self.config, SCALE_KEY, 1.0))

    def set_normalization(self, shift: float, scale: float = 1.0) -> None:
        """Store ``normalized(r) = (r - shift) / scale`` in config.json (saved with the model)."""
        if not (math.isfinite(shift) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"reward normalisation needs a finite shift and a positive scale, got {shift}, {scale}")
        setattr(self.config, SHIFT_KEY, float(shift))
        setattr(self.config, SCALE_KEY, float(scale))

    def normalized(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift) / self.scale

    def fold_normalization(self) -> None:
        """Make the head itself output ``normalized`` scores and store the identity normalisation.

        A value model initialised from a reward model must predict on the scale of the rewards PPO
        gives, ``(w.h + b - shift) / scale``: the head becomes ``w' = w / scale``, ``b' = (b - shift) / scale``.
        transformers' ``score`` layers have no bias, so one is added (trainable, like the weight);
        ``saving.save_scalar_model`` writes it back as the shift, so the saved folder's normalised score
        is the same value and folding that folder again gives the same head.
        """
        shift, scale = self.shift, self.scale
        if (shift, scale) == (0.0, 1.0):
            return
        old = self.head
        if type(old) is not nn.Linear:
            raise ModelError(f"cannot fold the reward normalisation into a {type(old).__name__} head "
                             f"(a LoRA-wrapped reward model?); load the merged model.")
        new = nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            bias = old.bias.float() if old.bias is not None else torch.zeros(old.out_features, device=old.weight.device)
            new.weight.copy_(old.weight.float() / scale)
            new.bias.copy_((bias - shift) / scale)
        new.requires_grad_(old.weight.requires_grad)
        self._hf.score = new
        self.set_normalization(0.0, 1.0)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_causal_lm(cls, path: str, dtype="auto", device="cpu", attn_implementation: Optional[str] = None,
                       trainable: bool = True, seed: int = 0) -> "ScalarModel":
        """Backbone weights from a causal LM checkpoint, a fresh head ~ N(0, 1/(H+1)) drawn from ``seed``
        (the init of Ziegler et al. 2019's reward heads: unit-variance hidden states give O(1) scores)."""
        model = cls._load(path, dtype, device, attn_implementation, trainable)
        head = model.head
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(head.weight.shape, generator=generator) / math.sqrt(head.weight.shape[1] + 1)
            head.weight.copy_(weight.to(head.weight))
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
        return model

    @classmethod
    def from_pretrained(cls, path: str, dtype="auto", device="cpu", attn_implementation: Optional[str] = None,
                        trainable: bool = True) -> "ScalarModel":
        """A reward/value model saved by ``saving.save_pretrained`` (or any 1-label sequence classifier)."""
        path = resolve_model_path(path)
        architectures = list(getattr(load_config(path), "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ModelError(f"{path} is a {', '.join(architectures) or 'model'}, not a reward/value model "
                             f"(*ForSequenceClassification); train one with `prefalign reward`.")
        return cls._load(path, dtype, device, attn_implementation, trainable)

    @classmethod
    def _load(cls, path, dtype, device, attn_implementation, trainable) -> "ScalarModel":
        from transformers import AutoModelForSequenceClassification

        path = resolve_model_path(path)
        device = resolve_device(device) if isinstance(device, str) else device
        config = load_config(path)
        if getattr(config, "num_labels", 1) != 1 and any(a.endswith("ForSequenceClassification")
                                                          for a in config.architectures or []):
            raise ModelError(f"{path} is a classifier with {config.num_labels} labels; a reward model has one.")
        try:
            with quiet_transformers():  # "score.weight newly initialised" is expected from a causal LM
                hf = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=1, dtype=resolve_dtype(dtype, device, trainable),
                    attn_implementation=attn_implementation or "sdpa")
        except OSError as e:
            raise ModelError(f"{path} cannot be loaded as a reward/value model: {e}") from None
        except (ValueError, KeyError) as e:
            raise ModelError(f"{path}: this architecture has no sequence-classification (scalar head) "
                             f"variant in transformers, or cannot be loaded: {str(e).splitlines()[0]}") from None
        model = cls(hf).to(device)
        if not trainable:
            model.eval().requires_grad_(False)
        return model


def load_scalar_model(path: str, dtype="auto", device="cpu", attn_implementation: Optional[str] = None,
                      trainable: bool = True, seed: int = 0):
    """``(ScalarModel, tokenizer)``: a saved reward/value model as is, or a causal LM with a new head."""
    path = resolve_model_path(path)
    config = load_config(path)
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        model = ScalarModel.from_pretrained(path, dtype, device, attn_implementation, trainable)
    else:
        check_causal_lm_config(path, config)  # a new reward model starts from a causal LM
        model = ScalarModel.from_causal_lm(path, dtype, device, attn_implementation, trainable, seed)
    tokenizer = load_tokenizer(path)
    check_vocab(path, tokenizer, model._hf)
    ensure_pad_token(tokenizer, model._hf)
    use_packed_attention(model)  # SDPA exactly, but packed rows pay only for their examples' attention
    return model, tokenizer
