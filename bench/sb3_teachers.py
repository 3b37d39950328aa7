"""Stable-Baselines3's DQN and PPO as teachers: speed against the lean teachers and the single-file peers.

    pip install stable-baselines3==2.9.2      # make bench installs it; not a dependency of the pipeline
    python bench/sb3_teachers.py              # 3 alternating repeats each of DQN and PPO on CartPole-v1

Issue #13 asks to measure a maintained library before writing our own teachers. SB3 is that
library; this prints env steps/s, side by side in one run (runs alternate, medians of --repeats),
one torch thread, on CPU, for:
  dqn   SB3 DQN recording every transition through `Recorder` (below), LeanDQNTeacher configured as
        close to SB3's DQN as it goes (no dueling head, 1-step returns, max-Q targets: SB3's DQN has
        no double Q or dueling), and bench/peer_dqn.py; all with the quick preset's CartPole MLP
        (256x256), batch 64, replay ratio 8 (SB3: train_freq 8, gradient_steps 1), lr 1e-3, target
        sync every 1,000 steps, learning from the first batch on (learning_starts 64).
  ppo   SB3 PPO recording the same way, LeanPPOTeacher and bench/peer_ppo.py with PPOConfig's
        defaults (rollouts of 2,000 steps, minibatches of 128, 10 epochs, lr 3e-4, MLP 64x64).
Recording, for SB3: a gymnasium wrapper that keeps every step's observation, action, reward,
flags and the learner's gradient-update count in preallocated arrays, then the project's
Transitions, Arrow table and a zstd Parquet encode per 1,000 rows, as collect writes them; for
the lean teachers the same tables from their train_steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from stable_baselines3 import DQN, PPO

import lean_dqn as dqn_bench
import lean_ppo as ppo_bench
import peer_dqn
import peer_ppo
from pipeline.schema import ObsEncoding, Transitions
from pipeline.teachers.lean_dqn import LeanDQNTeacher
from pipeline.teachers.lean_ppo import LeanPPOTeacher

ENV = "CartPole-v1"


class Recorder(gym.Wrapper):
    """Keeps every transition the learner acts in, with the learner's update count at that step."""

    def __init__(self, env: gym.Env, steps: int):
        super().__init__(env)
        self.encoding = ObsEncoding.for_space(env.observation_space)
        self.rows = Transitions.empty(steps, self.encoding)
        self.updates = lambda: 0  # set once the learner exists
        self.obs, self.count = None, 0

    def reset(self, **kwargs):
        self.obs, info = self.env.reset(**kwargs)
        return self.obs, info

    def step(self, action):
        next_obs, reward, terminated, truncated, info = self.env.step(action)
        i, rows = self.count, self.rows
        if i < len(rows):
            rows.obs[i], rows.action[i], rows.reward[i] = self.obs, int(action), reward
            rows.terminated[i], rows.truncated[i], rows.policy_version[i] = terminated, truncated, self.updates()
        self.obs, self.count = next_obs, i + 1
        return next_obs, reward, terminated, truncated, info

    def write_tables(self) -> None:
        rows = self.rows
        rows.number_steps(0, 0, 0)
        for start in range(0, len(rows), 1000):
            part = Transitions(**{name: values[start:start + 1000] for name, values in vars(rows).items()})
            table = part.to_table(self.encoding, teacher_id="bench", env_id=ENV, task_id="default", seed=0)
            pq.write_table(table, pa.BufferOutputStream(), compression="zstd")


def sb3_rate(make_learner, steps: int) -> float:
    env = Recorder(gym.make(ENV), steps)
    learner = make_learner(env)
    env.updates = lambda: learner._n_updates
    start = time.perf_counter()
    learner.learn(total_timesteps=steps)
    env.write_tables()
    return steps / (time.perf_counter() - start)


def sb3_dqn(config, budget: int, steps: int, seed: int):
    return lambda env: DQN(
        "MlpPolicy", env, learning_rate=config.lr, buffer_size=config.buffer_size, learning_starts=config.learning_starts,
        batch_size=config.train_batch_size, gamma=config.gamma,
        train_freq=round(config.train_batch_size / config.replay_ratio), gradient_steps=1,
        target_update_interval=config.target_update_steps, exploration_fraction=min(1.0, config.epsilon_decay * budget / steps),  # the same epsilon by step
        exploration_final_eps=config.epsilon_end, max_grad_norm=1e9,  # the others do not clip
        policy_kwargs={"net_arch": list(config.hidden)}, seed=seed, device="cpu")


def sb3_ppo(config, seed: int):
    return lambda env: PPO(
        "MlpPolicy", env, learning_rate=config.lr, n_steps=config.train_batch_size, batch_size=config.minibatch_size,
        n_epochs=config.num_epochs, gamma=config.gamma, gae_lambda=config.gae_lambda, clip_range=config.clip_param,
        ent_coef=config.entropy_coeff, policy_kwargs={"net_arch": list(config.hidden)}, seed=seed, device="cpu")


def compare(title: str, runs: dict, repeats: int) -> None:
    print(title)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, run in runs.items():
            rates[name].append(run(repeat))
        print("  " + ", ".join(f"{name} {r[-1]:,.0f}" for name, r in rates.items()), flush=True)
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in median.items():
        print(f"  {name:24s} {rate:8,.0f} env steps/s (median)")
    sb3, lean = next(n for n in median if n.startswith("sb3")), next(n for n in median if n.startswith("lean"))
    print(f"  {lean} / {sb3} = {median[lean] / median[sb3]:.2f}; {sb3} / peer = {median[sb3] / median['peer']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dqn-steps", type=int, default=6000)
    parser.add_argument("--ppo-steps", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config, budget = dqn_bench.cartpole_teachers("quick")
    timed = replace(config, learning_starts=config.train_batch_size, dueling=False, n_step=1, double_q=False)
    compare(f"DQN, {ENV}, {args.dqn_steps} steps per run", {
        "sb3 dqn (recording)": lambda seed: sb3_rate(sb3_dqn(timed, budget, args.dqn_steps, seed), args.dqn_steps),
        "lean_dqn (recording)": lambda seed: dqn_bench.teacher_rate(timed, budget, args.dqn_steps, seed),
        "peer": lambda seed: peer_dqn.run(args.dqn_steps, seed=seed, **dqn_bench.peer_kwargs(timed, budget))[0],
    }, args.repeats)
    ppo = ppo_bench.CONFIG
    compare(f"PPO, {ENV}, {args.ppo_steps} steps per run", {
        "sb3 ppo (recording)": lambda seed: sb3_rate(sb3_ppo(ppo, seed), args.ppo_steps),
        "lean_ppo (recording)": lambda seed: ppo_bench.teacher_rate(args.ppo_steps, seed),
        "peer": lambda seed: peer_ppo.run(args.ppo_steps, seed=seed, **ppo_bench.peer_kwargs(ppo))[0],
    }, args.repeats)


if __name__ == "__main__":
    main()
