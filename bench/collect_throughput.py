"""Collect throughput: the Ray fleet recording to Parquet against the same teachers in a bare loop.

    python bench/collect_throughput.py                   # the quick preset's Dark Room teachers (--group)
    python bench/collect_throughput.py --repeats 5 --set collect.teachers.darkroom.budget=40000

Measures, side by side in one run, with Ray started once beforehand:
  bare      each teacher in this process, learning but recording nothing
  recorded  each teacher in this process through run_teacher: recording, Parquet shards,
            checkpoints and manifests into a local store; no Ray
  fleet-1   collect() of all teachers with 1 teacher actor (Ray, recording, local store),
            wall time of the whole call, actor start included
  fleet-2   the same with 2 teacher actors
The speed of this machine drifts (the same work takes 1x to 2x as long from one second to the
next), so each repeat runs bare and recorded alternately teacher by teacher, then the two fleets
in alternating order; every figure is the median of --repeats such runs, all runs printed.
Goals: recorded / bare >= 0.9 (recording costs < 10%), fleet-2 / fleet-1 > 1.6 on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace

import ray

from pipeline.collect import collect, run_teacher
from pipeline.plan import teacher_specs
from pipeline.config import load_preset
from pipeline.store import Store
from pipeline.teachers import make_teacher


def bare_seconds(spec) -> float:
    start = time.perf_counter()
    teacher = make_teacher(spec.algo, spec.env_id, spec.env_kwargs, seed=spec.seed, budget=spec.budget, config=spec.algo_config)
    teacher.train_steps(spec.budget, record=False)
    return time.perf_counter() - start


def recorded_seconds(spec, store: Store, experiment: str, shard_steps: int, checkpoint_steps: int | None) -> float:
    start = time.perf_counter()
    run_teacher(spec, store, experiment, shard_steps=shard_steps, checkpoint_steps=checkpoint_steps)
    return time.perf_counter() - start


def fleet_seconds(preset, actors: int) -> float:
    preset = replace(preset, collect=replace(preset.collect, num_actors=actors))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        collect(preset, Store(folder), "bench", log=lambda line: None)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--group", default="darkroom", help="the teacher group measured; the preset's others are left out")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    preset = load_preset(args.preset, args.overrides)
    # Only this group's teachers (tabular: the bare loop runs them with record=False, which RLlib teachers lack).
    preset = replace(preset, collect=replace(preset.collect, teachers={args.group: preset.collect.teachers[args.group]}))
    specs = teacher_specs(preset)
    steps = sum(s.budget for s in specs)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    runs = {"bare": [], "recorded": [], "fleet-1": [], "fleet-2": []}
    with tempfile.TemporaryDirectory() as folder:
        store = Store(folder)
        for repeat in range(args.repeats):
            bare = recorded = 0.0
            for spec in specs:  # paired teacher by teacher, so drifts in speed hit both alike
                bare += bare_seconds(spec)
                recorded += recorded_seconds(spec, store, f"r{repeat}", preset.collect.shard_steps, preset.collect.checkpoint_steps)
            runs["bare"].append(bare)
            runs["recorded"].append(recorded)
            for actors in (1, 2) if repeat % 2 == 0 else (2, 1):
                runs[f"fleet-{actors}"].append(fleet_seconds(preset, actors))
    ray.shutdown()

    seconds = {name: statistics.median(times) for name, times in runs.items()}
    rate = {name: steps / s for name, s in seconds.items()}
    print(f"{len(specs)} teachers, {steps:,} env steps; median of {args.repeats} runs; {os.cpu_count()} CPUs")
    for name, s in seconds.items():
        print(f"  {name:9s} {s:7.2f} s  {rate[name]:10,.0f} steps/s   runs: {' '.join(f'{t:.2f}' for t in runs[name])}")
    print(f"recorded / bare   = {rate['recorded'] / rate['bare']:.3f}   (goal >= 0.9: recording costs < 10%)")
    print(f"fleet-1 / bare    = {rate['fleet-1'] / rate['bare']:.3f}   (recording and Ray, actor start included)")
    print(f"fleet-2 / fleet-1 = {rate['fleet-2'] / rate['fleet-1']:.3f}   (goal > 1.6)")


if __name__ == "__main__":
    main()
