"""Evaluate stage: the grid of docs/design.md's tests as one Ray Tune experiment, one trial per arm.

    python -m pipeline evaluate --preset quick      # after train; then: python -m pipeline report --preset quick
    tensorboard --logdir runs/quick/tune            # every trial's charts/episodic_return against env steps

Each trial runs one arm for `horizon` env steps after a cutoff and reports every finished episode
to Tune (charts/episodic_return, charts/episodic_length, charts/env_steps counted from the cutoff):
  imitator  the frozen imitator of the cutoff (every size and context length trained), rolled
            out with its KV cache; context primed with the teacher's last pre-cutoff steps, or empty
  teacher   the teacher restored from its checkpoint at the cutoff, continuing to learn; on held-out
            tasks or envs, a fresh teacher learning from scratch
  snapshot  the teacher's frozen greedy policy at the cutoff
  random    uniformly random actions
Tune stores everything under {store}/{experiment}/tune (s3:// works); rerunning the same command
restores the experiment and runs only the trials that are missing or failed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from typing import Any, Callable, Iterator

import numpy as np

from pipeline import layout
from pipeline.arms import ARMS, EXTRAPOLATION, IMITATOR, RANDOM, SNAPSHOT, TEACHER
from pipeline.collect import load_checkpoint
from pipeline.config import Preset, Resources
from pipeline.envs import make_env
from pipeline.errors import PipelineError
from pipeline.history import TeacherHistory
from pipeline.metrics import ENV_STEPS, EPISODIC_LENGTH, EPISODIC_RETURN, TRIAL_FINISHED
from pipeline.plan import PRIMED, TrialSpec, trial_specs
from pipeline.runtime import ensure_ray
from pipeline.rollout import ImitatorPolicy
from pipeline.schema import Transitions, check_schema
from pipeline.store import Store
from pipeline.teachers import make_teacher
from pipeline.train import load_imitator


class EvaluateError(PipelineError):
    """The grid cannot run from what is in the store; the message names what is missing."""


# --- the arms: each yields (env steps since the cutoff, episode return, episode length) per finished episode ---

Episode = tuple[int, float, int]
RUNNERS: dict[str, Callable[[TrialSpec, Store, str], Iterator[Episode]]] = {}  # arm name -> its rollout


def runs(arm: str):
    """Registers the decorated function as the rollout of `arm` (a key of pipeline.arms.ARMS)."""
    def register(function):
        RUNNERS[arm] = function
        return function
    return register


def episodes_of(batch: Transitions, offset: int, skip_partial_first: bool) -> Iterator[Episode]:
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
    history = TeacherHistory(store, experiment, spec.env_id, spec.teacher_id)
    load_checkpoint(teacher, store, history.checkpoint_path(trial.cutoff_step))
    return teacher


@runs(TEACHER)
def teacher_arm(trial: TrialSpec, store: Store, experiment: str) -> Iterator[Episode]:
    scratch = trial.test != EXTRAPOLATION
    teacher = _teacher_of(trial)[0] if scratch else _restored_teacher(trial, store, experiment)
    try:
        chunk = teacher.granularity * max(1, 1000 // teacher.granularity)
        done, first = 0, True
        while done < trial.horizon:
            batch = teacher.train_steps(min(chunk, trial.horizon - done))
            yield from episodes_of(batch, done, skip_partial_first=first)  # an episode begun before the cutoff is left out
            done, first = done + len(batch), False
    finally:
        teacher.close()


def _rollout(trial: TrialSpec, act: Callable[[Any, bool], int], observe: Callable[[float], None] = lambda r: None) -> Iterator[Episode]:
    env = make_env(trial.env_id, **trial.env_kwargs)
    try:
        obs, _ = env.reset(seed=trial.seed)
        first, total, length = True, 0.0, 0
        for step in range(1, trial.horizon + 1):
            obs, reward, terminated, truncated, _ = env.step(act(obs, first))
            observe(float(reward))
            total, length, first = total + float(reward), length + 1, False
            if terminated or truncated:
                yield step, total, length
                obs, _ = env.reset()
                first, total, length = True, 0.0, 0
    finally:
        env.close()


@runs(SNAPSHOT)
def snapshot_arm(trial: TrialSpec, store: Store, experiment: str) -> Iterator[Episode]:
    teacher = _restored_teacher(trial, store, experiment)
    try:
        yield from _rollout(trial, teacher.act)
    finally:
        teacher.close()


@runs(RANDOM)
def random_arm(trial: TrialSpec, store: Store, experiment: str) -> Iterator[Episode]:
    env = make_env(trial.env_id, **trial.env_kwargs)
    env.action_space.seed(trial.seed)
    yield from _rollout(trial, lambda obs, first: env.action_space.sample())


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


@runs(IMITATOR)
def imitator_arm(trial: TrialSpec, store: Store, experiment: str) -> Iterator[Episode]:
    model = load_trial_imitator(trial, store, experiment)
    policy = ImitatorPolicy(model, batch_size=1, temperature=trial.temperature, seed=trial.seed)
    if trial.context == PRIMED:
        policy.prime(*_pre_cutoff_steps(trial, store, experiment, model.args.context_steps))
    act = lambda obs, first: int(policy.act(np.asarray(obs)[None], np.array([first]))[0])  # noqa: E731
    yield from _rollout(trial, act, lambda reward: policy.observe(np.array([reward], np.float32)))


def _pre_cutoff_steps(trial: TrialSpec, store: Store, experiment: str, count: int):
    """The teacher's last `count` recorded steps before the cutoff: obs, action, reward, first."""
    history = TeacherHistory(store, experiment, trial.env_id, trial.teacher_spec.teacher_id)
    manifest = history.read_manifest()
    manifest.shards = [s for s in manifest.shards if s.last_step >= trial.cutoff_step - count and s.first_step < trial.cutoff_step]
    table = history.read(manifest)
    batch = Transitions.from_table(table, check_schema(table.schema, history.dir))
    keep = (batch.step >= trial.cutoff_step - count) & (batch.step < trial.cutoff_step)
    return batch.obs[keep], batch.action[keep], batch.reward[keep], batch.episode_step[keep] == 0



def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one arm, reporting every finished episode."""
    import torch
    from ray import tune
    from ray.tune.result import TIMESTEPS_TOTAL

    torch.set_num_threads(1)
    trial = TrialSpec(**config["trial"])
    # timesteps_total is the step Tune's TensorBoard logger plots against: env steps, not reports.
    for steps, episode_return, length in RUNNERS[trial.arm](trial, Store(config["store"]), config["experiment"]):
        tune.report({ENV_STEPS: steps, EPISODIC_RETURN: episode_return, EPISODIC_LENGTH: length, TIMESTEPS_TOTAL: steps})
    tune.report({ENV_STEPS: trial.horizon, TRIAL_FINISHED: True, TIMESTEPS_TOTAL: trial.horizon})


# --- the stage ---


def check_inputs(trials: list[TrialSpec], store: Store, experiment: str) -> None:
    """Every imitator finished training and every teacher checkpoint exists, before Tune starts."""
    for trial in trials:
        if trial.arm == IMITATOR:
            folder = layout.imitator_dir(experiment, trial.cutoff, trial.imitator)
            if not store.exists(f"{folder}/{layout.DONE_FILE}"):
                raise EvaluateError(f"imitator {trial.imitator} at cutoff {trial.cutoff:g} has not finished training "
                                    f"({store.url(folder)}): run train first")
        if trial.test == EXTRAPOLATION and trial.arm in (TEACHER, SNAPSHOT):
            spec = trial.teacher_spec
            path = TeacherHistory(store, experiment, spec.env_id, spec.teacher_id).checkpoint_path(trial.cutoff_step)
            if not store.exists(path):
                raise EvaluateError(f"teacher {spec.teacher_id} has no checkpoint at cutoff {trial.cutoff:g} "
                                    f"({store.url(path)}): run collect first")


def evaluate(preset: Preset, store: Store, experiment: str, log: Callable[[str], None] = print):
    """Run the missing trials of the preset's grid; returns Tune's ResultGrid."""
    import ray
    from ray import tune

    trials = trial_specs(preset)
    if not trials:
        log("evaluate: the preset lists no tests (evaluate.imitators)")
        return None
    layout.record_settings(store, layout.grid_file(experiment), [asdict(t) for t in trials],
                           what="an evaluation grid", experiment=experiment)
    check_inputs(trials, store, experiment)
    ensure_ray()
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's compact status table instead of every trial's config
    fs, path = store.arrow_fs, store.full(layout.tune_dir(experiment))
    settings = preset.evaluate
    resources = {arm: settings.trial_resources.get(arm, Resources()).tune_resources() for arm in RUNNERS}
    trainable = tune.with_resources(run_trial, lambda config: resources[config["trial"]["arm"]])
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"evaluate: resuming {store.url(layout.tune_dir(experiment))}: only missing or failed trials run")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        log(f"evaluate: {len(trials)} trials into {store.url(layout.tune_dir(experiment))}")
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([asdict(t) for t in longest_first(trials)]), "store": store.uri,
                         "experiment": experiment},
            tune_config=tune.TuneConfig(max_concurrent_trials=settings.max_concurrent_trials or _trials_that_fit(resources),
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                                        reuse_actors=True),  # most trials run for seconds: an actor start per trial would dominate
            run_config=tune.RunConfig(name=layout.TUNE_DIR, storage_path=store.full(experiment), storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=settings.max_failures), verbose=1,
                                      progress_reporter=tune.CLIReporter(
                                          metric_columns={ENV_STEPS: "env steps", EPISODIC_RETURN: "return"},
                                          parameter_columns={"trial/arm": "arm"}, max_progress_rows=12,
                                          max_report_frequency=30)),
        )
    results = tuner.fit()
    failed = [r for r in results if r.error]
    log(f"evaluate: {len(results) - len(failed)}/{len(trials)} trials finished" + (f", {len(failed)} failed" if failed else ""))
    return results


def longest_first(trials: list[TrialSpec]) -> list[TrialSpec]:
    """The grid in the order Tune should start it: long trials first, so that the last ones to
    finish are short (with the long ones last, the run ends waiting on them with idle CPUs)."""
    return sorted(trials, key=lambda t: -t.horizon * (1 + ARMS[t.arm].cost))


def _trials_that_fit(resources: dict[str, dict[str, float]]) -> int:
    """Trials the cluster's CPUs hold at once, counting each as the smallest arm's CPUs."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // min(r["cpu"] for r in resources.values())))


def _trial_name(trial) -> str:
    return trial.config["trial"]["trial_id"]
