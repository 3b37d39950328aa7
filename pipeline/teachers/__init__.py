"""Teachers: learners whose every acted transition is recorded.

Algorithms (ALGORITHMS below): `qlearning` (tabular), `dqn` and `ppo` (RLlib), and `lean_dqn` and
`lean_ppo` (the project's own PyTorch DQN and PPO: the same configs and recorded histories, without
RLlib, several times faster on one core; BENCHMARKS.md).

All teachers implement one API (the fleet, the evaluation arms and the tests use only this):

    teacher = make_teacher(algo, env_id, env_kwargs, seed=0, budget=20_000, config={...})
    batch = teacher.train_steps(n)   # learn for exactly n env steps; returns the Transitions it acted in
    teacher.step                     # env steps taken so far = global step of its next transition
    teacher.granularity              # n must be a multiple of this (RLlib trains in whole iterations)
    teacher.save(directory)          # everything needed to continue the same timeline
    teacher.restore(directory)
    teacher.act(obs, first=False)    # greedy action of the current (frozen) policy
    teacher.close()                  # release the env (and an RLlib algorithm's runner and learner)

A learner of several envs (lean_ppo with num_envs K > 1) has `streams` = K and
`train_streams(n)`, n steps in every env, one Transitions per env; `train_streams` below takes
either kind.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Protocol

from pydantic import TypeAdapter

from pipeline.schema import ObsEncoding, Transitions
from pipeline.teachers.rllib_config import DQNConfig, PPOConfig
from pipeline.teachers.tabular import QLearningConfig


class Teacher(Protocol):
    encoding: ObsEncoding
    step: int
    granularity: int

    def train_steps(self, n: int) -> Transitions: ...
    def save(self, directory: str) -> None: ...
    def restore(self, directory: str) -> None: ...
    def act(self, obs: Any, first: bool = False) -> int: ...
    def close(self) -> None: ...


# algo name -> (typed config, "module:TeacherClass"); teacher modules are imported only when used,
# so presets validate and tabular runs start without loading RLlib.
ALGORITHMS: dict[str, tuple[type, str]] = {
    "qlearning": (QLearningConfig, "pipeline.teachers.tabular:QLearningTeacher"),
    "dqn": (DQNConfig, "pipeline.teachers.rllib:RLlibTeacher"),
    "lean_dqn": (DQNConfig, "pipeline.teachers.lean_dqn:LeanDQNTeacher"),  # the same DQN in plain PyTorch, no RLlib
    "lean_ppo": (PPOConfig, "pipeline.teachers.lean_ppo:LeanPPOTeacher"),  # the same PPO in plain PyTorch, no RLlib
    "ppo": (PPOConfig, "pipeline.teachers.rllib:RLlibTeacher"),
}


def algo_config(algo: str, raw: dict[str, Any]):
    """Validate a preset's `algo_config` mapping into the algorithm's typed config."""
    return _adapter(algo).validate_python(raw)


@functools.cache
def _adapter(algo: str) -> TypeAdapter:
    return TypeAdapter(ALGORITHMS[algo][0])


def train_streams(teacher: Teacher, n: int) -> list[Transitions]:
    """n more steps of each of the teacher's streams: [train_steps(n)] for a teacher of one env."""
    return teacher.train_streams(n) if getattr(teacher, "streams", 1) > 1 else [teacher.train_steps(n)]


def make_teacher(algo: str, env_id: str, env_kwargs: dict[str, Any], *, seed: int, budget: int, config: dict[str, Any]) -> Teacher:
    module, name = ALGORITHMS[algo][1].split(":")
    teacher_type = getattr(importlib.import_module(module), name)
    return teacher_type(env_id, env_kwargs, seed=seed, budget=budget, config=algo_config(algo, config))
