"""RLlib teachers for real: DQN and PPO learning CartPole, Dark Room and Breakout observations,
save/restore/continue, and a teacher actor killed mid-run."""

import os
import signal
import threading

import numpy as np
import pytest
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

from pipeline.collect import collect, run_teacher
from pipeline.plan import teacher_specs
from pipeline.config import load_preset
from pipeline.history import TeacherHistory
from pipeline.schema import Transitions, check_schema
from pipeline.store import Store
from pipeline.teachers import make_teacher

from helpers import manifest, read_histories, teacher_actor_pids, wait_until_mid_run

pytestmark = pytest.mark.usefixtures("ray_address")

LEARNS = {
    "dqn": (10_240, {"learning_starts": 500, "epsilon_decay": 0.4, "lr": 1e-3, "hidden": [64, 64]}),
    "ppo": (12_000, {"train_batch_size": 1000, "minibatch_size": 100, "num_epochs": 6}),
}


def complete_episode_returns(batch: Transitions) -> np.ndarray:
    ends = np.flatnonzero(batch.terminated | batch.truncated)
    return np.array([batch.reward[batch.episode == batch.episode[end]].sum() for end in ends])


def assert_one_history(batch: Transitions, steps: int):
    np.testing.assert_array_equal(batch.step, np.arange(steps))
    starts = np.flatnonzero(batch.episode_step == 0)
    np.testing.assert_array_equal(np.unique(batch.episode), np.arange(len(starts)))  # numbered in order
    done = batch.terminated | batch.truncated
    assert (np.diff(batch.episode) == done[:-1]).all()  # a new episode exactly after each done step
    assert (np.diff(batch.policy_version) >= 0).all()


@pytest.mark.parametrize("algo", LEARNS)
def test_records_every_sampled_step_and_the_return_rises(algo):
    budget, config = LEARNS[algo]
    teacher = make_teacher(algo, "CartPole-v1", {}, seed=0, budget=budget, config=config)
    unit = teacher.granularity
    sizes = [unit, 3 * unit, budget - 4 * unit]  # several train_steps calls of different sizes
    batch = Transitions.concat([teacher.train_steps(n) for n in sizes])
    assert len(batch) == teacher.step == budget == teacher.algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME))
    assert_one_history(batch, budget)
    assert batch.policy_version[-1] > batch.policy_version[0]  # the weights changed while it acted
    returns = complete_episode_returns(batch)
    first, last = returns[:20].mean(), returns[-20:].mean()
    assert last > 2 * first, (first, last)


def test_dqn_on_dark_room_records_cell_indices():
    teacher = make_teacher("dqn", "DarkRoom-v0", {"goal": [1, 1]}, seed=0, budget=640, config={"learning_starts": 64})
    batch = teacher.train_steps(640)
    assert batch.obs.dtype == np.int64 and batch.obs.min() >= 0 and batch.obs.max() < 81
    assert (batch.obs[batch.episode_step == 0] == 40).all()  # every episode starts in the centre
    assert 0 <= teacher.act(int(batch.obs[-1])) < 5


def test_save_restore_continue_and_act(tmp_path):
    config = {"learning_starts": 64, "rollout_fragment_length": 64}
    first = make_teacher("dqn", "CartPole-v1", {}, seed=0, budget=1024, config=config)
    head = first.train_steps(512)
    first.save(str(tmp_path))
    second = make_teacher("dqn", "CartPole-v1", {}, seed=7, budget=1024, config=config)
    second.restore(str(tmp_path))
    assert second.step == 512
    assert second.algo.local_replay_buffer.get_num_timesteps() == 512  # the replay buffer came back
    observations = head.obs[::37]
    assert [first.act(o) for o in observations] == [second.act(o) for o in observations]  # same frozen weights
    tail = second.train_steps(512)
    np.testing.assert_array_equal(tail.step, np.arange(512, 1024))
    assert tail.episode[0] == head.episode[-1] + 1  # the restored runner starts a new episode
    assert tail.policy_version[0] >= head.policy_version[-1]


def schedules(teacher) -> dict:
    """What a continued DQN teacher must carry over: env steps (epsilon, lr and learning_starts
    are scheduled on them), the epsilon its module acts with, the learner's lr, the updates made."""
    learner = teacher.algo.learner_group._learner
    return {"steps": teacher.algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)),
            "epsilon": float(teacher.runner.module.epsilon_schedule.get_current_value()),
            "lr": float(learner.get_optimizer().param_groups[0]["lr"])}


@pytest.mark.parametrize("keep_buffer", [True, False])
def test_restored_dqn_continues_its_epsilon_lr_and_learning_starts(tmp_path, keep_buffer):
    config = {"learning_starts": 320, "rollout_fragment_length": 64, "epsilon_decay": 0.5, "epsilon_end": 0.05,
              "lr": 1e-3, "lr_end": 1e-4, "hidden": [32], "checkpoint_replay_buffer": keep_buffer}
    first = make_teacher("dqn", "CartPole-v1", {}, seed=0, budget=1024, config=config)
    first.train_steps(384)  # past learning_starts, epsilon still falling (to 0.05 at step 512)
    first.save(str(tmp_path))
    second = make_teacher("dqn", "CartPole-v1", {}, seed=7, budget=1024, config=config)
    second.restore(str(tmp_path))
    ahead, tail = first.train_steps(64), second.train_steps(64)
    assert schedules(second) == pytest.approx(schedules(first))
    assert 0.05 < schedules(second)["epsilon"] < 0.5 and 1e-4 < schedules(second)["lr"] < 1e-3
    assert tail.policy_version[0] == ahead.policy_version[0] > 0  # the same weights version
    assert second.train_steps(64).policy_version[0] > tail.policy_version[0]  # learning goes on: no second learning_starts
    fresh = make_teacher("dqn", "CartPole-v1", {}, seed=7, budget=1024, config=config)
    fresh.train_steps(64)
    assert schedules(fresh)["epsilon"] > 0.8 and fresh.train_steps(64).policy_version.max() == 0  # what a reset would look like


def test_atari_smoke_records_breakout_frames(tmp_path):
    preset = load_preset("atari", smoke=True)
    spec = next(s for s in teacher_specs(preset) if s.env_id == "ALE/Breakout-v5")
    store = Store(str(tmp_path))
    run_teacher(spec, store, "exp", shard_steps=preset.collect.shard_steps)
    history = TeacherHistory(store, "exp", spec.env_id, spec.teacher_id)
    table = history.read()
    encoding = check_schema(table.schema, "breakout shard")
    frames = Transitions.from_table(table, encoding).obs
    assert encoding.kind == "image" and frames.shape == (spec.budget, 84, 84) and frames.dtype == np.uint8
    assert frames.std() > 0 and len({frame.tobytes() for frame in frames[:64]}) > 1  # real, changing frames
    assert set(table["action"].to_pylist()) <= set(range(18))  # full_action_space
    shard_bytes = sum(os.path.getsize(store.full(history.path(s.path))) for s in history.read_manifest().shards)
    assert shard_bytes / spec.budget < 2000  # compressed frames: ~1 KB per transition, not 7 KB


def test_killed_rllib_teacher_actor_resumes_one_timeline(tmp_path):
    overrides = ["collect.teachers.darkroom.algo=dqn", "collect.teachers.darkroom.budget=2560",
                 "collect.teachers.darkroom.algo_config={learning_starts: 64}", "collect.teachers.darkroom.seeds=[0]",
                 "collect.shard_steps=320", "collect.checkpoint_steps=320", "evaluate.imitators.darkroom.horizon=128"]
    preset = load_preset("smoke", overrides)
    specs = teacher_specs(preset)
    store = Store(str(tmp_path))
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(results=collect(preset, store, "exp", log=lambda line: None)))
    worker.start()
    wait_until_mid_run(store, "exp", specs, timeout=120)
    for pid in teacher_actor_pids():
        os.kill(pid, signal.SIGKILL)
    worker.join(timeout=600)
    frame = read_histories(store, "exp")
    for spec in specs:
        steps = np.sort(frame[frame["teacher_id"] == spec.teacher_id]["step"].to_numpy())
        np.testing.assert_array_equal(steps, np.arange(spec.budget))
        assert manifest(store, "exp", spec)["complete"]
    assert any(r.steps_run < r.steps for r in outcome["results"])
