"""RLlib DQN teacher speed: the cost of recording, and the teacher against a single-file DQN.

    python bench/rllib_teacher.py                       # the quick preset's CartPole DQN teacher
    python bench/rllib_teacher.py --iterations 60

Prints, from one run:
  recording  env steps/s of the same RLlib DQN config sampling through RecordingEnvRunner (plus
             Transitions, an Arrow table and a Parquet encode of every iteration's rows) and
             through RLlib's plain SingleAgentEnvRunner, iterations alternating. Goal: < 5% apart.
  peer       the recording teacher against bench/peer_dqn.py, a single-file PyTorch DQN with the
             same network, batch size and replay ratio. Goal: >= 0.5x.
  where      what one env step costs the teacher: RLlib's env-runner step, and its replay
             sampling and learner update per replayed transition times the replay ratio.
Both learners start updating at once (learning_starts is set to one batch) so every timed step
carries its share of updates; torch uses one thread, as in a Ray actor.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

import peer_dqn
from pipeline.config import load_preset
from pipeline.teachers import algo_config
from pipeline.teachers.rllib import RLlibTeacher, rllib_config


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--group", default="cartpole")
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    group = load_preset(args.preset).collect.teachers[args.group]
    config = replace(algo_config(group.algo, group.algo_config), learning_starts=0)
    unit = config.granularity

    teacher = RLlibTeacher(group.env, group.env_kwargs, seed=0, budget=group.budget, config=config)
    plain = rllib_config(config, group.env, group.env_kwargs, seed=0, budget=group.budget) \
        .env_runners(env_runner_cls=SingleAgentEnvRunner).build_algo()

    def record():
        batch = teacher.train_steps(unit)
        table = batch.to_table(teacher.encoding, teacher_id="bench", env_id=group.env, task_id="default", seed=0)
        pq.write_table(table, pa.BufferOutputStream(), compression="zstd")

    for _ in range(3):  # warm up both past their first updates
        record()
        plain.train()
    recording = without = 0.0
    for _ in range(args.iterations):
        recording += timed(record)
        without += timed(plain.train)
    steps = unit * args.iterations
    teacher_rate, plain_rate = steps / recording, steps / without

    peer_rate, _ = peer_dqn.run(max(4000, steps), hidden=list(config.hidden), batch=config.train_batch_size,
                                replay_ratio=config.replay_ratio, lr=config.lr, gamma=config.gamma,
                                learning_starts=config.train_batch_size, target_update_steps=config.target_update_steps,
                                buffer_size=config.buffer_size)

    runner, buffer, learners = plain.env_runner, plain.local_replay_buffer, plain.learner_group
    sample_s = timed(runner.sample) / unit
    replayed = buffer.sample(num_items=config.train_batch_size, n_step=config.n_step, gamma=config.gamma,
                             batch_length_T=0, lookback=0, min_batch_length_T=0, beta=None, sample_episodes=True)
    replay_s = min(timed(lambda: buffer.sample(num_items=config.train_batch_size, n_step=config.n_step, gamma=config.gamma,
                                                batch_length_T=0, lookback=0, min_batch_length_T=0, beta=None,
                                                sample_episodes=True)) for _ in range(5)) / config.train_batch_size
    update_s = min(timed(lambda: learners.update(episodes=replayed, timesteps={})) for _ in range(5)) / config.train_batch_size

    print(f"{group.env} {group.algo}: hidden {list(config.hidden)}, batch {config.train_batch_size}, "
          f"replay ratio {config.replay_ratio:g}, {unit} env steps per iteration; {args.iterations} iterations each")
    print(f"  teacher, recording     {teacher_rate:8,.0f} env steps/s")
    print(f"  same, not recording    {plain_rate:8,.0f} env steps/s")
    print(f"  single-file peer       {peer_rate:8,.0f} env steps/s")
    print(f"recording / not recording = {teacher_rate / plain_rate:.3f}   (goal: > 0.95)")
    print(f"teacher / peer            = {teacher_rate / peer_rate:.3f}   (goal: >= 0.5)")
    per_step = sample_s + config.replay_ratio * (replay_s + update_s)
    print(f"where one teacher env step goes ({per_step * 1e3:.2f} ms): env runner step {sample_s * 1e3:.2f} ms, "
          f"replay sampling {config.replay_ratio:g} x {replay_s * 1e3:.3f} ms, learner update {config.replay_ratio:g} x {update_s * 1e3:.3f} ms "
          f"per replayed transition; the peer's whole step: {1e3 / peer_rate:.2f} ms")


if __name__ == "__main__":
    main()
