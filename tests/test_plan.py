"""The plan layer: pure functions of the preset, importable without Ray or torch."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline import layout
from pipeline.arms import ARMS, CONTROL, EXTRAPOLATION, IMITATOR, IN_DATA, TEACHER, TRANSFER, arms_for
from pipeline.config import ConfigError, load_preset
from pipeline.errors import PipelineError
from pipeline.plan import (PRIMED, ImitatorSpec, TrialBatch, imitator_specs, in_data_prime_step, trial_batches,
                           trial_specs)


def test_plan_layout_and_arms_import_neither_ray_nor_torch():
    code = ("import sys; import pipeline.plan, pipeline.layout, pipeline.arms, pipeline.errors; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_trial_arm_is_in_the_registry_and_runs_in_its_tests():
    trials = trial_specs(load_preset("quick"))
    assert {t.test for t in trials} == {EXTRAPOLATION, TRANSFER, CONTROL}
    for trial in trials:
        assert trial.arm in arms_for(trial.test)
    snapshot_tests = {t.test for t in trials if t.arm == "snapshot"}
    assert snapshot_tests == set(ARMS["snapshot"].tests) == {EXTRAPOLATION}


def shared(unit):
    return unit.test, unit.group, unit.cutoff, unit.arm, unit.imitator, unit.context


@pytest.mark.parametrize("lockstep", [1, 5, 16])
def test_units_are_grouped_into_trials_of_one_arm_and_test_teachers_alone(lockstep):
    units = trial_specs(load_preset("quick"))
    batches = trial_batches(units, lockstep)
    order = [u.trial_id for u in units]
    assert sorted(order.index(u.trial_id) for b in batches for u in b.units) == list(range(len(units)))  # each once
    assert len({b.batch_id for b in batches}) == len(batches)
    for batch in batches:
        assert 1 <= len(batch.units) <= (1 if batch.arm == TEACHER else lockstep)
        assert len({shared(u) for u in batch.units}) == 1
        assert sorted(batch.units, key=lambda u: order.index(u.trial_id)) == list(batch.units)
        assert (batch.batch_id == batch.units[0].trial_id) == (len(batch.units) == 1)
        config = json.loads(json.dumps(batch.config()))  # as Tune stores it
        assert TrialBatch.from_config(config).config() == config and config["arm"] == batch.arm
    # units that could share a trial fill as few trials as the limit allows, of sizes differing by at most one
    for key in {shared(u) for u in units if u.arm != TEACHER}:
        sizes = [len(b.units) for b in batches if shared(b.units[0]) == key]
        assert len(sizes) == -(-sum(sizes) // lockstep) and max(sizes) - min(sizes) <= 1
    if lockstep == 1:
        assert sorted(b.batch_id for b in batches) == sorted(order)


def test_the_quick_grid_runs_in_fewer_fuller_trials():
    preset = load_preset("quick")
    units, batches = trial_specs(preset), trial_batches(trial_specs(preset), preset.evaluate.lockstep)
    control = [b for b in batches if b.units[0].test == CONTROL and b.arm == "imitator"]
    assert [len(b.units) for b in control] == [16]  # the 16 held-out goals in one imitator trial
    assert len(batches) < len(units) / 2


def test_the_in_data_control_primes_each_variant_a_quarter_of_the_way_to_the_cutoff():
    """atari: two context lengths, three cutoffs, primed and empty contexts, 100-step iterations."""
    preset = load_preset("atari")
    trials = trial_specs(preset)
    in_data = [t for t in trials if t.arm == IN_DATA]
    primed = [t for t in trials if t.arm == IMITATOR and t.test == EXTRAPOLATION and t.context == PRIMED]
    assert sorted(t.trial_id for t in in_data) == sorted(f"{t.trial_id}-{IN_DATA}" for t in primed)
    # c' = 0.25 c rounded down to whole iterations; the horizon is the stretch from c' to c, not H
    expected = {625_000: (156_200, 468_800), 1_250_000: (312_500, 937_500), 1_875_000: (468_700, 1_406_300)}
    assert {t.cutoff_step: (t.prime_step, t.horizon) for t in in_data} == expected
    assert all(t.test == EXTRAPOLATION and t.context == PRIMED and t.primed_until == t.prime_step for t in in_data)
    assert all(t.prime_step is None and t.primed_until == t.cutoff_step for t in trials if t.arm != IN_DATA)
    batches = [b for b in trial_batches(trials, preset.evaluate.lockstep) if b.arm == IN_DATA]
    assert len(batches) == 6 and len({b.batch_id for b in batches}) == 6  # one per cutoff and variant
    assert all(len({(u.imitator, u.prime_step, u.horizon) for u in b.units}) == 1 for b in batches)


@pytest.mark.parametrize("override", ["evaluate.imitators.darkroom.in_data_fraction=null",
                                      "evaluate.imitators.darkroom.contexts=[empty]"])
def test_no_in_data_control_when_it_is_off_or_no_context_is_primed(override):
    trials = trial_specs(load_preset("smoke", [override]))
    assert {t.arm for t in trials} == {*ARMS} - {IN_DATA}


def test_the_prime_step_is_rounded_down_to_whole_iterations_and_may_be_the_start():
    assert in_data_prime_step(6016, 0.25, 64) == 1472
    assert in_data_prime_step(1000, 0.3, 100) == 300  # 0.3 * 1000 / 100 is 2.9999999999999996 in floats
    assert in_data_prime_step(128, 0.25, 64) == 0  # less than an iteration: from the teacher's start


def test_imitator_spec_carries_its_size_and_reads_old_records_without_it():
    spec = imitator_specs(load_preset("quick"))[0]
    assert spec.size == "small" and spec.name == f"{spec.group}-small-ctx{spec.model_args['context_steps']}"
    old = spec.settings()
    del old["size"]  # an _imitator.json written before the size was stored
    assert ImitatorSpec.from_dict(old) == spec
    assert not layout.check_rerun(json.dumps(old).encode(), spec.settings(), what="imitator", experiment="e",
                                  where="x", upgrade=lambda d: ImitatorSpec.from_dict(d).settings())


def test_a_rerun_with_other_settings_is_refused_naming_the_difference():
    with pytest.raises(ConfigError, match=r"already holds teacher t with other settings \(budget: 2000 then, 4000 now\)"):
        layout.check_rerun(b'{"budget": 2000}', {"budget": 4000}, what="teacher t", experiment="e", where="x")
    with pytest.raises(PipelineError, match="_teacher.json: not valid JSON"):
        layout.check_rerun(b"{", {"budget": 4000}, what="teacher t", experiment="e", where="_teacher.json")
    assert layout.check_rerun(None, {"budget": 4000}, what="teacher t", experiment="e", where="x")


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/b", "..", ".hidden", "", "a b", "-x"])
def test_names_that_would_leave_their_folder_are_refused(name):
    with pytest.raises(PipelineError, match="not a usable name") as caught:
        layout.check_name("--experiment", name)
    assert caught.value.exit_status == 2


@pytest.mark.parametrize("override, message", [
    ("evaluate.imitators.darkroom.contexts=[]", "List should have at least 1 item"),
    ("evaluate.imitators.darkroom.heldout_seeds=[]", "List should have at least 1 item"),
    ("train.imitators.darkroom.context_steps=[]", "List should have at least 1 item"),
    ("collect.teachers.darkroom.seeds=[]", "List should have at least 1 item"),
    ("evaluate.trial_resources={snapshots: {cpus: 1}}", "unknown arm"),
    ("collect.teachers.darkroom.budget=3", "too small to give distinct cutoff steps"),
    ("collect.teachers.darkroom.budget=[1,", "not valid YAML"),
    ("evaluate.imitators.darkroom.in_data_fraction=0", "in_data_fraction: Input should be greater than 0"),
    ("evaluate.imitators.darkroom.in_data_fraction=1", "in_data_fraction: Input should be less than 1"),
])
def test_an_override_at_fault_is_named_as_the_culprit(override, message):
    with pytest.raises(ConfigError) as caught:
        load_preset("smoke", [override])
    text = str(caught.value)
    assert text.startswith(f"--set {override}:") and message in text and "\n" not in text, text


def test_a_group_that_would_run_no_test_is_refused():
    overrides = ["train.imitators.darkroom.cutoffs=[1.0]", "evaluate.imitators.darkroom.heldout=0"]
    with pytest.raises(ConfigError, match=r"evaluate.imitators.darkroom: runs no test"):
        load_preset("smoke", overrides)
