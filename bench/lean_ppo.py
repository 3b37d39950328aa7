"""The lean PPO teacher (pipeline/teachers/lean_ppo.py) against the single-file peer (bench/peer_ppo.py).

    python bench/lean_ppo.py                          # speed, then learning curves over 5 seeds to 50k steps
    python bench/lean_ppo.py --seeds 3 --at 10000 24000

Prints, from one run, on CartPole-v1 with PPOConfig's defaults (no preset has a PPO teacher yet:
lr 3e-4, gamma 0.99, lambda 0.95, rollouts of 2,000 steps, minibatches of 128, 10 epochs, clip 0.2,
no entropy bonus, hidden [64, 64]):
  speed   env steps/s of LeanPPOTeacher (train_steps, plus the Arrow table and a Parquet encode of
          its rows: recording included) and of peer_ppo.run, both acting and updating (the same
          updates per rollout); runs alternate, medians of --repeats.
  curves  mean return of the last 10 episodes completed by each of --at env steps, over --seeds
          seeds, for both, with 95% t intervals. CartPole pays 1 per step, so an episode's return
          is its length and the returns place each episode's end.
One torch thread per learner, as in a Ray actor; the curves run two learners at a time (--jobs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from learning_curves import cartpole_peer_points, compare_curves, teacher_points
import peer_ppo
from pipeline.teachers.lean_ppo import LeanPPOTeacher
from pipeline.teachers.rllib_config import PPOConfig

ENV = "CartPole-v1"
CONFIG = PPOConfig()


def peer_kwargs(config: PPOConfig) -> dict:
    return dict(hidden=list(config.hidden), batch=config.train_batch_size, minibatch=config.minibatch_size,
                epochs=config.num_epochs, lr=config.lr, gamma=config.gamma, lam=config.gae_lambda,
                clip=config.clip_param, ent_coef=config.entropy_coeff)


def teacher_rate(steps: int, seed: int) -> float:
    teacher = LeanPPOTeacher(ENV, {}, seed=seed, budget=steps, config=CONFIG)
    start = time.perf_counter()
    for _ in range(steps // teacher.granularity):  # recording: each rollout's rows as collect writes them
        batch = teacher.train_steps(teacher.granularity)
        table = batch.to_table(teacher.encoding, teacher_id="bench", env_id=ENV, task_id="default", seed=seed)
        pq.write_table(table, pa.BufferOutputStream(), compression="zstd")
    return teacher.step / (time.perf_counter() - start)


def curve(args) -> tuple[str, int, list[float]]:
    """(learner, seed, mean return of the last 10 episodes completed by each checkpoint step)."""
    learner, seed, at = args
    torch.set_num_threads(1)
    steps = max(at)
    if learner == "lean":
        return learner, seed, teacher_points(LeanPPOTeacher(ENV, {}, seed=seed, budget=steps, config=CONFIG).train_steps(steps), at)
    return learner, seed, cartpole_peer_points(peer_ppo.run(steps, seed=seed, **peer_kwargs(CONFIG))[1], at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed-steps", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--at", type=int, nargs="+", default=[10_000, 24_000, 50_000])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    unit = CONFIG.granularity
    if args.speed_steps % unit or any(s % unit for s in args.at):
        parser.error(f"--speed-steps and --at must be multiples of the rollout, {unit} steps")
    print(f"{ENV}, PPOConfig defaults: hidden {list(CONFIG.hidden)}, rollout {unit}, minibatch {CONFIG.minibatch_size}, "
          f"{CONFIG.num_epochs} epochs, lr {CONFIG.lr:g}; {args.speed_steps} steps per run, {args.repeats} repeats")
    rates: dict[str, list[float]] = {"lean (recording included)": [], "peer": []}
    for repeat in range(args.repeats):
        rates["lean (recording included)"].append(teacher_rate(args.speed_steps, repeat))
        rates["peer"].append(peer_ppo.run(args.speed_steps, seed=repeat, **peer_kwargs(CONFIG))[0])
        print("  " + ", ".join(f"{name} {r[-1]:,.0f}" for name, r in rates.items()), flush=True)
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in median.items():
        print(f"  {name:28s} {rate:8,.0f} env steps/s (median)")
    print(f"lean / peer = {median['lean (recording included)'] / median['peer']:.3f}")

    compare_curves(curve, args.seeds, args.at, args.jobs)

if __name__ == "__main__":
    main()
