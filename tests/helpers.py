"""Checks shared by the collect tests: what a correct history of a teacher looks like."""

import json
import subprocess
import time

import numpy as np
import pyarrow.dataset as ds

from pipeline.plan import TeacherSpec
from pipeline.store import Store
from pipeline.teachers import make_teacher


def reference(spec: TeacherSpec):
    """The same teacher run uninterrupted in this process: what its history must equal."""
    teacher = make_teacher(spec.algo, spec.env_id, spec.env_kwargs, seed=spec.seed, budget=spec.budget, config=spec.algo_config)
    return teacher.train_steps(spec.budget)


def read_histories(store: Store, experiment: str):
    """Everything under histories/, read the way an outside reader would: plain pyarrow, hive folders."""
    dataset = ds.dataset(store.full(f"{experiment}/histories"), filesystem=store.arrow_fs, partitioning="hive")
    return dataset.to_table().to_pandas()


def assert_histories_match(store: Store, experiment: str, specs: list[TeacherSpec]):
    frame = read_histories(store, experiment)
    assert sorted(frame["teacher"].unique()) == sorted(s.teacher_id for s in specs)
    for spec in specs:
        rows = frame[frame["teacher_id"] == spec.teacher_id].sort_values("step")
        np.testing.assert_array_equal(rows["step"].to_numpy(), np.arange(spec.budget))  # no gap, no duplicate
        expected = reference(spec)
        for column in ("obs", "action", "reward", "episode", "episode_step", "truncated"):
            np.testing.assert_array_equal(rows[column].to_numpy(), getattr(expected, column), err_msg=f"{spec.teacher_id} {column}")
        assert set(rows["env"]) == {spec.env_id} and set(rows["task_id"]) == {spec.task_id}


def manifest(store: Store, experiment: str, spec: TeacherSpec) -> dict:
    path = f"{experiment}/histories/env={spec.env_id}/teacher={spec.teacher_id}/_manifest.json"
    return json.loads(store.read_bytes(path)) if store.exists(path) else {"complete": False, "shards": []}


def wait_until_mid_run(store: Store, experiment: str, specs: list[TeacherSpec], timeout: float = 60.0) -> None:
    """Return as soon as some teacher has committed a shard but is not complete."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m["shards"] and not m["complete"] for m in (manifest(store, experiment, s) for s in specs)):
            return
        time.sleep(0.02)
    raise AssertionError("no teacher was ever seen mid-run")


def teacher_actor_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::TeacherActor"], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]
