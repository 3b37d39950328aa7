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
from dataclasses import dataclass
from typing import Any, Callable

import ray

from pipeline import layout
from pipeline.config import CollectConfig, Preset
from pipeline.errors import PipelineError
from pipeline.history import HistoryError, TeacherHistory
from pipeline.plan import TeacherSpec, teacher_specs
from pipeline.runtime import ensure_ray
from pipeline.schema import Manifest, SchemaError, Transitions
from pipeline.store import Store
from pipeline.teachers import Teacher, make_teacher

PROGRESS_SECONDS = 5.0
PROGRESS_STEPS = 2048  # a teacher reports the steps it has done at least this often (rounded to whole iterations)
ACTOR_RESTARTS = 3


class CollectError(PipelineError):
    """Some teachers failed; their committed data is kept and a rerun resumes them."""


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
    chunk = teacher.granularity * max(1, PROGRESS_STEPS // teacher.granularity)
    rows, staged, saved = [], [], []
    for stop in spec.stops(shard_steps, checkpoint_steps):
        if stop.step <= start_step:
            continue  # committed before a restart
        while teacher.step < stop.step:
            rows.append(teacher.train_steps(min(chunk, stop.step - teacher.step)))
            if progress is not None:
                progress.report.remote(spec.teacher_id, teacher.step)
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
    """Steps done by each running teacher (committed or not), reported by the actors."""

    def __init__(self):
        self.steps: dict[str, int] = {}

    def report(self, teacher: str, step: int) -> None:
        self.steps[teacher] = step

    def snapshot(self) -> dict[str, int]:
        return dict(self.steps)


def plan(specs: list[TeacherSpec], store: Store, experiment: str) -> dict[str, Manifest]:
    """Check each teacher's stored spec against the preset (recording new ones); return committed manifests."""
    histories = {s.teacher_id: TeacherHistory(store, experiment, s.env_id, s.teacher_id) for s in specs}
    paths = [h.path(name) for h in histories.values() for name in (layout.TEACHER_SPEC_FILE, layout.MANIFEST_FILE)]
    stored = store.read_many(paths)  # concurrently: hundreds of teachers on an object store
    manifests = {}
    for spec in specs:
        history = histories[spec.teacher_id]
        spec_path, manifest_path = history.path(layout.TEACHER_SPEC_FILE), history.path(layout.MANIFEST_FILE)
        settings = spec.settings()
        if layout.check_rerun(stored.get(spec_path), settings, what=f"teacher {spec.teacher_id} collected",
                              experiment=experiment, where=store.url(spec_path)):
            store.write_bytes(spec_path, json.dumps(settings, sort_keys=True, indent=1).encode())
        text = stored.get(manifest_path)
        try:
            manifests[spec.teacher_id] = Manifest.from_json(text, store.url(manifest_path)) if text else Manifest()
        except SchemaError as error:
            raise HistoryError(f"{error}. Nothing was changed.") from error
    return manifests


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
        f"histories in {store.url(layout.histories_dir(experiment))}")
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
