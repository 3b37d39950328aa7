"""Stage 1, collect: a fleet of Ray actors runs the preset's teachers and records every transition.

    python -m pipeline collect --preset quick                      # into ./runs/quick
    python -m pipeline collect --preset smoke --store s3://bucket/prefix

Expect one progress line every few seconds (teachers done, steps, steps/s) and, at the end, the
folder of the Parquet histories. Each teacher's history is committed shard by shard together with a
checkpoint (see history.py); a learner of several envs (lean_ppo's num_envs) writes one history
per env, committed at the same steps with one shared checkpoint. Rerunning with the same experiment skips complete teachers and
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
from pipeline.plan import TeacherSpec, learners, teacher_specs
from pipeline.runtime import ensure_ray
from pipeline.schema import Manifest, SchemaError, Transitions
from pipeline.store import Store
from pipeline.teachers import Teacher, make_teacher, train_streams

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
    return run_learner([spec], store, experiment, shard_steps=shard_steps, checkpoint_steps=checkpoint_steps,
                       progress=progress)[0]


def run_learner(specs: list[TeacherSpec], store: Store, experiment: str, *, shard_steps: int,
                checkpoint_steps: int | None = None, progress: Any = None) -> list[TeacherResult]:
    """Run one learner to its budget (a teacher, or the streams of a learner of several envs,
    plan.learners), resuming from its newest committed checkpoint; one result per stream."""
    histories = [TeacherHistory.of(store, experiment, spec) for spec in specs]
    manifests = recover_learner(histories)
    if all(m.complete for m in manifests):
        return [TeacherResult(s.teacher_id, m.rows, 0) for s, m in zip(specs, manifests)]
    spec = specs[0]
    teacher = make_teacher(spec.algo, spec.env_id, spec.env_kwargs, seed=spec.seed, budget=spec.budget, config=spec.algo_config)
    try:
        return _run(teacher, specs, histories, manifests, shard_steps, checkpoint_steps, progress)
    finally:
        teacher.close()


def recover_learner(histories: list[TeacherHistory]) -> list[Manifest]:
    """Each stream's committed manifest, the later streams first brought up to the first one where a
    crash left them behind it (history.py), then every stream recovered."""
    first = histories[0].read_manifest()
    for history in histories[1:]:
        manifest = history.read_manifest()
        if manifest.next_step > first.next_step:
            raise HistoryError(f"{history.teacher_id} has {manifest.next_step} steps committed, more than its learner's "
                               f"first stream {histories[0].teacher_id} ({first.next_step}). Nothing was changed.")
        if manifest.next_step < first.next_step:
            history.roll_forward(manifest, first)
    return [history.recover() for history in histories]


def _run(teacher: Teacher, specs: list[TeacherSpec], histories: list[TeacherHistory], manifests: list[Manifest],
         shard_steps: int, checkpoint_steps: int | None, progress: Any) -> list[TeacherResult]:
    spec, first = specs[0], histories[0]
    store, experiment = first.store, first.experiment
    if manifests[0].checkpoints:
        load_checkpoint(teacher, store, f"{experiment}/{manifests[0].checkpoints[-1].path}")
    if teacher.step != manifests[0].next_step:
        raise HistoryError(f"{spec.teacher_id}: checkpoint is at step {teacher.step}, the history ends at {manifests[0].next_step}")
    start_step = teacher.step
    chunk = teacher.granularity * max(1, PROGRESS_STEPS // teacher.granularity)
    rows, staged, saved = [[] for _ in specs], [[] for _ in specs], []  # per stream, but one checkpoint
    for stop in spec.stops(shard_steps, checkpoint_steps):
        if stop.step <= start_step:
            continue  # committed before a restart
        while teacher.step < stop.step:
            for stream_rows, batch in zip(rows, train_streams(teacher, min(chunk, stop.step - teacher.step))):
                stream_rows.append(batch)
            for stream in specs if progress is not None else []:
                progress.report.remote(stream.teacher_id, teacher.step)
        if stop.cutoff is not None or stop.commits:
            saved.append(first.checkpoint_entry(teacher.step, stop.cutoff))
            _save_checkpoint(teacher, store, first.checkpoint_path(teacher.step))
        if stop.ends_shard:
            for stream, history, stream_rows, stream_staged in zip(specs, histories, rows, staged):
                table = Transitions.concat(stream_rows).to_table(
                    teacher.encoding, teacher_id=stream.teacher_id, env_id=stream.env_id, task_id=stream.task_id, seed=stream.seed)
                stream_staged.append(history.stage(table))
            rows = [[] for _ in specs]
        if stop.commits:
            last = len(specs) - 1
            manifests = [history.commit(manifest, stream_staged, saved, complete=teacher.step >= spec.budget, tidy=i == last)
                         for i, (history, manifest, stream_staged) in enumerate(zip(histories, manifests, staged))]
            staged, saved = [[] for _ in specs], []
    return [TeacherResult(s.teacher_id, m.rows, teacher.step - start_step) for s, m in zip(specs, manifests)]


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

    def run(self, specs: list[TeacherSpec], store: Store, experiment: str, shard_steps: int,
            checkpoint_steps: int | None, progress: Any) -> list[TeacherResult]:
        return run_learner(specs, store, experiment, shard_steps=shard_steps, checkpoint_steps=checkpoint_steps, progress=progress)


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
    histories = {s.teacher_id: TeacherHistory.of(store, experiment, s) for s in specs}
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
    todo = [streams for streams in learners(specs) if not all(manifests[s.teacher_id].complete for s in streams)]
    running = sum(len(streams) for streams in todo)
    log(f"collect: {len(specs)} teachers in {store.url(experiment)}: {len(specs) - running} complete, {running} to run")
    results = []
    if todo:
        ensure_ray()
        results = _run_fleet(todo, store, experiment, preset.collect, _ProgressMeter(specs, manifests, log), log)
    now = sum(r.steps_run for r in results)
    total = sum(m.rows for m in manifests.values() if m.complete) + sum(r.steps for r in results)
    log(f"collect: done: {len(specs)} teachers, {total:,} transitions ({now:,} collected by this run); "
        f"histories in {store.url(layout.histories_dir(experiment))}")
    return results


def _run_fleet(todo: list[list[TeacherSpec]], store: Store, experiment: str, config: CollectConfig,
               meter: _ProgressMeter, log: Callable[[str], None]) -> list[TeacherResult]:
    """Run these learners (plan.learners: each one teacher, or the streams of one learner) on actors."""
    fits = int(ray.cluster_resources().get("CPU", 1) // config.actor.cpus)
    n_actors = min(config.num_actors or max(1, fits), len(todo))
    log(f"collect: {n_actors} teacher actors")
    progress = Progress.remote()
    new_actor = lambda: TeacherActor.options(**config.actor.ray_options()).remote()  # noqa: E731
    # Two learners in flight per actor, so an actor never waits for the driver between them.
    free = [new_actor() for _ in range(n_actors)] * 2
    replacements = {}  # a dead actor -> the one that takes its place
    queue, running = deque(todo), {}
    results, failures = [], {}
    while queue or running:
        while queue and free:
            actor, streams = free.pop(), queue.popleft()
            ref = actor.run.remote(streams, store, experiment, config.shard_steps, config.checkpoint_steps, progress)
            running[ref] = (actor, streams)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=PROGRESS_SECONDS)
        for ref in ready:
            actor, streams = running.pop(ref)
            name = streams[0].learner_id
            try:
                results += ray.get(ref)
                for spec in streams:
                    meter.finished(spec.teacher_id)
            except ray.exceptions.RayTaskError as error:
                failures[name] = str(getattr(error, "cause", None) or error)
            except ray.exceptions.RayActorError as error:
                failures[name] = f"its actor died {ACTOR_RESTARTS + 1} times ({error})"
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
