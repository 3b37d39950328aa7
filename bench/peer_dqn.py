"""A minimal single-file PyTorch DQN in CleanRL's style: the peer the RLlib teacher is timed against.

Same pieces as the teacher's DQN: an MLP Q-network, Adam, Huber loss, double-Q targets, a target
network synced every `target_update_steps`, uniform replay with `replay_ratio` transitions
replayed per env step (one batch every batch / replay_ratio steps), linear epsilon decay.
Used by bench/rllib_teacher.py; run alone to see it learn:

    python bench/peer_dqn.py     # prints env steps/s and the mean return of the last 20 episodes
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F


def mlp(sizes: list[int]) -> torch.nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def run(steps: int, *, hidden: list[int], batch: int, replay_ratio: float, lr: float, gamma: float = 0.99,
        learning_starts: int = 1000, target_update_steps: int = 500, buffer_size: int = 50_000,
        epsilon_end: float = 0.05, epsilon_decay_steps: int = 10_000, seed: int = 0) -> tuple[float, list[float]]:
    """Train for `steps` env steps on CartPole-v1; returns (env steps/s, episode returns)."""
    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_obs, n_actions = env.observation_space.shape[0], env.action_space.n
    q = mlp([n_obs, *hidden, n_actions])
    target = mlp([n_obs, *hidden, n_actions])
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=lr)
    obs_buf = np.zeros((buffer_size, n_obs), np.float32)  # (capacity, obs)
    next_buf = np.zeros((buffer_size, n_obs), np.float32)
    act_buf = np.zeros(buffer_size, np.int64)
    rew_buf = np.zeros(buffer_size, np.float32)
    term_buf = np.zeros(buffer_size, np.float32)
    train_every = max(1, round(batch / replay_ratio))  # replay_ratio = batch / train_every
    obs, _ = env.reset(seed=seed)
    returns, episode_return, size = [], 0.0, 0
    start = time.perf_counter()
    for step in range(steps):
        epsilon = max(epsilon_end, 1.0 - step * (1.0 - epsilon_end) / epsilon_decay_steps)
        if rng.random() < epsilon:
            action = int(rng.integers(n_actions))
        else:
            with torch.no_grad():
                action = int(q(torch.as_tensor(obs)).argmax())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        i = step % buffer_size
        obs_buf[i], next_buf[i], act_buf[i], rew_buf[i], term_buf[i] = obs, next_obs, action, reward, terminated
        size = min(size + 1, buffer_size)
        episode_return += reward
        obs = next_obs
        if terminated or truncated:
            returns.append(episode_return)
            obs, episode_return = env.reset()[0], 0.0
        if step >= learning_starts and step % train_every == 0:
            idx = rng.integers(size, size=batch)
            o, o2 = torch.as_tensor(obs_buf[idx]), torch.as_tensor(next_buf[idx])
            with torch.no_grad():  # double Q: the online net picks, the target net values
                best = q(o2).argmax(1, keepdim=True)
                y = torch.as_tensor(rew_buf[idx]) + gamma * (1 - torch.as_tensor(term_buf[idx])) * target(o2).gather(1, best).squeeze(1)
            predicted = q(o).gather(1, torch.as_tensor(act_buf[idx])[:, None]).squeeze(1)
            loss = F.smooth_l1_loss(predicted, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if step % target_update_steps == 0:
            target.load_state_dict(q.state_dict())
    return steps / (time.perf_counter() - start), returns


if __name__ == "__main__":
    torch.set_num_threads(1)
    rate, returns = run(20_000, hidden=[64, 64], batch=64, replay_ratio=8, lr=1e-3)
    print(f"{rate:,.0f} env steps/s; mean return of the last 20 episodes {np.mean(returns[-20:]):.1f}")
