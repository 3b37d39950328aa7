"""Evaluate stage: the grid of DESIGN.md's tests as one Ray Tune experiment, one trial per arm.

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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.collect import TeacherSpec, load_checkpoint, teacher_specs
from pipeline.config import ConfigError, Preset, Resources, cutoff_steps, imitator_cutoffs, task_id
from pipeline.envs import make_env
from pipeline.history import TeacherHistory
from pipeline.metrics import ENV_STEPS, EPISODIC_LENGTH, EPISODIC_RETURN, TRIAL_FINISHED
from pipeline.runtime import ensure_ray
from pipeline.rollout import ImitatorPolicy
from pipeline.schema import Transitions, check_schema
from pipeline.store import Store
from pipeline.teachers import algo_config, make_teacher
from pipeline.train import DONE_FILE, imitator_specs, imitators_dir, load_imitator

TUNE_DIR = "tune"
GRID_FILE = "_grid.json"  # the trials of this experiment; a rerun with another grid is refused


class EvaluateError(RuntimeError):
    """The grid cannot run from what is in the store; the message names what is missing."""


@dataclass(frozen=True)
class TrialSpec:
    """One arm on one env/task, cutoff and seed; JSON-able (it is the Tune trial's config)."""

    trial_id: str
    test: str  # extrapolation | transfer | control
    group: str  # the imitator group
    arm: str  # imitator | teacher | snapshot | random
    env_id: str
    env_kwargs: dict[str, Any]
    task_id: str
    seed: int  # the bootstrap unit: the teacher's number in the group (extrapolation) or the run on a held-out task
    cutoff: float
    cutoff_step: int
    horizon: int
    teacher: dict[str, Any] = field(default_factory=dict)  # TeacherSpec of the teacher arm's teacher, as a dict
    imitator: str = ""  # imitator name ({group}-{size}-ctx{T}); imitator arm only
    context: str = ""  # primed | empty; imitator arm only
    temperature: float = 1.0


def trial_specs(preset: Preset) -> list[TrialSpec]:
    teachers = teacher_specs(preset)
    imitators = imitator_specs(preset)
    trials: list[TrialSpec] = []
    for name, test in preset.evaluate.imitators.items():
        group = preset.train.imitators[name]
        members = [t for t in teachers if t.group in group.teachers]
        collected = preset.collect.teachers[group.teachers[0]]
        unit = algo_config(collected.algo, collected.algo_config).granularity
        steps = {f: s for s, f in cutoff_steps(collected.budget, preset.collect.cutoffs, unit).items()}
        variants = [s for s in imitators if s.group == name]
        for cutoff in imitator_cutoffs(group, preset.collect):
            common = dict(group=name, cutoff=cutoff, cutoff_step=steps[cutoff], horizon=test.horizon, temperature=group.temperature)
            if cutoff < 1.0:
                for number, teacher in enumerate(members[:test.teachers]):
                    trials += _extrapolation(teacher, number, [v for v in variants if v.cutoff == cutoff], test.contexts, common)
            for index, (env_id, kwargs, task) in enumerate(_heldout(collected)[:test.heldout]):
                for seed in test.heldout_seeds:
                    scratch = replace_teacher(members[0], env_id, kwargs, task, seed)
                    trials += _transfer(scratch, index, [v for v in variants if v.cutoff == cutoff],
                                        "control" if cutoff == 1.0 else "transfer", common)
    return trials


def replace_teacher(spec: TeacherSpec, env_id: str, kwargs: dict, task: str, seed: int) -> TeacherSpec:
    """A fresh teacher like `spec` on a held-out task or env: the transfer tests' from-scratch arm."""
    return TeacherSpec(**{**asdict(spec), "teacher_id": f"{spec.group}-scratch-{task}-s{seed}",
                          "env_id": env_id, "env_kwargs": kwargs, "task_id": task, "seed": seed})


def _heldout(group) -> list[tuple[str, dict, str]]:
    """(env id, gym.make kwargs, task id) of each held-out task, then of each held-out env."""
    tasks = [(group.env, {**group.env_kwargs, **task}, task_id(task)) for task in group.heldout_tasks]
    return tasks + [(env_id, dict(group.env_kwargs), env_id.replace("/", "-")) for env_id in group.heldout_envs]


def _extrapolation(teacher: TeacherSpec, number: int, variants, contexts: list[str], common: dict) -> list[TrialSpec]:
    base = dict(test="extrapolation", env_id=teacher.env_id, env_kwargs=teacher.env_kwargs, task_id=teacher.task_id,
                seed=number, teacher=asdict(teacher), **common)
    prefix = f"x-{teacher.teacher_id}-c{common['cutoff']:g}"
    trials = [TrialSpec(trial_id=f"{prefix}-{arm}", arm=arm, **base) for arm in ("teacher", "snapshot", "random")]
    return trials + [TrialSpec(trial_id=f"{prefix}-{v.name}-{context}", arm="imitator", imitator=v.name, context=context, **base)
                     for v in variants for context in contexts]


def _transfer(scratch: TeacherSpec, index: int, variants, test: str, common: dict) -> list[TrialSpec]:
    base = dict(test=test, env_id=scratch.env_id, env_kwargs=scratch.env_kwargs, task_id=scratch.task_id,
                seed=index * 1000 + scratch.seed, teacher=asdict(scratch), **common)
    prefix = f"{test[0]}-{scratch.teacher_id}-c{common['cutoff']:g}"
    trials = [TrialSpec(trial_id=f"{prefix}-{arm}", arm=arm, **base) for arm in ("teacher", "random")]
    return trials + [TrialSpec(trial_id=f"{prefix}-{v.name}-empty", arm="imitator", imitator=v.name, context="empty", **base)
                     for v in variants]


# --- the arms: each yields (env steps since the cutoff, episode return, episode length) per finished episode ---

Episode = tuple[int, float, int]


def episodes_of(batch: Transitions, offset: int, skip_partial_first: bool) -> Iterator[Episode]:
    """Finished episodes of a batch of transitions, the step counted from `offset`."""
    ends = np.flatnonzero(batch.terminated | batch.truncated)
    start = 0
    for end in ends:
        if not (skip_partial_first and start == 0 and batch.episode_step[0] > 0):
            yield offset + int(end) + 1, float(batch.reward[start:end + 1].sum()), int(end - start + 1)
        start = end + 1


def _teacher_of(trial: TrialSpec):
    spec = TeacherSpec(**{**trial.teacher, "cutoffs": tuple(trial.teacher["cutoffs"])})
    return make_teacher(spec.algo, spec.env_id, spec.env_kwargs, seed=spec.seed, budget=spec.budget, config=spec.algo_config), spec


def _restored_teacher(trial: TrialSpec, store: Store, experiment: str):
    teacher, spec = _teacher_of(trial)
    history = TeacherHistory(store, experiment, spec.env_id, spec.teacher_id)
    load_checkpoint(teacher, store, history.checkpoint_path(trial.cutoff_step))
    return teacher


def teacher_arm(trial: TrialSpec, store: Store, experiment: str) -> Iterator[Episode]:
    scratch = trial.test != "extrapolation"
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


def snapshot_arm(trial: TrialSpec, store: Store, experiment: str) -> Iterator[Episode]:
    teacher = _restored_teacher(trial, store, experiment)
    try:
        yield from _rollout(trial, teacher.act)
    finally:
        teacher.close()


def random_arm(trial: TrialSpec, store: Store, experiment: str) -> Iterator[Episode]:
    env = make_env(trial.env_id, **trial.env_kwargs)
    env.action_space.seed(trial.seed)
    yield from _rollout(trial, lambda obs, first: env.action_space.sample())


def load_trial_imitator(trial: TrialSpec, store: Store, experiment: str):
    """The trial's frozen imitator, on the GPU Ray gave the trial (evaluate.trial_resources), else the CPU."""
    import ray

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    folder = f"{imitators_dir(experiment, trial.cutoff)}/{trial.imitator}"
    done = json.loads(store.read_bytes(f"{folder}/{DONE_FILE}"))
    checkpoint = os.path.basename(done["checkpoint"].rstrip("/"))
    with tempfile.TemporaryDirectory() as local:
        store.download_dir(f"{folder}/{checkpoint}", local)
        return load_imitator(local, device)


def imitator_arm(trial: TrialSpec, store: Store, experiment: str) -> Iterator[Episode]:
    model = load_trial_imitator(trial, store, experiment)
    policy = ImitatorPolicy(model, batch_size=1, temperature=trial.temperature, seed=trial.seed)
    if trial.context == "primed":
        policy.prime(*_pre_cutoff_steps(trial, store, experiment, model.args.context_steps))
    act = lambda obs, first: int(policy.act(np.asarray(obs)[None], np.array([first]))[0])  # noqa: E731
    yield from _rollout(trial, act, lambda reward: policy.observe(np.array([reward], np.float32)))


def _pre_cutoff_steps(trial: TrialSpec, store: Store, experiment: str, count: int):
    """The teacher's last `count` recorded steps before the cutoff: obs, action, reward, first."""
    history = TeacherHistory(store, experiment, trial.env_id, trial.teacher["teacher_id"])
    manifest = history.read_manifest()
    manifest.shards = [s for s in manifest.shards if s.last_step >= trial.cutoff_step - count and s.first_step < trial.cutoff_step]
    table = history.read(manifest)
    batch = Transitions.from_table(table, check_schema(table.schema, history.dir))
    keep = (batch.step >= trial.cutoff_step - count) & (batch.step < trial.cutoff_step)
    return batch.obs[keep], batch.action[keep], batch.reward[keep], batch.episode_step[keep] == 0


ARMS = {"imitator": imitator_arm, "teacher": teacher_arm, "snapshot": snapshot_arm, "random": random_arm}


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one arm, reporting every finished episode."""
    import torch
    from ray import tune

    torch.set_num_threads(1)
    trial = TrialSpec(**config["trial"])
    for steps, episode_return, length in ARMS[trial.arm](trial, Store(config["store"]), config["experiment"]):
        tune.report({ENV_STEPS: steps, EPISODIC_RETURN: episode_return, EPISODIC_LENGTH: length})
    tune.report({ENV_STEPS: trial.horizon, TRIAL_FINISHED: True})


# --- the stage ---


def check_inputs(trials: list[TrialSpec], store: Store, experiment: str) -> None:
    """Every imitator finished training and every teacher checkpoint exists, before Tune starts."""
    for trial in trials:
        if trial.arm == "imitator":
            folder = f"{imitators_dir(experiment, trial.cutoff)}/{trial.imitator}"
            if not store.exists(f"{folder}/{DONE_FILE}"):
                raise EvaluateError(f"imitator {trial.imitator} at cutoff {trial.cutoff:g} has not finished training "
                                    f"({store.url(folder)}): run train first")
        if trial.test == "extrapolation" and trial.arm in ("teacher", "snapshot"):
            spec = trial.teacher
            path = TeacherHistory(store, experiment, spec["env_id"], spec["teacher_id"]).checkpoint_path(trial.cutoff_step)
            if not store.exists(path):
                raise EvaluateError(f"teacher {spec['teacher_id']} has no checkpoint at cutoff {trial.cutoff:g} "
                                    f"({store.url(path)}): run collect first")


def evaluate(preset: Preset, store: Store, experiment: str, log: Callable[[str], None] = print):
    """Run the missing trials of the preset's grid; returns Tune's ResultGrid."""
    import ray
    from ray import tune

    trials = trial_specs(preset)
    if not trials:
        log("evaluate: the preset lists no tests (evaluate.imitators)")
        return None
    _check_same_grid(store, experiment, trials)
    check_inputs(trials, store, experiment)
    ensure_ray()
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's compact status table instead of every trial's config
    fs, path = store.arrow_fs, store.full(f"{experiment}/{TUNE_DIR}")
    settings = preset.evaluate
    resources = {arm: settings.trial_resources.get(arm, Resources()).tune_resources() for arm in ARMS}
    trainable = tune.with_resources(run_trial, lambda config: resources[config["trial"]["arm"]])
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"evaluate: resuming {store.url(f'{experiment}/{TUNE_DIR}')}: only missing or failed trials run")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        log(f"evaluate: {len(trials)} trials into {store.url(f'{experiment}/{TUNE_DIR}')}")
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([asdict(t) for t in longest_first(trials)]), "store": store.uri,
                         "experiment": experiment},
            tune_config=tune.TuneConfig(max_concurrent_trials=settings.max_concurrent_trials or _trials_that_fit(resources),
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                                        reuse_actors=True),  # most trials run for seconds: an actor start per trial would dominate
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=store.full(experiment), storage_filesystem=fs,
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


ARM_COST = {"teacher": 4, "imitator": 2, "snapshot": 1, "random": 0}  # rough relative cost per env step


def longest_first(trials: list[TrialSpec]) -> list[TrialSpec]:
    """The grid in the order Tune should start it: long trials first, so that the last ones to
    finish are short (with the long ones last, the run ends waiting on them with idle CPUs)."""
    return sorted(trials, key=lambda t: -t.horizon * (1 + ARM_COST[t.arm]))


def _trials_that_fit(resources: dict[str, dict[str, float]]) -> int:
    """Trials the cluster's CPUs hold at once, counting each as the smallest arm's CPUs."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // min(r["cpu"] for r in resources.values())))


def _trial_name(trial) -> str:
    return trial.config["trial"]["trial_id"]


def _check_same_grid(store: Store, experiment: str, trials: list[TrialSpec]) -> None:
    path = f"{experiment}/{GRID_FILE}"
    grid = json.dumps([asdict(t) for t in trials], sort_keys=True)
    try:
        old = store.read_bytes(path).decode()
    except FileNotFoundError:
        store.write_bytes(path, grid.encode())
        return
    if json.loads(old) != json.loads(grid):
        raise ConfigError(f"experiment {experiment!r} already holds an evaluation grid with other trials; "
                          "use another --experiment, or the settings it was started with")
