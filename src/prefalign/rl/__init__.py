"""Pieces of the online RL loops (PPO now; RLOO, GRPO and online DPO next), one idea a file:

    kl_control.py      the KL coefficient beta: fixed, or adapted toward a target (Ziegler et al. 2019)
    scores.py          what the reward is built from: running score statistics, clipping, EOS penalty
    reward_scoring.py  reward-model inputs for a rollout (re-tokenised when the tokenizers differ)
    forwards.py        the policy's and the value model's per-token forwards over a rollout
    value_head.py      a value head on the policy's backbone: initialised, saved, loaded back

Sampling itself is prefalign.rollout; whitening and GAE are prefalign.losses.advantage.
"""
