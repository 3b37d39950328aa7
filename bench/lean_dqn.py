"""The lean DQN teacher (pipeline/teachers/lean_dqn.py) against the single-file peer (bench/peer_dqn.py).

    python bench/lean_dqn.py                          # speed, then learning curves over 5 seeds to 50k steps
    python bench/lean_dqn.py --seeds 3 --at 10000 24000
    python bench/lean_dqn.py --preset cartpole --speed-steps 0 --at 10000 32000 64000   # the cartpole preset's teachers

Prints, from one run, on CartPole-v1 with the preset's (default quick) cartpole algo_config:
  speed   env steps/s of LeanDQNTeacher (train_steps, plus the Arrow table and a Parquet encode of
          its rows: recording included) and of peer_dqn.run, with the same MLP, batch, replay
          ratio, learning rate and target sync, updating from the first batch on; runs alternate,
          medians of --repeats. The teacher twice: with the preset's dueling head and 3-step
          returns, and as the peer (no dueling head, 1-step returns).
  curves  mean return of the last 10 episodes completed by each of --at env steps, over --seeds
          seeds, for the teacher (the preset's config and budget: its epsilon and lr schedules) and
          the peer (the same epsilon schedule, learning_starts, buffer and target sync; a constant lr,
          no dueling head, 1-step returns: what it has), with 95% t intervals. CartPole pays 1 per
          step, so an episode's return is its length and the returns place each episode's end.
One torch thread per learner, as in a Ray actor; the curves run two learners at a time (--jobs).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from learning_curves import cartpole_peer_points, compare_curves, teacher_points
import peer_dqn
from pipeline.config import load_preset
from pipeline.teachers import algo_config
from pipeline.teachers.lean_dqn import LeanDQNTeacher

ENV = "CartPole-v1"


def cartpole_teachers(preset: str = "quick"):
    """(DQNConfig, budget) of the preset's cartpole teachers (algo dqn or lean_dqn: the same config)."""
    group = load_preset(preset).collect.teachers["cartpole"]
    return algo_config(group.algo, group.algo_config), group.budget


def peer_kwargs(config, budget: int) -> dict:
    return dict(hidden=list(config.hidden), batch=config.train_batch_size, replay_ratio=config.replay_ratio, lr=config.lr,
                gamma=config.gamma, learning_starts=config.learning_starts, target_update_steps=config.target_update_steps,
                buffer_size=config.buffer_size, epsilon_end=config.epsilon_end,
                epsilon_decay_steps=max(1, round(config.epsilon_decay * budget)))


def teacher_rate(config, budget: int, steps: int, seed: int) -> float:
    teacher = LeanDQNTeacher(ENV, {}, seed=seed, budget=budget, config=config)
    start = time.perf_counter()
    for _ in range(steps // 1000):  # recording: the rows as collect writes them, in 1,000-step chunks
        batch = teacher.train_steps(1000)
        table = batch.to_table(teacher.encoding, teacher_id="bench", env_id=ENV, task_id="default", seed=seed)
        pq.write_table(table, pa.BufferOutputStream(), compression="zstd")
    return steps // 1000 * 1000 / (time.perf_counter() - start)


def curve(job: tuple[str, int, list[int]], preset: str) -> tuple[str, int, list[float]]:
    """(learner, seed, mean return of the last 10 episodes completed by each checkpoint step)."""
    learner, seed, at = job
    torch.set_num_threads(1)
    config, budget = cartpole_teachers(preset)
    steps = max(at)
    if learner == "lean":
        return learner, seed, teacher_points(LeanDQNTeacher(ENV, {}, seed=seed, budget=budget, config=config).train_steps(steps), at)
    return learner, seed, cartpole_peer_points(peer_dqn.run(steps, seed=seed, **peer_kwargs(config, budget))[1], at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", help="whose cartpole teachers (their config and budget)")
    parser.add_argument("--speed-steps", type=int, default=6000, help="0: learning curves only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--at", type=int, nargs="+", default=[10_000, 24_000, 50_000])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config, budget = cartpole_teachers(args.preset)
    if args.speed_steps:
        speed(config, budget, args)
    compare_curves(functools.partial(curve, preset=args.preset), args.seeds, args.at, args.jobs)


def speed(config, budget: int, args) -> None:
    timed = replace(config, learning_starts=config.train_batch_size)  # every timed step carries its share of updates
    as_peer = replace(timed, dueling=False, n_step=1)
    print(f"{ENV}, the {args.preset} preset's cartpole config: hidden {list(config.hidden)}, batch {config.train_batch_size}, "
          f"replay ratio {config.replay_ratio:g}, target sync every {config.target_update_steps} steps; "
          f"{args.speed_steps} steps per run, {args.repeats} repeats")
    rates: dict[str, list[float]] = {"lean (preset: dueling, 3-step)": [], "lean (as the peer)": [], "peer": []}
    for repeat in range(args.repeats):
        rates["lean (preset: dueling, 3-step)"].append(teacher_rate(timed, budget, args.speed_steps, repeat))
        rates["lean (as the peer)"].append(teacher_rate(as_peer, budget, args.speed_steps, repeat))
        rates["peer"].append(peer_dqn.run(args.speed_steps, seed=repeat, **peer_kwargs(timed, budget))[0])
        print("  " + ", ".join(f"{name} {r[-1]:,.0f}" for name, r in rates.items()), flush=True)
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in median.items():
        print(f"  {name:32s} {rate:8,.0f} env steps/s (median)")
    for name in list(median)[:2]:
        print(f"{name} / peer = {median[name] / median['peer']:.3f}")


if __name__ == "__main__":
    main()
