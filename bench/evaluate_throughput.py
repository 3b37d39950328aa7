"""Evaluate's rollouts: env steps/s per arm kind, one unit per trial against units in lockstep.

    python bench/evaluate_throughput.py                    # lockstep 1, 8 and 16; 16 units per arm, 500 steps each
    python bench/evaluate_throughput.py --lockstep 1 4 --units 8 --rounds 3

For each env of the quick preset (Dark Room, 9x9, 20-step episodes; CartPole-v1) and each arm kind,
runs --units units of the quick grid (Dark Room: one held-out goal each; CartPole: one seed each)
for the preset's horizon through evaluate's own rollout code (pipeline/evaluate.py:
imitator_rollout, snapshot_rollout, the random arm), split into trials of `lockstep` units run one
after another as Tune would run them on one CPU, and prints the env steps/s of all units together
(best of --rounds alternating rounds) and the ratio to lockstep 1, which is today's one unit per
trial. Seconds are this process's CPU time (one thread), which other work on a busy machine
slows less than it slows the wall clock; a Tune trial has one CPU of its own. The arms:
  imitator primed  the quick preset's imitator (untrained weights: its speed does not depend on
                   them), each unit's context primed with context_steps recorded steps of its own
                   (random actions in its env)
  imitator empty   the same from an empty context
  snapshot         the quick preset's teacher (Q-learning; lean_dqn for CartPole), acting greedily
  random           uniformly random actions
What it leaves out, the same for every lockstep: loading the imitator or teachers and Tune's cost
per trial. Tune's cost per reported episode (one tune.report each, the same number at every
lockstep) is measured last, apart: a Tune trial on local Ray that only reports. torch uses one
thread, as in a Tune trial with one CPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Callable, Iterator

import numpy as np
import torch
from ray.tune.result import TIMESTEPS_TOTAL

from pipeline.arms import IMITATOR, RANDOM
from pipeline.config import load_preset
from pipeline.envs import make_env
from pipeline.evaluate import RUNNERS, imitator_rollout, snapshot_rollout
from pipeline.metrics import ENV_STEPS, EPISODIC_RETURN, UNIT
from pipeline.model import Imitator, ModelArgs
from pipeline.plan import EMPTY, PRIMED, TrialSpec, heldout_targets, imitator_specs, trial_specs
from pipeline.teachers import make_teacher

ARM_KINDS = ("imitator primed", "imitator empty", "snapshot", "random")


def bench_units(preset, group: str, count: int, horizon: int | None) -> list[TrialSpec]:
    """`count` units of `group`'s imitator arm in the quick grid, each on its own task or seed."""
    first = next(t for t in trial_specs(preset) if t.group == group and t.arm == IMITATOR)
    targets = heldout_targets(preset.collect.teachers[first.teacher_spec.group])
    tasks = [kwargs for env_id, kwargs, _ in targets if env_id == first.env_id] or [first.env_kwargs]
    return [replace(first, trial_id=f"unit{i}", env_kwargs=tasks[i % len(tasks)], seed=i, horizon=horizon or first.horizon)
            for i in range(count)]


def recorded_steps(unit: TrialSpec, count: int):
    """`count` steps of random actions in the unit's env, as a teacher's history holds them."""
    env = make_env(unit.env_id, **unit.env_kwargs)
    env.action_space.seed(unit.seed)
    obs, _ = env.reset(seed=unit.seed)
    steps, first = [], True
    for _ in range(count):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        steps.append((obs, action, reward, first))
        first = terminated or truncated
        obs = env.reset()[0] if first else next_obs
    env.close()
    obs, action, reward, first = zip(*steps)
    return np.array(obs), np.array(action), np.array(reward, np.float32), np.array(first)


def arm_rollouts(preset, group: str, units: list[TrialSpec]) -> dict[str, Callable[[list[TrialSpec]], Iterator]]:
    """Arm kind -> a function running a trial of some of `units` (a batch) to its end."""
    spec = next(s for s in imitator_specs(preset) if s.group == group)
    model = Imitator(ModelArgs.from_dict(spec.model_args)).eval()
    primes = {u.trial_id: recorded_steps(u, model.args.context_steps) for u in units}
    teachers = {u.trial_id: teacher_of(u) for u in units}
    return {
        "imitator primed": lambda batch: imitator_rollout(model, [replace(u, context=PRIMED) for u in batch],
                                                          [primes[u.trial_id] for u in batch]),
        "imitator empty": lambda batch: imitator_rollout(model, [replace(u, context=EMPTY) for u in batch], None),
        "snapshot": lambda batch: snapshot_rollout([teachers[u.trial_id] for u in batch], batch),
        "random": lambda batch: RUNNERS[RANDOM](batch, None, ""),
    }


def teacher_of(unit: TrialSpec):
    """The unit's teacher as the snapshot arm acts with it (weights as built: acting costs the same)."""
    t = unit.teacher_spec
    return make_teacher(t.algo, unit.env_id, unit.env_kwargs, seed=unit.seed, budget=t.budget, config=t.algo_config)


def steps_per_second(rollout: Callable[[list[TrialSpec]], Iterator], units: list[TrialSpec], lockstep: int) -> float:
    """Env steps per CPU second of every unit, run as consecutive trials of `lockstep` units."""
    start = time.process_time()
    for first in range(0, len(units), lockstep):
        for _ in rollout(units[first:first + lockstep]):
            pass
    return sum(u.horizon for u in units) / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lockstep", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=500, help="env steps per unit (0: the preset's horizon)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = load_preset("quick")
    print(f"env steps per CPU second of {args.units} units per arm, {args.horizon or 'the preset'} steps each, best of "
          f"{args.rounds} round(s); ratio to lockstep {args.lockstep[0]}")
    print(f"{'env':12} {'arm':16}" + "".join(f"{f'lockstep {n}':>13}" for n in args.lockstep)
          + "".join(f"{f'{n}/{args.lockstep[0]}':>8}" for n in args.lockstep[1:]))
    for group in ("darkroom", "cartpole"):
        units = bench_units(preset, group, args.units, args.horizon)
        rollouts = arm_rollouts(preset, group, units)
        for kind in ARM_KINDS:
            rounds = [[steps_per_second(rollouts[kind], units, n) for n in args.lockstep] for _ in range(args.rounds)]
            rates = np.max(np.array(rounds), axis=0)
            print(f"{units[0].env_id:12} {kind:16}" + "".join(f"{r:13,.0f}" for r in rates)
                  + "".join(f"{r / rates[0]:7.1f}x" for r in rates[1:]), flush=True)
    print(f"tune.report: {tune_report_ms():.2f} ms per reported episode (in the trial, wall clock)")


def tune_report_ms(reports: int = 1000) -> float:
    """Wall-clock ms a function trainable spends in each tune.report of an episode, on local Ray."""
    import os
    import tempfile

    import ray
    from ray import tune

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def reporting(config):
        start = time.perf_counter()
        for step in range(reports):
            tune.report({UNIT: "unit0", EPISODIC_RETURN: 1.0, ENV_STEPS: step, TIMESTEPS_TOTAL: step})
        tune.report({"ms": (time.perf_counter() - start) / reports * 1e3})

    with tempfile.TemporaryDirectory() as folder:
        result = tune.Tuner(reporting, run_config=tune.RunConfig(storage_path=folder, name="bench", verbose=0)).fit()[0]
    ray.shutdown()
    return result.metrics["ms"]


if __name__ == "__main__":
    main()
