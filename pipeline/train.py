"""Train stage: fit the Algorithm-Distillation imitators on the teachers' histories with Ray Train.

    python -m pipeline train --preset quick            # after collect; one imitator per cutoff x size x context
    python -m pipeline train --preset quick --smoke    # ten optimizer steps per imitator

Each imitator reads its teacher groups' committed shards with Ray Data through the store's
filesystem (so s3:// works), keeps the rows with step < its cutoff step (a filter Ray Data
pushes into the Parquet read), cuts windows that never cross teachers (pipeline/windows.py) and
streams them to a TorchTrainer fitting pipeline/model.py by next-action prediction. Teachers
held out by `val_fraction` give the validation loss. One Ray Train job fits up to
train.imitators_per_job imitators one after another (its datasets train_{i} and val_{i}), since
starting a job costs far more than fitting a small imitator; train.concurrent jobs run at once.
Rank 0 writes each imitator's checkpoints, TensorBoard logs and done file straight into
{store}/{experiment}/imitators/cutoff={c}/{name}/. A job's worker, restarted by Ray Train after a
failure (FailureConfig), and a rerun of the command both go on from there: finished imitators
are skipped, an unfinished one resumes from its newest checkpoint (optimizer and step included).
Expect a loss falling from log(n_actions) and, on held-out teachers, a validation loss that
follows it.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipeline import layout
from pipeline.config import Preset, TrainConfig
from pipeline.errors import PipelineError
from pipeline.history import TeacherHistory
from pipeline.model import Imitator, ModelArgs
from pipeline.plan import ImitatorSpec, imitator_specs
from pipeline.runtime import ensure_ray
from pipeline.schema import ObsEncoding, check_schema
from pipeline.store import Store
from pipeline.windows import make_windows

CHECKPOINT_FILE = "imitator.pt"
CHECKPOINT_NAME = re.compile(r"checkpoint_\d+")  # checkpoint_{step:09d}: folders in an imitator's folder
KEEP_CHECKPOINTS = 2
JOBS_DIR = "_jobs"  # Ray Train's own records of each job, under imitators/
READ_COLUMNS = ["teacher_id", "step", "episode_step", "obs", "action", "reward"]
VAL_BATCHES = 8  # batches of held-out windows per validation
MAX_REPEAT_BYTES = 256 * 2**20  # largest block of repeated windows read_plan makes


class TrainError(PipelineError):
    """An imitator cannot be trained from what is in the store; the message names the data at fault."""


# --- data ---


def shard_paths(store: Store, experiment: str, spec: ImitatorSpec, teacher_ids: tuple[str, ...]) -> list[str]:
    """Full store paths of the committed shards holding steps < cutoff_step, after checking that each
    teacher has committed that far and that every such shard is readable history of this schema."""
    paths = []
    for teacher in teacher_ids:
        history = TeacherHistory(store, experiment, spec.env_id, teacher)
        manifest = history.read_manifest()
        if manifest.next_step < spec.cutoff_step:
            raise TrainError(f"imitator {spec.name} (cutoff {spec.cutoff:g}) needs the first {spec.cutoff_step} steps of "
                             f"teacher {teacher}, but {store.url(history.dir)} has {manifest.next_step} committed: run collect first")
        manifest.shards = [s for s in manifest.shards if s.first_step < spec.cutoff_step]
        history.verify(manifest)
        paths += [store.full(history.path(s.path)) for s in manifest.shards]
    return paths


def read_encoding(store: Store, path: str) -> ObsEncoding:
    with store.fs.open(path, "rb") as handle:
        return check_schema(pq.read_schema(handle), path)


def history_rows(store: Store, paths: list[str], cutoff_step: int, read_tasks: int | None = None) -> ray.data.Dataset:
    """The rows of these shards with step < cutoff_step; Ray Data pushes the filter into the Parquet read."""
    from ray.data.expressions import col

    # Ray Data's V1 Parquet reader: V2 (the default in Ray 2.60) footer-reads each file one by one
    # before reading, 24 s for the quick preset's 175 one-shard Dark Room teachers against 1.6 s
    # for V1 (bench/train_throughput.py). Both push the filter into the read (tests/test_train.py).
    ray.data.DataContext.get_current().use_datasource_v2 = False
    return (ray.data.read_parquet(paths, filesystem=store.arrow_fs, partitioning=None, override_num_blocks=read_tasks,
                                  shuffle="files")
            .select_columns(READ_COLUMNS)
            .filter(expr=col("step") < cutoff_step))


@dataclass(frozen=True)
class ReadPlan:
    read_tasks: int | None  # Parquet read tasks (blocks of windows); None: Ray Data's choice, about one per shard
    repeats: int  # epochs each read yields: a block's windows repeated, each repeat in its own order


def read_plan(spec: ImitatorSpec, window: int, stride: int, repeat: bool = True) -> ReadPlan:
    """How to read the histories. Ray Data starts a read pipeline per pass, seconds of fixed cost,
    and a block's windows are shuffled only among themselves and the local shuffle buffer. So a
    history whose windows fit in MAX_REPEAT_BYTES is read in one block, once for as many epochs as
    training needs: batches drawn from every teacher from the first step. (Read in two blocks, a
    Dark Room imitator trained on one half of the goals, then on the other, and forgot the first.)
    A larger history is streamed, shard files in random order, and read once per epoch."""
    args = ModelArgs.from_dict(spec.model_args)
    teachers = len(spec.train_teachers)
    per_teacher = max(1, (spec.cutoff_step - window) // stride)
    obs_bytes = {"discrete": 8, "vector": 4 * math.prod(args.obs_shape),
                 "image": args.frame_stack * math.prod(args.obs_shape)}[args.obs_kind]
    epoch_bytes = per_teacher * teachers * window * (obs_bytes + 21)
    if epoch_bytes > MAX_REPEAT_BYTES:
        return ReadPlan(None, 1)
    needed = math.ceil(spec.hparams["steps"] * spec.hparams["batch_size"] / (teachers * per_teacher)) if repeat else 1
    return ReadPlan(1, int(max(1, min(needed, MAX_REPEAT_BYTES // epoch_bytes))))


def windows_dataset(store: Store, paths: list[str], spec: ImitatorSpec, repeat: bool = True) -> ray.data.Dataset:
    """Training windows, streamed: Parquet rows with step < cutoff_step -> windows of one teacher each."""
    args = ModelArgs.from_dict(spec.model_args)
    encoding = read_encoding(store, paths[0])
    window = spec.hparams["window_steps"] or args.context_steps
    stride = spec.hparams["window_stride"] or max(1, window // 2)
    plan = read_plan(spec, window, stride, repeat)
    rows = history_rows(store, paths, spec.cutoff_step, plan.read_tasks)
    # Plain ints in the closure: a ModelArgs or ReadPlan in it would make each read task import
    # this module and torch, seconds in a fresh worker process.
    n_actions, frame_stack, repeats = args.n_actions, args.frame_stack, plan.repeats

    def to_windows(table: pa.Table) -> dict[str, np.ndarray]:
        columns = {name: table[name].to_numpy(zero_copy_only=False) for name in READ_COLUMNS if name != "obs"}
        columns["obs"] = encoding.decode(table["obs"])
        windows = make_windows(columns, window_steps=window, stride=stride, n_actions=n_actions, frame_stack=frame_stack)
        order = np.concatenate([rng.permutation(len(windows["action"])) for _ in range(repeats)])
        return {name: values[order] for name, values in windows.items()}

    rng = np.random.default_rng()

    return rows.map_batches(to_windows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


# --- optimization ---


def learning_rate(step: int, hp: dict[str, Any]) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at the last step."""
    if step < hp["warmup_steps"]:
        return hp["lr"] * (step + 1) / hp["warmup_steps"]
    progress = (step - hp["warmup_steps"]) / max(1, hp["steps"] - hp["warmup_steps"])
    return hp["min_lr"] + 0.5 * (hp["lr"] - hp["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    _, loss = model(batch["obs"], batch["prev_action"], batch["prev_reward"], batch["first"], targets=batch["action"])
    return loss


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                   step: int, hp: dict[str, Any]) -> torch.Tensor:
    """One update at the schedule's learning rate for `step`, gradients clipped; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, hp)
    loss = batch_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
    optimizer.step()
    return loss


def validation_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [batch_loss(model, batch).item() for batch in batches]
    model.train()
    return float(np.mean(losses)) if losses else float("nan")


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Updates the optimizer's state has seen (it travels in checkpoints, so it counts across resumes)."""
    return int(max((state["step"] for state in optimizer.state.values()), default=0))


# --- checkpoints and outputs (rank 0 writes them straight into the imitator's folder) ---


def checkpoint_names(store: Store, folder: str) -> list[str]:
    """The imitator's checkpoint folders, oldest first (named by step)."""
    return sorted(name for name in store.list_names(folder) if CHECKPOINT_NAME.fullmatch(name))


def save_checkpoint(store: Store, folder: str, spec: ImitatorSpec, model: Imitator, optimizer: torch.optim.Optimizer,
                    step: int) -> str:
    """{folder}/checkpoint_{step}/imitator.pt, one file written whole or not at all, naming its
    imitator; keeps the newest KEEP_CHECKPOINTS. Returns the checkpoint's folder."""
    path = f"{folder}/checkpoint_{step:09d}"
    buffer = io.BytesIO()
    torch.save({"imitator": spec.name, "cutoff": spec.cutoff, "model_args": spec.model_args, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step}, buffer)
    store.write_bytes(f"{path}/{CHECKPOINT_FILE}", buffer.getvalue())
    for old in checkpoint_names(store, folder)[:-KEEP_CHECKPOINTS]:
        store.delete(f"{folder}/{old}")
    return path


def restore_checkpoint(store: Store, folder: str, spec: ImitatorSpec, model: Imitator, optimizer: torch.optim.Optimizer,
                       device: torch.device) -> int:
    """Load the imitator's newest checkpoint into model and optimizer; returns its step (0: none yet).
    One taken at the last step is passed over: without a done file, its worker died before writing it."""
    for name in reversed(checkpoint_names(store, folder)):
        if int(name.removeprefix("checkpoint_")) >= spec.hparams["steps"]:
            continue
        try:
            data = store.read_bytes(f"{folder}/{name}/{CHECKPOINT_FILE}")
        except FileNotFoundError:  # its worker died before writing it
            continue
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        if (state["imitator"], state["cutoff"]) != (spec.name, spec.cutoff):
            raise TrainError(f"{store.url(folder)}/{name} is a checkpoint of imitator {state['imitator']} at cutoff "
                             f"{state['cutoff']:g}, not of {spec.name} at cutoff {spec.cutoff:g}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return state["step"]
    return 0


def load_imitator(directory: str, device: str | torch.device = "cpu") -> Imitator:
    """The frozen imitator of a checkpoint directory, rebuilt from the model args it stores."""
    state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location=device, weights_only=True)
    model = Imitator(ModelArgs.from_dict(state["model_args"])).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


class ImitatorOutputs:
    """What rank 0 writes for one imitator: TensorBoard logs (local, copied into the store at each
    report), checkpoints and, once it is finished, the done file."""

    def __init__(self, store: Store, experiment: str, spec: ImitatorSpec):
        from tensorboardX import SummaryWriter

        self.store, self.spec, self.folder = store, spec, spec.dir(experiment)
        self.local_dir = tempfile.mkdtemp(prefix="tensorboard-")
        self.writer = SummaryWriter(self.local_dir)
        self.checkpoint = ""

    def log(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"imitator/{name}", value, metrics["step"])
        self.writer.flush()
        self.store.upload_dir(self.local_dir, f"{self.folder}/tensorboard")

    def save(self, model: Imitator, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.checkpoint = save_checkpoint(self.store, self.folder, self.spec, model, optimizer, step)

    def finish(self, metrics: dict[str, float]) -> None:
        final = {**metrics, "imitator": self.spec.name, "cutoff": self.spec.cutoff, "checkpoint": self.store.full(self.checkpoint)}
        self.store.write_bytes(f"{self.folder}/{layout.DONE_FILE}", json.dumps(final, indent=1).encode())
        self.writer.close()


# --- the training loop (runs in each Ray Train worker) ---


def train_loop(config: dict[str, Any]) -> None:
    """The job's imitators, one after another. One with a done file is skipped and an unfinished
    one resumes from its newest checkpoint, so a restarted worker and a rerun go on from the store."""
    store, experiment = config["store"], config["experiment"]
    for index, spec in enumerate(config["imitators"]):
        if not store.exists(f"{spec.dir(experiment)}/{layout.DONE_FILE}"):
            fit_in_worker(spec, index, store, experiment)


def fit_in_worker(spec: ImitatorSpec, index: int, store: Store, experiment: str) -> None:
    """One imitator on the job's datasets train_{index} and val_{index}."""
    import ray.train
    import ray.train.torch

    hp, args = spec.hparams, ModelArgs.from_dict(spec.model_args)
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(Imitator(args))
    bare = model.module if hasattr(model, "module") else model
    optimizer = bare.configure_optimizer(hp["weight_decay"], hp["lr"], (0.9, 0.95))
    step = restore_checkpoint(store, spec.dir(experiment), spec, bare, optimizer, device)

    per_worker = hp["batch_size"] // workers
    train_windows = ray.train.get_dataset_shard(f"train_{index}")
    iterate = lambda shard, shuffle: shard.iter_torch_batches(  # noqa: E731
        batch_size=per_worker, drop_last=True, device=device, local_shuffle_buffer_size=shuffle or None)
    # The same few held-out batches at every validation, read once.
    val_batches = (list(itertools.islice(iterate(ray.train.get_dataset_shard(f"val_{index}"), 0), VAL_BATCHES))
                   if spec.val_teachers else None)
    outputs = ImitatorOutputs(store, experiment, spec) if rank == 0 else None
    tokens_per_step = hp["batch_size"] * (hp["window_steps"] or args.context_steps)
    started, first_step = time.perf_counter(), step
    while step < hp["steps"]:
        batches = 0
        for batch in iterate(train_windows, hp["shuffle_buffer"]):
            batches += 1
            if step == first_step:  # tokens/s from the first batch on: the read pipeline's start-up is not training
                started = time.perf_counter()
            loss = optimizer_step(model, optimizer, batch, step, hp)
            step += 1
            done = step == hp["steps"]
            checkpoint = step % hp["checkpoint_every"] == 0 or done
            if step % hp["report_every"] == 0 or checkpoint:
                metrics = {"step": step, "loss": loss.item(), "lr": learning_rate(step - 1, hp),
                           "tokens_per_s": (step - first_step) * tokens_per_step / (time.perf_counter() - started),
                           "resumed_from": first_step, "optimizer_steps": optimizer_steps(optimizer)}
                if val_batches is not None:
                    metrics["val_loss"] = validation_loss(model, val_batches)
                if outputs:
                    outputs.log(metrics)
                    if checkpoint:
                        outputs.save(bare, optimizer, step)
                    if done:
                        outputs.finish(metrics)
            if done:
                break
        if batches == 0:
            raise TrainError(f"no training window of {hp['window_steps'] or args.context_steps} steps: the histories before the cutoff are "
                             f"shorter than the context, or there are fewer windows than a batch of {per_worker}")


# --- the stage ---


def train(preset: Preset, store: Store, experiment: str, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every imitator of the preset that is not finished yet; returns each one's final metrics."""
    specs = imitator_specs(preset)
    if not specs:
        log("train: the preset lists no imitators (train.imitators)")
        return []
    store.check_writable(layout.imitators_dir(experiment))
    results, todo = [], []
    for spec in specs:
        done = _stored(store, f"{spec.dir(experiment)}/{layout.DONE_FILE}")
        layout.record_settings(store, f"{spec.dir(experiment)}/{layout.IMITATOR_SPEC_FILE}", spec.settings(),
                               what=f"imitator {spec.name} at cutoff {spec.cutoff:g} trained", experiment=experiment,
                               upgrade=lambda old: ImitatorSpec.from_dict(old).settings())
        (results.append(json.loads(done)) if done else todo.append(spec))
    for spec in todo:  # check all data before training any
        shard_paths(store, experiment, spec, spec.train_teachers + spec.val_teachers)
    if todo:
        results += fit_imitators(preset, store, experiment, todo, log)
    log(f"train: done: {len(specs)} imitators in {store.url(layout.imitators_dir(experiment))}")
    return results


def fit_imitators(preset: Preset, store: Store, experiment: str, todo: list[ImitatorSpec],
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Fit these imitators in Ray Train jobs of up to train.imitators_per_job each, train.concurrent
    jobs at a time; their final metrics in order."""
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    at_once = concurrent_jobs(preset.train, len(todo))
    jobs = job_groups(todo, preset.train.imitators_per_job, at_once)
    log(f"train: {len(todo)} to fit, {len(jobs)} Ray Train job(s), {at_once} at a time")

    def fit(number: int, specs: list[ImitatorSpec]) -> list[dict[str, Any]]:
        log(f"train: job {number}/{len(jobs)}: " + ", ".join(
            f"{spec.name} at cutoff {spec.cutoff:g} ({len(spec.train_teachers)} teachers, {len(spec.val_teachers)} held out, "
            f"{spec.hparams['steps']} steps)" for spec in specs))
        finals = fit_job(preset, store, experiment, specs)
        for final in finals:
            log(f"train: {final['imitator']} at cutoff {final['cutoff']:g}: loss {final['loss']:.3f}"
                + (f", validation loss {final['val_loss']:.3f}" if "val_loss" in final else ""))
        return finals

    # Each job checkpoints as it goes: when one fails, the others still finish (leaving the pool
    # waits for them) before the first error is raised.
    with ThreadPoolExecutor(at_once) as pool:
        futures = [pool.submit(fit, number, specs) for number, specs in enumerate(jobs, 1)]
    finals = {(final["imitator"], final["cutoff"]): final for future in futures for final in future.result()}
    return [finals[spec.name, spec.cutoff] for spec in todo]


def concurrent_jobs(settings: TrainConfig, todo: int) -> int:
    """train.concurrent, but never more Train jobs than the cluster's CPUs now hold with one CPU
    left for Ray Data's read tasks (with none left, the jobs would wait for their data forever)."""
    per_job = settings.num_workers * settings.cpus_per_worker
    fits = math.floor((ray.cluster_resources().get("CPU", 0) - 1) / per_job + 1e-9)
    return max(1, min(settings.concurrent, todo, fits))


def job_groups(todo: list[ImitatorSpec], per_job: int, at_once: int) -> list[list[ImitatorSpec]]:
    """The imitators spread over at least `at_once` jobs of at most `per_job` each, balanced by
    tokens trained: the largest first, each into the least loaded job with room. A job fits its
    imitators in preset order."""
    count = max(math.ceil(len(todo) / per_job), at_once)
    jobs, loads = [[] for _ in range(count)], [0] * count
    for spec in sorted(todo, key=training_tokens, reverse=True):
        job = min((j for j in range(count) if len(jobs[j]) < per_job), key=loads.__getitem__)
        jobs[job].append(spec)
        loads[job] += training_tokens(spec)
    return [sorted(job, key=todo.index) for job in jobs]


def training_tokens(spec: ImitatorSpec) -> int:
    hp = spec.hparams
    return hp["steps"] * hp["batch_size"] * (hp["window_steps"] or spec.model_args["context_steps"])


def fit_job(preset: Preset, store: Store, experiment: str, specs: list[ImitatorSpec]) -> list[dict[str, Any]]:
    """One Ray Train job fitting these imitators one after another (train_loop); their done files."""
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    datasets = {}
    for index, spec in enumerate(specs):
        datasets[f"train_{index}"] = windows_dataset(store, shard_paths(store, experiment, spec, spec.train_teachers), spec)
        if spec.val_teachers:
            datasets[f"val_{index}"] = windows_dataset(store, shard_paths(store, experiment, spec, spec.val_teachers), spec,
                                                       repeat=False)
    settings = preset.train
    # Split among several workers only: a split dataset is read through its own coordinator actor,
    # about 8 s to start per imitator here, where one worker reads a whole dataset in its process.
    split = [name for name in datasets if name.startswith("train_")] if settings.num_workers > 1 else []
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"imitators": specs, "experiment": experiment, "store": store},
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=use_gpu(settings.use_gpu),
                                     resources_per_worker={"CPU": settings.cpus_per_worker}),
        run_config=RunConfig(name=job_name(specs), storage_path=store.full(f"{layout.imitators_dir(experiment)}/{JOBS_DIR}"),
                             storage_filesystem=store.arrow_fs, failure_config=FailureConfig(max_failures=settings.max_failures)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=split),
    )
    trainer.fit()
    return [json.loads(store.read_bytes(f"{spec.dir(experiment)}/{layout.DONE_FILE}")) for spec in specs]


def job_name(specs: list[ImitatorSpec]) -> str:
    """Named after its imitators: rerunning the same job reuses its folder instead of adding one."""
    return f"job-{zlib.crc32(' '.join(f'{spec.cutoff:g}/{spec.name}' for spec in specs).encode()):08x}"


def use_gpu(setting: bool | str) -> bool:
    """train.use_gpu: true, false, or auto (GPU workers if the cluster has a GPU now)."""
    return ray.cluster_resources().get("GPU", 0) >= 1 if setting == "auto" else bool(setting)


def _stored(store: Store, path: str) -> bytes | None:
    try:
        return store.read_bytes(path)
    except FileNotFoundError:
        return None
