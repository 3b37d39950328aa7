"""Presets: YAML files in jobs/presets/, loaded into typed configs, one per stage.

    preset = load_preset("quick", overrides=["collect.teachers.darkroom.budget=4000"], smoke=False)

Every problem (unknown key, wrong type, unknown env id, an env that rejects its kwargs, an
algorithm that cannot run on the env) raises ConfigError naming the key, before any work starts.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import field, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

import pipeline.envs  # noqa: F401  (registers the project's envs and ALE's)
from pipeline.teachers import ALGORITHMS, algo_config

PRESETS_DIR = Path(__file__).resolve().parent.parent / "jobs" / "presets"
SMOKE_BUDGET = 400  # env steps per teacher under --smoke
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STRICT = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A preset or an override is invalid; the message names the key and the value."""


@dataclass(config=_STRICT)
class TeacherGroup:
    """Teachers of one algorithm on one env: one teacher per (task, seed)."""

    env: str  # Gymnasium env id, e.g. DarkRoom-v0, CartPole-v1, ALE/Breakout-v5
    algo: str  # a key of pipeline.teachers.ALGORITHMS
    budget: int = Field(gt=0)  # env steps in each teacher's life
    seeds: list[int] = field(default_factory=lambda: [0])
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to gym.make for every task
    tasks: list[dict[str, Any]] = field(default_factory=lambda: [{}])  # per-task gym.make kwargs
    heldout_tasks: list[dict[str, Any]] = field(default_factory=list)  # never collected: for transfer tests
    algo_config: dict[str, Any] = field(default_factory=dict)  # the algorithm's typed config


@dataclass(config=_STRICT)
class CollectConfig:
    teachers: dict[str, TeacherGroup]  # group name -> group; the name prefixes its teacher ids
    cutoffs: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # fractions of each budget
    shard_steps: int = Field(50_000, gt=0)  # most rows in one Parquet shard
    # Commit shards with a resume checkpoint every this many steps (None: only at the end); a
    # crashed teacher redoes at most this many. Cutoff checkpoints are saved whatever this is.
    checkpoint_steps: int | None = Field(None, gt=0)
    num_actors: int | None = Field(None, gt=0)  # teacher actors; None: one per CPU of the Ray cluster


@dataclass(config=_STRICT)
class Preset:
    name: str
    collect: CollectConfig
    description: str = ""

    def smoke(self) -> Preset:
        """The same envs and algorithms, shrunk to a run of seconds."""
        groups = {
            name: replace(
                group,
                budget=min(group.budget, SMOKE_BUDGET),
                seeds=group.seeds[:1],
                tasks=group.tasks[:2],
                heldout_tasks=group.heldout_tasks[:1],
            )
            for name, group in self.collect.teachers.items()
        }
        return replace(self, name=f"{self.name}-smoke", collect=replace(self.collect, teachers=groups))


def task_id(task: dict[str, Any]) -> str:
    """Path-safe name of a task: {"goal": [2, 7]} -> "goal2x7"; {} -> "default"."""
    if not task:
        return "default"
    flat = lambda v: "x".join(flat(x) for x in v) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    return re.sub(r"[^A-Za-z0-9_.x-]", "_", "_".join(f"{key}{flat(value)}" for key, value in sorted(task.items())))


def teacher_id(group: str, task: dict[str, Any], seed: int) -> str:
    return f"{group}-s{seed}" if not task else f"{group}-{task_id(task)}-s{seed}"


# --- loading ---


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        return path
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; known presets: {', '.join(known)}")
    return candidate


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
    preset = parse_preset(raw, str(path))
    return validate(preset.smoke() if smoke else preset)


def apply_override(raw: dict, override: str) -> None:
    """Apply one --set key.path=value (value parsed as YAML) to the raw preset mapping."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key.path=value, got {override!r}")
    value = yaml.safe_load(text) if text else ""
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


def parse_preset(raw: dict, source: str) -> Preset:
    try:
        return TypeAdapter(Preset).validate_python(raw)
    except ValidationError as error:
        raise ConfigError(f"preset {source}: " + "; ".join(_describe(e) for e in error.errors())) from None


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: missing"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


# --- checks that need more than types ---


def validate(preset: Preset) -> Preset:
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
    return preset


def _check_group(key: str, name: str, group: TeacherGroup, cutoffs: list[float]) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"{key}: group names may use letters, digits, '_', '.' and '-' only")
    if group.env not in gym.registry:
        close = difflib.get_close_matches(group.env, list(gym.registry), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}.env: unknown Gymnasium env id {group.env!r}{hint}")
    if group.algo not in ALGORITHMS:
        raise ConfigError(f"{key}.algo: unknown algorithm {group.algo!r}; known: {', '.join(ALGORITHMS)}")
    try:
        algo_config(group.algo, group.algo_config)
    except ValidationError as error:
        raise ConfigError("; ".join(f"{key}.algo_config.{_describe(e)}" for e in error.errors())) from None
    if not group.seeds or not group.tasks:
        raise ConfigError(f"{key}: needs at least one seed and one task")
    steps = [round(c * group.budget) for c in cutoffs]
    if len(set(steps)) != len(steps) or steps[0] == 0:
        raise ConfigError(f"{key}.budget: {group.budget} steps is too small to give distinct cutoff steps for {cutoffs}")
    for kind, tasks in (("tasks", group.tasks), ("heldout_tasks", group.heldout_tasks)):
        for index, task in enumerate(tasks):
            _check_env(f"{key}.{kind}.{index}", group, {**group.env_kwargs, **task})


def _check_env(key: str, group: TeacherGroup, kwargs: dict[str, Any]) -> None:
    """Build the env once: catches bad kwargs and spaces the algorithm cannot use."""
    _, teacher_type = ALGORITHMS[group.algo]
    try:
        env = gym.make(group.env, **kwargs)
    except Exception as error:  # envs raise anything for bad kwargs
        raise ConfigError(f"{key}: {group.env} rejects {kwargs} ({type(error).__name__}: {error})") from None
    try:
        teacher_type.check_spaces(group.env, env.observation_space, env.action_space)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    finally:
        env.close()
