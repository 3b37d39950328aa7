"""Imitator training speed: Ray Train + Ray Data against a bare PyTorch loop, FLOP utilisation, and
the fixed cost of an imitator when several share a Ray Train job.

    python bench/train_throughput.py              # the quick preset's Dark Room imitator (cutoff 0.25)
    python bench/train_throughput.py --steps 600 --imitators 6 --fixed-steps 100

Collects the quick preset's Dark Room histories into a temporary store, then prints, from one run:
  ray train   tokens/s of the real train stage (fit_job: Ray Data reading the Parquet shards,
              windows, TorchTrainer with one CPU worker), timed inside the training loop from its
              first batch to its last step; the Train job's start-up is printed apart.
  bare        tokens/s of the same model, optimizer and steps over the same windows already in
              memory as tensors. Goal: ray train / bare >= 0.9.
  MFU         achieved FLOP/s (model.flops_per_step() x tokens/s) over the FLOP/s of a plain
              torch.matmul shaped like the model's MLP matmul, measured in the same run. Aim > 25%.
  read        seconds to read the histories before the cutoff (the train stage's Parquet read with
              its pushed-down filter) with Ray Data's V1 reader, which train uses, and with V2,
              Ray 2.60's default; alternating, best of three each.
  fixed cost  --imitators copies of that imitator, --fixed-steps steps each, fitted one per Train
              job (one job after another), then all in one job: per imitator, (wall time - time
              in the training loop) / imitators. Goal: < 10 s in one job.
torch uses one thread everywhere, as in a Ray Train worker with one CPU.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from dataclasses import replace

import ray
import torch

from pipeline.collect import collect
from pipeline.config import load_preset
from pipeline.model import Imitator, ModelArgs
from pipeline.store import Store
from pipeline.plan import imitator_specs
from pipeline.train import READ_COLUMNS, fit_job, optimizer_step, shard_paths, windows_dataset


def bare_loop(args: ModelArgs, hp: dict, batches: list[dict[str, torch.Tensor]]) -> float:
    """Seconds for len(batches) optimizer steps, as train_loop makes them."""
    torch.manual_seed(0)
    model = Imitator(args)
    optimizer = model.configure_optimizer(hp["weight_decay"], hp["lr"], (0.9, 0.95))
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        optimizer_step(model, optimizer, batch, step, hp)
    return time.perf_counter() - start


def read_seconds(store: Store, paths: list[str], cutoff_step: int, datasource_v2: bool) -> float:
    """One read of the rows before the cutoff, as pipeline.train.history_rows makes it."""
    from ray.data.expressions import col

    ray.data.DataContext.get_current().use_datasource_v2 = datasource_v2
    start = time.perf_counter()
    ray.data.read_parquet(paths, filesystem=store.arrow_fs, partitioning=None).select_columns(READ_COLUMNS) \
        .filter(expr=col("step") < cutoff_step).materialize()
    return time.perf_counter() - start


def matmul_flops(rows: int, inner: int, cols: int, repeats: int = 50) -> float:
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - start)


def fixed_cost_per_imitator(preset, store: Store, specs: list, per_job: int) -> tuple[float, float]:
    """Wall seconds and seconds inside the training loops to fit these imitators, `per_job` to a
    Train job, one job after another; (wall - loops) / imitators is each one's fixed cost."""
    started = time.perf_counter()
    finals = [final for first in range(0, len(specs), per_job) for final in fit_job(preset, store, "bench", specs[first:first + per_job])]
    wall = time.perf_counter() - started
    tokens_per_step = specs[0].hparams["batch_size"] * specs[0].model_args["context_steps"]
    in_loops = sum(final["step"] * tokens_per_step / final["tokens_per_s"] for final in finals)
    return wall, in_loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--imitators", type=int, default=4, help="imitators fitted for the fixed cost")
    parser.add_argument("--fixed-steps", type=int, default=100, help="optimizer steps of each of those")
    options = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    preset = load_preset("quick")
    preset = replace(preset, collect=replace(preset.collect, teachers={"darkroom": preset.collect.teachers["darkroom"]}),
                     train=replace(preset.train, imitators={"darkroom": preset.train.imitators["darkroom"]}))
    spec = imitator_specs(preset)[0]
    hp = {**spec.hparams, "steps": options.steps, "report_every": options.steps, "checkpoint_every": options.steps}
    spec = replace(spec, hparams=hp, val_teachers=())
    args = ModelArgs.from_dict(spec.model_args)
    with tempfile.TemporaryDirectory() as root:
        store = Store(root)
        collect(preset, store, "bench", log=lambda line: None)
        started = time.perf_counter()
        [result] = fit_job(preset, store, "bench", [spec])
        train_wall = time.perf_counter() - started
        paths = shard_paths(store, "bench", spec, spec.train_teachers)
        times = {False: [], True: []}
        for _, v2 in itertools.product(range(3), (False, True)):
            times[v2].append(read_seconds(store, paths, spec.cutoff_step, v2))
        reads = {v2: min(seconds) for v2, seconds in times.items()}
        dataset = windows_dataset(store, paths, spec)
        batches = list(itertools.islice(dataset.iter_torch_batches(batch_size=hp["batch_size"], drop_last=True), options.steps))
        short = {**hp, "steps": options.fixed_steps, "report_every": options.fixed_steps, "checkpoint_every": options.fixed_steps}
        copies = lambda kind: [replace(spec, name=f"{spec.name}-{kind}{i}", hparams=short) for i in range(options.imitators)]  # noqa: E731
        fixed = {per_job: fixed_cost_per_imitator(preset, store, copies(f"per{per_job}-"), per_job)
                 for per_job in (1, options.imitators)}
    tokens = options.steps * hp["batch_size"] * args.context_steps
    ray_rate, bare_rate = result["tokens_per_s"], tokens / bare_loop(args, hp, batches)
    model = Imitator(args)
    achieved = model.flops_per_step() * bare_rate
    peak = matmul_flops(hp["batch_size"] * args.context_steps, args.n_embd, 4 * args.n_embd)
    print(f"{spec.name} at cutoff {spec.cutoff:g}: {args.n_layer} layers, n_embd {args.n_embd}, {model.num_params():,} parameters, "
          f"batch {hp['batch_size']} x {args.context_steps} steps, {options.steps} optimizer steps, "
          f"{len(spec.train_teachers)} teachers")
    print(f"  ray train (in the loop)   {ray_rate:10,.0f} tokens/s   (whole fit incl. start-up: {train_wall:.1f} s, "
          f"{tokens / train_wall:,.0f} tokens/s)")
    print(f"  bare loop, batches in RAM {bare_rate:10,.0f} tokens/s")
    print(f"ray train / bare = {ray_rate / bare_rate:.3f}   (goal: >= 0.9)")
    print(f"MFU: {achieved / 1e9:.2f} GFLOP/s achieved (bare loop) / {peak / 1e9:.2f} GFLOP/s of a "
          f"({hp['batch_size'] * args.context_steps} x {args.n_embd}) @ ({args.n_embd} x {4 * args.n_embd}) matmul = "
          f"{achieved / peak:.1%}   (aim: > 25%); through ray train: {model.flops_per_step() * ray_rate / peak:.1%}")
    print(f"read of {len(paths)} shards before the cutoff: V1 {reads[False]:.2f} s, V2 {reads[True]:.2f} s, "
          f"V2 / V1 = {reads[True] / reads[False]:.1f}")
    print(f"fixed cost per imitator, {options.imitators} imitators of {options.fixed_steps} steps (goal: < 10 s in one job):")
    for per_job, (wall, in_loops) in fixed.items():
        jobs = "one Train job each" if per_job == 1 else f"{per_job} in one Train job"
        print(f"  {jobs:20} wall {wall:6.1f} s, in the training loops {in_loops:5.1f} s: "
              f"{(wall - in_loops) / options.imitators:5.1f} s per imitator")


if __name__ == "__main__":
    main()
