"""The lean DQN teacher (pipeline/teachers/lean_dqn.py) on Breakout against a single-file Atari peer.

    python bench/lean_dqn_atari.py                    # 3 alternating repeats of 1,500 timed env steps each
    python bench/lean_dqn_atari.py --steps 3000 --repeats 5

The Breakout version of bench/lean_dqn.py (speed only, no learning curves). On ALE/Breakout-v5
through pipeline.envs.make_env (sticky actions, frame skip 4, 84x84 grayscale uint8 frames, no-op
starts) with the atari preset's env_kwargs and breakout algo_config, except learning_starts = one
batch and a buffer of --buffer-size transitions (memory), it times:
  lean    LeanDQNTeacher.train_steps in chunks of --chunk steps, plus the Arrow table and a Parquet
          (zstd) encode of each chunk's rows: recording included. The replay holds each frame once
          and rebuilds stacks of 4 by index.
  peer    `peer_run` below: CleanRL's Atari DQN in one function. The same Nature-DQN network
          (NATURE_CNN, then the preset's hidden, a linear head; uint8 frames scaled in the network),
          Adam at the preset's lr, Huber loss, max-Q or double-Q targets as the preset says, rewards
          clipped for the loss, one batch every batch / replay_ratio steps, target sync every
          target_update_steps, linear epsilon over epsilon_decay * budget steps; a deque of the
          last 4 frames (the first repeated at an episode's start) and a uint8 replay of stacked
          observations and next observations, as CleanRL's (SB3's) buffer without memory
          optimisation.
Both start untimed: reset, then learning_starts env steps (one batch) so every timed step carries
its share of updates; runs alternate lean, peer; medians of --repeats. For each it prints env
steps/s (one CPU core: one torch thread, single process), updates/s (updates over the run's whole
wall time), ms per env step, and that time split: updating (the update calls timed alone), recording
(lean), acting (the rest: env step, epsilon-greedy, replay writes). The preset's epsilon falls from 1
over 250,000 steps, so the timed steps act almost all at random; the greedy forward (batch of one
frame stack) is timed apart, --greedy-calls times, to cost a step later in training.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import load_preset
from pipeline.envs import make_env
from pipeline.teachers import algo_config
from pipeline.teachers.lean_dqn import LeanDQNTeacher

ENV = "ALE/Breakout-v5"


def atari_breakout():
    group = load_preset("atari").collect.teachers["breakout"]
    return algo_config(group.algo, group.algo_config), group.budget, dict(group.env_kwargs)


# --- the single-file peer ---


def nature_dqn(frame_stack: int, conv_filters, hidden: list[int], actions: int) -> nn.Sequential:
    """uint8 (N, k, 84, 84) -> Q (N, actions): scale, the conv stack, `hidden` (ReLU), a linear head."""
    layers, channels = [], frame_stack
    for filters, kernel, stride in conv_filters:
        layers += [nn.Conv2d(channels, filters, kernel, stride), nn.ReLU()]
        channels = filters
    trunk = nn.Sequential(*layers, nn.Flatten())
    with torch.no_grad():
        width = trunk(torch.zeros(1, frame_stack, 84, 84)).shape[1]
    sizes = [width, *hidden]
    mlp = [layer for a, b in zip(sizes, sizes[1:]) for layer in (nn.Linear(a, b), nn.ReLU())]

    class Scale(nn.Module):
        def forward(self, x):
            return x.float() / 255.0

    return nn.Sequential(Scale(), trunk, *mlp, nn.Linear(sizes[-1], actions))


def peer_run(steps: int, *, env_kwargs: dict, config, budget: int, seed: int, warmup: int) -> dict:
    """`warmup` untimed env steps, then `steps` timed ones; returns the timings."""
    c = config
    env = make_env(ENV, **env_kwargs)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_actions, k = int(env.action_space.n), c.frame_stack
    q = nature_dqn(k, c.conv_filters, list(c.hidden), n_actions)
    target = nature_dqn(k, c.conv_filters, list(c.hidden), n_actions)
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=c.lr)
    capacity = c.buffer_size
    obs_buf = np.zeros((capacity, k, 84, 84), np.uint8)  # (C, k, 84, 84)
    next_buf = np.zeros((capacity, k, 84, 84), np.uint8)
    act_buf = np.zeros(capacity, np.int64)
    rew_buf = np.zeros(capacity, np.float32)
    term_buf = np.zeros(capacity, np.float32)
    train_every = max(1, round(c.train_batch_size / c.replay_ratio))  # 32 / 8 = 4
    decay_steps = max(1, round(c.epsilon_decay * budget))
    frame, _ = env.reset(seed=seed)
    frames = deque([frame] * k, maxlen=k)
    obs = np.stack(frames)
    size, updates, update_time, start = 0, 0, 0.0, None
    for step in range(warmup + steps):
        if step == warmup:
            start, update_time, updates = time.perf_counter(), 0.0, 0
        epsilon = c.epsilon_start + min(step / decay_steps, 1.0) * (c.epsilon_end - c.epsilon_start)
        if rng.random() < epsilon:
            action = int(rng.integers(n_actions))
        else:
            with torch.no_grad():
                action = int(q(torch.as_tensor(obs)[None]).argmax())
        frame, reward, terminated, truncated, _ = env.step(action)
        frames.append(frame)
        next_obs = np.stack(frames)
        i = step % capacity
        obs_buf[i], next_buf[i], act_buf[i], rew_buf[i], term_buf[i] = obs, next_obs, action, reward, terminated
        size = min(size + 1, capacity)
        obs = next_obs
        if terminated or truncated:
            frame, _ = env.reset()
            frames = deque([frame] * k, maxlen=k)
            obs = np.stack(frames)
        done = step + 1  # env steps taken
        if done >= c.learning_starts and (done - c.learning_starts) % train_every == 0:
            t0 = time.perf_counter()
            idx = rng.integers(size, size=c.train_batch_size)
            o, o2 = torch.as_tensor(obs_buf[idx]), torch.as_tensor(next_buf[idx])
            r = torch.as_tensor(rew_buf[idx])
            if c.clip_rewards:
                r = r.clamp(-1.0, 1.0)
            with torch.no_grad():
                next_target = target(o2)
                best = (q(o2) if c.double_q else next_target).argmax(1, keepdim=True)
                y = r + c.gamma * (1 - torch.as_tensor(term_buf[idx])) * next_target.gather(1, best).squeeze(1)
            predicted = q(o).gather(1, torch.as_tensor(act_buf[idx])[:, None]).squeeze(1)
            loss = F.smooth_l1_loss(predicted, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            update_time += time.perf_counter() - t0
        if done % c.target_update_steps == 0:
            target.load_state_dict(q.state_dict())
    wall = time.perf_counter() - start
    greedy = greedy_ms(lambda: int(q(torch.as_tensor(obs)[None]).argmax()))
    env.close()
    return {"wall": wall, "steps": steps, "updates": updates, "update": update_time, "record": 0.0, "greedy_ms": greedy}


# --- the lean teacher ---


def lean_run(steps: int, *, env_kwargs: dict, config, budget: int, seed: int, warmup: int, chunk: int) -> dict:
    teacher = LeanDQNTeacher(ENV, env_kwargs, seed=seed, budget=budget, config=config, device="cpu")
    teacher.train_steps(warmup)
    timed = {"update": 0.0}
    update = teacher._update

    def timed_update(done):
        t0 = time.perf_counter()
        update(done)
        timed["update"] += time.perf_counter() - t0

    teacher._update = timed_update
    updates_before, record = teacher.updates, 0.0
    start = time.perf_counter()
    for taken in range(0, steps, chunk):  # recording: the rows as collect writes them
        batch = teacher.train_steps(min(chunk, steps - taken))
        t0 = time.perf_counter()
        table = batch.to_table(teacher.encoding, teacher_id="bench", env_id=ENV, task_id="default", seed=seed)
        pq.write_table(table, pa.BufferOutputStream(), compression="zstd")
        record += time.perf_counter() - t0
    wall = time.perf_counter() - start
    greedy = greedy_ms(lambda: teacher._greedy(teacher.replay.current()))
    teacher.close()
    return {"wall": wall, "steps": steps, "updates": teacher.updates - updates_before, "update": timed["update"],
            "record": record, "greedy_ms": greedy}


def greedy_ms(call, n: int | None = None) -> float:
    n = n or GREEDY_CALLS
    with torch.no_grad():
        call()
        t0 = time.perf_counter()
        for _ in range(n):
            call()
    return (time.perf_counter() - t0) / n * 1e3


GREEDY_CALLS = 200


def main() -> None:
    global GREEDY_CALLS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="timed env steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--buffer-size", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=500, help="lean: env steps per train_steps call and recorded table")
    parser.add_argument("--greedy-calls", type=int, default=200)
    args = parser.parse_args()
    GREEDY_CALLS = args.greedy_calls
    torch.set_num_threads(1)
    config, budget, env_kwargs = atari_breakout()
    timed = replace(config, learning_starts=config.train_batch_size, buffer_size=args.buffer_size)
    warmup = timed.learning_starts
    print(f"{ENV} {env_kwargs}, the atari preset's breakout config: conv {timed.conv_filters}, hidden {list(timed.hidden)}, "
          f"frame stack {timed.frame_stack}, batch {timed.train_batch_size}, replay ratio {timed.replay_ratio:g}, "
          f"double_q {timed.double_q}, dueling {timed.dueling}, n_step {timed.n_step}, lr {timed.lr:g}, target sync every "
          f"{timed.target_update_steps} steps, buffer {timed.buffer_size}, learning_starts {warmup}, budget {budget} "
          f"(epsilon 1 -> {timed.epsilon_end} over {round(timed.epsilon_decay * budget)} steps); torch threads "
          f"{torch.get_num_threads()}; {args.steps} timed steps per run after {warmup} untimed, {args.repeats} repeats",
          flush=True)
    runs: dict[str, list[dict]] = {"lean": [], "peer": []}
    for repeat in range(args.repeats):
        runs["lean"].append(lean_run(args.steps, env_kwargs=env_kwargs, config=timed, budget=budget, seed=repeat,
                                     warmup=warmup, chunk=args.chunk))
        runs["peer"].append(peer_run(args.steps, env_kwargs=env_kwargs, config=timed, budget=budget, seed=repeat,
                                     warmup=warmup))
        print("  repeat %d: " % repeat + "; ".join(
            f"{name} {r[-1]['steps'] / r[-1]['wall']:,.1f} env steps/s, {r[-1]['updates'] / r[-1]['wall']:.2f} updates/s"
            for name, r in runs.items()), flush=True)
    median = {}
    print("\n| learner | env steps/s | updates/s | ms / env step | acting | updating | recording | ms / update | greedy forward ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        m = {key: statistics.median(f(r) for r in rs) for key, f in {
            "steps/s": lambda r: r["steps"] / r["wall"],
            "updates/s": lambda r: r["updates"] / r["wall"],
            "ms/step": lambda r: r["wall"] / r["steps"] * 1e3,
            "act": lambda r: (r["wall"] - r["update"] - r["record"]) / r["steps"] * 1e3,
            "update": lambda r: r["update"] / r["steps"] * 1e3,
            "record": lambda r: r["record"] / r["steps"] * 1e3,
            "ms/update": lambda r: r["update"] / max(1, r["updates"]) * 1e3,
            "greedy": lambda r: r["greedy_ms"],
        }.items()}
        median[name] = m
        print(f"| {name} | {m['steps/s']:,.1f} | {m['updates/s']:.2f} | {m['ms/step']:.2f} | {m['act']:.2f} | "
              f"{m['update']:.2f} | {m['record']:.3f} | {m['ms/update']:.2f} | {m['greedy']:.2f} |")
    print("(medians of the repeats, each column on its own; acting, updating, recording are ms per env step)")
    for key in ("steps/s", "updates/s", "ms/step"):
        print(f"lean / peer, {key}: {median['lean'][key] / median['peer'][key]:.3f}")
    for name, m in median.items():
        each = ", ".join(f"{r['wall'] / r['steps'] * 1e3:.2f}" for r in runs[name])
        print(f"{name}: every run {each} ms/step; updates per run {[r['updates'] for r in runs[name]]}")


if __name__ == "__main__":
    main()
