"""The commit protocol, crash point by crash point (see pipeline/history.py)."""

import numpy as np
import pyarrow.dataset as ds
import pytest

from pipeline.history import HistoryError, TeacherHistory
from pipeline.schema import Manifest
from pipeline.store import Store
from pipeline.teachers import make_teacher

ENV = "DarkRoom-v0"


@pytest.fixture
def setup(tmp_path):
    store = Store(str(tmp_path / "runs"))
    history = TeacherHistory(store, "exp", ENV, "t0")
    teacher = make_teacher("qlearning", ENV, {"goal": [0, 0]}, seed=0, budget=400, config={})
    return store, history, teacher


def commit_next(history, teacher, manifest, n, cutoff=None, complete=False):
    """One commit of the protocol: stage a shard, checkpoint, publish and commit."""
    entry = history.stage(teacher.train_steps(n).to_table(teacher.encoding, teacher_id="t0", env_id=ENV, task_id="default", seed=0))
    checkpoint = history.checkpoint_entry(teacher.step, cutoff)
    teacher.save(history.store.full(history.checkpoint_path(teacher.step)))
    return history.commit(manifest, [entry], [checkpoint], complete=complete)


def plain_read_steps(store):
    """What an outside reader sees with plain pyarrow over the histories folder."""
    table = ds.dataset(store.full("exp/histories"), partitioning="hive").to_table(columns=["step"])
    return sorted(table["step"].to_pylist())


def test_commits_extend_one_timeline_and_drop_superseded_resume_points(setup):
    store, history, teacher = setup
    manifest = commit_next(history, teacher, Manifest(), 100)  # resume point
    manifest = commit_next(history, teacher, manifest, 100, cutoff=0.5)
    manifest = commit_next(history, teacher, manifest, 100)  # resume point
    assert [c.step for c in manifest.checkpoints] == [200, 300]
    assert store.list_names("exp/teachers/t0") == ["step=200", "step=300"]
    assert history.read_manifest() == manifest
    assert plain_read_steps(store) == list(range(300))
    assert history.read()["step"].to_pylist() == list(range(300))


def test_staged_shards_are_invisible_and_recovery_removes_them(setup):
    store, history, teacher = setup
    manifest = commit_next(history, teacher, Manifest(), 100, cutoff=0.25)
    # crash after staging and checkpointing, before publishing:
    history.stage(teacher.train_steps(100).to_table(teacher.encoding, teacher_id="t0", env_id=ENV, task_id="default", seed=0))
    teacher.save(store.full(history.checkpoint_path(200)))
    assert plain_read_steps(store) == list(range(100))
    assert history.recover() == manifest
    assert store.list_names(history.dir) == ["_manifest.json", "part-000000000000.parquet"]
    assert store.list_names("exp/teachers/t0") == ["step=100"]


def test_published_but_uncommitted_shards_are_removed(setup):
    store, history, teacher = setup
    manifest = commit_next(history, teacher, Manifest(), 100, cutoff=0.25)
    entry = history.stage(teacher.train_steps(100).to_table(teacher.encoding, teacher_id="t0", env_id=ENV, task_id="default", seed=0))
    store.rename(history.path("_" + entry.path), history.path(entry.path))  # crash right after publishing
    store.write_bytes(history.path("_notes.txt"), b"a file that is not ours")
    assert history.recover() == manifest
    assert plain_read_steps(store) == list(range(100))
    assert "_notes.txt" in store.list_names(history.dir)  # only the protocol's own files are removed


def test_a_corrupt_committed_shard_is_named_and_kept(setup):
    store, history, teacher = setup
    manifest = commit_next(history, teacher, Manifest(), 100, cutoff=0.25)
    manifest = commit_next(history, teacher, manifest, 100, cutoff=0.5)
    garbage = b"PAR1 this is not a parquet file"
    store.write_bytes(history.path("part-000000000100.parquet"), garbage)
    with pytest.raises(HistoryError, match=r"committed shard .*t0/part-000000000100.parquet is unreadable"):
        history.recover()
    assert store.read_bytes(history.path("part-000000000100.parquet")) == garbage
    assert store.list_names("exp/teachers/t0") == ["step=100", "step=200"]


def test_a_missing_committed_shard_is_named(setup):
    store, history, teacher = setup
    commit_next(history, teacher, Manifest(), 100, cutoff=0.25)
    store.delete(history.path("part-000000000000.parquet"))
    with pytest.raises(HistoryError, match="part-000000000000.parquet is missing"):
        history.recover()


def test_a_corrupt_manifest_is_named_and_nothing_is_deleted(setup):
    store, history, teacher = setup
    commit_next(history, teacher, Manifest(), 100, cutoff=0.25)
    store.write_bytes(history.path("_manifest.json"), b'{"complete": tru')
    with pytest.raises(HistoryError, match=r"_manifest.json: not a valid manifest"):
        history.recover()
    assert store.list_names(history.dir) == ["_manifest.json", "part-000000000000.parquet"]


def test_resuming_from_the_newest_checkpoint_gives_the_uninterrupted_timeline(setup, tmp_path):
    store, history, teacher = setup
    manifest = commit_next(history, teacher, Manifest(), 150, cutoff=0.25)
    teacher.train_steps(77)  # work lost in a crash, never committed
    resumed = make_teacher("qlearning", ENV, {"goal": [0, 0]}, seed=0, budget=400, config={})
    resumed.restore(store.full(f"exp/{manifest.checkpoints[-1].path}"))
    commit_next(history, resumed, history.recover(), 250, cutoff=1.0, complete=True)
    whole = make_teacher("qlearning", ENV, {"goal": [0, 0]}, seed=0, budget=400, config={}).train_steps(400)
    table = history.read()
    np.testing.assert_array_equal(table["step"].to_numpy(), whole.step)
    np.testing.assert_array_equal(table["action"].to_numpy(), whole.action)
    np.testing.assert_array_equal(table["obs"].to_numpy(), whole.obs)
