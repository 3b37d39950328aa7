"""Evaluate stage: the grid of docs/design.md's tests as one Ray Tune experiment.

    python -m pipeline evaluate --preset quick      # after train; then: python -m pipeline report --preset quick
    tensorboard --logdir runs/quick/tune            # every trial's charts/episodic_return against env steps

The grid's units (plan.TrialSpec: one arm on one env/task and seed, for a cutoff) run `horizon`
env steps after the cutoff (the in-data control: from its earlier prime step c' to the cutoff).
A Tune trial runs a batch of up to `evaluate.lockstep` units of one arm, test, cutoff, imitator
and context in lockstep (plan.trial_batches), each in its own env, and reports every finished
episode to Tune with its unit's trial_id (unit, charts/episodic_return, charts/episodic_length,
charts/env_steps counted from the cutoff, or c'); its last report (trial/finished) marks every
unit of the batch finished. The arms:
  imitator  the frozen imitator of the cutoff (every size and context length trained), rolled
            out with its KV cache, one model call per step for the whole batch; each unit's
            context primed with its teacher's last pre-cutoff steps, or empty
  teacher   the teacher restored from its checkpoint at the cutoff, continuing to learn; on held-out
            tasks or envs, a fresh teacher learning from scratch; one unit per trial
  snapshot  the teacher's frozen greedy policy at the cutoff
  random    uniformly random actions
  in_data   the in-data control: the imitator arm's cutoff imitator, each unit's context primed with
            its teacher's last steps before c' (evaluate.imitators.*.in_data_fraction of the cutoff
            step), rolled out for the cutoff_step - c' steps the teacher took from there to the cutoff
Tune stores everything under {store}/{experiment}/tune (s3:// works), one folder per trial named by
its batch id (a one-unit batch by its unit's trial_id); rerunning the same command restores the
experiment and runs only the trials that are missing or failed.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline import layout
from pipeline.arms import ARMS, EXTRAPOLATION, IMITATOR, IN_DATA, RANDOM, SNAPSHOT, TEACHER
from pipeline.collect import load_checkpoint
from pipeline.config import Preset, Resources
from pipeline.envs import make_env
from pipeline.errors import PipelineError
from pipeline.history import TeacherHistory
from pipeline.metrics import ENV_STEPS, EPISODIC_LENGTH, EPISODIC_RETURN, TRIAL_FINISHED, UNIT
from pipeline.plan import PRIMED, TrialBatch, TrialSpec, trial_batches, trial_specs
from pipeline.runtime import ensure_ray
from pipeline.rollout import ImitatorPolicy, left_padded
from pipeline.schema import Transitions, check_schema
from pipeline.store import Store
from pipeline.teachers import make_teacher, train_streams
from pipeline.train import load_imitator


class EvaluateError(PipelineError):
    """The grid cannot run from what is in the store; the message names what is missing."""


# --- the arms: each runs a batch's units in lockstep and yields every finished episode ---

Episode = tuple[int, int, float, int]  # (unit's index in the batch, env steps since the cutoff, return, length)
RUNNERS: dict[str, Callable[[list[TrialSpec], Store, str], Iterator[Episode]]] = {}  # arm name -> its rollout


def runs(arm: str):
    """Registers the decorated function as the rollout of `arm` (a key of pipeline.arms.ARMS)."""
    def register(function):
        RUNNERS[arm] = function
        return function
    return register


def episodes_of(batch: Transitions, offset: int, skip_partial_first: bool) -> Iterator[tuple[int, float, int]]:
    """Finished episodes of a batch of transitions, the step counted from `offset`."""
    ends = np.flatnonzero(batch.terminated | batch.truncated)
    start = 0
    for end in ends:
        if not (skip_partial_first and start == 0 and batch.episode_step[0] > 0):
            yield offset + int(end) + 1, float(batch.reward[start:end + 1].sum()), int(end - start + 1)
        start = end + 1


def _teacher_of(trial: TrialSpec):
    spec = trial.teacher_spec
    return make_teacher(spec.algo, spec.env_id, spec.env_kwargs, seed=spec.seed, budget=spec.budget, config=spec.algo_config), spec


def _restored_teacher(trial: TrialSpec, store: Store, experiment: str):
    teacher, spec = _teacher_of(trial)
    history = TeacherHistory.of(store, experiment, spec)
    load_checkpoint(teacher, store, history.checkpoint_path(trial.cutoff_step))
    return teacher


@runs(TEACHER)
def teacher_arm(units: list[TrialSpec], store: Store, experiment: str) -> Iterator[Episode]:
    (trial,) = units  # plan.trial_batches: one learning teacher per trial
    scratch = trial.test != EXTRAPOLATION
    teacher = _teacher_of(trial)[0] if scratch else _restored_teacher(trial, store, experiment)
    try:
        chunk = teacher.granularity * max(1, 1000 // teacher.granularity)
        done, first = 0, True
        while done < trial.horizon:
            batch = train_streams(teacher, min(chunk, trial.horizon - done))[trial.teacher_spec.stream]  # all streams learn
            for episode in episodes_of(batch, done, skip_partial_first=first):  # an episode begun before the cutoff is left out
                yield 0, *episode
            done, first = done + len(batch), False
    finally:
        teacher.close()


@contextmanager
def _envs(units: list[TrialSpec]):
    envs = [make_env(unit.env_id, **unit.env_kwargs) for unit in units]
    try:
        yield envs
    finally:
        for env in envs:
            env.close()


def _lockstep(units: list[TrialSpec], envs: list, act: Callable[[list, np.ndarray], Sequence[int]],
              observe: Callable[[np.ndarray], None] = lambda rewards: None) -> Iterator[Episode]:
    """Every unit's env stepped `horizon` times in lockstep, each seeded by its unit: act(observations,
    first) gives one action per env (first[i]: env i's episode has just begun), observe(rewards)
    sees what they returned. An env whose episode ends is reset on its own."""
    obs = [env.reset(seed=unit.seed)[0] for env, unit in zip(envs, units)]
    first = np.ones(len(envs), bool)
    totals, lengths = np.zeros(len(envs)), np.zeros(len(envs), np.int64)
    for step in range(1, units[0].horizon + 1):
        actions = act(obs, first)
        rewards = np.zeros(len(envs), np.float32)
        for i, env in enumerate(envs):
            obs[i], rewards[i], terminated, truncated, _ = env.step(int(actions[i]))
            first[i] = terminated or truncated
        observe(rewards)
        totals, lengths = totals + rewards, lengths + 1
        for i in np.flatnonzero(first):
            yield int(i), step, float(totals[i]), int(lengths[i])
            obs[i] = envs[i].reset()[0]
        totals[first], lengths[first] = 0.0, 0


@runs(SNAPSHOT)
def snapshot_arm(units: list[TrialSpec], store: Store, experiment: str) -> Iterator[Episode]:
    teachers = []
    try:
        for unit in units:  # one at a time, so that those already restored are closed if one fails
            teachers.append(_restored_teacher(unit, store, experiment))
        yield from snapshot_rollout(teachers, units)
    finally:
        for teacher in teachers:
            teacher.close()


def snapshot_rollout(teachers: list, units: list[TrialSpec]) -> Iterator[Episode]:
    """The snapshot arm on loaded teachers, one per unit: each acts greedily in its unit's env."""
    with _envs(units) as envs:
        yield from _lockstep(units, envs, lambda obs, first: [t.act(o, f) for t, o, f in zip(teachers, obs, first)])


@runs(RANDOM)
def random_arm(units: list[TrialSpec], store: Store, experiment: str) -> Iterator[Episode]:
    with _envs(units) as envs:
        for env, unit in zip(envs, units):
            env.action_space.seed(unit.seed)
        yield from _lockstep(units, envs, lambda obs, first: [env.action_space.sample() for env in envs])


def load_trial_imitator(trial: TrialSpec, store: Store, experiment: str):
    """The trial's frozen imitator, on the GPU Ray gave the trial (evaluate.trial_resources), else the CPU."""
    import ray

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    folder = layout.imitator_dir(experiment, trial.cutoff, trial.imitator)
    done = json.loads(store.read_bytes(f"{folder}/{layout.DONE_FILE}"))
    checkpoint = os.path.basename(done["checkpoint"].rstrip("/"))
    with tempfile.TemporaryDirectory() as local:
        store.download_dir(f"{folder}/{checkpoint}", local)
        return load_imitator(local, device)


@runs(IN_DATA)
@runs(IMITATOR)
def imitator_arm(units: list[TrialSpec], store: Store, experiment: str) -> Iterator[Episode]:
    """One policy steps every unit's env: one model call per step for the whole batch. The batch's
    sampling stream is seeded by its first unit. A primed context holds the teacher's last steps
    before the unit's primed_until: the cutoff, or the in-data control's earlier prime step."""
    model = load_trial_imitator(units[0], store, experiment)
    yield from imitator_rollout(model, units, [recorded_steps_before(unit, unit.primed_until, store, experiment,
                                                                     model.args.context_steps)
                                               for unit in units] if units[0].context == PRIMED else None)


def imitator_rollout(model, units: list[TrialSpec], primes: list | None) -> Iterator[Episode]:
    """The imitator arm on a loaded model; primes: per unit, its recorded steps (obs, action, reward,
    first) to prime its context with, or None for empty contexts."""
    policy = ImitatorPolicy(model, batch_size=len(units), temperature=units[0].temperature, seed=units[0].seed)
    if primes is not None:
        policy.prime(*left_padded(primes))
    with _envs(units) as envs:
        yield from _lockstep(units, envs, lambda obs, first: policy.act(np.asarray(obs), first), policy.observe)


def recorded_steps_before(trial: TrialSpec, step: int, store: Store, experiment: str, count: int):
    """The trial's teacher's last `count` recorded steps before `step` (fewer when the history has
    fewer): obs, action, reward, first."""
    history = TeacherHistory(store, experiment, trial.env_id, trial.teacher_spec.teacher_id)
    manifest = history.read_manifest()
    manifest.shards = [s for s in manifest.shards if s.last_step >= step - count and s.first_step < step]
    if not manifest.shards:  # step 0: the in-data control from the teacher's start, an empty context
        return tuple(np.zeros(0) for _ in range(4))
    table = history.read(manifest)
    batch = Transitions.from_table(table, check_schema(table.schema, history.dir))
    keep = (batch.step >= step - count) & (batch.step < step)
    return batch.obs[keep], batch.action[keep], batch.reward[keep], batch.episode_step[keep] == 0


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one batch of units in lockstep, reporting every finished episode under its
    unit's trial_id; the last report (trial/finished) says that every unit ran its whole horizon."""
    import torch
    from ray import tune
    from ray.tune.result import TIMESTEPS_TOTAL

    torch.set_num_threads(1)
    batch = TrialBatch.from_config(config["batch"])
    units = list(batch.units)
    # timesteps_total is the step Tune's TensorBoard logger plots against: env steps, the same for every unit.
    for unit, steps, episode_return, length in RUNNERS[batch.arm](units, Store(config["store"]), config["experiment"]):
        tune.report({UNIT: units[unit].trial_id, ENV_STEPS: steps, EPISODIC_RETURN: episode_return,
                     EPISODIC_LENGTH: length, TIMESTEPS_TOTAL: steps})
    tune.report({ENV_STEPS: batch.horizon, TRIAL_FINISHED: True, TIMESTEPS_TOTAL: batch.horizon})


# --- the stage ---


def check_inputs(trials: list[TrialSpec], store: Store, experiment: str) -> None:
    """Every imitator finished training and every teacher checkpoint exists, before Tune starts."""
    for trial in trials:
        if trial.imitator:  # the imitator arm and the in-data control
            folder = layout.imitator_dir(experiment, trial.cutoff, trial.imitator)
            if not store.exists(f"{folder}/{layout.DONE_FILE}"):
                raise EvaluateError(f"imitator {trial.imitator} at cutoff {trial.cutoff:g} has not finished training "
                                    f"({store.url(folder)}): run train first")
        if trial.test == EXTRAPOLATION and trial.arm in (TEACHER, SNAPSHOT):
            spec = trial.teacher_spec
            path = TeacherHistory.of(store, experiment, spec).checkpoint_path(trial.cutoff_step)
            if not store.exists(path):
                raise EvaluateError(f"teacher {spec.teacher_id} has no checkpoint at cutoff {trial.cutoff:g} "
                                    f"({store.url(path)}): run collect first")


def evaluate(preset: Preset, store: Store, experiment: str, log: Callable[[str], None] = print):
    """Run the missing trials of the preset's grid; returns Tune's ResultGrid (one result per batch)."""
    import ray
    from ray import tune

    trials = trial_specs(preset)
    if not trials:
        log("evaluate: the preset lists no tests (evaluate.imitators)")
        return None
    settings = preset.evaluate
    batches = trial_batches(trials, settings.lockstep)
    layout.record_settings(store, layout.grid_file(experiment), grid_record(trials, batches, settings.lockstep),
                           what="an evaluation grid", experiment=experiment, upgrade=upgraded_grid)
    check_inputs(trials, store, experiment)
    ensure_ray()
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's compact status table instead of every trial's config
    fs, path = store.arrow_fs, store.full(layout.tune_dir(experiment))
    resources = {arm: settings.trial_resources.get(arm, Resources()).tune_resources() for arm in RUNNERS}
    trainable = tune.with_resources(run_trial, lambda config: resources[config["batch"]["arm"]])
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"evaluate: resuming {store.url(layout.tune_dir(experiment))}: only missing or failed trials run")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        log(f"evaluate: {len(trials)} units in {len(batches)} trials into {store.url(layout.tune_dir(experiment))}")
        tuner = tune.Tuner(
            trainable,
            param_space={"batch": tune.grid_search([b.config() for b in longest_first(batches)]), "store": store.uri,
                         "experiment": experiment},
            tune_config=tune.TuneConfig(max_concurrent_trials=settings.max_concurrent_trials or _trials_that_fit(resources),
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                                        reuse_actors=True),  # most trials run for seconds: an actor start per trial would dominate
            run_config=tune.RunConfig(name=layout.TUNE_DIR, storage_path=store.full(experiment), storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=settings.max_failures), verbose=1,
                                      progress_reporter=tune.CLIReporter(
                                          metric_columns={ENV_STEPS: "env steps", EPISODIC_RETURN: "return"},
                                          parameter_columns={"batch/arm": "arm"}, max_progress_rows=12,
                                          max_report_frequency=30)),
        )
    results = tuner.fit()
    failed = [r for r in results if r.error]
    log(f"evaluate: {len(results) - len(failed)}/{len(batches)} trials finished" + (f", {len(failed)} failed" if failed else ""))
    return results


def grid_record(trials: list[TrialSpec], batches: list[TrialBatch], lockstep: int) -> dict[str, Any]:
    """_grid.json: the units, and the Tune trial (batch) that runs each; a rerun must plan the same."""
    return {"lockstep": lockstep, "trials": [asdict(t) for t in trials],
            "batches": {b.batch_id: [u.trial_id for u in b.units] for b in batches}}


def upgraded_grid(stored):
    """A grid recorded by an older version, in today's form. One from before evaluate.lockstep (a
    list of TrialSpecs, one Tune trial each): a rerun of it is refused, naming lockstep, since its
    Tune trials hold one unit each in a config this version does not read. Units recorded before
    the in-data control have no prime_step: theirs is None."""
    grid = stored if isinstance(stored, dict) else {
        "lockstep": "none (one Tune trial per unit, recorded before evaluate.lockstep)", "trials": stored}
    return {**grid, "trials": [{"prime_step": None, **trial} for trial in grid["trials"]]}


def longest_first(batches: list[TrialBatch]) -> list[TrialBatch]:
    """The grid in the order Tune should start it: long trials first, so that the last ones to
    finish are short (with the long ones last, the run ends waiting on them with idle CPUs). A
    trial's length is taken as horizon x arm cost x units, an overestimate for batched imitators."""
    return sorted(batches, key=lambda b: -b.horizon * (1 + ARMS[b.arm].cost) * len(b.units))


def _trials_that_fit(resources: dict[str, dict[str, float]]) -> int:
    """Trials the cluster's CPUs hold at once, counting each as the smallest arm's CPUs."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // min(r["cpu"] for r in resources.values())))


def _trial_name(trial) -> str:
    return trial.config["batch"]["batch_id"]
