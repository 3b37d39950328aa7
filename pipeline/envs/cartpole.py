"""CartPole with other physics: the held-out envs of CartPole transfer tests.

Gymnasium's CartPole-v1 with a pole of another length or mass, or another push force. Same
observations (4 floats), actions (push left/right), reward (1 per step) and 500-step limit, so
an imitator of CartPole-v1 teachers can act in it unchanged; only the dynamics differ.
"""

from __future__ import annotations

from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class CartPoleVariant(CartPoleEnv):
    def __init__(self, length: float = 0.5, masspole: float = 0.1, force_mag: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if min(length, masspole, force_mag) <= 0:
            raise ValueError(f"CartPoleVariant needs positive length, masspole and force_mag, got {length}, {masspole}, {force_mag}")
        self.length, self.masspole, self.force_mag = float(length), float(masspole), float(force_mag)  # half the pole's length
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length
