"""The project's own envs beyond Dark Room: CartPole with other physics, the CartPole transfer target."""

import numpy as np
import pytest

from pipeline.envs import make_env
from pipeline.envs.cartpole import CartPoleVariant


def test_long_pole_cartpole_has_cartpoles_spaces_and_limit_but_other_dynamics():
    standard, long_pole = make_env("CartPole-v1"), make_env("CartPoleLongPole-v0")
    assert standard.observation_space == long_pole.observation_space and standard.action_space == long_pole.action_space
    assert long_pole.spec.max_episode_steps == standard.spec.max_episode_steps == 500
    a, _ = standard.reset(seed=3)
    b, _ = long_pole.reset(seed=3)
    np.testing.assert_array_equal(a, b)  # same start state
    for _ in range(5):
        a, *_ = standard.step(1)
        b, *_ = long_pole.step(1)
    assert abs(b[3]) < abs(a[3])  # pushed the same way, the long pole tips more slowly


def test_variant_rejects_impossible_physics():
    with pytest.raises(ValueError, match="positive length"):
        CartPoleVariant(length=0)
