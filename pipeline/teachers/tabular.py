"""Tabular Q-learning with epsilon-greedy exploration, for envs with discrete observations and actions."""

from __future__ import annotations

import json
import os
import pickle
import zlib

import gymnasium as gym
import numpy as np
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from pipeline.envs import make_env
from pipeline.schema import ObsEncoding, Transitions

CHECKPOINT_FILE = "qlearning.pkl"


@dataclass(config=ConfigDict(extra="forbid"))
class QLearningConfig:
    learning_rate: float = Field(0.1, gt=0, le=1)
    gamma: float = Field(0.9, ge=0, le=1)
    epsilon_start: float = Field(1.0, ge=0, le=1)
    epsilon_end: float = Field(0.05, ge=0, le=1)
    epsilon_decay: float = Field(0.8, gt=0, le=1)  # fraction of the budget over which epsilon falls linearly
    initial_q: float = 0.0  # above the returns an action can earn: optimism that explores what was not tried
    # At each episode's end, repeat its TD updates from the last step back to the first, so a reward
    # reaches every step that led to it at once (episodic backward update) instead of one step per visit.
    backward_replay: bool = False

    granularity = 1  # any number of steps per train_steps call

    @staticmethod
    def check_spaces(env_id: str, observation_space: gym.Space, action_space: gym.Space) -> None:
        if not all(isinstance(space, gym.spaces.Discrete) for space in (observation_space, action_space)):
            raise ValueError(f"qlearning needs discrete observations and actions; {env_id} has {observation_space} and {action_space}")


def td_update(q: np.ndarray, obs: int, action: int, reward: float, next_obs: int, terminated: bool, lr: float, gamma: float) -> None:
    """One Q-learning TD update of q[obs, action] in place (no bootstrap from a terminal next_obs)."""
    target = reward if terminated else reward + gamma * q[next_obs].max()
    q[obs, action] += lr * (target - q[obs, action])


class QLearningTeacher:
    """One Q-table, one env. Every env step is one TD update, so policy_version == step."""

    def __init__(self, env_id: str, env_kwargs: dict, *, seed: int, budget: int, config: QLearningConfig):
        self.env = make_env(env_id, **env_kwargs)
        config.check_spaces(env_id, self.env.observation_space, self.env.action_space)
        self.encoding = ObsEncoding.for_space(self.env.observation_space)
        self.config, self.budget, self.granularity = config, budget, config.granularity
        # Seeded by the seed and the task: teachers of other tasks (other Dark Room goals) with the same
        # seed explore differently, as independent runs would.
        self.rng = np.random.default_rng([seed, zlib.crc32(json.dumps(env_kwargs, sort_keys=True).encode())])
        # Tiny random values break argmax ties randomly instead of always picking action 0.
        self.q = config.initial_q + self.rng.uniform(0, 1e-6, (self.env.observation_space.n, self.env.action_space.n))
        self.obs, _ = self.env.reset(seed=seed)
        self.step, self.episode, self.episode_step = 0, 0, 0
        self.episode_steps: list[tuple[int, int, float, int, bool]] = []  # (obs, action, reward, next obs, terminated)

    def epsilon(self, steps: np.ndarray) -> np.ndarray:
        c = self.config
        progress = np.minimum(steps / (c.epsilon_decay * self.budget), 1.0)
        return c.epsilon_start + progress * (c.epsilon_end - c.epsilon_start)

    def train_steps(self, n: int, record: bool = True) -> Transitions | None:
        """Act and learn for n env steps; return what was acted in (None when record=False)."""
        # One uniform per step, so splitting the same steps into other calls gives the same timeline:
        # explore when u < epsilon, and then u / epsilon picks the random action.
        u = self.rng.random(n)
        epsilon = self.epsilon(np.arange(self.step, self.step + n))
        explore = u < epsilon
        n_actions = self.env.action_space.n
        random_actions = np.minimum((u / np.maximum(epsilon, 1e-12) * n_actions).astype(np.int64), n_actions - 1)
        q, env, lr, gamma = self.q, self.env, self.config.learning_rate, self.config.gamma
        obs, episode, episode_step = self.obs, self.episode, self.episode_step
        # The loop appends only obs, action and reward (list appends cost a fraction of numpy
        # item writes) and notes where episodes end; everything else is derived after it.
        seen, actions, rewards, ends = [], [], [], []
        add_obs, add_action, add_reward = seen.append, actions.append, rewards.append
        for i in range(n):
            action = int(random_actions[i]) if explore[i] else int(q[obs].argmax())
            next_obs, reward, terminated, truncated, _ = env.step(action)
            td_update(q, obs, action, reward, next_obs, terminated, lr, gamma)
            if self.config.backward_replay:
                self.episode_steps.append((obs, action, reward, next_obs, terminated))
            if record:
                add_obs(obs)
                add_action(action)
                add_reward(reward)
            if terminated or truncated:
                self._replay_backward()
                ends.append((i, terminated, truncated))
                next_obs, _ = env.reset()
                episode, episode_step = episode + 1, 0
            else:
                episode_step += 1
            obs = next_obs
        out = self._transitions(seen, actions, rewards, ends) if record else None
        self.obs, self.episode, self.episode_step = obs, episode, episode_step
        self.step += n
        return out

    def _replay_backward(self) -> None:
        q, lr, gamma = self.q, self.config.learning_rate, self.config.gamma
        for obs, action, reward, next_obs, terminated in reversed(self.episode_steps):
            td_update(q, obs, action, reward, next_obs, terminated, lr, gamma)
        self.episode_steps = []

    def _transitions(self, seen: list, actions: list, rewards: list, ends: list) -> Transitions:
        n = len(seen)
        out = Transitions.empty(n, self.encoding)
        out.obs, out.action = np.fromiter(seen, np.int64, n), np.fromiter(actions, np.int64, n)
        out.reward = np.fromiter(rewards, np.float32, n)
        for i, terminated, truncated in ends:
            out.terminated[i], out.truncated[i] = terminated, truncated
        out.number_steps(self.step, self.episode, self.episode_step)
        out.policy_version[:] = out.step  # one TD update per step
        return out

    def act(self, obs, first: bool = False) -> int:
        return int(self.q[obs].argmax())

    def close(self) -> None:
        self.env.close()

    # The env is pickled with its state, so a restored teacher continues mid-episode exactly.
    _STATE = ("q", "rng", "env", "obs", "step", "episode", "episode_step", "episode_steps")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CHECKPOINT_FILE), "wb") as handle:
            pickle.dump({name: getattr(self, name) for name in self._STATE}, handle)

    def restore(self, directory: str) -> None:
        with open(os.path.join(directory, CHECKPOINT_FILE), "rb") as handle:
            state = pickle.load(handle)
        for name in self._STATE:
            if name in state:  # checkpoints from before backward_replay have no episode_steps
                setattr(self, name, state[name])
