"""The KL coefficient beta of the shaped reward r - beta * KL: fixed, or adapted toward a target
per-sequence KL (Ziegler et al. 2019, Sec. 2.2). Both are checkpointed (state_dict)."""
from __future__ import annotations

from prefalign.errors import ConfigError


class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Adaptive beta of Ziegler et al. 2019, Sec. 2.2: moves the observed KL toward ``target``.

    error = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + error * n_steps / horizon).
    ``kl`` is the mean per-sequence KL of the batch, ``n_steps`` the number of sequences in it.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)  # proportional error, clipped
        multiplier = 1.0 + error * n_steps / self.horizon
        if multiplier <= 0:  # a negative beta would reward moving away from the reference
            raise ValueError(f"the adaptive KL controller's horizon {self.horizon} is too short for {n_steps} "
                             f"sequences per update (beta would turn negative); it must exceed {n_steps / 5:g}")
        self.value *= multiplier


def min_kl_horizon(sequences_per_update: int) -> float:
    """The horizon must exceed this: with the error clipped to 0.2, beta's multiplier
    1 - 0.2 * n / horizon stays positive only while horizon > n / 5."""
    return sequences_per_update / 5


def make_kl_controller(cfg, sequences_per_update: int) -> FixedKLController:
    """--target-kl set: the adaptive controller; otherwise beta fixed at --kl-coef."""
    if cfg.target_kl is not None:
        if cfg.kl_horizon <= min_kl_horizon(sequences_per_update):
            raise ConfigError(f"--kl-horizon {cfg.kl_horizon} is too short for {sequences_per_update} sequences per "
                              f"iteration: the adaptive KL controller could make beta negative (which rewards moving "
                              f"away from the reference). Use --kl-horizon above "
                              f"{min_kl_horizon(sequences_per_update):g} (the default is 10000).")
        return AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)
