"""The evaluate stage for real: the smoke grid through Ray Tune on a local folder and on the moto
S3 server, TensorBoard files with the documented tags, units run in lockstep and each episode
reported under its own unit, and an interrupted grid finished by rerun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import pytest

from pipeline import layout
from pipeline.config import ConfigError, load_preset
from pipeline.arms import ARMS, IMITATOR, IN_DATA, RANDOM, SNAPSHOT, TEACHER
from pipeline.evaluate import RUNNERS, EvaluateError, evaluate, grid_record, recorded_steps_before, upgraded_grid
from pipeline.history import TeacherHistory
from pipeline.plan import PRIMED, trial_batches, trial_specs
from pipeline.metrics import ENV_STEPS, EPISODIC_RETURN, TRIAL_FINISHED
from pipeline.report.stage import gather, report
from pipeline.report.tables import EPISODE_STEPS, OK, RETURN, STATUS, TRIAL_ID
from pipeline.store import Store

from conftest import REPO

pytestmark = pytest.mark.usefixtures("ray_address")
QUIET = dict(log=lambda line: None)


def copy_of(trained, tmp_path) -> Store:
    root, _ = trained  # the session's smoke experiment (conftest.trained)
    shutil.copytree(root / "exp", tmp_path / "exp")
    return Store(str(tmp_path))


def batches_of(preset):
    return trial_batches(trial_specs(preset), preset.evaluate.lockstep)


def check_results(results, preset):
    assert {r.config["batch"]["batch_id"] for r in results} == {b.batch_id for b in batches_of(preset)}
    for result in results:
        assert result.error is None, result.error
        frame = result.metrics_dataframe
        assert frame[ENV_STEPS].max() <= result.config["batch"]["units"][0]["horizon"]
        assert frame[EPISODIC_RETURN].iloc[:-1].notna().all() and frame[TRIAL_FINISHED].iloc[-1]


def test_smoke_grid_runs_through_tune_with_tensorboard_files(trained, tmp_path):
    store = copy_of(trained, tmp_path)
    preset = trained[1]
    results = evaluate(preset, store, "exp", **QUIET)
    check_results(results, preset)
    events = [p for p in (tmp_path / "exp" / "tune").rglob("events.out.tfevents*")]
    assert len({p.parent for p in events}) == len(batches_of(preset))  # one TensorBoard log per trial
    assert all(f"ray/tune/{EPISODIC_RETURN}".encode() in p.read_bytes() for p in events)
    # TensorBoard plots the return against env steps (the trial's charts/env_steps), not against reports
    for result in results:
        folder = tmp_path / "exp" / "tune" / result.config["batch"]["batch_id"]
        returns = tensorboard_scalars(folder, f"ray/tune/{EPISODIC_RETURN}")
        reported = result.metrics_dataframe.dropna(subset=[EPISODIC_RETURN])
        assert returns == list(zip(reported[ENV_STEPS], reported[EPISODIC_RETURN])), folder


LOCKSTEP = ["evaluate.lockstep=3", "evaluate.imitators.darkroom.teachers=4",
            "evaluate.imitators.darkroom.heldout_seeds=[0,1,2]"]


def test_units_in_lockstep_report_each_episode_under_its_own_unit(trained, tmp_path):
    """Four extrapolation units per arm (the in-data control's too) run as Tune trials of 2 and 2,
    three transfer units as one trial of 3: the report gets every unit's episodes, the same as that
    unit run alone, and builds with the in-data control's units among them."""
    store = copy_of(trained, tmp_path)
    preset = load_preset("smoke", LOCKSTEP)
    units, batches = trial_specs(preset), batches_of(preset)
    assert sorted(len(b.units) for b in batches if b.arm != TEACHER) == [2] * 8 + [3] * 2
    check_results(evaluate(preset, store, "exp", **QUIET), preset)
    trials, episodes, _ = gather(preset, store, "exp")
    assert len(trials) == len(units) and (trials[STATUS] == OK).all()
    by_unit = {unit: list(zip(rows[EPISODE_STEPS], rows[RETURN])) for unit, rows in episodes.groupby(TRIAL_ID)}
    episode_len = preset.collect.teachers["darkroom"].env_kwargs["episode_len"]
    assert all(len(by_unit[u.trial_id]) == u.horizon // episode_len for u in units if u.arm != TEACHER)
    for arm in (RANDOM, SNAPSHOT):  # deterministic given the unit's seed: the same alone as in its batch
        alone = {u.trial_id: [(steps, ret) for _, steps, ret, _ in RUNNERS[arm]([u], store, "exp")]
                 for u in units if u.arm == arm}
        assert alone == {unit: by_unit[unit] for unit in alone}
        assert len({tuple(episodes) for episodes in alone.values()}) > 1  # units differ: a mix-up would show
    assert {u.trial_id for u in units if u.arm in (IMITATOR, IN_DATA)} <= set(by_unit)
    in_data = [u for u in units if u.arm == IN_DATA]
    assert len(in_data) == 4 and all(u.horizon == 450 for u in in_data)  # from c' = 150 to the cutoff at 600
    assert len(report(preset, store, "exp", **QUIET).table)


def test_a_primed_context_holds_the_teachers_last_steps_before_its_units_prime_step(trained):
    """The in-data control's context ends at its prime step c' (150 steps into the smoke teacher's
    history), the imitator arm's at the cutoff (600); fewer steps where fewer are recorded."""
    store, preset = Store(str(trained[0])), trained[1]
    units = [u for u in trial_specs(preset) if u.context == PRIMED]
    in_data, imitator = (next(u for u in units if u.arm == arm) for arm in (IN_DATA, IMITATOR))
    assert (in_data.primed_until, imitator.primed_until) == (150, 600)
    table = TeacherHistory(store, "exp", in_data.env_id, in_data.teacher_spec.teacher_id).read()
    steps, actions, rewards = (table[column].to_numpy() for column in ("step", "action", "reward"))
    for unit, end in ((in_data, 150), (imitator, 600), (replace(in_data, prime_step=7), 7),
                      (replace(in_data, prime_step=0), 0)):
        obs, action, reward, first = recorded_steps_before(unit, unit.primed_until, store, "exp", 20)
        recorded = (steps >= end - 20) & (steps < end)
        assert len(obs) == len(action) == len(first) == min(20, end)
        np.testing.assert_array_equal(action, actions[recorded])
        np.testing.assert_array_equal(reward, rewards[recorded])


def test_a_grid_recorded_before_the_in_data_control_reruns_with_it_off():
    preset = load_preset("smoke", ["evaluate.imitators.darkroom.in_data_fraction=null"])
    grid = grid_record(trial_specs(preset), batches_of(preset), preset.evaluate.lockstep)
    old = {**grid, "trials": [{k: v for k, v in trial.items() if k != "prime_step"} for trial in grid["trials"]]}
    assert not layout.check_rerun(json.dumps(old).encode(), grid, what="an evaluation grid", experiment="exp",
                                  where="_grid.json", upgrade=upgraded_grid)


def test_a_rerun_with_another_lockstep_or_a_grid_from_before_lockstep_is_refused(trained, tmp_path):
    store = copy_of(trained, tmp_path)
    preset = load_preset("smoke", LOCKSTEP)
    grid = grid_record(trial_specs(preset), batches_of(preset), preset.evaluate.lockstep)
    layout.record_settings(store, layout.grid_file("exp"), grid, what="an evaluation grid", experiment="exp")
    with pytest.raises(ConfigError, match=r"already holds an evaluation grid with other settings \(lockstep: 3 then, 2 now"):
        evaluate(load_preset("smoke", LOCKSTEP + ["evaluate.lockstep=2"]), store, "exp", **QUIET)
    store.write_bytes(layout.grid_file("exp"), json.dumps([asdict(t) for t in trial_specs(preset)]).encode())
    with pytest.raises(ConfigError, match=r"\(lockstep: 'none \(one Tune trial per unit, recorded before evaluate.lockstep\)' then, 3 now"):
        evaluate(preset, store, "exp", **QUIET)
    assert not (tmp_path / "exp" / "tune").exists()


def tensorboard_scalars(folder, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, pytest.approx(event.value)) for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_smoke_grid_on_s3(trained, s3_uri):
    store = Store(s3_uri)
    store.upload_dir(str(trained[0] / "exp"), "exp")
    results = evaluate(trained[1], store, "exp", **QUIET)
    check_results(results, trained[1])
    assert any("tfevents" in p for p in store.fs.find(store.full("exp/tune")))


def test_every_arm_of_the_registry_has_a_rollout():
    assert set(RUNNERS) == set(ARMS)


def test_missing_imitator_is_named_before_any_trial(tmp_path, trained):
    store = copy_of(trained, tmp_path)
    shutil.rmtree(tmp_path / "exp" / "imitators")
    with pytest.raises(EvaluateError, match=r"imitator darkroom-tiny-ctx20 at cutoff 0.5 has not finished training"):
        evaluate(trained[1], store, "exp", **QUIET)


def test_interrupted_grid_reruns_only_missing_trials(trained, tmp_path, ray_address):
    store = copy_of(trained, tmp_path)
    overrides = ["evaluate.max_concurrent_trials=1", "evaluate.imitators.darkroom.horizon=3000"]
    preset = load_preset("smoke", overrides)
    command = [sys.executable, "-m", "pipeline", "evaluate", "--preset", "smoke", "--store", str(tmp_path),
               "--experiment", "exp", *[arg for o in overrides for arg in ("--set", o)]]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "RAY_ADDRESS": ray_address},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tune_dir = tmp_path / "exp" / "tune"
    deadline = time.time() + 300
    while len(finished_trials(tune_dir)) < 2:
        assert process.poll() is None and time.time() < deadline, "the grid ended or stalled before two trials finished"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = finished_trials(tune_dir)
    assert 2 <= len(before) < len(batches_of(preset))
    results = evaluate(preset, store, "exp", **QUIET)
    check_results(results, preset)
    after = finished_trials(tune_dir)
    assert all(after[name] == lines for name, lines in before.items())  # finished trials were not run again


def finished_trials(tune_dir) -> dict[str, list[str]]:
    """Trial folder -> the lines of its result.json (timestamped reports), for trials whose last report is in."""
    found = {}
    for result in tune_dir.glob("*/result.json") if tune_dir.exists() else []:
        lines = result.read_text().splitlines()
        if lines and f'"{TRIAL_FINISHED}": true' in lines[-1]:
            found[result.parent.name] = lines
    return found
