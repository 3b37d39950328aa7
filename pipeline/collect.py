"""Stage 1, collect: a fleet of Ray actors runs the preset's teachers and records every transition.

    python -m pipeline collect --preset quick                      # into ./runs/quick
    python -m pipeline collect --preset smoke --store s3://bucket/prefix

Expect one progress line every few seconds (teachers done, steps, steps/s) and, at the end, the
folder of the Parquet histories. Each teacher's history is committed shard by shard together with a
checkpoint (see history.py). Rerunning with the same experiment skips complete teachers and
resumes the others from their newest checkpoint; an actor that dies is restarted by Ray and
resumes the same way. Checkpoints at every cutoff fraction (and the end) stay for later stages.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

import ray

from pipeline.config import CollectConfig, ConfigError, Preset, cutoff_steps, task_id, teacher_id
from pipeline.runtime import ensure_ray
from pipeline.history import MANIFEST, SPEC, HistoryError, TeacherHistory, histories_dir
from pipeline.schema import Manifest, SchemaError, Transitions
from pipeline.store import Store
from pipeline.teachers import Teacher, algo_config, make_teacher

PROGRESS_SECONDS = 5.0
ACTOR_RESTARTS = 3


class CollectError(RuntimeError):
    """Some teachers failed; their committed data is kept and a rerun resumes them."""


@dataclass(frozen=True)
class Stop:
    step: int
    cutoff: float | None  # save the checkpoint of this cutoff fraction here (1.0: the end)
    ends_shard: bool  # write the rows gathered since the last shard as one shard
    commits: bool  # commit the shards and checkpoints since the last commit (a resume point)


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that defines one teacher's timeline; stored as _teacher.json beside its history."""

    teacher_id: str
    group: str
    env_id: str
    env_kwargs: dict[str, Any]  # the group's env_kwargs with the task's applied
    task_id: str
    seed: int
    algo: str
    algo_config: dict[str, Any]
    budget: int
    cutoffs: tuple[float, ...]

    def stops(self, shard_steps: int, checkpoint_steps: int | None) -> list[Stop]:
        """The steps where run_teacher pauses, and what it does at each; all whole training iterations."""
        unit = algo_config(self.algo, self.algo_config).granularity
        whole = lambda steps: -(-steps // unit) * unit  # noqa: E731  (round up to whole iterations)
        cutoffs = cutoff_steps(self.budget, list(self.cutoffs), unit)
        commits = set(range(whole(checkpoint_steps), self.budget, whole(checkpoint_steps))) if checkpoint_steps else set()
        commits.add(self.budget)
        shards = set(range(whole(shard_steps), self.budget, whole(shard_steps))) | commits
        return [Stop(step, cutoffs.get(step), step in shards, step in commits) for step in sorted(cutoffs.keys() | shards)]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()


def teacher_specs(preset: Preset) -> list[TeacherSpec]:
    collect = preset.collect
    return [
        TeacherSpec(
            teacher_id=teacher_id(name, task, seed),
            group=name,
            env_id=group.env,
            env_kwargs={**group.env_kwargs, **task},
            task_id=task_id(task),
            seed=seed,
            algo=group.algo,
            algo_config=group.algo_config,
            budget=group.budget,
            cutoffs=tuple(collect.cutoffs),
        )
        for name, group in collect.teachers.items()
        for task in group.tasks
        for seed in group.seeds
    ]


@dataclass
class TeacherResult:
    teacher_id: str
    steps: int  # committed steps in its history now
    steps_run: int  # of which this call collected


# --- one teacher ---


def run_teacher(spec: TeacherSpec, store: Store, experiment: str, *, shard_steps: int,
                checkpoint_steps: int | None = None, progress: Any = None) -> TeacherResult:
    """Run one teacher to its budget, resuming from its newest committed checkpoint."""
    history = TeacherHistory(store, experiment, spec.env_id, spec.teacher_id)
    manifest = history.recover()
    if manifest.complete:
        return TeacherResult(spec.teacher_id, manifest.rows, 0)
    teacher = make_teacher(spec.algo, spec.env_id, spec.env_kwargs, seed=spec.seed, budget=spec.budget, config=spec.algo_config)
    try:
        return _run(teacher, spec, history, manifest, shard_steps, checkpoint_steps, progress)
    finally:
        teacher.close()


def _run(teacher: Teacher, spec: TeacherSpec, history: TeacherHistory, manifest: Manifest, shard_steps: int,
         checkpoint_steps: int | None, progress: Any) -> TeacherResult:
    store, experiment = history.store, history.experiment
    if manifest.checkpoints:
        load_checkpoint(teacher, store, f"{experiment}/{manifest.checkpoints[-1].path}")
    if teacher.step != manifest.next_step:
        raise HistoryError(f"{spec.teacher_id}: checkpoint is at step {teacher.step}, the history ends at {manifest.next_step}")
    start_step = teacher.step
    rows, staged, saved = [], [], []
    for stop in spec.stops(shard_steps, checkpoint_steps):
        if stop.step <= teacher.step:
            continue  # committed before a restart
        rows.append(teacher.train_steps(stop.step - teacher.step))
        if stop.cutoff is not None or stop.commits:
            saved.append(history.checkpoint_entry(teacher.step, stop.cutoff))
            _save_checkpoint(teacher, store, history.checkpoint_path(teacher.step))
        if stop.ends_shard:
            table = Transitions.concat(rows).to_table(
                teacher.encoding, teacher_id=spec.teacher_id, env_id=spec.env_id, task_id=spec.task_id, seed=spec.seed)
            staged.append(history.stage(table))
            rows = []
        if stop.commits:
            manifest = history.commit(manifest, staged, saved, complete=teacher.step >= spec.budget)
            staged, saved = [], []
            if progress is not None:
                progress.report.remote(spec.teacher_id, teacher.step)
    return TeacherResult(spec.teacher_id, manifest.rows, teacher.step - start_step)


def _save_checkpoint(teacher: Teacher, store: Store, path: str) -> None:
    if store.is_local:
        teacher.save(store.full(path))
        return
    with tempfile.TemporaryDirectory() as local:
        teacher.save(local)
        store.upload_dir(local, path)


def load_checkpoint(teacher: Teacher, store: Store, path: str) -> None:
    """Restore `teacher` from a checkpoint folder in the store (also used by the evaluation arms)."""
    with tempfile.TemporaryDirectory() as local:
        store.download_dir(path, local)
        teacher.restore(local)


# --- the fleet ---


@ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)  # resources: collect.actor
class TeacherActor:
    """Runs teachers one after another; Ray restarts it (and retries the teacher) if it dies."""

    def run(self, spec: TeacherSpec, store: Store, experiment: str, shard_steps: int,
            checkpoint_steps: int | None, progress: Any) -> TeacherResult:
        return run_teacher(spec, store, experiment, shard_steps=shard_steps, checkpoint_steps=checkpoint_steps, progress=progress)


@ray.remote(num_cpus=0)
class Progress:
    """Newest committed step of each running teacher, reported by the actors."""

    def __init__(self):
        self.steps: dict[str, int] = {}

    def report(self, teacher: str, step: int) -> None:
        self.steps[teacher] = step

    def snapshot(self) -> dict[str, int]:
        return dict(self.steps)


def plan(specs: list[TeacherSpec], store: Store, experiment: str) -> dict[str, Manifest]:
    """Check each teacher's stored spec against the preset (recording new ones); return committed manifests."""
    histories = {s.teacher_id: TeacherHistory(store, experiment, s.env_id, s.teacher_id) for s in specs}
    stored = store.read_many([h.path(SPEC) for h in histories.values()] + [h.path(MANIFEST) for h in histories.values()])
    manifests = {}
    for spec in specs:
        history = histories[spec.teacher_id]
        old = _stored_spec(stored.get(history.path(SPEC)), store.url(history.path(SPEC)))
        if old is None:
            store.write_bytes(history.path(SPEC), spec.to_json())
        elif old != json.loads(spec.to_json()):
            raise ConfigError(_spec_mismatch(experiment, spec, old))
        text = stored.get(history.path(MANIFEST))
        try:
            manifests[spec.teacher_id] = Manifest.from_json(text, store.url(history.path(MANIFEST))) if text else Manifest()
        except SchemaError as error:
            raise HistoryError(f"{error}. Nothing was changed.") from error
    return manifests


def _stored_spec(data: bytes | None, where: str) -> dict | None:
    try:
        return json.loads(data) if data is not None else None
    except ValueError as error:
        raise HistoryError(f"{where}: not valid JSON ({error}). Nothing was changed.") from error


def _spec_mismatch(experiment: str, spec: TeacherSpec, old: dict) -> str:
    new = json.loads(spec.to_json())
    diffs = ", ".join(f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in new if old.get(k) != new[k])
    return (f"experiment {experiment!r} already holds teacher {spec.teacher_id} collected with other settings ({diffs}); "
            "use another --experiment, or the settings it was started with")


def collect(preset: Preset, store: Store, experiment: str, log: Callable[[str], None] = print) -> list[TeacherResult]:
    """Run every teacher of the preset not yet complete in `experiment`; raise CollectError if any fails."""
    specs = teacher_specs(preset)
    store.check_writable(experiment)
    manifests = plan(specs, store, experiment)
    todo = [s for s in specs if not manifests[s.teacher_id].complete]
    log(f"collect: {len(specs)} teachers in {store.url(experiment)}: {len(specs) - len(todo)} complete, {len(todo)} to run")
    results = []
    if todo:
        ensure_ray()
        results = _run_fleet(todo, store, experiment, preset.collect, _ProgressMeter(specs, manifests, log), log)
    now = sum(r.steps_run for r in results)
    total = sum(m.rows for m in manifests.values() if m.complete) + sum(r.steps for r in results)
    log(f"collect: done: {len(specs)} teachers, {total:,} transitions ({now:,} collected by this run); "
        f"histories in {store.url(histories_dir(experiment))}")
    return results


def _run_fleet(todo: list[TeacherSpec], store: Store, experiment: str, config: CollectConfig,
               meter: _ProgressMeter, log: Callable[[str], None]) -> list[TeacherResult]:
    fits = int(ray.cluster_resources().get("CPU", 1) // config.actor.cpus)
    n_actors = min(config.num_actors or max(1, fits), len(todo))
    log(f"collect: {n_actors} teacher actors")
    progress = Progress.remote()
    new_actor = lambda: TeacherActor.options(**config.actor.ray_options()).remote()  # noqa: E731
    # Two teachers in flight per actor, so an actor never waits for the driver between teachers.
    free = [new_actor() for _ in range(n_actors)] * 2
    replacements = {}  # a dead actor -> the one that takes its place
    queue, running = deque(todo), {}
    results, failures = [], {}
    while queue or running:
        while queue and free:
            actor, spec = free.pop(), queue.popleft()
            ref = actor.run.remote(spec, store, experiment, config.shard_steps, config.checkpoint_steps, progress)
            running[ref] = (actor, spec)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=PROGRESS_SECONDS)
        for ref in ready:
            actor, spec = running.pop(ref)
            try:
                results.append(ray.get(ref))
                meter.finished(spec.teacher_id)
            except ray.exceptions.RayTaskError as error:
                failures[spec.teacher_id] = str(getattr(error, "cause", None) or error)
            except ray.exceptions.RayActorError as error:
                failures[spec.teacher_id] = f"its actor died {ACTOR_RESTARTS + 1} times ({error})"
                actor = replacements.setdefault(actor, new_actor())
            free.append(actor)
        meter.maybe_log(lambda: ray.get(progress.snapshot.remote()))
    for actor in set(free):
        ray.kill(actor)
    ray.kill(progress)
    if failures:
        lines = "\n".join(f"  {tid}: {message}" for tid, message in sorted(failures.items()))
        raise CollectError(f"{len(failures)} of {len(todo)} teachers failed (committed data is kept; rerun to resume):\n{lines}")
    return results


class _ProgressMeter:
    """At most one line every PROGRESS_SECONDS: teachers complete, steps committed, steps/s of this run."""

    def __init__(self, specs: list[TeacherSpec], manifests: dict[str, Manifest], log: Callable[[str], None]):
        self.budgets = {s.teacher_id: s.budget for s in specs}
        self.steps = {tid: manifests[tid].next_step for tid in self.budgets}
        self.complete = {tid for tid in self.budgets if manifests[tid].complete}
        self.start_steps, self.log = sum(self.steps.values()), log
        self.start = self.last = time.perf_counter()

    def finished(self, teacher: str) -> None:
        self.steps[teacher] = max(self.steps[teacher], self.budgets[teacher])
        self.complete.add(teacher)

    def maybe_log(self, reported: Callable[[], dict[str, int]]) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        for teacher, step in reported().items():
            self.steps[teacher] = max(self.steps[teacher], step)
        steps, total = sum(self.steps.values()), sum(self.budgets.values())
        rate = (steps - self.start_steps) / (now - self.start)
        self.log(f"collect: {len(self.complete)}/{len(self.budgets)} teachers complete · {steps:,}/{total:,} steps "
                 f"({steps / total:.0%}) · {rate:,.0f} steps/s")
