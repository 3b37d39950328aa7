"""The evaluate stage for real: the smoke grid through Ray Tune on a local folder and on the moto
S3 server, TensorBoard files with the documented tags, and an interrupted grid finished by rerun."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline.config import load_preset
from pipeline.arms import ARMS
from pipeline.evaluate import RUNNERS, EvaluateError, evaluate
from pipeline.plan import trial_specs
from pipeline.metrics import ENV_STEPS, EPISODIC_RETURN, TRIAL_FINISHED
from pipeline.store import Store

from conftest import REPO

pytestmark = pytest.mark.usefixtures("ray_address")
QUIET = dict(log=lambda line: None)


def copy_of(trained, tmp_path) -> Store:
    root, _ = trained  # the session's smoke experiment (conftest.trained)
    shutil.copytree(root / "exp", tmp_path / "exp")
    return Store(str(tmp_path))


def check_results(results, preset):
    expected = {t.trial_id for t in trial_specs(preset)}
    assert {r.config["trial"]["trial_id"] for r in results} == expected
    for result in results:
        assert result.error is None, result.error
        frame = result.metrics_dataframe
        assert frame[ENV_STEPS].max() <= result.config["trial"]["horizon"]
        assert frame[EPISODIC_RETURN].iloc[:-1].notna().all() and frame[TRIAL_FINISHED].iloc[-1]


def test_smoke_grid_runs_through_tune_with_tensorboard_files(trained, tmp_path):
    store = copy_of(trained, tmp_path)
    preset = trained[1]
    results = evaluate(preset, store, "exp", **QUIET)
    check_results(results, preset)
    events = [p for p in (tmp_path / "exp" / "tune").rglob("events.out.tfevents*")]
    assert len({p.parent for p in events}) == len(trial_specs(preset))  # one TensorBoard log per trial
    assert all(f"ray/tune/{EPISODIC_RETURN}".encode() in p.read_bytes() for p in events)
    # TensorBoard plots the return against env steps (the trial's charts/env_steps), not against reports
    for result in results:
        folder = tmp_path / "exp" / "tune" / result.config["trial"]["trial_id"]
        returns = tensorboard_scalars(folder, f"ray/tune/{EPISODIC_RETURN}")
        reported = result.metrics_dataframe.dropna(subset=[EPISODIC_RETURN])
        assert returns == list(zip(reported[ENV_STEPS], reported[EPISODIC_RETURN])), folder


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
    assert 2 <= len(before) < len(trial_specs(preset))
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
