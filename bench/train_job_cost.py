"""Where a Ray Train job's fixed cost goes, part by part, on the quick preset's Dark Room data.

    python bench/train_job_cost.py

Runs one-worker, one-CPU TorchTrainer jobs whose train function only times what it is given:
  empty job      fit() of a train function that does nothing: to its first line, and after it
  + datasets     three Dark Room window datasets (pipeline.train.windows_dataset): the first
                 20 batches of each, one after another, split by Ray Train (streaming_split, one
                 coordinator per dataset, as train used before jobs held several imitators) or
                 not (the worker reads each whole, as train does with one worker)
  reports        five ray.train.report calls with metrics only, and five with a Ray Train
                 checkpoint of the imitator, against five checkpoints written straight to the
                 store (pipeline.train.save_checkpoint)
Times are seconds; every job runs on a warm Ray (after one job that is not counted).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace

import ray

from pipeline.collect import collect
from pipeline.config import load_preset
from pipeline.model import Imitator, ModelArgs
from pipeline.plan import imitator_specs
from pipeline.store import Store
from pipeline.train import save_checkpoint, shard_paths, windows_dataset


def timed_loop(config: dict) -> None:
    import ray.train

    times, mark = {"entered": time.time()}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        times[name] = time.perf_counter() - mark
        mark = time.perf_counter()

    for index in range(config["datasets"]):
        for _ in zip(range(20), ray.train.get_dataset_shard(f"train_{index}").iter_torch_batches(batch_size=32)):
            pass
        lap(f"dataset {index}")
    if config["reports"]:
        spec, store = config["spec"], config["store"]
        model = Imitator(ModelArgs.from_dict(spec.model_args))
        optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95))
        for step in range(5):
            ray.train.report({"step": step})
        lap("5 reports")
        for step in range(5):
            with tempfile.TemporaryDirectory() as directory:
                path = save_checkpoint(Store(directory), "imitator", spec, model, optimizer, step + 1)
                ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(f"{directory}/{path}"))
        lap("5 reports with a Ray Train checkpoint")
        for step in range(5):
            save_checkpoint(store, "bench/checkpoints", spec, model, optimizer, step + 1)
        lap("5 checkpoints into the store")
    times["left"] = time.time()
    Store(config["out"]).write_bytes("times.json", json.dumps(times).encode())


def job(name: str, root: str, datasets: dict | None = None, split: bool = False, **config) -> dict[str, float]:
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    datasets = datasets or {}
    started = time.time()
    TorchTrainer(timed_loop, train_loop_config={"datasets": len(datasets), "reports": False, "out": root, **config},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"{name}-{started}", storage_path=f"{root}/ray_results"),
                 datasets=datasets, dataset_config=DataConfig(datasets_to_split=list(datasets) if split else [])).fit()
    ended = time.time()
    times = json.loads(Store(root).read_bytes("times.json"))
    return {"to the train function": times.pop("entered") - started, "after it": ended - times.pop("left"),
            **times, "whole job": ended - started}


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    preset = load_preset("quick")
    preset = replace(preset, collect=replace(preset.collect, teachers={"darkroom": preset.collect.teachers["darkroom"]}),
                     train=replace(preset.train, imitators={"darkroom": preset.train.imitators["darkroom"]}))
    spec = replace(imitator_specs(preset)[0], val_teachers=())
    with tempfile.TemporaryDirectory() as root:
        store = Store(root)
        collect(preset, store, "bench", log=lambda line: None)
        paths = shard_paths(store, "bench", spec, spec.train_teachers)
        three = lambda: {f"train_{i}": windows_dataset(store, paths, spec) for i in range(3)}  # noqa: E731
        job("warm-up", root)
        runs = {"empty job": job("empty", root),
                "3 datasets, split": job("split", root, three(), split=True),
                "3 datasets, not split": job("whole", root, three()),
                "reports and checkpoints": job("reports", root, reports=True, spec=spec, store=store)}
    for name, times in runs.items():
        print(f"{name:24} " + ", ".join(f"{part} {seconds:.1f}" for part, seconds in times.items()))


if __name__ == "__main__":
    main()
