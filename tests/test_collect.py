"""The collect stage for real: Ray actors, local and S3 stores, reruns and faults."""

import os
import signal
import threading

import pytest
import ray
from ray.data.datasource import Partitioning

from pipeline.collect import CollectError, collect, run_teacher
from pipeline.plan import teacher_specs
from pipeline.config import ConfigError, load_preset
from pipeline.errors import PipelineError
from pipeline.store import Store

from helpers import assert_histories_match, manifest, teacher_actor_pids, wait_until_mid_run

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
