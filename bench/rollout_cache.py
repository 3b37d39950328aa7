"""Imitator rollouts: the KV cache against recomputing the context at every env step.

    python bench/rollout_cache.py                 # the quick preset's Dark Room imitator, 16 envs

Prints env steps/s of 16 Dark Room envs in lockstep driven by the quick preset's Dark Room
imitator (untrained weights: speed does not depend on them), at the preset's context length and
at 4x it, two ways, alternating: `cache` steps pipeline.rollout.ImitatorPolicy (one token of
compute per layer per step), `recompute` runs the model's forward over the last context_steps
steps at every step (what a rollout without a cache does). Both include the envs. Goal: cache /
recompute >= 5x at the longer context. torch uses one thread, as in a Ray worker with one CPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from pipeline.config import load_preset
from pipeline.envs import make_env
from pipeline.model import Imitator, ModelArgs, sample_actions
from pipeline.rollout import ImitatorPolicy
from pipeline.plan import imitator_specs


class Envs:
    """B envs in lockstep, reset on done (first[i] marks env i's new episode)."""

    def __init__(self, env_id: str, kwargs: dict, count: int):
        self.envs = [make_env(env_id, **kwargs) for _ in range(count)]
        self.obs = np.array([env.reset(seed=i)[0] for i, env in enumerate(self.envs)])
        self.first = np.ones(count, bool)

    def step(self, actions: np.ndarray) -> np.ndarray:
        rewards = np.zeros(len(self.envs), np.float32)
        for i, (env, action) in enumerate(zip(self.envs, actions)):
            obs, rewards[i], terminated, truncated, _ = env.step(int(action))
            self.first[i] = terminated or truncated
            self.obs[i] = env.reset()[0] if self.first[i] else obs
        return rewards


def with_cache(model: Imitator, envs: Envs, steps: int) -> float:
    policy = ImitatorPolicy(model, len(envs.envs), temperature=1.0)
    start = time.perf_counter()
    for _ in range(steps):
        policy.observe(envs.step(policy.act(envs.obs, envs.first)))
    return steps / (time.perf_counter() - start)


@torch.no_grad()
def recomputing(model: Imitator, envs: Envs, steps: int) -> float:
    args, count = model.args, len(envs.envs)
    history = {"obs": [], "prev_action": [], "prev_reward": [], "first": []}
    prev_action, prev_reward = torch.full((count,), args.n_actions), torch.zeros(count)
    start = time.perf_counter()
    for _ in range(steps):
        for name, value in (("obs", torch.as_tensor(envs.obs)), ("prev_action", prev_action),
                            ("prev_reward", prev_reward), ("first", torch.as_tensor(envs.first))):
            history[name] = (history[name] + [value])[-args.context_steps:]
        window = {name: torch.stack(values, dim=1) for name, values in history.items()}  # (B, T, ...)
        logits, _ = model(window["obs"], window["prev_action"], window["prev_reward"], window["first"])
        prev_action = sample_actions(logits[:, -1], 1.0)
        prev_reward = torch.as_tensor(envs.step(prev_action.numpy()))
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = load_preset("quick")
    spec = next(s for s in imitator_specs(preset) if s.group == "darkroom")
    group = preset.collect.teachers["darkroom"]
    base = ModelArgs.from_dict(spec.model_args)
    print(f"{spec.name}: {base.n_layer} layers, n_embd {base.n_embd}, {args.envs} Dark Room envs in lockstep; "
          f"env steps/s, median of {args.rounds} alternating rounds")
    for context in (base.context_steps, 4 * base.context_steps):
        model = Imitator(replace(base, context_steps=context)).eval()
        steps = 2 * context  # past the first window, where the cache starts dropping old steps
        cache, recompute = [], []
        for _ in range(args.rounds):
            cache.append(with_cache(model, Envs(group.env, {**group.env_kwargs, **group.tasks[0]}, args.envs), steps))
            recompute.append(recomputing(model, Envs(group.env, {**group.env_kwargs, **group.tasks[0]}, args.envs), steps))
        c, r = float(np.median(cache)), float(np.median(recompute))
        print(f"  context {context:4d}: cache {c * args.envs:9,.0f}  recompute {r * args.envs:9,.0f}  "
              f"cache / recompute = {c / r:5.1f}x" + ("   (goal at this length: >= 5x)" if context > base.context_steps else ""))


if __name__ == "__main__":
    main()
