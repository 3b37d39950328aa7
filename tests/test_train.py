"""The train stage for real: windows, the cutoff filter, Ray Train reading the moto S3 server,
an interrupted run resumed by rerunning it, and bad input named in the error."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.collect import collect
from pipeline.plan import imitator_specs, teacher_specs
from pipeline.config import ConfigError, load_preset
from pipeline.history import HistoryError, TeacherHistory
from pipeline.schema import VERSION_KEY, ObsEncoding, Transitions
from pipeline.store import Store
from pipeline.train import (ReadPlan, TrainError, concurrent_jobs, history_rows, job_groups, load_imitator, read_plan, shard_paths,
                            train)
from pipeline.windows import make_windows, stack_frames

from conftest import REPO

pytestmark = pytest.mark.usefixtures("ray_address")
N_ACTIONS = 5


def rows_of(teacher: str, steps: range, episode_len: int, code: int) -> dict[str, np.ndarray]:
    steps = np.array(steps)
    return {"teacher_id": np.array([teacher] * len(steps), dtype=object), "step": steps,
            "episode_step": steps % episode_len, "obs": code * 1000 + steps,
            "action": steps % N_ACTIONS, "reward": (steps % 3).astype(np.float32)}


def test_windows_never_cross_teachers_or_gaps():
    parts = [rows_of("a", range(0, 30), 7, 1), rows_of("b", range(0, 30), 7, 2), rows_of("a", range(40, 70), 7, 1)]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    shuffled = np.random.default_rng(0).permutation(len(rows["step"]))
    windows = make_windows({k: v[shuffled] for k, v in rows.items()}, window_steps=8, stride=4, n_actions=N_ACTIONS)
    obs = windows["obs"]
    assert len(obs) == 6 + 6 + 6  # 8-step windows every 4 steps in each 30-step run
    assert sorted(obs[(obs[:, 0] >= 1040) & (obs[:, 0] < 2000), 0]) == [1041, 1045, 1049, 1053, 1057, 1061]  # after the gap: from its second row
    assert (obs // 1000 == obs[:, :1] // 1000).all()  # one teacher per window
    assert (np.diff(obs, axis=1) == 1).all()  # consecutive steps, no gap inside a window
    steps = obs % 1000
    np.testing.assert_array_equal(windows["action"], steps % N_ACTIONS)
    expected_prev = np.where(steps == 0, N_ACTIONS, (steps - 1) % N_ACTIONS)
    np.testing.assert_array_equal(windows["prev_action"], expected_prev)  # "none" only at the history's start
    np.testing.assert_array_equal(windows["prev_reward"], np.where(steps == 0, 0, (steps - 1) % 3))
    np.testing.assert_array_equal(windows["first"], steps % 7 == 0)


def test_frame_stacks_stay_inside_their_episode():
    frames = np.arange(10, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8)
    episode_step = np.array([0, 1, 2, 3, 0, 1, 2, 3, 4, 5])
    stacks = stack_frames(frames, episode_step, 3)[:, :, 0, 0]
    np.testing.assert_array_equal(stacks[0], [0, 0, 0])  # the reset frame repeated
    np.testing.assert_array_equal(stacks[3], [1, 2, 3])
    np.testing.assert_array_equal(stacks[5], [4, 4, 5])  # never a frame of the previous episode
    np.testing.assert_array_equal(stacks[9], [7, 8, 9])


def test_cutoff_filter_drops_exactly_the_rows_at_or_past_the_cutoff_inside_the_parquet_read(tmp_path, capsys):
    preset = load_preset("smoke")
    store = Store(str(tmp_path))
    collect(preset, store, "exp", log=lambda line: None)
    spec = imitator_specs(preset)[0]
    teachers = spec.train_teachers + spec.val_teachers
    rows = history_rows(store, shard_paths(store, "exp", spec, teachers), spec.cutoff_step)
    capsys.readouterr()
    rows.explain()
    optimized = capsys.readouterr().out.split("Logical Plan (Optimized)")[1].split("Physical Plan")[0]
    assert "Read" in optimized and "Filter" not in optimized  # pushed down: no separate filter pass
    frame = rows.to_pandas()
    assert spec.cutoff_step == 600
    for teacher in teachers:
        steps = np.sort(frame[frame["teacher_id"] == teacher]["step"].to_numpy())
        np.testing.assert_array_equal(steps, np.arange(spec.cutoff_step))


def write_deterministic_histories(store: Store, experiment: str, preset) -> None:
    """Smoke teachers' histories whose action is a fixed function of the observation (obs mod 5):
    learnable exactly, so a model that fits it drives the loss to ~0."""
    encoding = ObsEncoding("discrete", (), 25)
    rng = np.random.default_rng(0)
    for spec in teacher_specs(preset):
        n = spec.budget
        batch = Transitions.empty(n, encoding)
        batch.obs[:] = rng.integers(0, 25, n)
        batch.action[:] = batch.obs % N_ACTIONS
        batch.truncated[9::10] = True
        batch.number_steps(0, 0, 0)
        history = TeacherHistory(store, experiment, spec.env_id, spec.teacher_id)
        table = batch.to_table(encoding, teacher_id=spec.teacher_id, env_id=spec.env_id, task_id=spec.task_id, seed=spec.seed)
        staged = [history.stage(table)]
        history.commit(history.read_manifest(), staged, [history.checkpoint_entry(n, None)], complete=True)


def tensorboard_tags(store: Store, folder: str) -> bytes:
    names = [p for p in store.fs.find(store.full(folder)) if "tfevents" in p]
    assert names, f"no TensorBoard event file under {folder}"
    return b"".join(store.fs.cat_file(p) for p in names)


def test_tiny_models_overfit_a_tiny_history_through_ray_train_on_s3_two_jobs_at_once(s3_uri, tmp_path):
    overrides = ["train.imitators.darkroom.steps=150", "train.imitators.darkroom.lr=0.003",
                 "train.imitators.darkroom.warmup_steps=10", "train.imitators.darkroom.report_every=75",
                 "train.imitators.darkroom.checkpoint_every=50", "train.imitators.darkroom.sizes={tiny: {n_layer: 1, n_head: 2, n_embd: 64}}",
                 "train.imitators.darkroom.context_steps=[20, 10, 16]", "train.imitators_per_job=2", "train.concurrent=2",
                 "train.cpus_per_worker=0.5"]
    preset = load_preset("smoke", overrides)
    store = Store(s3_uri)
    write_deterministic_histories(store, "exp", preset)
    lines = []
    results = train(preset, store, "exp", log=lines.append)
    assert "train: 3 to fit, 2 Ray Train job(s), 2 at a time" in lines
    assert sum(line.startswith("train: job ") and ", darkroom" in line for line in lines) == 1  # one job fits two
    assert [r["imitator"] for r in results] == ["darkroom-tiny-ctx20", "darkroom-tiny-ctx10", "darkroom-tiny-ctx16"]
    for result, spec in zip(results, imitator_specs(preset)):
        assert result["step"] == 150 and result["loss"] < 0.05, result
        assert result["val_loss"] < 0.1, result  # held-out teachers follow the same rule
        folder = spec.dir("exp")
        assert store.exists(f"{folder}/_done.json")
        assert checkpoint_steps(store, folder) == [100, 150]  # the newest two, each in its imitator's folder
        local = tmp_path / spec.name
        store.download_dir(f"{folder}/{os.path.basename(result['checkpoint'])}", str(local))
        assert load_imitator(str(local)).args.context_steps == spec.model_args["context_steps"]
        assert torch.load(local / "imitator.pt", weights_only=True)["step"] == 150
        assert b"imitator/loss" in tensorboard_tags(store, f"{folder}/tensorboard")
    again = train(preset, store, "exp", log=lambda line: None)  # finished imitators are not retrained
    assert again == results
    # an _imitator.json written before the size was stored still matches, and other settings do not
    record = f"{imitator_specs(preset)[0].dir('exp')}/_imitator.json"
    old = {k: v for k, v in json.loads(store.read_bytes(record)).items() if k != "size"}
    store.write_bytes(record, json.dumps(old).encode())
    assert train(preset, store, "exp", log=lambda line: None) == results
    with pytest.raises(ConfigError, match=r"imitator darkroom-tiny-ctx20 at cutoff 0.5 trained with other settings \(hparams"):
        train(load_preset("smoke", [*overrides, "train.imitators.darkroom.lr=0.001"]), store, "exp", log=lambda line: None)


def checkpoint_steps(store: Store, folder: str) -> list[int]:
    return [int(name.removeprefix("checkpoint_")) for name in store.list_names(folder) if name.startswith("checkpoint_")]


def test_imitators_are_spread_over_jobs_balanced_by_tokens_with_room_for_concurrency():
    darkroom, control, cartpole = imitator_specs(load_preset("quick"))  # 600, 1500 and 600 steps
    names = lambda jobs: [[spec.group for spec in job] for job in jobs]  # noqa: E731
    assert names(job_groups([darkroom, control, cartpole], per_job=8, at_once=2)) == [["darkroom_control"], ["darkroom", "cartpole"]]
    assert names(job_groups([darkroom, control, cartpole], per_job=8, at_once=1)) == [["darkroom", "darkroom_control", "cartpole"]]
    assert names(job_groups([darkroom, control, cartpole], per_job=1, at_once=2)) == [["darkroom_control"], ["darkroom"], ["cartpole"]]


def test_a_small_history_is_read_once_in_one_block_a_large_one_streamed_per_epoch():
    [spec] = imitator_specs(load_preset("smoke"))
    assert read_plan(spec, window=20, stride=10) == ReadPlan(1, 1)  # every teacher in one block; one epoch is enough
    many_steps = replace(spec, hparams={**spec.hparams, "steps": 5000})
    assert read_plan(many_steps, window=20, stride=10).repeats > 1  # all the epochs it needs from one read
    assert read_plan(many_steps, window=20, stride=10, repeat=False).repeats == 1  # validation: one pass
    frames = replace(spec, model_args={**spec.model_args, "obs_kind": "image", "obs_shape": [84, 84], "frame_stack": 4},
                     train_teachers=spec.train_teachers * 200)
    assert read_plan(frames, window=20, stride=10) == ReadPlan(None, 1)


def test_concurrent_imitator_jobs_leave_a_cpu_for_reading_their_data():
    settings = load_preset("smoke").train  # the fixture's Ray has 2 CPUs
    assert concurrent_jobs(replace(settings, concurrent=2, cpus_per_worker=0.5), todo=3) == 2
    assert concurrent_jobs(replace(settings, concurrent=2, cpus_per_worker=1), todo=3) == 1  # two would take both CPUs
    assert concurrent_jobs(replace(settings, concurrent=4, cpus_per_worker=0.25), todo=3) == 3


# Two imitators in one job, 600 steps each, a checkpoint every 100.
ONE_JOB_OF_TWO = ["train.imitators.darkroom.steps=600", "train.imitators.darkroom.checkpoint_every=100",
                  "train.imitators.darkroom.report_every=100", "train.imitators.darkroom.val_fraction=0",
                  "train.imitators.darkroom.context_steps=[20, 10]", "train.imitators_per_job=2"]


def wait_for_first_done_second_checkpointed(store: Store, first: str, second: str, running) -> bytes:
    """Waits until the job has finished its first imitator and checkpointed its second (not
    finished); returns the first's done file."""
    deadline = time.time() + 300
    while not (store.exists(f"{first}/_done.json") and checkpoint_steps(store, second)):
        assert running() and time.time() < deadline, "training ended or stalled before the second imitator's first checkpoint"
        time.sleep(0.05)
    assert not store.exists(f"{second}/_done.json"), "the second imitator finished before the test could interrupt it"
    return store.read_bytes(f"{first}/_done.json")


def train_worker_pids() -> list[int]:
    """Ray Train workers of this test session's Ray, which runs under this process."""
    parents, titles = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                parents[int(entry)], titles[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1]), cmdline.read()
        except OSError:
            continue
    ours, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - ours
        ours |= frontier
    return [pid for pid in ours if titles[pid].startswith(b"ray::RayTrainWorker")]


def test_a_killed_worker_resumes_its_imitator_without_refitting_the_finished_one(tmp_path):
    preset = load_preset("smoke", ONE_JOB_OF_TWO)
    store = Store(str(tmp_path))
    write_deterministic_histories(store, "exp", preset)
    first, second = (spec.dir("exp") for spec in imitator_specs(preset))
    results = []
    training = threading.Thread(target=lambda: results.extend(train(preset, store, "exp", log=lambda line: None)))
    training.start()
    first_done = wait_for_first_done_second_checkpointed(store, first, second, training.is_alive)
    [worker] = train_worker_pids()
    os.kill(worker, signal.SIGKILL)
    training.join(timeout=300)
    assert [r["step"] for r in results] == [600, 600], "the job did not finish after its worker was killed"
    assert store.read_bytes(f"{first}/_done.json") == first_done  # not refitted
    assert results[1]["resumed_from"] >= 100 and results[1]["resumed_from"] % 100 == 0, results[1]
    assert results[1]["optimizer_steps"] == 600  # the optimizer state came back too


def test_rerun_resumes_an_interrupted_imitator_from_its_checkpoint_and_skips_the_finished_one(tmp_path, ray_address):
    preset = load_preset("smoke", ONE_JOB_OF_TWO)
    store = Store(str(tmp_path))
    write_deterministic_histories(store, "exp", preset)
    first, second = (spec.dir("exp") for spec in imitator_specs(preset))
    command = [sys.executable, "-m", "pipeline", "train", "--preset", "smoke", "--store", str(tmp_path),
               "--experiment", "exp", *[arg for o in ONE_JOB_OF_TWO for arg in ("--set", o)]]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "RAY_ADDRESS": ray_address},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first_done = wait_for_first_done_second_checkpointed(store, first, second, lambda: process.poll() is None)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not store.exists(f"{second}/_done.json")
    lines = []
    results = train(preset, store, "exp", log=lines.append)
    assert "train: 1 to fit, 1 Ray Train job(s), 1 at a time" in lines  # the finished one is skipped
    assert store.read_bytes(f"{first}/_done.json") == first_done
    assert results[1]["resumed_from"] >= 100 and results[1]["resumed_from"] % 100 == 0, results[1]
    assert results[1]["step"] == results[1]["optimizer_steps"] == 600  # the optimizer state came back too


def test_bad_input_names_what_is_at_fault(tmp_path):
    preset = load_preset("smoke")
    store = Store(str(tmp_path))
    with pytest.raises(TrainError, match=r"darkroom-goal\S+ .* run collect first"):
        train(preset, store, "exp", log=lambda line: None)
    with pytest.raises(ConfigError, match=r"train.imitators.darkroom: training windows of 900 steps do not fit"):
        load_preset("smoke", ["train.imitators.darkroom.context_steps=[900]"])

    write_deterministic_histories(store, "exp", preset)
    spec = imitator_specs(preset)[0]
    [first, *_] = shard_paths(store, "exp", spec, spec.train_teachers)
    table = pq.read_table(first)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, VERSION_KEY: b"99"}), first)
    with pytest.raises(HistoryError, match=rf"{os.path.basename(first)}.*schema version 99"):
        train(preset, store, "exp", log=lambda line: None)
    with open(first, "wb") as handle:
        handle.write(b"not parquet")
    with pytest.raises(HistoryError, match=rf"{os.path.basename(first)} is unreadable"):
        train(preset, store, "exp", log=lambda line: None)
    assert os.path.getsize(first) == len(b"not parquet")  # nothing was deleted or rewritten
