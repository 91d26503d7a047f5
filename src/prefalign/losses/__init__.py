"""Pure loss functions (tensors in, tensors out); they import only torch and prefalign.ops."""
from prefalign.losses.advantage import gae, global_moments, whiten
from prefalign.losses.kl import KL_ESTIMATORS, kl_estimate
from prefalign.losses.ppo import ppo_policy_loss, ppo_value_loss
from prefalign.losses.preference import DPO_LOSSES, bradley_terry_loss, dpo_loss

__all__ = ["bradley_terry_loss", "dpo_loss", "DPO_LOSSES", "ppo_policy_loss", "ppo_value_loss", "gae", "global_moments", "whiten",
           "kl_estimate", "KL_ESTIMATORS"]
