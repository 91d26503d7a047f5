"""The reward function both sides of benchmarks/online_bench.py call: cheap, deterministic, pure Python,
and with a spread inside each group of completions (so GRPO's group std is not zero).

    prefalign grpo --reward-fn benchmarks/peers/online_reward.py:vowel_share ...
    GRPOTrainer(reward_funcs=vowel_share, ...)   # via benchmarks/peers/trl_online.py --reward-fn
"""


def vowel_share(prompts, completions, **kwargs):
    """Share of the completion's characters that are lowercase vowels (0 for an empty completion)."""
    return [sum(ch in "aeiou" for ch in text) / max(1, len(text)) for text in completions]
