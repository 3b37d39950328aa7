import gymnasium as gym
import pytest

import pipeline.envs  # noqa: F401
from pipeline.envs.darkroom import DarkRoom

STAY, UP, DOWN, LEFT, RIGHT = range(5)


def rollout(env, actions):
    env.reset(seed=0)
    return [env.step(a) for a in actions]


def test_registered_with_gymnasium_and_starts_in_the_centre():
    env = gym.make("DarkRoom-v0", size=9, goal=[0, 0])
    obs, _ = env.reset(seed=0)
    assert obs == 4 * 9 + 4
    assert env.observation_space == gym.spaces.Discrete(81) and env.action_space == gym.spaces.Discrete(5)
    assert gym.make("DarkRoomHard-v0").unwrapped.hard


def test_moves_and_walls():
    env = DarkRoom(size=3, goal=[0, 0], episode_len=50)
    steps = rollout(env, [UP, UP, LEFT, LEFT, DOWN, RIGHT, STAY])
    assert [s[0] for s in steps] == [1, 1, 0, 0, 3, 4, 4]


def test_reward_every_step_on_the_goal_and_fixed_episode_length():
    env = DarkRoom(size=5, goal=[2, 3], episode_len=4)
    steps = rollout(env, [RIGHT, STAY, LEFT, RIGHT])
    assert [s[1] for s in steps] == [1.0, 1.0, 0.0, 1.0]
    assert [s[3] for s in steps] == [False, False, False, True]
    assert not any(s[2] for s in steps)  # never terminated, only truncated


def test_hard_variant_rewards_only_the_first_arrival():
    env = DarkRoom(size=5, goal=[2, 3], episode_len=4, hard=True)
    assert [s[1] for s in rollout(env, [RIGHT, STAY, LEFT, RIGHT])] == [1.0, 0.0, 0.0, 0.0]
    env.reset()
    assert env.step(RIGHT)[1] == 1.0  # a new episode rewards the goal again


def test_optimal_return():
    assert DarkRoom(size=9, goal=[0, 0], episode_len=20).optimal_return() == 13.0  # 8 steps away
    assert DarkRoom(size=9, goal=[4, 4], episode_len=20).optimal_return() == 20.0
    assert DarkRoom(size=9, goal=[0, 0], episode_len=20, hard=True).optimal_return() == 1.0


def test_goal_outside_the_room_is_rejected():
    with pytest.raises(ValueError, match=r"goal \[9, 0\] is outside the 9x9 room"):
        DarkRoom(size=9, goal=[9, 0])
