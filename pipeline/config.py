"""Presets: YAML files in jobs/presets/, loaded into typed configs, one per stage.

    preset = load_preset("quick", overrides=["collect.teachers.darkroom.budget=4000"], smoke=False)

Every problem (unknown key, wrong type, unknown env id, an env that rejects its kwargs, an
algorithm that cannot run on the env) raises ConfigError naming the key, before any work starts.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import field, replace
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from pipeline.arms import ARMS
from pipeline.envs import make_env
from pipeline.errors import BadInput, ConfigError
from pipeline.layout import check_name
from pipeline.metrics import VerdictRules
from pipeline.plan import cutoff_steps, group_cutoff_steps, imitator_cutoffs, teacher_id
from pipeline.teachers import ALGORITHMS, algo_config

PRESETS_DIR = Path(__file__).resolve().parent.parent / "jobs" / "presets"  # in a checkout
PRESETS_ENV = "CUTOFF_PRESETS_DIR"  # where an installed package (the Docker image) finds them
SMOKE_BUDGET = 400  # env steps per teacher under --smoke
SMOKE_TRAIN_STEPS = 10  # optimizer steps per imitator under --smoke
SMOKE_CONTEXT = 32  # context steps of the smoke imitators
SMOKE_HORIZON = 200  # env steps per evaluation arm under --smoke
_STRICT = ConfigDict(extra="forbid")


@dataclass(config=_STRICT)
class TeacherGroup:
    """Teachers of one algorithm on one env: one teacher per (task, seed)."""

    env: str  # Gymnasium env id, e.g. DarkRoom-v0, CartPole-v1, ALE/Breakout-v5
    algo: str  # a key of pipeline.teachers.ALGORITHMS
    budget: int = Field(gt=0)  # env steps in each teacher's life
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to gym.make for every task
    tasks: list[dict[str, Any]] = Field(default_factory=lambda: [{}], min_length=1)  # per-task gym.make kwargs
    heldout_tasks: list[dict[str, Any]] = field(default_factory=list)  # never collected: for transfer tests
    heldout_envs: list[str] = field(default_factory=list)  # env ids never collected: transfer targets
    algo_config: dict[str, Any] = field(default_factory=dict)  # the algorithm's typed config


@dataclass(config=_STRICT)
class Resources:
    """What one teacher actor or evaluation trial asks Ray for. On a cluster this is what places
    it: no GPUs asked, no GPU needed; memory reserved (Ray's `memory` resource) keeps a node from
    taking more replay buffers than it holds; custom resources name node types of a cluster file."""

    cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)
    memory_gb: float = Field(0, ge=0)  # 0: none reserved
    custom: dict[str, float] = field(default_factory=dict)  # e.g. {"cpu_node": 1}, declared by the cluster's nodes

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments of Ray's .options() for an actor or task."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "memory": int(self.memory_gb * 2**30) or None,
                "resources": dict(self.custom) or None}

    def tune_resources(self) -> dict[str, float]:
        """The resource dict tune.with_resources takes for a trial."""
        return {"cpu": self.cpus, "gpu": self.gpus, **({"memory": self.memory_gb * 2**30} if self.memory_gb else {}),
                **self.custom}


@dataclass(config=_STRICT)
class CollectConfig:
    teachers: dict[str, TeacherGroup]  # group name -> group; the name prefixes its teacher ids
    cutoffs: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # fractions of each budget
    shard_steps: int = Field(50_000, gt=0)  # most rows in one Parquet shard
    # Commit shards with a resume checkpoint every this many steps (None: only at the end); a
    # crashed teacher redoes at most this many. Cutoff checkpoints are saved whatever this is.
    checkpoint_steps: int | None = Field(None, gt=0)
    num_actors: int | None = Field(None, gt=0)  # teacher actors; None: as many as the cluster's CPUs fit
    actor: Resources = field(default_factory=Resources)  # what each teacher actor asks Ray for


@dataclass(config=_STRICT)
class ModelSize:
    n_layer: int = Field(2, gt=0)
    n_head: int = Field(2, gt=0)
    n_embd: int = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


@dataclass(config=_STRICT)
class ImitatorGroup:
    """Imitators fit on the histories of teacher groups of one env: one per cutoff x size x context.

    The experimental axes are `cutoffs`, `sizes` and `context_steps` (no context length may
    suffice, so it is an axis, not a tuned hyperparameter). Every window is the full stream of a
    teacher's history: no episodes are subsampled.
    """

    teachers: list[str] = Field(min_length=1)  # collect group names; all on one env
    cutoffs: list[float] | None = Field(None, min_length=1)  # fractions of the budget; None: collect.cutoffs. 1.0: full histories
    sizes: dict[str, ModelSize] = Field(default_factory=lambda: {"small": ModelSize()}, min_length=1)
    context_steps: list[int] = Field(default_factory=lambda: [64], min_length=1)  # steps the transformer attends to
    frame_stack: int = Field(4, gt=0)  # image observations: frames per token
    # Steps per training window; None: context_steps. Attention spans context_steps steps per layer
    # (sliding window, pipeline/model.py), so rollouts past the context reach back further through
    # deeper layers; windows longer than the context train that reach too, at more cost.
    window_steps: int | None = Field(None, gt=0)
    window_stride: int | None = Field(None, gt=0)  # steps between window starts; None: half a window
    val_fraction: float = Field(0.0, ge=0, lt=1)  # teachers held out for the validation loss (by id hash)
    batch_size: int = Field(32, gt=0)  # windows per optimizer step, over all workers
    steps: int = Field(1000, gt=0)  # optimizer steps
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)  # cosine decay after warmup ends here
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    report_every: int = Field(50, gt=0)  # optimizer steps between metric reports (and validation)
    checkpoint_every: int = Field(200, gt=0)  # optimizer steps between checkpoints
    shuffle_buffer: int = Field(512, ge=0)  # windows in Ray Data's local shuffle buffer
    temperature: float = Field(1.0, ge=0)  # rollouts: 0 greedy, else softmax sampling


@dataclass(config=_STRICT)
class TrainConfig:
    imitators: dict[str, ImitatorGroup] = field(default_factory=dict)
    num_workers: int = Field(1, gt=0)  # Ray Train workers per job (data parallel)
    use_gpu: bool | Literal["auto"] = False  # one GPU per worker; auto: if the cluster has GPUs when train starts
    cpus_per_worker: float = Field(1, gt=0)
    # The most imitators one Ray Train job fits, one after another. A job costs about 25 s on 2
    # cores (controller, worker, the first read of the data), paid once; each further imitator in
    # it about a second beyond its training (BENCHMARKS.md).
    imitators_per_job: int = Field(8, gt=0)
    # Ray Train jobs run at once; the imitators are spread over at least this many jobs. On a
    # small machine a job is one torch thread, so two at once (with half a CPU per worker, which
    # leaves Ray Data's read tasks a CPU) use it better than one after the other.
    concurrent: int = Field(1, gt=0)
    max_failures: int = Field(3, ge=0)  # worker failures a job survives; each resumes from the newest checkpoint


@dataclass(config=_STRICT)
class EvaluateGroup:
    """The tests run with one imitator group (docs/design.md): every cutoff below 1.0 of the group
    gets the extrapolation test on its teachers' own tasks; if the teacher group has held-out
    tasks or envs, every cutoff (1.0 included: the positive control) gets the transfer test there,
    against a teacher learning them from scratch."""

    horizon: int = Field(gt=0)  # env steps each arm runs after the cutoff
    teachers: int | None = Field(None, gt=0)  # extrapolation: the first N teachers of the group; None: all
    heldout: int | None = Field(None, ge=0)  # transfer: the first N held-out tasks (or envs); None: all
    contexts: list[Literal["primed", "empty"]] = Field(default_factory=lambda: ["primed"], min_length=1)  # extrapolation imitators
    heldout_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)  # transfer: runs per held-out task
    # The in-data control's c'/c: with primed contexts, each cutoff imitator is also primed at this
    # fraction of the cutoff step and rolled out to the cutoff (plan.in_data_prime_step); None: off.
    in_data_fraction: float | None = Field(0.25, gt=0, lt=1)


VerdictConfig = dataclass(VerdictRules, config=_STRICT)  # a preset's evaluate.verdict, checked as the other configs


@dataclass(config=_STRICT)
class EvaluateConfig:
    imitators: dict[str, EvaluateGroup] = field(default_factory=dict)  # keyed by train.imitators group
    max_concurrent_trials: int | None = Field(None, gt=0)  # None: as many as the cluster's CPUs fit
    # What each trial asks Ray for, per arm (a key of pipeline.arms.ARMS); unlisted arms: 1 CPU.
    trial_resources: dict[str, Resources] = field(default_factory=dict)
    max_failures: int = Field(2, ge=0)  # retries of a failed trial
    window: int = Field(10, gt=0)  # W: episodes averaged by the metrics
    # Units (arm x env/task x seed) one Tune trial steps in lockstep, one env each: its imitator
    # units share one model call per step (plan.trial_batches). 1: one trial per unit. The teacher
    # arm always runs one unit per trial.
    lockstep: int = Field(16, gt=0)
    # The verdict ladder's thresholds (metrics.extrapolation_verdict): fidelity, in_data, margin.
    verdict: VerdictConfig = field(default_factory=VerdictConfig)


@dataclass(config=_STRICT)
class Preset:
    name: str
    collect: CollectConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    description: str = ""

    def smoke(self) -> Preset:
        """The same envs and algorithms, shrunk to a run of seconds (still whole training iterations;
        imitators tiny, on one CPU worker)."""
        def budget(group: TeacherGroup) -> int:
            unit = algo_config(group.algo, group.algo_config).granularity
            return min(group.budget, unit * max(len(self.collect.cutoffs) + 1, SMOKE_BUDGET // unit))

        groups = {
            name: replace(
                group,
                budget=budget(group),
                seeds=group.seeds[:1],
                tasks=group.tasks[:2],
                heldout_tasks=group.heldout_tasks[:1],
            )
            for name, group in self.collect.teachers.items()
        }
        imitators = {
            name: replace(
                group,
                steps=min(group.steps, SMOKE_TRAIN_STEPS),
                report_every=min(group.report_every, SMOKE_TRAIN_STEPS // 2),
                checkpoint_every=min(group.checkpoint_every, SMOKE_TRAIN_STEPS // 2),
                sizes=dict(list(group.sizes.items())[:1]),
                context_steps=[min(group.context_steps[0], SMOKE_CONTEXT)],
                window_steps=None,
                batch_size=min(group.batch_size, 8),
            )
            for name, group in self.train.imitators.items()
        }
        def horizon(name: str, group: EvaluateGroup) -> int:
            teachers = self.collect.teachers[self.train.imitators[name].teachers[0]]
            unit = algo_config(teachers.algo, teachers.algo_config).granularity
            return min(group.horizon, unit * max(1, SMOKE_HORIZON // unit))

        tests = {name: replace(group, horizon=horizon(name, group), teachers=1, heldout=min(group.heldout or 1, 1),
                               heldout_seeds=group.heldout_seeds[:1])
                 for name, group in self.evaluate.imitators.items()}
        # A smoke run fits on any machine: one CPU per actor, worker and trial, no GPU, no reservations.
        return replace(self, name=f"{self.name}-smoke", collect=replace(self.collect, teachers=groups, actor=Resources()),
                       train=replace(self.train, imitators=imitators, num_workers=1, use_gpu=False, cpus_per_worker=1, concurrent=1),
                       evaluate=replace(self.evaluate, imitators=tests, trial_resources={}))


# --- loading ---


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        return path
    folders = preset_dirs()
    for folder in folders:
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    known = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
    raise ConfigError(f"unknown preset {name_or_path!r} (looked in {', '.join(map(str, folders))}); "
                      f"known presets: {', '.join(known) or 'none'}")


def preset_dirs() -> list[Path]:
    """Where preset names are looked up: $CUTOFF_PRESETS_DIR, ./jobs/presets, then the checkout's."""
    folders = [Path(os.environ[PRESETS_ENV])] if os.environ.get(PRESETS_ENV) else []
    return list(dict.fromkeys([*folders, Path.cwd() / "jobs" / "presets", PRESETS_DIR]))


def load_preset(name_or_path: str, overrides: list[str] = (), smoke: bool = False) -> Preset:
    path = resolve_preset(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"preset {path}: not valid YAML ({error})") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path}: expected a mapping at the top level")
    raw.setdefault("name", path.stem)
    for override in overrides:
        apply_override(raw, override)
    preset = parse_preset(raw, str(path), overrides)
    try:
        return validate(preset.smoke() if smoke else preset)
    except ConfigError as error:
        raise ConfigError(_blame(str(error), overrides, str(error))) from None


def apply_override(raw: dict, override: str) -> None:
    """Apply one --set key.path=value (value parsed as YAML) to the raw preset mapping."""
    key, sep, text = override.partition("=")
    if not sep or not key or "" in key.split("."):
        raise ConfigError(f"--set expects key.path=value, got {override!r}")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {override}: the value is not valid YAML ({' '.join(str(error).split())})") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_preset(raw: dict, source: str, overrides: list[str] = ()) -> Preset:
    try:
        return TypeAdapter(Preset).validate_python(raw)
    except ValidationError as error:
        problems = [_describe(e) for e in error.errors()]
        raise ConfigError("; ".join(_blame(p, overrides, f"preset {source}: {p}") for p in problems)) from None


def _blame(problem: str, overrides: list[str], otherwise: str) -> str:
    """`problem` ("key.path: what is wrong") prefixed with the --set override that wrote that key,
    if one did; else `otherwise` (the preset file is the culprit)."""
    key = problem.split(":", 1)[0].strip()
    for override in reversed(overrides):  # the last override of a key is the one that counts
        set_key = override.partition("=")[0]
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return f"--set {override}: {problem}"
    return otherwise


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: missing"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


# --- checks that need more than types ---


def validate(preset: Preset) -> Preset:
    _check_name("name", preset.name)
    collect = preset.collect
    if not collect.teachers:
        raise ConfigError("collect.teachers: no teacher groups")
    if any(not 0 < c < 1 for c in collect.cutoffs) or sorted(set(collect.cutoffs)) != collect.cutoffs:
        raise ConfigError(f"collect.cutoffs: expected increasing fractions strictly between 0 and 1, got {collect.cutoffs}")
    ids: set[str] = set()
    for name, group in collect.teachers.items():
        _check_group(f"collect.teachers.{name}", name, group, collect.cutoffs)
        for task in group.tasks:
            for seed in group.seeds:
                tid = teacher_id(name, task, seed)
                if tid in ids:
                    raise ConfigError(f"collect.teachers.{name}: teacher id {tid} is not unique (repeated task or seed?)")
                ids.add(tid)
    for name, imitators in preset.train.imitators.items():
        _check_imitators(f"train.imitators.{name}", name, imitators, preset)
    for name, group in preset.evaluate.imitators.items():
        if name not in preset.train.imitators:
            raise ConfigError(f"evaluate.imitators.{name}: no train.imitators group {name!r}; known: {', '.join(preset.train.imitators)}")
        teachers = preset.collect.teachers[preset.train.imitators[name].teachers[0]]
        if group.horizon % algo_config(teachers.algo, teachers.algo_config).granularity:
            raise ConfigError(f"evaluate.imitators.{name}.horizon: {group.horizon} is not a whole number of "
                              f"{teachers.algo} training iterations")
        _check_runs_a_test(f"evaluate.imitators.{name}", group, preset.train.imitators[name], teachers, preset)
    for arm in preset.evaluate.trial_resources:
        if arm not in ARMS:
            raise ConfigError(f"evaluate.trial_resources.{arm}: unknown arm; known: {', '.join(ARMS)}")
    if any(g.batch_size % preset.train.num_workers for g in preset.train.imitators.values()):
        raise ConfigError(f"train.num_workers: {preset.train.num_workers} workers must divide every imitator batch_size")
    return preset


def _check_name(key: str, name: str) -> None:
    try:
        check_name(key, name)
    except BadInput as error:
        raise ConfigError(str(error)) from None


def _check_runs_a_test(key: str, test: EvaluateGroup, imitators: ImitatorGroup, teachers: TeacherGroup,
                       preset: Preset) -> None:
    """An evaluation group that would run no trial is a mistake, not an empty report."""
    cutoffs = imitator_cutoffs(imitators, preset.collect)
    extrapolation = any(c < 1.0 for c in cutoffs)
    transfer = test.heldout != 0 and bool(teachers.heldout_tasks or teachers.heldout_envs)
    if not (extrapolation or transfer):
        raise ConfigError(f"{key}: runs no test: its imitators' cutoffs {cutoffs} have no extrapolation test (cutoff "
                          "1.0 is the full history) and there are no held-out tasks or envs to transfer to")


def _check_imitators(key: str, name: str, imitators: ImitatorGroup, preset: Preset) -> None:
    _check_name(key, name)
    for size_name in imitators.sizes:
        _check_name(f"{key}.sizes.{size_name}", size_name)
    groups = preset.collect.teachers
    if not imitators.teachers:
        raise ConfigError(f"{key}.teachers: name at least one collect group")
    for index, group in enumerate(imitators.teachers):
        if group not in groups:
            raise ConfigError(f"{key}.teachers.{index}: no collect group {group!r}; known: {', '.join(groups)}")
    envs = {groups[g].env for g in imitators.teachers}
    if len(envs) > 1:
        raise ConfigError(f"{key}.teachers: one imitator learns one env's histories, got {sorted(envs)}")
    known = set(preset.collect.cutoffs) | {1.0}
    for cutoff in imitator_cutoffs(imitators, preset.collect):
        if cutoff not in known:
            raise ConfigError(f"{key}.cutoffs: {cutoff} is not a collect cutoff (teacher checkpoints exist at {sorted(known)})")
    for size_name, size in imitators.sizes.items():
        if size.n_embd % (2 * size.n_head):
            raise ConfigError(f"{key}.sizes.{size_name}: n_embd {size.n_embd} must be a multiple of 2 * n_head "
                              "(heads of even width, for rotary positions)")
    if not imitators.sizes or not imitators.context_steps or min(imitators.context_steps) < 1:
        raise ConfigError(f"{key}: needs at least one size and positive context_steps")
    for group in imitators.teachers:
        for cutoff, step in group_cutoff_steps(groups[group], preset.collect.cutoffs).items():
            longest = max(imitators.window_steps or 0, *imitators.context_steps)
            if cutoff in imitator_cutoffs(imitators, preset.collect) and step < longest + imitators.frame_stack:
                raise ConfigError(f"{key}: training windows of {longest} steps do not fit in the "
                                  f"{step} steps group {group!r} has before cutoff {cutoff}")


def _check_group(key: str, name: str, group: TeacherGroup, cutoffs: list[float]) -> None:
    _check_name(key, name)
    _check_env_id(f"{key}.env", group.env)
    if group.algo not in ALGORITHMS:
        raise ConfigError(f"{key}.algo: unknown algorithm {group.algo!r}; known: {', '.join(ALGORITHMS)}")
    try:
        config = algo_config(group.algo, group.algo_config)
    except ValidationError as error:
        raise ConfigError("; ".join(f"{key}.algo_config.{_describe(e)}" for e in error.errors())) from None
    if getattr(config, "num_envs", 1) > 1 and group.algo != "lean_ppo":
        raise ConfigError(f"{key}.algo_config.num_envs: several envs per learner are recorded by lean_ppo only, not {group.algo}")
    if not group.seeds or not group.tasks:
        raise ConfigError(f"{key}: needs at least one seed and one task")
    actions = None
    for kind, tasks in (("tasks", group.tasks), ("heldout_tasks", group.heldout_tasks)):
        for index, task in enumerate(tasks):
            actions = _check_env(f"{key}.{kind}.{index}", group.env, config, {**group.env_kwargs, **task})
    for index, env_id in enumerate(group.heldout_envs):
        _check_env_id(f"{key}.heldout_envs.{index}", env_id)
        other = _check_env(f"{key}.heldout_envs.{index}", env_id, config, group.env_kwargs)
        if other != actions:
            raise ConfigError(f"{key}.heldout_envs.{index}: {env_id} has actions {other}, {group.env} has {actions}; "
                              "transfer needs one action set (for Atari: env_kwargs full_action_space: true)")
    if group.budget % config.granularity:
        raise ConfigError(f"{key}.budget: {group.budget} is not a whole number of {group.algo} training "
                          f"iterations of {config.granularity} env steps")
    steps = sorted(cutoff_steps(group.budget, cutoffs, config.granularity))
    if len(steps) != len(cutoffs) + 1 or steps[0] == 0:
        raise ConfigError(f"{key}.budget: {group.budget} steps is too small to give distinct cutoff steps for {cutoffs}")


def _check_env_id(key: str, env_id: str) -> None:
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: unknown Gymnasium env id {env_id!r}{hint}")


def _check_env(key: str, env_id: str, config, kwargs: dict[str, Any]) -> gym.Space:
    """Build the env once: catches bad kwargs and spaces the algorithm cannot use; returns its actions."""
    try:
        env = make_env(env_id, **kwargs)
    except Exception as error:  # envs raise anything for bad kwargs
        raise ConfigError(f"{key}: {env_id} rejects {kwargs} ({type(error).__name__}: {error})") from None
    try:
        config.check_spaces(env_id, env.observation_space, env.action_space)
        return env.action_space
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    finally:
        env.close()
