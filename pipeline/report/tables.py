"""The report's tables, pure: the column contract, the input checks, each trial's and teacher's curve,
the per-seed rows (metrics.parquet) and the summary over seeds (summary.parquet) with its verdicts.
Frames in, frames out: no files, no figures, no store.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from pipeline.arms import ARMS, EXTRAPOLATION, IMITATOR, IN_DATA, RANDOM, SNAPSHOT, TEACHER, TESTS
from pipeline.errors import PipelineError
from pipeline.metrics import (COUNT, CUTOFF, DEGRADES, ENV, ENV_STEPS, EPISODIC_RETURN, EXTRAPOLATES, EXTRAPOLATION_RATIO,
                              EXTRAPOLATION_RATIO_REASON, FINAL_IMITATOR, FINAL_RANDOM, FINAL_TEACHER,
                              FIRST_IMITATOR, GAIN_IMITATOR, GAIN_TEACHER, MISSING, MISSING_SEEDS, N_SEEDS,
                              PER_SEED_METRICS, SEED, TRANSFER_AUC_RATIO, VERDICT, VERDICT_REASON, Curve, VerdictRules,
                              ci_columns, mean_ci, missing_seeds, per_seed_metrics, summarise, transfer_auc_ratio,
                              verdict)

HISTORY = "history"  # the teacher's recorded history, a required input of the extrapolation test
OK, FAILED, NO_EPISODES = "ok", "failed", "no episodes"
STATUSES = (OK, FAILED, MISSING)
LEARNS_IN_CONTEXT = "learns in context"  # transfer / control verdict replacing EXTRAPOLATES

# Input columns.
TRIAL_ID, TEST, GROUP, TASK_ID, ARM = "trial_id", "test", "group", "task_id", "arm"
SIZE, CONTEXT, CONTEXT_STEPS, HORIZON, STATUS = "size", "context", "context_steps", "horizon", "status"
CUTOFF_STEP = "cutoff_step"  # optional in trials; always in metrics.parquet
PRIME_STEP = "prime_step"  # optional in trials: where the in-data control's context ends (c')
IMITATOR_ARMS = (IMITATOR, IN_DATA)  # the arms that run an imitator variant
EPISODE_STEPS, RETURN, END_STEP, BUDGET = "env_steps", "episodic_return", "end_step", "budget"
TRIAL_COLUMNS = (TRIAL_ID, TEST, ENV, GROUP, CUTOFF, SEED, TASK_ID, ARM, CONTEXT, CONTEXT_STEPS, SIZE, HORIZON, STATUS)
EPISODE_COLUMNS = (TRIAL_ID, EPISODE_STEPS, RETURN)
HISTORY_COLUMNS = (GROUP, ENV, SEED, TASK_ID, END_STEP, RETURN, BUDGET)

# Output columns (besides pipeline.metrics' names).
COMPARISON = (TEST, ENV, GROUP, CUTOFF)  # arms compared with one another
VARIANT_KEYS = (SIZE, CONTEXT, CONTEXT_STEPS)  # one imitator variant
GROUP_KEYS = (*COMPARISON, *VARIANT_KEYS)  # one summary row
VARIANT = "variant"  # readable variant label, e.g. "small, 400 steps primed"
HORIZON_STEPS = "horizon_steps"  # H the arms of the row were cut at
IN_CONTEXT_GAIN = "in_context_gain"  # imitator final W-mean - its first W-mean (report-level metric)
MISSING_TRIALS = "missing_trials"  # e.g. "imitator failed: seeds [2]"
STATUS_OF, TRIAL_OF = "status_", "trial_"  # prefixes: status_imitator, trial_imitator, ...
EXTRAPOLATION_METRICS = tuple(m for m in PER_SEED_METRICS if m != TRANSFER_AUC_RATIO)
TRANSFER_METRICS = (FIRST_IMITATOR, FINAL_IMITATOR, FINAL_TEACHER, FINAL_RANDOM, TRANSFER_AUC_RATIO)
METRICS_FILE, SUMMARY_FILE, REPORT_FILE = "metrics.parquet", "summary.parquet", "report.md"

NAN = float("nan")
EMPTY = Curve(np.zeros(0), np.zeros(0))


class ReportError(PipelineError):
    """The report cannot be built from what it was given or found; the message names the culprit."""


class RecordedCurve(NamedTuple):
    """A teacher's recorded learning curve, as the report reads it from the histories frame."""

    curve: Curve  # the teacher's episodes over its whole recorded life
    budget: int  # its budget in env steps


# --- inputs --------------------------------------------------------------------------------------


def _require(frame: pd.DataFrame, columns: tuple[str, ...], name: str) -> None:
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise ReportError(f"report: {name} lacks columns {absent} (expected {list(columns)})")


def _only(frame: pd.DataFrame, column: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(frame[column]) - set(allowed))
    if unknown:
        raise ReportError(f"report: trials.{column} has {_some(unknown)}; expected one of {list(allowed)}")


def _some(values: list, shown: int = 10) -> str:
    """The list for a one-line message: its first `shown` values, then how many more."""
    return str(values[:shown]) + (f" and {len(values) - shown} more" if len(values) > shown else "")


def normalise_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Checked copy of `trials` with plain types; non-imitator arms get the empty variant ("", "", 0)."""
    _require(trials, TRIAL_COLUMNS, "trials")
    blank = [c for c in TRIAL_COLUMNS if c not in VARIANT_KEYS and trials[c].isna().any()]
    if blank:
        raise ReportError(f"report: trials has empty values in {blank}")
    trials = trials.copy()
    for column in (TRIAL_ID, TEST, ENV, GROUP, TASK_ID, ARM, STATUS):
        trials[column] = trials[column].astype(str)
    for column, empty in ((SIZE, ""), (CONTEXT, ""), (CONTEXT_STEPS, 0)):
        trials[column] = trials[column].where(trials[ARM].isin(IMITATOR_ARMS), empty).fillna(empty)
    trials[[SIZE, CONTEXT]] = trials[[SIZE, CONTEXT]].astype(str)
    for column, kind, what in ((CONTEXT_STEPS, int, "an integer"), (SEED, int, "an integer"),
                               (HORIZON, int, "an integer"), (CUTOFF, float, "a number")):
        try:
            trials[column] = trials[column].astype(kind)
        except (TypeError, ValueError) as error:
            raise ReportError(f"report: trials.{column} has a value that is not {what} ({error})") from error
    for column, allowed in ((TEST, TESTS), (ARM, tuple(ARMS)), (STATUS, STATUSES)):
        _only(trials, column, allowed)
    twice = trials.duplicated([*GROUP_KEYS, ARM, SEED], keep=False)
    if twice.any():
        raise ReportError(f"report: more than one trial per arm and seed: {_some(trials.loc[twice, TRIAL_ID].tolist())}")
    return trials


def trial_curves(trials: pd.DataFrame, episodes: pd.DataFrame) -> dict[str, Curve]:
    """Curve of every trial with status ok and at least one finished episode, by trial id."""
    _require(episodes, EPISODE_COLUMNS, "episodes")
    ok = set(trials.loc[trials[STATUS] == OK, TRIAL_ID])
    results = episodes.assign(**{TRIAL_ID: episodes[TRIAL_ID].astype(str)})
    results = results[results[TRIAL_ID].isin(ok)].rename(columns={EPISODE_STEPS: ENV_STEPS, RETURN: EPISODIC_RETURN})
    curves = {trial: Curve.from_results(frame) for trial, frame in results.groupby(TRIAL_ID)}
    return {trial: curve for trial, curve in curves.items() if len(curve)}


def history_curves(histories: pd.DataFrame) -> dict[tuple, RecordedCurve]:
    """Each teacher's recorded episodes, by (group, env, seed, task_id)."""
    _require(histories, HISTORY_COLUMNS, "histories")
    rows = histories.dropna(subset=[RETURN]).astype({GROUP: str, ENV: str, SEED: int, TASK_ID: str})
    found = {}
    for (group, env, seed, task), frame in rows.groupby([GROUP, ENV, SEED, TASK_ID]):
        frame = frame.sort_values(END_STEP, kind="stable")
        curve = Curve(frame[END_STEP], frame[RETURN])
        found[(group, env, int(seed), task)] = RecordedCurve(curve, int(frame[BUDGET].max()))
    return found


# --- per seed ------------------------------------------------------------------------------------


def variant_label(variant: dict) -> str:
    return f"{variant[SIZE]}, {variant[CONTEXT_STEPS]} steps {variant[CONTEXT]}"


def arm_status(trial: pd.Series | None, curves: dict[str, Curve]) -> str:
    if trial is None:
        return MISSING
    if trial[STATUS] != OK:
        return trial[STATUS]
    return OK if trial[TRIAL_ID] in curves else NO_EPISODES


def cutoff_step_of(trials: list[pd.Series], history: RecordedCurve | None, cutoff: float) -> int | None:
    """The trials' cutoff_step when given, else round(cutoff * budget); None without either."""
    given = [t[CUTOFF_STEP] for t in trials if CUTOFF_STEP in t and pd.notna(t[CUTOFF_STEP])]
    if given:
        return int(given[0])
    return round(cutoff * history.budget) if history is not None else None


def seed_metrics(keys: dict, seed: int, task: str, horizon: int, trials: dict[str, pd.Series | None],
                 curves: dict[str, Curve], histories: dict[tuple, RecordedCurve], window: int) -> dict[str, Any]:
    """The metrics of one seed: pipeline.metrics.per_seed_metrics, plus the transfer AUC ratio."""
    arm = {name: curves.get(t[TRIAL_ID]) if t is not None else None for name, t in trials.items()}
    if keys[TEST] != EXTRAPOLATION:  # no pre-cutoff history on a held-out task: only the arms' returns
        values = per_seed_metrics(EMPTY, arm[TEACHER], arm[IMITATOR], None, horizon_steps=horizon,
                                  random=arm.get(RANDOM), window=window)
        both = arm[IMITATOR] is not None and arm[TEACHER] is not None
        auc_ratio = transfer_auc_ratio(arm[IMITATOR], arm[TEACHER], horizon) if both else NAN
        return {**values, TRANSFER_AUC_RATIO: auc_ratio, CUTOFF_STEP: None, PRIME_STEP: None, STATUS_OF + HISTORY: ""}
    history = histories.get((keys[GROUP], keys[ENV], seed, task))
    cutoff_step = cutoff_step_of([t for t in trials.values() if t is not None], history, keys[CUTOFF])
    in_data = trials.get(IN_DATA)
    prime_step = int(in_data[PRIME_STEP]) if in_data is not None and pd.notna(in_data.get(PRIME_STEP)) else None
    values = per_seed_metrics(history.curve if history else EMPTY, arm[TEACHER], arm[IMITATOR], arm.get(SNAPSHOT),
                              cutoff_step=cutoff_step, horizon_steps=horizon, random=arm.get(RANDOM),
                              in_data=arm.get(IN_DATA), prime_step=prime_step, window=window)
    history_status = OK if history else MISSING
    return {**values, TRANSFER_AUC_RATIO: NAN, CUTOFF_STEP: cutoff_step, PRIME_STEP: prime_step,
            STATUS_OF + HISTORY: history_status}


def seed_row(keys: dict, variant: dict, seed: int, at_seed: pd.DataFrame, arms: tuple[str, ...],
             curves: dict[str, Curve], histories: dict[tuple, RecordedCurve], window: int) -> dict[str, Any]:
    """One row of metrics.parquet: the trials of one variant and seed (and the arms it is compared with)."""
    is_variant = np.logical_and.reduce([at_seed[k] == v for k, v in variant.items()]) | ~at_seed[ARM].isin(IMITATOR_ARMS)
    trials = {arm: _one(at_seed[is_variant & (at_seed[ARM] == arm)]) for arm in arms}
    present = [t for t in trials.values() if t is not None] or [at_seed.iloc[0]]
    task = (trials[IMITATOR] if trials[IMITATOR] is not None else present[0])[TASK_ID]
    timed = [t for name, t in trials.items() if t is not None and name != IN_DATA] or present  # in-data: its own horizon
    horizon = int(min(t[HORIZON] for t in timed))
    row = {**keys, **variant, VARIANT: variant_label(variant), SEED: int(seed), TASK_ID: task, HORIZON_STEPS: horizon}
    for arm in ARMS:
        row[STATUS_OF + arm] = arm_status(trials[arm], curves) if arm in trials else ""
        row[TRIAL_OF + arm] = trials[arm][TRIAL_ID] if trials.get(arm) is not None else None
    row.update(seed_metrics(keys, int(seed), task, horizon, trials, curves, histories, window))
    row[IN_CONTEXT_GAIN] = row[FINAL_IMITATOR] - row[FIRST_IMITATOR]
    return row


def _one(frame: pd.DataFrame) -> pd.Series | None:
    return frame.iloc[0] if len(frame) else None


def per_seed_frame(trials: pd.DataFrame, curves: dict[str, Curve], histories: dict[tuple, RecordedCurve],
                   window: int) -> pd.DataFrame:
    """metrics.parquet: a row for every imitator variant x expected seed of every comparison.

    The expected seeds of a comparison are every seed any of its trials has; its arms are the
    imitator, the teacher, and the other arms (snapshot, random) where the comparison has such trials.
    """
    rows = []
    for test in TESTS:
        for keys, comparison in trials[trials[TEST] == test].groupby([ENV, GROUP, CUTOFF], sort=True):
            keys = dict(zip(COMPARISON, (test, *keys)))
            present = set(comparison[ARM])
            arms = (IMITATOR, TEACHER, *(a for a in ARMS if a not in (IMITATOR, TEACHER) and a in present))
            imitators = comparison.loc[comparison[ARM] == IMITATOR, list(VARIANT_KEYS)]
            for variant in imitators.drop_duplicates().sort_values(list(VARIANT_KEYS)).to_dict("records"):
                for seed, at_seed in comparison.groupby(SEED, sort=True):
                    rows.append(seed_row(keys, variant, seed, at_seed, arms, curves, histories, window))
    frame = pd.DataFrame(rows)
    frame[[CUTOFF_STEP, PRIME_STEP]] = frame[[CUTOFF_STEP, PRIME_STEP]].astype("Int64")
    return frame


# --- over seeds ----------------------------------------------------------------------------------


def missing_trials(group: pd.DataFrame) -> str:
    """'imitator failed: seeds [2]; random missing: seeds [0]', or '' when every trial delivered."""
    parts = []
    for arm in (HISTORY, *ARMS):
        statuses = group[STATUS_OF + arm]
        for status in sorted(set(statuses) - {OK, ""}):
            parts.append(f"{arm} {status}: seeds {sorted(group.loc[statuses == status, SEED].tolist())}")
    return "; ".join(parts)


def transfer_verdict(group: pd.DataFrame, seeds: list[int]) -> tuple[list[int], str]:
    """metrics.verdict with the imitator's first-W return as the bar: did it improve in context?"""
    values = [group[c].to_numpy(dtype=np.float64) for c in (FINAL_IMITATOR, FINAL_TEACHER, FIRST_IMITATOR)]
    complete = group[SEED][np.isfinite(np.vstack(values)).all(axis=0)]
    said = verdict(*values, seeds=group[SEED].tolist(), expected_seeds=seeds)
    return missing_seeds(seeds, complete), LEARNS_IN_CONTEXT if said == EXTRAPOLATES else said


def summarise_group(group: pd.DataFrame, rules: VerdictRules) -> dict[str, Any]:
    """One summary row: metrics.summarise over the group's seeds, with its own expected seeds."""
    test, seeds = group[TEST].iloc[0], sorted(group[SEED].tolist())
    metrics = EXTRAPOLATION_METRICS if test == EXTRAPOLATION else TRANSFER_METRICS
    row = summarise(group[[*GROUP_KEYS, SEED, *metrics]], by=GROUP_KEYS, expected_seeds=seeds,
                    rules=rules).iloc[0].to_dict()
    row[VARIANT] = group[VARIANT].iloc[0]
    row.update(zip(ci_columns(IN_CONTEXT_GAIN), mean_ci(group[IN_CONTEXT_GAIN])))
    row[IN_CONTEXT_GAIN + COUNT] = int(np.isfinite(group[IN_CONTEXT_GAIN].to_numpy(dtype=np.float64)).sum())
    if test == EXTRAPOLATION:
        gains = group[[GAIN_IMITATOR, GAIN_TEACHER]].to_numpy(dtype=np.float64)
        row[EXTRAPOLATION_RATIO + COUNT] = int(np.isfinite(gains).all(axis=1).sum())  # seeds the ratio pairs
    else:
        row[MISSING_SEEDS], row[VERDICT] = transfer_verdict(group, seeds)
        row[VERDICT_REASON], row[DEGRADES] = "", False
        row[EXTRAPOLATION_RATIO_REASON] = f"not part of the {test} test"
    row[MISSING_TRIALS] = missing_trials(group)
    return row


def summary_columns() -> list[str]:
    metrics = [c for m in (*PER_SEED_METRICS, IN_CONTEXT_GAIN) for c in (*ci_columns(m), m + COUNT)]
    return [*GROUP_KEYS, VARIANT, N_SEEDS, MISSING_SEEDS, VERDICT, VERDICT_REASON, DEGRADES, MISSING_TRIALS, *metrics,
            *ci_columns(EXTRAPOLATION_RATIO), EXTRAPOLATION_RATIO + COUNT, EXTRAPOLATION_RATIO_REASON]


def summary_frame(per_seed: pd.DataFrame, rules: VerdictRules = VerdictRules()) -> pd.DataFrame:
    """summary.parquet: one row per (test, env, group, cutoff, variant), tests in TESTS order."""
    rows = [summarise_group(group, rules) for _, group in per_seed.groupby(list(GROUP_KEYS), sort=False)]
    frame = pd.DataFrame(rows).reindex(columns=summary_columns())
    counts = [c for c in frame.columns if c.endswith(COUNT)]
    frame[counts] = frame[counts].fillna(0).astype(int)  # 0 finite seeds where a metric is not part of the test
    return frame
