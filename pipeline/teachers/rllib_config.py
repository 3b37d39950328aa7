"""Typed configs of the RLlib teachers. Importing this does not import RLlib, so presets validate fast."""

from __future__ import annotations

from dataclasses import field

import gymnasium as gym
import numpy as np
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

# Nature-DQN conv stack (Mnih et al. 2015): (filters, kernel, stride) per layer. Also the imitator's
# frame encoder (pipeline/model.py).
NATURE_CNN = ((32, 8, 4), (64, 4, 2), (64, 3, 1))


def is_image(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 2


def _is_vector(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and len(space.shape) == 1


def _check_spaces(env_id: str, observation_space: gym.Space, action_space: gym.Space, images: bool, needs: str) -> None:
    """Discrete actions, and vector or discrete observations (or 2-D uint8 images where `images`);
    `needs` opens the observation error, e.g. "dqn needs vector, discrete or 2-D uint8 image observations"."""
    if not isinstance(action_space, gym.spaces.Discrete):
        raise ValueError(f"RLlib teachers here need discrete actions; {env_id} has {action_space}")
    if not (_is_vector(observation_space) or isinstance(observation_space, gym.spaces.Discrete)
            or (images and is_image(observation_space))):
        raise ValueError(f"{needs}; {env_id} has {observation_space}")


@dataclass(config=ConfigDict(extra="forbid"))
class DQNConfig:
    """A standard DQN (Mnih et al. 2015): epsilon-greedy, uniform replay, a target network,
    double Q by default.

    `replay_ratio` is the literature's: transitions replayed per env step (Nature DQN and Rainbow:
    a batch of 32 every 4 steps = 8; CleanRL's CartPole DQN: 128 every 10 = 12.8). RLlib samples
    `rollout_fragment_length` env steps per training iteration, then makes
    replay_ratio * fragment / batch updates: a longer fragment keeps the ratio and amortises
    RLlib's per-iteration overhead, at the price of updates arriving in bursts.
    """

    lr: float = Field(5e-4, gt=0)
    lr_end: float | None = Field(None, gt=0)  # if set, lr falls linearly to this over the budget
    gamma: float = Field(0.99, gt=0, le=1)
    train_batch_size: int = Field(64, gt=0)
    replay_ratio: float = Field(8.0, gt=0)
    target_update_tau: float = Field(1.0, gt=0, le=1)  # 1: copy the weights; < 1: Polyak averaging
    rollout_fragment_length: int = Field(64, gt=0)
    learning_starts: int = Field(1000, ge=0)  # env steps sampled before the first update
    target_update_steps: int = Field(500, gt=0)  # env steps between target network syncs
    buffer_size: int = Field(50_000, gt=0)  # transitions in the replay buffer
    epsilon_start: float = Field(1.0, ge=0, le=1)
    epsilon_end: float = Field(0.05, ge=0, le=1)
    epsilon_decay: float = Field(0.25, gt=0, le=1)  # fraction of the budget over which epsilon falls linearly
    double_q: bool = True
    dueling: bool = False
    n_step: int = Field(1, gt=0)
    # Clip the rewards the loss sees to [-1, 1] (Mnih et al. 2015; with n_step > 1 the n-step sum is
    # clipped). The history keeps the env's own rewards.
    clip_rewards: bool = False
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # MLP; for frames, after the conv stack
    conv_filters: list[list[int]] = field(default_factory=lambda: [list(layer) for layer in NATURE_CNN])  # image observations only
    frame_stack: int = Field(4, gt=0)  # frames per observation the network sees, image observations only
    # A new-API-stack RLlib checkpoint leaves the replay buffer out; the teacher saves it beside
    # (for Atari, frame_stack * 7 KB per transition in the buffer). Without it a restored teacher
    # refills its buffer from scratch while it keeps updating.
    checkpoint_replay_buffer: bool = True

    @model_validator(mode="after")
    def _whole_updates(self):
        updates = self.replay_ratio * self.rollout_fragment_length / self.train_batch_size
        if updates < 1 or abs(updates - round(updates)) > 1e-9:
            raise ValueError(
                f"replay_ratio * rollout_fragment_length / train_batch_size = {updates:g} updates per "
                "iteration; choose values that make it a whole number >= 1")
        return self

    @property
    def granularity(self) -> int:
        """Env steps per RLlib training iteration: train_steps(n) needs n to be a multiple."""
        return self.rollout_fragment_length

    @staticmethod
    def check_spaces(env_id: str, observation_space: gym.Space, action_space: gym.Space) -> None:
        _check_spaces(env_id, observation_space, action_space, images=True,
                      needs="dqn needs vector, discrete or 2-D uint8 image observations")


@dataclass(config=ConfigDict(extra="forbid"))
class PPOConfig:
    """PPO (Schulman et al. 2017) with GAE; each iteration samples `train_batch_size` env steps."""

    lr: float = Field(3e-4, gt=0)
    gamma: float = Field(0.99, gt=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    train_batch_size: int = Field(2000, gt=0)
    minibatch_size: int = Field(128, gt=0)
    num_epochs: int = Field(10, gt=0)
    clip_param: float = Field(0.2, gt=0)
    entropy_coeff: float = Field(0.0, ge=0)
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    # lean_ppo only: envs one learner steps in lockstep, each recorded as its own history (a stream;
    # plan.teacher_specs names them). Streams share the learner, so they are not independent
    # teachers. train_batch_size counts the steps of all streams together.
    num_envs: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _whole_streams(self):
        if self.train_batch_size % self.num_envs:
            raise ValueError(f"train_batch_size {self.train_batch_size} is not a multiple of num_envs {self.num_envs}")
        return self

    @property
    def granularity(self) -> int:
        """Env steps per stream in one iteration: train_steps(n) needs n to be a multiple."""
        return self.train_batch_size // self.num_envs

    @staticmethod
    def check_spaces(env_id: str, observation_space: gym.Space, action_space: gym.Space) -> None:
        _check_spaces(env_id, observation_space, action_space, images=False,
                      needs="ppo teachers here need vector or discrete observations (use dqn for images)")
