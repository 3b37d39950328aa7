"""The collect stage for real: Ray actors, local and S3 stores, reruns and faults."""

import json
import os
import signal
import threading

import numpy as np
import pytest
import ray
from ray.data.datasource import Partitioning

from pipeline.arms import EXTRAPOLATION, SNAPSHOT, TEACHER
from pipeline.collect import CollectError, collect, run_learner, run_teacher
from pipeline.history import TeacherHistory
from pipeline.plan import imitator_specs, learners, teacher_specs, trial_specs
from pipeline.config import ConfigError, load_preset
from pipeline.errors import PipelineError
from pipeline.evaluate import RUNNERS
from pipeline.store import Store
from pipeline.teachers import make_teacher

from helpers import assert_histories_match, manifest, read_histories, teacher_actor_pids, wait_until_mid_run

pytestmark = pytest.mark.usefixtures("ray_address")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_collect_smoke_then_read_back_with_plain_pyarrow(where, tmp_path, request):
    store = Store(str(tmp_path / "runs") if where == "local" else request.getfixturevalue("s3_uri"))
    preset = load_preset("smoke")
    specs = teacher_specs(preset)
    results = collect(preset, store, "exp", log=lambda line: None)
    assert sorted(r.teacher_id for r in results) == sorted(s.teacher_id for s in specs)
    assert_histories_match(store, "exp", specs)
    for spec in specs:
        committed = manifest(store, "exp", spec)
        assert committed["complete"] and sum(s["rows"] for s in committed["shards"]) == spec.budget
        assert [c["cutoff"] for c in committed["checkpoints"]] == [0.25, 0.5, 0.75, 1.0]
        assert [c["step"] for c in committed["checkpoints"]] == [round(f * spec.budget) for f in (0.25, 0.5, 0.75, 1.0)]
        assert all(store.exists(f"exp/{c['path']}") for c in committed["checkpoints"])
    # Ray Data reads the same histories through the store's filesystem (as the train stage will)
    rows = ray.data.read_parquet(store.full("exp/histories"), filesystem=store.arrow_fs,
                                 partitioning=Partitioning("hive")).select_columns(["teacher_id", "step"])
    assert rows.count() == sum(s.budget for s in specs)
    # rerunning the same experiment finds every teacher complete and runs nothing
    lines = []
    assert collect(preset, store, "exp", log=lines.append) == []
    assert f"{len(specs)} complete, 0 to run" in lines[0]


def test_a_different_preset_under_the_same_experiment_is_refused(tmp_path):
    store = Store(str(tmp_path / "runs"))
    collect(load_preset("smoke"), store, "exp", log=lambda line: None)
    changed = load_preset("smoke", ["collect.teachers.darkroom.budget=2400"])
    with pytest.raises(ConfigError, match=r"teacher darkroom-goal0x0-s0 .*budget: 1200 then, 2400 now"):
        collect(changed, store, "exp", log=lambda line: None)
    assert_histories_match(store, "exp", teacher_specs(load_preset("smoke")))  # nothing lost


class ProgressRecorder:
    """Stands in for the progress actor: records (teacher, step) reports; with `crash_at`, raises when
    that step is reported (after the steps are done, before they are committed), as if the process died there."""

    def __init__(self, crash_at: int | None = None):
        self.crash_at, self.reported, self.report = crash_at, [], self

    def remote(self, teacher: str, step: int):
        self.reported.append(step)
        if step == self.crash_at:
            raise KeyboardInterrupt("simulated crash")


def test_a_teacher_reports_steps_done_before_they_are_committed(tmp_path):
    store = Store(str(tmp_path / "runs"))
    preset = load_preset("smoke", ["collect.teachers.darkroom.budget=5000", "collect.teachers.darkroom.seeds=[0]"])
    progress = ProgressRecorder()
    run_teacher(teacher_specs(preset)[0], store, "exp", shard_steps=5000, checkpoint_steps=None, progress=progress)
    # one commit, at the end; cutoff checkpoints at 1250, 2500, 3750; reports at least every 2048 steps
    assert progress.reported == [1250, 2500, 3750, 5000]
    progress = ProgressRecorder()
    preset = load_preset("smoke", ["collect.teachers.darkroom.budget=20000", "collect.teachers.darkroom.seeds=[0]"])
    run_teacher(teacher_specs(preset)[0], store, "exp2", shard_steps=50000, checkpoint_steps=None, progress=progress)
    assert progress.reported == [2048, 4096, 5000, 7048, 9096, 10000, 12048, 14096, 15000, 17048, 19096, 20000]


def test_a_corrupt_shard_found_on_resume_fails_that_teacher_only(tmp_path):
    store = Store(str(tmp_path / "runs"))
    preset = load_preset("smoke")
    specs = teacher_specs(preset)
    with pytest.raises(KeyboardInterrupt):
        run_teacher(specs[0], store, "exp", shard_steps=preset.collect.shard_steps,
                    checkpoint_steps=preset.collect.checkpoint_steps, progress=ProgressRecorder(crash_at=900))
    shard = f"exp/histories/env=DarkRoom-v0/teacher={specs[0].teacher_id}/part-000000000300.parquet"
    store.write_bytes(shard, b"PAR1 garbage")
    with pytest.raises(CollectError, match=rf"1 of 4 teachers failed.*\n  {specs[0].teacher_id}: committed shard .*part-000000000300.parquet is unreadable"):
        collect(preset, store, "exp", log=lambda line: None)
    assert store.read_bytes(shard) == b"PAR1 garbage"  # kept for a person to look at
    assert store.exists(shard.replace("000000000300", "000000000000"))
    assert all(manifest(store, "exp", s)["complete"] for s in specs[1:])


def test_killed_actors_are_restarted_and_resume_from_their_checkpoints(tmp_path):
    store = Store(str(tmp_path / "runs"))
    preset = load_preset("smoke", ["collect.teachers.darkroom.budget=60000", "collect.shard_steps=5000", "collect.checkpoint_steps=5000"])
    specs = teacher_specs(preset)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(results=collect(preset, store, "exp", log=lambda line: None)))
    worker.start()
    wait_until_mid_run(store, "exp", specs)
    pids = teacher_actor_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    worker.join(timeout=300)
    assert_histories_match(store, "exp", specs)
    # at least one teacher continued from a checkpoint instead of starting over
    assert any(r.steps_run < r.steps for r in outcome["results"]), outcome["results"]


def test_a_corrupt_teacher_spec_is_named(tmp_path):
    store = Store(str(tmp_path / "runs"))
    preset = load_preset("smoke")
    collect(preset, store, "exp", log=lambda line: None)
    spec_file = f"exp/histories/env=DarkRoom-v0/teacher={teacher_specs(preset)[1].teacher_id}/_teacher.json"
    store.write_bytes(spec_file, b"{truncated")
    with pytest.raises(PipelineError, match=rf"{spec_file}: not valid JSON"):
        collect(preset, store, "exp", log=lambda line: None)
    assert store.read_bytes(spec_file) == b"{truncated"


STREAMS = ["collect.teachers.darkroom.algo=lean_ppo", "collect.teachers.darkroom.seeds=[0]",
           "collect.teachers.darkroom.algo_config={train_batch_size: 200, minibatch_size: 50, num_epochs: 1, num_envs: 2}"]


def stream_frames(store: Store, experiment: str, specs):
    frame = read_histories(store, experiment)
    return {s.teacher_id: frame[frame["teacher_id"] == s.teacher_id].sort_values("step") for s in specs}


def test_a_learner_of_two_envs_records_two_histories_with_one_checkpoint(tmp_path):
    store, preset = Store(str(tmp_path / "runs")), load_preset("smoke", STREAMS)
    specs = teacher_specs(preset)
    assert [s.teacher_id for s in specs][:2] == ["darkroom-goal0x0-s0-e0", "darkroom-goal0x0-s0-e1"]
    assert {s.learner for s in specs[:2]} == {"darkroom-goal0x0-s0"} and [s.stream for s in specs[:2]] == [0, 1]
    collect(preset, store, "exp", log=lambda line: None)
    frames = stream_frames(store, "exp", specs)
    for learner in learners(specs):
        reference = make_teacher(learner[0].algo, learner[0].env_id, learner[0].env_kwargs, seed=0,
                                 budget=learner[0].budget, config=learner[0].algo_config).train_streams(learner[0].budget)
        for spec, expected in zip(learner, reference):
            rows = frames[spec.teacher_id]
            for column in ("step", "obs", "action", "reward", "episode", "policy_version"):
                np.testing.assert_array_equal(rows[column].to_numpy(), getattr(expected, column), err_msg=column)
            stored = json.loads(store.read_bytes(f"exp/histories/env=DarkRoom-v0/teacher={spec.teacher_id}/_teacher.json"))
            assert (stored["learner"], stored["stream"]) == (learner[0].learner, spec.stream)
        listed = [manifest(store, "exp", spec)["checkpoints"] for spec in learner]
        assert listed[0] == listed[1] and all(c["path"].startswith(f"teachers/{learner[0].learner}/") for c in listed[0])
    assert not np.array_equal(frames[specs[0].teacher_id]["obs"], frames[specs[1].teacher_id]["obs"])


def test_a_crash_between_two_streams_commits_is_rolled_forward(tmp_path, monkeypatch):
    store, preset = Store(str(tmp_path / "runs")), load_preset("smoke", STREAMS)
    streams = learners(teacher_specs(preset))[0]
    run = lambda: run_learner(streams, store, "exp", shard_steps=300, checkpoint_steps=300)  # noqa: E731
    commit = TeacherHistory.commit

    def crash_before_the_second_stream_commits_600(self, manifest_, staged, *args, **kwargs):
        if self.teacher_id.endswith("-e1") and staged and staged[0].first_step == 300:
            raise KeyboardInterrupt("simulated crash")
        return commit(self, manifest_, staged, *args, **kwargs)

    monkeypatch.setattr(TeacherHistory, "commit", crash_before_the_second_stream_commits_600)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert [manifest(store, "exp", s)["shards"][-1]["last_step"] for s in streams] == [599, 299]
    before = stream_frames(store, "exp", streams)[streams[0].teacher_id]
    monkeypatch.setattr(TeacherHistory, "commit", commit)
    run()
    after = stream_frames(store, "exp", streams)
    np.testing.assert_array_equal(after[streams[0].teacher_id]["obs"].to_numpy()[:600], before["obs"].to_numpy())  # kept
    for spec in streams:
        rows = after[spec.teacher_id]
        assert manifest(store, "exp", spec)["complete"]
        np.testing.assert_array_equal(rows["step"].to_numpy(), np.arange(spec.budget))  # no gap, no duplicate
        assert (np.diff(rows["episode"].to_numpy()) >= 0).all()
    np.testing.assert_array_equal(*(after[s.teacher_id]["policy_version"].to_numpy() for s in streams))  # one learner
    leftovers = [name for s in streams for name in store.list_names(f"exp/histories/env=DarkRoom-v0/teacher={s.teacher_id}")
                 if name.startswith("_part")]
    assert leftovers == []


def test_the_units_of_a_learner_of_two_envs_are_its_first_streams_and_its_teacher_arm_continues(tmp_path):
    store, preset = Store(str(tmp_path / "runs")), load_preset("smoke", STREAMS)
    trials = [t for t in trial_specs(preset) if t.test == EXTRAPOLATION]
    assert trials and {t.teacher_spec.stream for t in trials} == {0}
    for spec in imitator_specs(preset):  # validation holds out whole learners
        assert not {t.rsplit("-e", 1)[0] for t in spec.val_teachers} & {t.rsplit("-e", 1)[0] for t in spec.train_teachers}
    collect(preset, store, "exp", log=lambda line: None)
    trial = next(t for t in trials if t.arm == TEACHER)
    episodes = list(RUNNERS[TEACHER]([trial], store, "exp"))
    assert episodes and max(step for _, step, _, _ in episodes) <= trial.horizon
    snapshot = next(t for t in trials if t.arm == SNAPSHOT)
    assert list(RUNNERS[SNAPSHOT]([snapshot], store, "exp"))
