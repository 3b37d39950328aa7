"""Learning curves of a lean teacher and its single-file peer, side by side: shared by
bench/lean_dqn.py and bench/lean_ppo.py. Each curve is the mean return of the last 10 episodes
completed by each step of `at`, one run per (learner, seed), several runs at a time."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import numpy as np
from scipy import stats

LEARNERS = ("lean", "peer")


def points(end_steps: np.ndarray, returns: np.ndarray, at: list[int]) -> list[float]:
    """Mean return of the last 10 episodes completed by each step of `at`."""
    return [float(returns[end_steps <= step][-10:].mean()) for step in at]


def teacher_points(batch, at: list[int]) -> list[float]:
    """The curve of a teacher's recorded Transitions (complete episodes only)."""
    end_steps = np.flatnonzero(batch.terminated | batch.truncated) + 1
    return points(end_steps, np.bincount(batch.episode, weights=batch.reward)[:len(end_steps)], at)


def cartpole_peer_points(returns: list[float], at: list[int]) -> list[float]:
    """The curve of a peer's CartPole episode returns, in order (a return there is the episode's length)."""
    returns = np.asarray(returns)
    return points(np.cumsum(returns), returns, at)


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% t interval over seeds; no interval with one seed."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def compare_curves(curve: Callable[[tuple[str, int, list[int]]], tuple[str, int, list[float]]],
                   seeds: int, at: list[int], jobs: int) -> dict[str, np.ndarray]:
    """Run curve((learner, seed, at)) for both learners and every seed; print each seed's curve and
    the mean with its interval at each step; return (seeds, len(at)) arrays by learner."""
    start = time.perf_counter()
    with ProcessPoolExecutor(jobs) as pool:
        results = list(pool.map(curve, [(learner, seed, at) for seed in range(seeds) for learner in LEARNERS]))
    print(f"learning curves: mean return of the last 10 episodes, {seeds} seeds, "
          f"{time.perf_counter() - start:.0f} s on {jobs} processes")
    by = {learner: np.array([r for name, _, r in results if name == learner]) for learner in LEARNERS}  # (seeds, at)
    for learner, table in by.items():
        for seed, row in enumerate(table):
            print(f"  {learner} seed {seed}: " + "  ".join(f"{v:6.1f}" for v in row))
    for i, step in enumerate(at):
        lean, peer = t_interval(by["lean"][:, i]), t_interval(by["peer"][:, i])
        print(f"  at {step:6,d}: lean {lean[0]:6.1f} [{lean[1]:6.1f}, {lean[2]:6.1f}]   "
              f"peer {peer[0]:6.1f} [{peer[1]:6.1f}, {peer[2]:6.1f}]   lean / peer = {lean[0] / peer[0]:.2f}")
    return by
