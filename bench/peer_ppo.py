"""A minimal single-file PyTorch PPO in CleanRL's style (ppo.py, one env): the peer the lean PPO
teacher (pipeline/teachers/lean_ppo.py) is timed and compared against.

The same pieces as the teacher: separate actor and critic MLPs with tanh and orthogonal init,
rollouts of `batch` env steps, GAE(lambda), `epochs` passes of shuffled minibatches of `minibatch`
with per-minibatch advantage normalisation, the clipped surrogate, 0.5 * (0.5 * squared error)
value loss (unclipped), an entropy bonus, Adam (eps 1e-5, constant lr), gradient norm clipped to
0.5. Unlike CleanRL, a truncated episode bootstraps from its final obs (folded into its last
reward: r + gamma * V(final obs)), as the teacher does. As CleanRL, it runs the actor and the
critic in torch at every env step and samples from torch's Categorical.
Used by bench/lean_ppo.py; run alone to see it learn:

    python bench/peer_ppo.py     # prints env steps/s and the mean return of the last 10 episodes
"""

from __future__ import annotations

import math
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn


def mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        nn.init.orthogonal_(linear.weight, out_gain if i == len(sizes) - 2 else math.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def run(steps: int, *, hidden: list[int], batch: int, minibatch: int, epochs: int, lr: float, gamma: float = 0.99,
        lam: float = 0.95, clip: float = 0.2, ent_coef: float = 0.0, seed: int = 0) -> tuple[float, list[float]]:
    """Train for `steps` env steps (whole rollouts of `batch`) on CartPole-v1; returns (env steps/s, episode returns)."""
    env = gym.make("CartPole-v1")
    torch.manual_seed(seed)
    n_obs, n_actions = env.observation_space.shape[0], env.action_space.n
    actor, critic = mlp([n_obs, *hidden, n_actions], 0.01), mlp([n_obs, *hidden, 1], 1.0)
    params = [*actor.parameters(), *critic.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr, eps=1e-5)
    obs_buf = torch.zeros((batch, n_obs))
    act_buf, logp_buf = torch.zeros(batch, dtype=torch.long), torch.zeros(batch)
    rew_buf, val_buf, done_buf = torch.zeros(batch), torch.zeros(batch), torch.zeros(batch)
    obs = torch.as_tensor(env.reset(seed=seed)[0])
    returns, episode_return = [], 0.0
    start = time.perf_counter()
    for _ in range(steps // batch):
        for t in range(batch):
            with torch.no_grad():
                dist = torch.distributions.Categorical(logits=actor(obs))
                action = dist.sample()
                val_buf[t], logp_buf[t] = critic(obs).squeeze(), dist.log_prob(action)
            obs_buf[t], act_buf[t] = obs, action
            next_obs, reward, terminated, truncated, _ = env.step(int(action))
            episode_return += reward
            if truncated and not terminated:
                with torch.no_grad():
                    reward += gamma * float(critic(torch.as_tensor(next_obs)))
            rew_buf[t], done_buf[t] = reward, float(terminated or truncated)
            if terminated or truncated:
                returns.append(episode_return)
                next_obs, episode_return = env.reset()[0], 0.0
            obs = torch.as_tensor(next_obs)
        with torch.no_grad():  # GAE, bootstrapping from the obs after the rollout
            next_value = critic(obs).squeeze()
            advantages, running = torch.zeros(batch), 0.0
            for t in reversed(range(batch)):
                following = next_value if t == batch - 1 else val_buf[t + 1]
                nonterminal = 1.0 - done_buf[t]
                delta = rew_buf[t] + gamma * following * nonterminal - val_buf[t]
                running = delta + gamma * lam * nonterminal * running
                advantages[t] = running
            targets = advantages + val_buf
        for _ in range(epochs):
            order = torch.randperm(batch)
            for begin in range(0, batch, minibatch):
                idx = order[begin:begin + minibatch]
                dist = torch.distributions.Categorical(logits=actor(obs_buf[idx]))
                ratio = (dist.log_prob(act_buf[idx]) - logp_buf[idx]).exp()
                adv = advantages[idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
                v_loss = 0.5 * ((critic(obs_buf[idx]).squeeze(1) - targets[idx]) ** 2).mean()
                loss = pg_loss - ent_coef * dist.entropy().mean() + 0.5 * v_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, 0.5)
                optimizer.step()
    return steps / (time.perf_counter() - start), returns


if __name__ == "__main__":
    torch.set_num_threads(1)
    rate, returns = run(20_000, hidden=[64, 64], batch=2000, minibatch=128, epochs=10, lr=3e-4)
    print(f"{rate:,.0f} env steps/s; mean return of the last 10 episodes {np.mean(returns[-10:]):.1f}")
