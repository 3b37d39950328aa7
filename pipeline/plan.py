"""The plan of a run: what each stage will do, as pure functions of the preset. No Ray, no torch.

    teachers = teacher_specs(preset)     # collect: one TeacherSpec per (group, task, seed)
    imitators = imitator_specs(preset)   # train: one ImitatorSpec per (group, cutoff, size, context)
    trials = trial_specs(preset)         # evaluate: one TrialSpec per (test, unit, arm, variant)
    batches = trial_batches(trials, preset.evaluate.lockstep)   # evaluate: the Tune trials that run them

Each spec is stored beside what its stage writes (layout.py), so a rerun with other settings is
refused instead of mixing two experiments. The cutoff steps are computed here only.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline import layout
from pipeline.arms import CONTROL, EXTRAPOLATION, IMITATOR, IN_DATA, TEACHER, TRANSFER, arms_for
from pipeline.envs import make_env
from pipeline.schema import ObsEncoding
from pipeline.teachers import algo_config

PRIMED, EMPTY = "primed", "empty"  # an imitator's context at the start of its rollout (evaluate.imitators.*.contexts)

# --- names ---


def task_id(task: dict[str, Any]) -> str:
    """Path-safe name of a task: {"goal": [2, 7]} -> "goal2x7"; {} -> "default"."""
    if not task:
        return "default"
    flat = lambda v: "x".join(flat(x) for x in v) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    return re.sub(r"[^A-Za-z0-9_.x-]", "_", "_".join(f"{key}{flat(value)}" for key, value in sorted(task.items())))


def teacher_id(group: str, task: dict[str, Any], seed: int) -> str:
    return f"{group}-s{seed}" if not task else f"{group}-{task_id(task)}-s{seed}"


# --- cutoffs ---


def cutoff_steps(budget: int, cutoffs: list[float], granularity: int) -> dict[int, float]:
    """Step of each cutoff fraction, rounded to whole training iterations; the end is cutoff 1.0."""
    steps = {granularity * round(c * budget / granularity): c for c in cutoffs}
    return steps | {budget: 1.0}


def in_data_prime_step(cutoff_step: int, fraction: float, granularity: int) -> int:
    """The in-data control's prime step c': `fraction` of the cutoff step, rounded down to whole
    training iterations (0 when less than one fits: an empty context at the teacher's start)."""
    return granularity * int(round(fraction * cutoff_step / granularity, 6))  # round(): 2.9999999999999996 is 3


def group_cutoff_steps(group, cutoffs: list[float]) -> dict[float, int]:
    """Cutoff fraction -> env step, for a collect teacher group (config.TeacherGroup)."""
    unit = algo_config(group.algo, group.algo_config).granularity
    return {fraction: step for step, fraction in cutoff_steps(group.budget, list(cutoffs), unit).items()}


def imitator_cutoffs(imitators, collect) -> list[float]:
    """An imitator group's cutoffs (config.ImitatorGroup), collect.cutoffs when it names none."""
    return imitators.cutoffs if imitators.cutoffs is not None else collect.cutoffs


# --- collect ---


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
    # A stream of a learner of several envs (algo_config.num_envs > 1): the learner's id (its
    # checkpoints' owner) and this env's index; "" and 0 for a teacher of its own.
    learner: str = ""
    stream: int = 0

    @property
    def granularity(self) -> int:
        return algo_config(self.algo, self.algo_config).granularity

    @property
    def learner_id(self) -> str:
        """Who learns this history and owns the checkpoints: the teacher itself, or its learner."""
        return self.learner or self.teacher_id

    def stops(self, shard_steps: int, checkpoint_steps: int | None) -> list[Stop]:
        """The steps where collect pauses, and what it does at each; all whole training iterations."""
        unit = self.granularity
        whole = lambda steps: -(-steps // unit) * unit  # noqa: E731  (round up to whole iterations)
        cutoffs = cutoff_steps(self.budget, list(self.cutoffs), unit)
        commits = set(range(whole(checkpoint_steps), self.budget, whole(checkpoint_steps))) if checkpoint_steps else set()
        commits.add(self.budget)
        shards = set(range(whole(shard_steps), self.budget, whole(shard_steps))) | commits
        return [Stop(step, cutoffs.get(step), step in shards, step in commits) for step in sorted(cutoffs.keys() | shards)]

    def settings(self) -> dict[str, Any]:
        """As stored in _teacher.json (JSON types); a teacher of its own stores no learner fields, as
        before they existed."""
        settings = json.loads(json.dumps(asdict(self)))
        return settings if self.learner else {k: v for k, v in settings.items() if k not in ("learner", "stream")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherSpec:
        return cls(**{**d, "cutoffs": tuple(d["cutoffs"])})


def teacher_specs(preset) -> list[TeacherSpec]:
    """One spec per (group, task, seed); a learner of K envs gives K specs, {id}-e{k}, one per stream."""
    specs = []
    for name, group in preset.collect.teachers.items():
        streams = getattr(algo_config(group.algo, group.algo_config), "num_envs", 1)
        for task in group.tasks:
            for seed in group.seeds:
                spec = TeacherSpec(
                    teacher_id=teacher_id(name, task, seed), group=name, env_id=group.env, env_kwargs={**group.env_kwargs, **task},
                    task_id=task_id(task), seed=seed, algo=group.algo, algo_config=group.algo_config, budget=group.budget,
                    cutoffs=tuple(preset.collect.cutoffs))
                specs += [spec] if streams == 1 else [replace(spec, teacher_id=f"{spec.teacher_id}-e{k}", learner=spec.teacher_id, stream=k)
                                                      for k in range(streams)]
    return specs


def learners(specs: list[TeacherSpec]) -> list[list[TeacherSpec]]:
    """The specs grouped by learner, streams in order, learners in the order they first appear."""
    grouped: dict[str, list[TeacherSpec]] = {}
    for spec in specs:
        grouped.setdefault(spec.learner_id, []).append(spec)
    return [sorted(streams, key=lambda s: s.stream) for streams in grouped.values()]


# --- train ---


@dataclass(frozen=True)
class ImitatorSpec:
    """One imitator: a group of teachers, a cutoff, a model size and a context length."""

    group: str
    name: str  # {group}-{size}-ctx{context_steps}
    cutoff: float
    cutoff_step: int  # rows with step < cutoff_step are its training data
    env_id: str
    model_args: dict[str, Any]  # pipeline.model.ModelArgs as a dict
    hparams: dict[str, Any]  # the ImitatorGroup's training settings
    train_teachers: tuple[str, ...]
    val_teachers: tuple[str, ...]
    size: str = ""  # the model size's name in the preset (train.imitators.{group}.sizes)

    def dir(self, experiment: str) -> str:
        return layout.imitator_dir(experiment, self.cutoff, self.name)

    def settings(self) -> dict[str, Any]:
        """As stored in _imitator.json (JSON types)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImitatorSpec:
        """Also reads an _imitator.json written before `size` was stored: the size is then the middle
        of its name, {group}-{size}-ctx{T}."""
        size = d.get("size") or d["name"].removeprefix(f"{d['group']}-").rsplit("-ctx", 1)[0]
        return cls(**{**d, "size": size, "train_teachers": tuple(d["train_teachers"]),
                      "val_teachers": tuple(d["val_teachers"])})


def held_out(teacher_ids: list[str], fraction: float) -> set[str]:
    """A fixed share of teachers for validation, chosen by a hash of their ids (stable across runs)."""
    if fraction == 0 or len(teacher_ids) < 2:
        return set()
    count = min(len(teacher_ids) - 1, max(1, round(fraction * len(teacher_ids))))
    return set(sorted(teacher_ids, key=lambda t: zlib.crc32(t.encode()))[:count])


def model_args(env_id: str, env_kwargs: dict, group, size, context_steps: int) -> dict[str, Any]:
    """pipeline.model.ModelArgs of an imitator, as a dict (the env tells observations and actions)."""
    env = make_env(env_id, **env_kwargs)
    try:
        encoding = ObsEncoding.for_space(env.observation_space)
        n_actions = int(env.action_space.n)
    finally:
        env.close()
    return dict(obs_kind=encoding.kind, obs_shape=list(encoding.shape), obs_n=encoding.n, n_actions=n_actions,
                n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd, context_steps=context_steps,
                frame_stack=group.frame_stack if encoding.kind == "image" else 1, dropout=size.dropout)


def imitator_specs(preset) -> list[ImitatorSpec]:
    teachers = teacher_specs(preset)
    specs = []
    for name, group in preset.train.imitators.items():
        members = [t for t in teachers if t.group in group.teachers]
        validation = held_out(sorted({t.learner_id for t in members}), group.val_fraction)  # whole learners
        first = preset.collect.teachers[group.teachers[0]]
        steps = group_cutoff_steps(first, preset.collect.cutoffs)
        hparams = {k: v for k, v in asdict(group).items() if k not in ("teachers", "cutoffs", "sizes", "context_steps")}
        for cutoff in imitator_cutoffs(group, preset.collect):
            for size_name, size in group.sizes.items():
                for context in group.context_steps:
                    specs.append(ImitatorSpec(
                        group=name, name=f"{name}-{size_name}-ctx{context}", cutoff=cutoff, cutoff_step=steps[cutoff],
                        env_id=first.env, model_args=model_args(first.env, members[0].env_kwargs, group, size, context),
                        hparams=hparams, size=size_name,
                        train_teachers=tuple(t.teacher_id for t in members if t.learner_id not in validation),
                        val_teachers=tuple(t.teacher_id for t in members if t.learner_id in validation)))
    return specs


# --- evaluate ---


@dataclass(frozen=True)
class TrialSpec:
    """One arm on one env/task, cutoff and seed: the unit the report reads, under its trial_id.
    JSON-able; a TrialBatch of them is one Tune trial's config."""

    trial_id: str
    test: str  # arms.TESTS
    group: str  # the imitator group
    arm: str  # a key of arms.ARMS
    env_id: str
    env_kwargs: dict[str, Any]
    task_id: str
    seed: int  # the unit intervals are over: the teacher's number in the group (extrapolation) or the run on a held-out task
    cutoff: float
    cutoff_step: int
    horizon: int  # env steps it runs: the group's H; for the in-data control, cutoff_step - prime_step
    teacher: dict[str, Any] = field(default_factory=dict)  # TeacherSpec of the teacher arm's teacher, as a dict
    imitator: str = ""  # imitator name ({group}-{size}-ctx{T}); imitator and in-data arms only
    context: str = ""  # PRIMED | EMPTY; imitator and in-data arms only
    temperature: float = 1.0
    prime_step: int | None = None  # in-data arm: the step c' its context is primed before; None: the cutoff step

    @property
    def primed_until(self) -> int:
        """The step before which the teacher's recorded steps prime a primed context."""
        return self.cutoff_step if self.prime_step is None else self.prime_step

    @property
    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec.from_dict(self.teacher)


def trial_specs(preset) -> list[TrialSpec]:
    teachers = teacher_specs(preset)
    imitators = imitator_specs(preset)
    trials: list[TrialSpec] = []
    for name, test in preset.evaluate.imitators.items():
        group = preset.train.imitators[name]
        members = [t for t in teachers if t.group in group.teachers]
        collected = preset.collect.teachers[group.teachers[0]]
        steps = group_cutoff_steps(collected, preset.collect.cutoffs)
        for cutoff in imitator_cutoffs(group, preset.collect):
            variants = [s for s in imitators if s.group == name and s.cutoff == cutoff]
            common = dict(group=name, cutoff=cutoff, cutoff_step=steps[cutoff], horizon=test.horizon, temperature=group.temperature)
            if cutoff < 1.0:  # the units: teachers, and of a learner of several envs its first stream only
                for number, teacher in enumerate([t for t in members if t.stream == 0][:test.teachers]):
                    trials += _extrapolation(teacher, number, variants, test, common)
            for index, (env_id, kwargs, task) in enumerate(heldout_targets(collected)[:test.heldout]):
                for seed in test.heldout_seeds:
                    scratch = scratch_teacher(members[0], env_id, kwargs, task, seed)
                    trials += _transfer(scratch, index, variants, CONTROL if cutoff == 1.0 else TRANSFER, common)
    return trials


def scratch_teacher(spec: TeacherSpec, env_id: str, kwargs: dict, task: str, seed: int) -> TeacherSpec:
    """A fresh teacher like `spec` on a held-out task or env: the transfer tests' from-scratch arm."""
    return TeacherSpec(**{**asdict(spec), "teacher_id": f"{spec.group}-scratch-{task}-s{seed}",
                          "env_id": env_id, "env_kwargs": kwargs, "task_id": task, "seed": seed, "learner": "", "stream": 0})


def heldout_targets(group) -> list[tuple[str, dict, str]]:
    """(env id, gym.make kwargs, task id) of each held-out task of a teacher group, then of each held-out env."""
    tasks = [(group.env, {**group.env_kwargs, **task}, task_id(task)) for task in group.heldout_tasks]
    return tasks + [(env_id, dict(group.env_kwargs), env_id.replace("/", "-")) for env_id in group.heldout_envs]


def _arm_trials(test: str, prefix: str, base: dict, variants: list[ImitatorSpec], contexts: list[str]) -> list[TrialSpec]:
    """The trials of one unit: every arm of the test, the imitator once per variant and context; not
    the in-data control (_extrapolation adds it)."""
    trials = [TrialSpec(trial_id=f"{prefix}-{arm}", arm=arm, **base)
              for arm in arms_for(test) if arm not in (IMITATOR, IN_DATA)]
    return trials + [TrialSpec(trial_id=f"{prefix}-{v.name}-{context}", arm=IMITATOR, imitator=v.name, context=context, **base)
                     for v in variants for context in contexts]


def _extrapolation(teacher: TeacherSpec, number: int, variants: list[ImitatorSpec], test,
                   common: dict) -> list[TrialSpec]:
    """The trials of one teacher's unit; with primed contexts and test.in_data_fraction (config.EvaluateGroup),
    also the in-data control of each variant."""
    base = dict(test=EXTRAPOLATION, env_id=teacher.env_id, env_kwargs=teacher.env_kwargs, task_id=teacher.task_id,
                seed=number, teacher=teacher.settings(), **common)
    prefix = f"x-{teacher.teacher_id}-c{common['cutoff']:g}"
    trials = _arm_trials(EXTRAPOLATION, prefix, base, variants, test.contexts)
    if test.in_data_fraction is None or PRIMED not in test.contexts:
        return trials
    start = in_data_prime_step(common["cutoff_step"], test.in_data_fraction, teacher.granularity)
    in_data = {**base, "horizon": common["cutoff_step"] - start}  # the stretch from c' to c, whatever H is
    return trials + [TrialSpec(trial_id=f"{prefix}-{v.name}-{PRIMED}-{IN_DATA}", arm=IN_DATA, imitator=v.name,
                               context=PRIMED, prime_step=start, **in_data) for v in variants]


def _transfer(scratch: TeacherSpec, index: int, variants: list[ImitatorSpec], test: str, common: dict) -> list[TrialSpec]:
    base = dict(test=test, env_id=scratch.env_id, env_kwargs=scratch.env_kwargs, task_id=scratch.task_id,
                seed=index * 1000 + scratch.seed, teacher=scratch.settings(), **common)
    return _arm_trials(test, f"{test[0]}-{scratch.teacher_id}-c{common['cutoff']:g}", base, variants, [EMPTY])


@dataclass(frozen=True)
class TrialBatch:
    """Units (TrialSpecs) that one Tune trial steps in lockstep, each in its own env, for the same
    horizon: one test, group, cutoff, arm, imitator and context. Named by its only unit's trial_id,
    else by what its units share and its number."""

    batch_id: str
    units: tuple[TrialSpec, ...]

    @property
    def arm(self) -> str:
        return self.units[0].arm

    @property
    def horizon(self) -> int:
        return self.units[0].horizon

    def config(self) -> dict[str, Any]:
        """As the Tune trial's config holds it (JSON types); `arm` is there for Tune's resources and table."""
        return {"batch_id": self.batch_id, "arm": self.arm, "units": [asdict(unit) for unit in self.units]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrialBatch:
        return cls(config["batch_id"], tuple(TrialSpec(**unit) for unit in config["units"]))


def trial_batches(trials: list[TrialSpec], lockstep: int) -> list[TrialBatch]:
    """The grid's units grouped into Tune trials of at most `lockstep` units each, split evenly:
    units of one test, group, cutoff, arm, imitator and context share a trial, in grid order.
    A trial of the imitator steps all its envs through one model call per step, and the snapshot
    and random arms at least share the trial's start and its reports. The teacher arm keeps one
    unit per trial: a teacher that keeps learning costs its own updates per step, which stepping
    several teachers together would not share."""
    groups: dict[tuple, list[TrialSpec]] = {}
    for trial in trials:
        key = (trial.trial_id,) if trial.arm == TEACHER else (
            trial.test, trial.group, trial.cutoff, trial.arm, trial.imitator, trial.context)
        groups.setdefault(key, []).append(trial)
    return [TrialBatch(_batch_id(chunk, number), tuple(chunk))
            for members in groups.values() for number, chunk in enumerate(_even_chunks(members, lockstep))]


def _even_chunks(members: list, most: int) -> list[list]:
    count = -(-len(members) // most)
    return [members[i * len(members) // count:(i + 1) * len(members) // count] for i in range(count)]


def _batch_id(units: list[TrialSpec], number: int) -> str:
    if len(units) == 1:
        return units[0].trial_id
    unit = units[0]
    variant = f"{unit.imitator}-{unit.context}" if unit.imitator else unit.group
    arm = "" if unit.arm == IMITATOR else f"-{unit.arm}"
    return f"{unit.test}-c{unit.cutoff:g}-{variant}{arm}-b{number}"
