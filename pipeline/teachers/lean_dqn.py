"""The project's own DQN teacher: one env, one Q-network, plain PyTorch, every acted step recorded.

A lean alternative to RLlib's `dqn` (pipeline.teachers.rllib) with the same typed config
(DQNConfig) and the same recorded history; it runs at the speed of a single-file DQN
(bench/lean_dqn.py). The algorithm, in textbook terms (Mnih et al. 2015; van Hasselt et al.
2016; Wang et al. 2016; Sutton and Barto, ch. 7):

  act       a_t = random action with probability eps(t), else argmax_a Q(s_t, a), where
            eps(t) = eps_start + min(t / D, 1) * (eps_end - eps_start), D = epsilon_decay * budget
  store     (s_t, a_t, r_t, terminated_t, episode ended at t) in a uniform replay buffer of
            `buffer_size` slots (an episode's end takes one more slot, for its final observation)
  learn     from env step `learning_starts` on, one minibatch of `train_batch_size` transitions every
            train_batch_size / replay_ratio env steps (so `replay_ratio` transitions replayed per env
            step; fractional intervals are spread exactly), Adam at lr(s) = lr + min(s / budget, 1)
            * (lr_end - lr) (constant lr when lr_end is unset), Huber loss on
                Q(s_t, a_t)  ->  y_t = G_t + gamma^K * (1 - terminated) * Q_target(s_{t+K}, a*)
            G_t = sum_{k<K} gamma^k r_{t+k}, K = n_step or fewer when the episode ends first (no
            bootstrap when it terminated; a truncated episode bootstraps from its final obs);
            G_t clipped to [-1, 1] when clip_rewards (the history keeps the env's rewards);
            a* = argmax_a Q(s_{t+K}, a) with double_q, else argmax_a Q_target(s_{t+K}, a)
  target    every `target_update_steps` env steps: Q_target <- tau * Q + (1 - tau) * Q_target
            (tau = target_update_tau; 1 copies the weights)
  network   an MLP of `hidden` (ReLU) on vectors or one-hot cells of discrete observations; on
            84x84 uint8 frames the last `frame_stack` frames (the first repeated at an episode's
            start), scaled to [0, 1], through the conv stack `conv_filters` then `hidden`. With
            `dueling`, Q = V + A - mean(A) from two linear heads; else one linear head.
No gradient clipping, no prioritised replay. `rollout_fragment_length` is RLlib's and unused here:
train_steps takes any number of steps (granularity 1).

Recorded as RLlib's teacher records: the cell index for discrete observations, the newest frame
for images, the vector itself otherwise. A row's policy_version is the number of gradient updates
made before its action. The replay buffer stores observations in that recorded form, one per env
step, and rebuilds frame stacks from consecutive slots, so a frame is held once, not frame_stack
times.

save/restore use no pickle: the networks and the optimizer as state dicts (torch.load with
weights_only=True), counters and the numpy RNG state as JSON, the replay buffer (when
checkpoint_replay_buffer) as numpy arrays (allow_pickle=False). A restored teacher continues the
same timeline of steps, updates, schedules and RNG, but, like the RLlib teacher, not the env:
its next step starts a new episode (the replay buffer treats the cut episode as truncated).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.envs import make_env
from pipeline.schema import ObsEncoding, Transitions
from pipeline.teachers.rllib_config import DQNConfig
from pipeline.teachers.torch_checkpoint import load_checkpoint, resumed_episode, save_checkpoint

REPLAY_FILE = "replay.npz"  # beside torch_checkpoint's files


# --- the Q-network ---


class OneHot(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, cells: torch.Tensor) -> torch.Tensor:  # (N,) int64 -> (N, n)
        return F.one_hot(cells, self.n).float()


class Frames(nn.Module):
    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # (N, k, 84, 84) uint8 -> float in [0, 1]
        return frames.float() / 255.0


def mlp(sizes: list[int]) -> list[nn.Module]:
    """Linear + ReLU layers through `sizes` (ReLU after every layer)."""
    return [layer for a, b in zip(sizes, sizes[1:]) for layer in (nn.Linear(a, b), nn.ReLU())]


class QNetwork(nn.Module):
    """obs -> Q(obs, .) of shape (N, actions): a body, then one linear head or a dueling pair."""

    def __init__(self, encoding: ObsEncoding, actions: int, config: DQNConfig):
        super().__init__()
        if encoding.kind == "image":
            convs, channels = [], config.frame_stack
            for filters, kernel, stride in config.conv_filters:
                convs += [nn.Conv2d(channels, filters, kernel, stride), nn.ReLU()]
                channels = filters
            trunk = nn.Sequential(Frames(), *convs, nn.Flatten())
            with torch.no_grad():
                width = trunk(torch.zeros(1, config.frame_stack, *encoding.shape, dtype=torch.uint8)).shape[1]
        elif encoding.kind == "discrete":
            trunk, width = OneHot(encoding.n), encoding.n
        else:
            trunk, width = nn.Identity(), encoding.shape[0]
        self.body = nn.Sequential(trunk, *mlp([width, *config.hidden]))
        features = config.hidden[-1] if config.hidden else width
        self.advantage = nn.Linear(features, actions)
        self.value = nn.Linear(features, 1) if config.dueling else None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.body(obs)  # (N, features)
        advantage = self.advantage(h)  # (N, actions)
        if self.value is None:
            return advantage
        return self.value(h) + advantage - advantage.mean(1, keepdim=True)

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        """argmax_a Q(obs, a), (N,): the advantage head's argmax (V and mean(A) do not depend on a)."""
        return self.advantage(self.body(obs)).argmax(1)


class NumpyGreedy:
    """QNetwork.greedy for one vector or discrete observation, in numpy over views of the network's
    CPU parameters (optimizer steps and load_state_dict update them in place, so the views follow).
    At batch 1 a torch forward is mostly dispatch: this is about 4x faster (BENCHMARKS.md)."""

    def __init__(self, q: QNetwork, one_hot: bool):
        linears = [m for m in q.body if isinstance(m, nn.Linear)] + [q.advantage]
        self.layers = [(layer.weight.detach().numpy(), layer.bias.detach().numpy()) for layer in linears]
        self.one_hot = one_hot

    def __call__(self, obs: np.ndarray) -> int:  # obs: (1, *obs)
        (weight, bias), *rest = self.layers
        h = weight[:, int(obs[0])] + bias if self.one_hot else weight @ obs[0] + bias  # the one-hot product is a column
        for weight, bias in rest:  # ReLU after every body layer, none after the head
            h = weight @ np.maximum(h, 0.0) + bias
        return int(h.argmax())


# --- the learning rule, as pure functions ---


def linear(start: float, end: float, progress):
    """start -> end as progress goes 0 -> 1, then end."""
    return start + np.minimum(progress, 1.0) * (end - start)


def n_step_returns(rewards: np.ndarray, terminated: np.ndarray, ended: np.ndarray, gamma: float):
    """The n steps from each sampled step on, (N, n) each -> (G, discount, K), each (N,):
    K = steps up to and including the first episode end (n if none), G = sum_{k<K} gamma^k r_k,
    discount = gamma^K, or 0 when the episode terminated within those K steps."""
    n = rewards.shape[1]
    in_episode = (np.cumsum(ended, axis=1) - ended) == 0  # (N, n): no episode end before step k
    returns = (in_episode * gamma ** np.arange(n) * rewards).sum(1)
    horizon = in_episode.sum(1)
    discount = gamma ** horizon * ~(terminated & in_episode).any(1)
    return returns.astype(np.float32), discount.astype(np.float32), horizon


def td_targets(returns: torch.Tensor, discount: torch.Tensor, next_q: torch.Tensor, next_q_target: torch.Tensor,
               double_q: bool) -> torch.Tensor:
    """y = G + discount * Q_target(s', a*): a* from the online net (double Q) or the target net. (N,)"""
    best = (next_q if double_q else next_q_target).argmax(1, keepdim=True)  # (N, 1)
    return returns + discount * next_q_target.gather(1, best).squeeze(1)


# --- uniform replay over one stream of slots ---


class Replay:
    """Preallocated numpy arrays, one slot per env step in the order they were taken, indexed by
    absolute position (slot = position % capacity). A slot holds the (recorded-form) observation
    and, once acted on, its action, reward and flags; after an episode's last step one more slot
    (`valid` False) holds its final observation. Slot `head` holds the current observation, whose
    action is not taken yet. The n steps from position p are p..p+n-1, their bootstrap observation
    sits at p+K; a frame stack at p is the frames at p-k+1..p, the episode's first repeated."""

    ARRAYS = ("obs", "action", "reward", "terminated", "ended", "valid", "start")

    def __init__(self, capacity: int, encoding: ObsEncoding, frame_stack: int, n_step: int):
        self.capacity, self.frame_stack, self.n_step = capacity, frame_stack, n_step
        self.frames = encoding.kind == "image"
        self.obs = np.zeros((capacity, *encoding.shape), encoding.numpy_dtype)  # (C, *obs)
        self.action = np.zeros(capacity, np.int64)
        self.reward = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, bool)
        self.ended = np.zeros(capacity, bool)  # the episode ended at this step (terminated or truncated)
        self.valid = np.zeros(capacity, bool)  # an action was taken at this slot's obs
        self.start = np.zeros(capacity, np.int64)  # absolute position of the slot's episode's first obs
        self.head, self.episode_start = 0, 0

    def begin(self, obs) -> None:
        """A new episode's first observation. One in progress (cut by a restore) ends as truncated."""
        before = (self.head - 1) % self.capacity
        if self.head > 0 and self.valid[before] and not self.ended[before]:
            self.ended[before] = True  # the obs at head becomes its final observation
            self.head += 1
        self.episode_start = self.head
        self._put_obs(obs)

    def add(self, action: int, reward: float, terminated: bool, truncated: bool, next_obs) -> None:
        i = self.head % self.capacity
        self.action[i], self.reward[i], self.terminated[i] = action, reward, terminated
        self.ended[i], self.valid[i] = terminated or truncated, True
        self.head += 1
        self._put_obs(next_obs)
        if terminated or truncated:
            self.head += 1  # the final observation keeps its slot; begin() writes the next episode's

    def _put_obs(self, obs) -> None:
        i = self.head % self.capacity
        self.obs[i], self.valid[i], self.start[i] = obs, False, self.episode_start

    def stacked(self, positions: np.ndarray) -> np.ndarray:
        """(N,) positions -> network inputs (N, *obs), or (N, k, H, W) frame stacks."""
        if not self.frames:
            return self.obs[positions % self.capacity]
        offsets = np.arange(1 - self.frame_stack, 1)  # (k,)
        frames = np.maximum(positions[:, None] + offsets, self.start[positions % self.capacity][:, None])
        return self.obs[frames % self.capacity]

    def current(self) -> np.ndarray:
        """The network input at the head, (1, *obs) or (1, k, H, W)."""
        if self.frames:
            return self.stacked(np.array([self.head]))
        i = self.head % self.capacity
        return self.obs[i:i + 1]

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray | None:
        """(size,) positions drawn uniformly from the acted steps whose n steps are stored and whose
        frames are not overwritten; None when there are none yet."""
        low = max(0, self.head - self.capacity + self.frame_stack)
        high = self.head - self.n_step  # inclusive
        if high < low:
            return None
        positions = rng.integers(low, high + 1, size)
        for _ in range(100):  # redraw the final-observation slots (about one per episode)
            invalid = ~self.valid[positions % self.capacity]
            if not invalid.any():
                return positions
            positions[invalid] = rng.integers(low, high + 1, int(invalid.sum()))
        candidates = np.arange(low, high + 1)
        candidates = candidates[self.valid[candidates % self.capacity]]
        return rng.choice(candidates, size) if len(candidates) else None

    def n_steps(self, positions: np.ndarray, gamma: float):
        """(N,) positions -> n_step_returns of the n steps from each, and the bootstrap positions."""
        slots = (positions[:, None] + np.arange(self.n_step)) % self.capacity  # (N, n)
        returns, discount, horizon = n_step_returns(self.reward[slots], self.terminated[slots], self.ended[slots], gamma)
        return returns, discount, positions + horizon


# --- the teacher ---


class LeanDQNTeacher:
    """The Teacher API (pipeline.teachers) over the DQN of this module's docstring."""

    granularity = 1

    def __init__(self, env_id: str, env_kwargs: dict, *, seed: int, budget: int, config: DQNConfig,
                 device: str | None = None):
        self.env = make_env(env_id, **env_kwargs)
        config.check_spaces(env_id, self.env.observation_space, self.env.action_space)
        self.encoding = ObsEncoding.for_space(self.env.observation_space)
        self.config, self.budget = config, budget
        self.actions = int(self.env.action_space.n)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Seeded by the seed and the task, as the Q-learning teacher: other tasks' teachers explore differently.
        self.rng = np.random.default_rng([seed, zlib.crc32(json.dumps(env_kwargs, sort_keys=True).encode())])
        with torch.random.fork_rng(devices=[]):  # leave the caller's torch RNG as it was
            torch.manual_seed(int(self.rng.integers(2**31)))
            self.q = QNetwork(self.encoding, self.actions, config).to(self.device)
            self.target = QNetwork(self.encoding, self.actions, config).to(self.device)
        self.target.load_state_dict(self.q.state_dict())
        self.target.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=config.lr, fused=True)  # one kernel for all tensors: 2x faster updates on CPU
        self._numpy_greedy = (NumpyGreedy(self.q, self.encoding.kind == "discrete")
                              if self.device.type == "cpu" and self.encoding.kind != "image" else None)
        self.frame_stack = config.frame_stack if self.encoding.kind == "image" else 1
        self.replay = self._new_replay()
        self.step, self.episode, self.episode_step, self.updates = 0, 0, 0, 0
        self.replay.begin(self.env.reset(seed=int(self.rng.integers(2**31)))[0])
        self.new_episode = False  # set by restore: the next step starts a new episode
        self._frames: deque | None = None  # act()'s frame stack

    def _new_replay(self) -> Replay:
        return Replay(self.config.buffer_size, self.encoding, self.frame_stack, self.config.n_step)

    # schedules, by env step

    def epsilon(self, step):
        c = self.config
        return linear(c.epsilon_start, c.epsilon_end, step / max(1, round(c.epsilon_decay * self.budget)))

    def lr(self, step):
        c = self.config
        return c.lr if c.lr_end is None else float(linear(c.lr, c.lr_end, step / self.budget))

    def updates_scheduled(self, steps: int) -> int:
        """Gradient updates due once `steps` env steps are taken: one at learning_starts (at least
        n_step), then one every train_batch_size / replay_ratio steps."""
        c = self.config
        first = max(c.learning_starts, c.n_step)
        if steps < first:
            return 0
        return math.floor((steps - first) * c.replay_ratio / c.train_batch_size + 1e-9) + 1

    # acting and learning

    def train_steps(self, n: int) -> Transitions:
        """Act and learn for n env steps; return the n transitions acted in."""
        if self.new_episode:
            self._begin_episode(seed=int(self.rng.integers(2**31)))
        out = Transitions.empty(n, self.encoding)
        replay, env = self.replay, self.env
        for i in range(n):
            obs = replay.obs[replay.head % replay.capacity]
            action = self._choose(self.step + i)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            out.obs[i], out.action[i], out.reward[i] = obs, action, reward
            out.terminated[i], out.truncated[i], out.policy_version[i] = terminated, truncated, self.updates
            replay.add(action, reward, terminated, truncated, next_obs)
            if terminated or truncated:
                self._begin_episode()
            self._learn(self.step + i + 1)
        out.number_steps(self.step, self.episode, self.episode_step)
        if n:
            done = out.terminated[-1] or out.truncated[-1]
            self.episode = int(out.episode[-1]) + int(done)
            self.episode_step = 0 if done else int(out.episode_step[-1]) + 1
        self.step += n
        return out

    def _begin_episode(self, seed: int | None = None) -> None:
        self.replay.begin(self.env.reset(seed=seed)[0])
        self.new_episode = False

    def _choose(self, step: int) -> int:
        """Epsilon-greedy at the current observation (the replay's head slot)."""
        if self.rng.random() < self.epsilon(step):
            return int(self.rng.integers(self.actions))
        return self._greedy(self.replay.current())

    def _greedy(self, obs: np.ndarray) -> int:  # obs: (1, *network obs)
        if self._numpy_greedy:
            return self._numpy_greedy(obs)
        with torch.inference_mode():
            return int(self.q.greedy(torch.as_tensor(obs, device=self.device))[0])

    def _learn(self, steps: int) -> None:
        """After env step `steps` - 1: the updates it is due, then a target sync on its multiples."""
        for _ in range(self.updates_scheduled(steps) - self.updates_scheduled(steps - 1)):
            self._update(steps)
        if steps % self.config.target_update_steps == 0:
            self._sync_target()

    def _update(self, steps: int) -> None:
        c = self.config
        positions = self.replay.sample(self.rng, c.train_batch_size)  # (B,)
        if positions is None:  # a restored teacher without its buffer: nothing to replay yet
            return
        returns, discount, next_positions = self.replay.n_steps(positions, c.gamma)  # (B,) each
        if c.clip_rewards:
            returns = np.clip(returns, -1.0, 1.0)
        tensor = lambda array: torch.as_tensor(array, device=self.device)  # noqa: E731
        obs, next_obs = tensor(self.replay.stacked(positions)), tensor(self.replay.stacked(next_positions))
        action = tensor(self.replay.action[positions % self.replay.capacity])
        with torch.no_grad():
            next_q = self.q(next_obs) if c.double_q else None  # (B, actions)
            y = td_targets(tensor(returns), tensor(discount), next_q, self.target(next_obs), c.double_q)  # (B,)
        predicted = self.q(obs).gather(1, action[:, None]).squeeze(1)  # (B,)
        loss = F.smooth_l1_loss(predicted, y)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(steps)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1

    def _sync_target(self) -> None:
        tau = self.config.target_update_tau
        if tau == 1.0:
            self.target.load_state_dict(self.q.state_dict())
            return
        with torch.no_grad():
            for target, online in zip(self.target.parameters(), self.q.parameters()):
                target.lerp_(online, tau)

    def act(self, obs, first: bool = False) -> int:
        """Greedy action of the current weights for one recorded-style observation; `first` marks
        the first observation of an episode (it restarts the frame stack)."""
        if self.encoding.kind == "image":  # the first frame repeated at an episode's start, as the replay stacks them
            if first or self._frames is None:
                self._frames = deque([obs] * self.frame_stack, maxlen=self.frame_stack)
            else:
                self._frames.append(obs)
            obs = np.stack(self._frames)
        return self._greedy(np.asarray(obs, self.encoding.numpy_dtype)[None])

    def close(self) -> None:
        self.env.close()

    # checkpoints, without pickle

    def save(self, directory: str) -> None:
        keep = self.config.checkpoint_replay_buffer
        state = {"step": self.step, "episode": self.episode, "episode_step": self.episode_step, "updates": self.updates,
                 "rng": self.rng.bit_generator.state, "replay": keep and {"head": self.replay.head,
                                                                        "episode_start": self.replay.episode_start}}
        save_checkpoint(directory, {"q": self.q.state_dict(), "target": self.target.state_dict(),
                                    "optimizer": self.optimizer.state_dict()}, state)
        if keep:
            np.savez(os.path.join(directory, REPLAY_FILE), **{name: getattr(self.replay, name) for name in Replay.ARRAYS})

    def restore(self, directory: str) -> None:
        state_dicts, state = load_checkpoint(directory, self.device)
        for name, part in (("q", self.q), ("target", self.target), ("optimizer", self.optimizer)):
            part.load_state_dict(state_dicts[name])
        self.step, self.updates = state["step"], state["updates"]
        self.episode, self.episode_step = resumed_episode(state)
        self.rng.bit_generator.state = state["rng"]
        self.replay = self._new_replay()
        if state["replay"]:
            with np.load(os.path.join(directory, REPLAY_FILE), allow_pickle=False) as arrays:
                for name in Replay.ARRAYS:
                    getattr(self.replay, name)[...] = arrays[name]
            self.replay.head, self.replay.episode_start = state["replay"]["head"], state["replay"]["episode_start"]
        self.new_episode = True
