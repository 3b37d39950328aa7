"""Metrics of docs/design.md on synthetic curves whose answers are known by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.metrics import (B_C, B_C_DEBIASED, CEILING_EXCEEDANCE, COUNT, CUTOFF, DEGRADES, DOES_NOT, ENV, ENV_STEPS,
                              EPISODIC_RETURN, EXTRAPOLATES, EXTRAPOLATION_RATIO, EXTRAPOLATION_RATIO_REASON, FIDELITY,
                              FINAL_IMITATOR, FINAL_RANDOM, FINAL_SNAPSHOT, FINAL_TEACHER, FIRST_IMITATOR,
                              GAIN_IMITATOR, GAIN_TEACHER, IMITATION_FAILED, IMITATOR_DRIFT, IN_DATA_RATIO,
                              INCONCLUSIVE, L_C, MISSING, MISSING_SEEDS, N_SEEDS, NOT_TESTABLE, SEED,
                              SNAPSHOT_FIDELITY, VERDICT_REASON, Curve, VerdictRules, auc, best_window_mean,
                              ci_columns, debiased_best_window_mean, extrapolation_ratio, fieller_interval, mean_ci,
                              extrapolation_verdict, final_window_mean, first_window_mean, last_window_mean,
                              per_seed_metrics, summarise, transfer_auc_ratio, verdict, window_mean)

EPISODE = 20  # env steps per synthetic episode
SEEDS = [0, 1, 2, 3, 4]


def curve(returns, start: int = 0) -> Curve:
    """Episodes of EPISODE steps each, the first ending at start + EPISODE."""
    returns = np.asarray(returns, dtype=float)
    return Curve(start + EPISODE * np.arange(1, len(returns) + 1), returns)


def nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


# --- curves and windows --------------------------------------------------------------------------


def test_window_means_by_hand():
    c = curve(np.arange(1, 16))  # returns 1..15, ending at steps 20, 40, ..., 300
    assert window_mean([1, 2, 3, 4], 2) == 3.5
    assert last_window_mean(c, 200, 3) == 9.0  # episodes 1..10 finished by step 200: mean(8, 9, 10)
    assert last_window_mean(c, 199, 3) == 8.0  # the episode ending at 200 is not finished by 199
    assert last_window_mean(c, None, 3) == 14.0
    assert first_window_mean(c, 3) == 2.0 and final_window_mean(c, 4) == 13.5
    peaked = curve([0, 5, 9, 1, 1, 1, 50])
    assert best_window_mean(peaked, 120, 2) == 7.0  # rolling means 2.5, 7, 5, 1, 1; the 50 ends at 140
    assert best_window_mean(peaked, None, 2) == 25.5


def test_fewer_than_w_episodes_use_what_exists_and_none_is_nan():
    c = curve([2.0, 4.0])
    assert last_window_mean(c, None, 10) == best_window_mean(c, None, 10) == first_window_mean(c, 10) == 3.0
    assert nan(last_window_mean(c, 19, 10)) and nan(best_window_mean(c, 0, 10))
    assert nan(final_window_mean(curve([]), 10)) and nan(window_mean([], 10))


def test_best_window_is_at_least_the_last_window():
    rng = np.random.default_rng(1)
    c = curve(rng.normal(size=200).cumsum())
    for by in (100, 1000, 4000):
        assert best_window_mean(c, by, 10) >= last_window_mean(c, by, 10)


def test_curve_from_transitions_and_from_results():
    reward = np.array([0, 1, 0, 2, 2, 5, 1], dtype=np.float32)
    done = np.array([0, 1, 0, 0, 1, 0, 0], dtype=bool)  # two finished episodes, one unfinished
    c = Curve.from_transitions(np.arange(100, 107), reward, done)
    np.testing.assert_array_equal(c.end_step, [102, 105])  # last row's step + 1
    np.testing.assert_array_equal(c.episode_return, [1.0, 4.0])

    frame = pd.DataFrame({ENV_STEPS: [40, 10, 25, 30], EPISODIC_RETURN: [4.0, 1.0, np.nan, 3.0]})
    c = Curve.from_results(frame)
    np.testing.assert_array_equal(c.end_step, [10, 30, 40])
    np.testing.assert_array_equal(c.episode_return, [1.0, 3.0, 4.0])


def test_curve_rejects_bad_input():
    with pytest.raises(ValueError, match="non-decreasing"):
        Curve(np.array([10, 5]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="2 end steps but 1 returns"):
        Curve(np.array([1, 2]), np.array([1.0]))


# --- per seed ------------------------------------------------------------------------------------


def test_per_seed_metrics_by_hand():
    # Pre-cutoff: 10 episodes at 50, 10 at 100 (the best window), 10 at 80 (the last); after the
    # cutoff at step 600 the recorded history reaches 500, which the imitator never saw.
    history = curve([50] * 10 + [100] * 10 + [80] * 10 + [500] * 10)
    cutoff = 30 * EPISODE
    teacher = curve([100] * 10 + [150] * 10)
    imitator = curve([72] * 10 + [90] * 10 + [10_000])  # the last episode ends after the horizon
    snapshot = curve([80] * 21)
    horizon = 20 * EPISODE
    m = per_seed_metrics(history, teacher, imitator, snapshot, cutoff_step=cutoff, horizon_steps=horizon)
    assert m[L_C] == 80 and m[B_C] == 100 and m[B_C_DEBIASED] == 100
    assert m[FINAL_TEACHER] == 150 and m[GAIN_TEACHER] == 70
    assert m[FINAL_IMITATOR] == 90 and m[GAIN_IMITATOR] == 10 and m[CEILING_EXCEEDANCE] == -10
    assert m[FIRST_IMITATOR] == 72 and m[SNAPSHOT_FIDELITY] == pytest.approx(0.9) and m[IMITATOR_DRIFT] == 18
    assert m[FINAL_SNAPSHOT] == 80 and nan(m[FINAL_RANDOM]) and nan(m[FIDELITY])  # no random arm given
    assert nan(m[IN_DATA_RATIO])  # no in-data control given
    # with a random arm at 20 and an in-data control primed at episode 10 (L_c' = 50) ending at 70
    m = per_seed_metrics(history, teacher, imitator, snapshot, cutoff_step=cutoff, horizon_steps=horizon,
                         random=curve([20] * 20), in_data=curve([60] * 5 + [70] * 10), prime_step=10 * EPISODE)
    assert m[FIDELITY] == pytest.approx((72 - 20) / (80 - 20)) and m[IN_DATA_RATIO] == pytest.approx((70 - 50) / (80 - 50))
    # the same history already cut gives the same ceiling
    assert per_seed_metrics(history.upto(cutoff), teacher, imitator, snapshot)[B_C] == 100


def test_the_debiased_best_window_is_not_lifted_by_noise():
    flat = curve(np.random.default_rng(0).normal(100, 20, 400))  # no improvement: the best window is noise
    assert best_window_mean(flat, None) > 115  # the max over ~390 noisy windows
    assert debiased_best_window_mean(flat, None) == pytest.approx(100, abs=8)
    rising = curve(np.linspace(0, 100, 200))
    assert debiased_best_window_mean(rising, None) == pytest.approx(best_window_mean(rising, None), abs=3)
    assert debiased_best_window_mean(curve([4, 6]), None) == 5  # fewer than W episodes: their mean


def test_snapshot_fidelity_is_nan_when_the_teacher_returned_zero():
    m = per_seed_metrics(curve([0] * 10), curve([1] * 10), curve([3] * 10), curve([0] * 10))
    assert m[L_C] == 0 and nan(m[SNAPSHOT_FIDELITY]) and m[FIRST_IMITATOR] == 3


def test_a_missing_arm_gives_nan_not_zero():
    m = per_seed_metrics(curve([5] * 10), curve([9] * 10), None, curve([5] * 10))
    assert nan(m[FINAL_IMITATOR]) and nan(m[GAIN_IMITATOR]) and nan(m[SNAPSHOT_FIDELITY])
    assert m[GAIN_TEACHER] == 4


# --- area under the curve -------------------------------------------------------------------------


def test_auc_of_a_constant_curve_is_the_constant():
    assert auc(curve([7.0] * 30), 1000) == pytest.approx(7.0)
    assert auc(curve([-3.0] * 5, start=130), 200) == pytest.approx(-3.0)  # the first return holds before its end


def test_auc_by_hand():
    c = Curve(np.array([10, 30, 80]), np.array([1.0, 3.0, 100.0]))
    assert auc(c, 50) == pytest.approx((10 * 1 + 20 * 1 + 20 * 3) / 50)  # the episode ending at 80 is ignored
    assert nan(auc(c, 5))  # no episode ends within the horizon


def test_transfer_auc_ratio():
    assert transfer_auc_ratio(curve([2.0] * 10), curve([4.0] * 10), 200) == pytest.approx(0.5)
    assert nan(transfer_auc_ratio(curve([2.0] * 10), curve([0.0] * 10), 200))


# --- intervals ------------------------------------------------------------------------------------


def test_mean_ci_is_the_t_interval_and_narrows_with_seeds():
    few = np.array([8.3, 12.1, 9.4, 11.7, 10.2])
    estimate, low, high = mean_ci(few)
    half = 2.776 * few.std(ddof=1) / np.sqrt(5)  # t(0.975, 4 df)
    assert estimate == pytest.approx(few.mean()) and (low, high) == pytest.approx((few.mean() - half, few.mean() + half), rel=1e-3)
    _, low_many, high_many = mean_ci(np.tile(few, 20))  # the same spread over 20x the seeds
    assert high_many - low_many < (high - low) / 3


def test_mean_ci_drops_nans_and_needs_two_values_for_bounds():
    assert mean_ci([1.0, np.nan, 3.0])[0] == 2.0
    estimate, low, high = mean_ci([4.0, np.nan])
    assert estimate == 4.0 and nan(low) and nan(high)
    assert all(nan(x) for x in mean_ci([]))


# Per-seed metrics are roughly normal, heavy-tailed or skewed; at the seeds runs have, the 95%
# interval must hold the true mean at least 90% of the time (issue #14). The percentile bootstrap
# the report used before covered 72-84% at 5 seeds on these.
SHAPES = {"normal": lambda rng, n: rng.normal(0, 1, n), "t, 3 df": lambda rng, n: rng.standard_t(3, n),
          "skewed": lambda rng, n: rng.lognormal(0, 0.5, n) - np.exp(0.125)}


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("shape", SHAPES)
def test_intervals_cover_at_the_seeds_runs_have(shape, n):
    rng, runs = np.random.default_rng(7), 4000
    covered = sum(low <= 0 <= high for _, low, high in (mean_ci(SHAPES[shape](rng, n)) for _ in range(runs)))
    assert covered / runs >= 0.90, covered / runs


def test_the_ratio_interval_covers_the_ratio_of_mean_gains():
    rng, runs, covered = np.random.default_rng(3), 2000, 0
    for _ in range(runs):
        teacher = rng.normal(100, 30, 5)  # the continued teacher's gains: mean 100
        imitator = 0.3 * teacher + rng.normal(0, 20, 5)  # the imitator keeps 30% of them, noisily
        low, high = fieller_interval(imitator, teacher)
        covered += low <= 0.3 <= high
    assert covered / runs >= 0.90


def test_extrapolation_ratio_reported_only_for_a_significant_teacher_gain():
    teacher_gain = np.array([100.0, 110, 90, 105, 95])
    imitator_gain = np.array([50.0, 60, 40, 55, 45])
    r = extrapolation_ratio(imitator_gain, teacher_gain)
    assert r.estimate == pytest.approx(0.5) and r.low < 0.5 < r.high and r.reason == ""

    flat_teacher = np.array([30.0, -40, 10, -20, 15])  # mean -1: no significant gain
    r = extrapolation_ratio(imitator_gain, flat_teacher)
    assert nan(r.estimate) and nan(r.low) and nan(r.high) and "not significantly positive" in r.reason
    assert "fewer than 2" in extrapolation_ratio([1.0, np.nan], [5.0, 6.0]).reason  # one paired seed


# --- verdicts -------------------------------------------------------------------------------------


def seed_rows(imitator_final, teacher_final, pre_cutoff_best=100.0, imitator_start=100.0, random=10.0, in_data=100.0):
    """Per-seed metrics of 5 seeds from synthetic curves: the teacher's history rises to
    `pre_cutoff_best` (L_c); the imitator starts at `imitator_start` for 10 episodes, the in-data
    control (primed at episode 10, L_c' about 11.5) ends at `in_data` (None: not run); random at `random`."""
    rows = []
    for seed, (im, te) in enumerate(zip(imitator_final, teacher_final)):
        history = curve(np.linspace(0, pre_cutoff_best, 40).tolist() + [pre_cutoff_best] * 10)
        m = per_seed_metrics(history, curve([pre_cutoff_best] * 10 + [te] * 10), curve([imitator_start] * 10 + [im] * 10),
                             curve([pre_cutoff_best] * 20), random=curve([random] * 20),
                             in_data=None if in_data is None else curve([in_data] * 10), prime_step=10 * EPISODE)
        rows.append({ENV: "Env-v0", CUTOFF: 0.25, SEED: seed, **m})
    return pd.DataFrame(rows)


def ladder(frame: pd.DataFrame, **kwargs):
    return extrapolation_verdict(frame, kwargs.pop("expected_seeds", frame[SEED].tolist()), **kwargs)


def test_an_imitator_above_its_ceiling_extrapolates():
    frame = seed_rows(imitator_final=[198, 203, 200, 197, 202], teacher_final=[250] * 5)
    assert frame[B_C_DEBIASED].to_numpy() == pytest.approx([100] * 5, abs=3)
    assert ladder(frame).said == EXTRAPOLATES


def test_an_imitator_stuck_at_the_snapshot_while_the_teacher_rises_does_not():
    frame = seed_rows(imitator_final=[99, 101, 100, 98, 102], teacher_final=[195, 205, 200, 210, 190])
    found = ladder(frame)
    assert found.said == DOES_NOT and "below 0.25" in found.reason and not found.degrades


def test_without_the_in_data_control_a_null_is_not_drawn():
    frame = seed_rows(imitator_final=[99, 101, 100, 98, 102], teacher_final=[195, 205, 200, 210, 190], in_data=None)
    found = ladder(frame)
    assert found.said == INCONCLUSIVE and "no in-data control" in found.reason


def test_a_teacher_that_does_not_improve_makes_the_test_not_testable():
    frame = seed_rows(imitator_final=[99, 101, 100, 98, 102], teacher_final=[60, 140, 110, 90, 105])
    found = ladder(frame)
    assert found.said == NOT_TESTABLE and "not above 0" in found.reason


@pytest.mark.parametrize("change, reason", [({"imitator_start": 30.0}, "fidelity 0.22 < 0.5"),
                                             ({"in_data": 20.0}, "in-data ratio 0.10 < 0.5")])
def test_an_imitator_that_does_not_reproduce_its_data_failed_imitation(change, reason):
    frame = seed_rows(imitator_final=[99, 101, 100, 98, 102], teacher_final=[195, 205, 200, 210, 190], **change)
    found = ladder(frame)
    assert found.said == IMITATION_FAILED and found.reason == reason
    assert ladder(frame, rules=VerdictRules(fidelity=0.1, in_data=0.05)).said == DOES_NOT  # the thresholds decide


def test_noisy_overlapping_seeds_are_inconclusive_and_say_what_they_leave_open():
    frame = seed_rows(imitator_final=[60, 170, 120, 80, 140], teacher_final=[190, 210, 200, 205, 195])
    found = ladder(frame)
    assert found.said == INCONCLUSIVE and "are not ruled out at n = 5" in found.reason


def test_an_imitator_ending_below_its_start_degrades():
    frame = seed_rows(imitator_final=[49, 51, 50, 48, 52], teacher_final=[195, 205, 200, 210, 190])
    assert ladder(frame) == (DOES_NOT, ladder(frame).reason, True)


def test_a_missing_seed_is_reported_not_averaged_away():
    frame = seed_rows(imitator_final=[198, 203, 200, 197, 202], teacher_final=[250] * 5)
    frame.loc[frame[SEED] == 3, FINAL_IMITATOR] = np.nan  # that seed's imitator trial failed
    assert ladder(frame).said == f"{MISSING}: seeds [3]"
    # a seed with no row at all, caught through the expected seeds
    four = frame[frame[SEED] != 3]
    assert ladder(four).said == EXTRAPOLATES  # the four present seeds alone would pass
    assert ladder(four, expected_seeds=SEEDS).said == f"{MISSING}: seeds [3]"
    assert verdict([], [], []) == f"{MISSING}: no seeds"  # the transfer tests' rule


# --- summary --------------------------------------------------------------------------------------


def test_summarise_one_row_per_env_and_cutoff_with_cis_verdicts_and_missing_seeds():
    up = seed_rows(imitator_final=[198, 203, 200, 197, 202], teacher_final=[250] * 5)
    flat = seed_rows(imitator_final=[99, 101, 100, 98, 102], teacher_final=[195, 205, 200, 210, 190])
    flat[ENV] = "Flat-v0"
    gap = seed_rows(imitator_final=[198, 203, 200, 197, 202], teacher_final=[250] * 5)
    gap[CUTOFF] = 0.5
    gap = gap[gap[SEED] != 4]  # seed 4 never ran at this cutoff
    table = summarise(pd.concat([up, flat, gap]))

    assert len(table) == 3
    by_key = table.set_index([ENV, CUTOFF])
    row = by_key.loc[("Env-v0", 0.25)]
    assert row["verdict"] == EXTRAPOLATES and row[N_SEEDS] == 5 and row[MISSING_SEEDS] == []
    assert "above 0" in row[VERDICT_REASON] and not row[DEGRADES]
    estimate, low, high = (row[c] for c in ci_columns(GAIN_IMITATOR))
    assert estimate == pytest.approx(up[GAIN_IMITATOR].mean()) and low <= estimate <= high
    assert row[GAIN_IMITATOR + COUNT] == 5
    assert row[EXTRAPOLATION_RATIO] == pytest.approx(up[GAIN_IMITATOR].mean() / up[GAIN_TEACHER].mean())
    assert row[EXTRAPOLATION_RATIO_REASON] == ""

    assert by_key.loc[("Flat-v0", 0.25)]["verdict"] == DOES_NOT
    missing = by_key.loc[("Env-v0", 0.5)]
    assert missing["verdict"] == f"{MISSING}: seeds [4]" and missing[MISSING_SEEDS] == [4] and missing[N_SEEDS] == 4


def test_summarise_rejects_duplicate_seeds():
    frame = seed_rows(imitator_final=[100] * 5, teacher_final=[100] * 5)
    with pytest.raises(ValueError, match="more than one row"):
        summarise(pd.concat([frame, frame.iloc[:1]]))


def test_an_undefined_fidelity_or_in_data_ratio_is_left_out_not_called_missing():
    frame = seed_rows(imitator_final=[99, 101, 100, 98, 102], teacher_final=[195, 205, 200, 210, 190])
    frame.loc[frame[SEED] == 2, FIDELITY] = np.nan  # that teacher ended its pre-cutoff history at random's level
    found = ladder(frame)
    assert found.said == DOES_NOT and "fidelity 1.00 (over 4 of 5 seeds)" in found.reason
    frame[FIDELITY] = np.nan
    found = ladder(frame)
    assert found.said == INCONCLUSIVE and "not verified: no fidelity" in found.reason
