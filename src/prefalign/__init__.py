"""prefalign: align causal language models with human preferences (SFT, reward models, PPO, DPO)."""

__version__ = "0.1.0"
