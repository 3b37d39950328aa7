"""Report stage: from the evaluation trials' episodes to metrics, figures and a verdict table.

    summary = build_report(trials, episodes, histories, out_dir="runs/quick/report")
    print(summary.paragraph)   # e.g. "CartPole-v1 (cartpole-dqn) cutoff 0.5: does not extrapolate (...)."

    python -m pipeline report --preset quick      # after evaluate: {store}/{experiment}/report/report.md

`report()` (the stage, at the end of this file) builds the three input frames from the trials'
result.json files that Tune wrote in the store and from the teachers' histories, runs
build_report in a local folder and uploads it to {store}/{experiment}/report/. build_report itself
is pure: frames in, files out.

Inputs (the column contract)
----------------------------
trials     one row per EXPECTED trial, whether it ran or not:
             trial_id (str), test ("extrapolation" | "transfer" | "control"), env (env id), group
             (teacher / imitator group), cutoff (fraction of the teacher budget; 1.0 for the control),
             seed (int, the bootstrap unit: teacher seed or held-out task index), task_id (str),
             arm ("imitator" | "teacher" | "snapshot" | "random"; in transfer and control "teacher"
             is a teacher learning the held-out task from scratch), context ("primed" | "empty";
             "" for other arms), context_steps (int; 0 for other arms), size ("" for other arms),
             horizon (int, H env steps the arm runs), status ("ok" | "failed" | "missing").
             Optional: cutoff_step (int, the teacher's global step at the cutoff as collect saved
             its checkpoint, see config.cutoff_steps); without it, cutoff step = round(cutoff * budget).
episodes   one row per finished episode of a trial: trial_id, env_steps (steps the arm had taken
             when the episode ended, 0 = the cutoff), episodic_return.
histories  the teachers' recorded learning curves, one row per finished episode: group, env, seed,
             task_id, end_step (the teacher's global step when the episode ended), episodic_return,
             budget (the teacher's budget in env steps; one value per teacher).

Arms are compared within one (test, env, group, cutoff, seed); an imitator variant is one
(size, context, context_steps). Every arm of a seed is cut at the smallest horizon among that
seed's trials, so arms are compared over the same H steps. A trial that failed, is missing, or
finished no episode has no curve: its metrics are NaN, `metrics.summarise` turns that into the
verdict "missing: seeds [...]", and the table says which trial it was ("imitator failed: seeds [2]").

Outputs (in out_dir)
--------------------
metrics.parquet   one row per (test, env, group, cutoff, variant, seed): the per-seed metrics
                  (column names from pipeline.metrics), arm statuses `status_<arm>`, trial ids
                  `trial_<arm>`, the cutoff step and horizon.
summary.parquet   one row per (test, env, group, cutoff, variant): each metric's bootstrap
                  estimate, `_low`, `_high`, `_n`; the extrapolation ratio and its reason; verdict,
                  missing seeds and missing trials.
report.md         verdict paragraph, one verdict table per test, the positive control, the figures.
*.png             curves_*: the extrapolation test per (env, group, cutoff); transfer_* and
                  control_*: arms on held-out tasks; context_*: ratio and ceiling exceedance
                  against context length, one line per model size (only when several exist).

How to read the figures
-----------------------
Every line is a mean over seeds of the W-episode rolling mean return (each seed's episodes put on
a common step grid, the last value carried forward), with a shaded 95% bootstrap band across
seeds. In curves_*, the teacher's recorded history is solid up to the cutoff (what the imitator
was trained on) and dashed after it (the unseen future); the arms start at the cutoff's vertical
line. An imitator that merely copies its snapshot runs flat near the orange snapshot line and
under the dotted pre-cutoff best B_c, while the continued teacher (green) climbs along the dashed
history; an imitator that extrapolates climbs above the dotted line.

Verdicts (extrapolation): "extrapolates" when the CI of imitator final - B_c is above 0; "does
not" when not and the CI of imitator final - continued-teacher final is below 0; else
"inconclusive". Transfer and control use `metrics.verdict` with the imitator's own first-W
return as the bar: "learns in context" when its final return is significantly above where it
started, "does not" when not and it ends significantly below the teacher learning from scratch.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from matplotlib.figure import Figure  # object-oriented matplotlib: Agg canvas, no display, no pyplot state

from pipeline.metrics import (B_C, BOOTSTRAP_SEED, CEILING_EXCEEDANCE, CONFIDENCE, COUNT, CUTOFF, DOES_NOT, ENV,
                              ENV_STEPS, EPISODIC_RETURN, EXTRAPOLATES, EXTRAPOLATION_RATIO,
                              EXTRAPOLATION_RATIO_REASON, FINAL_IMITATOR, FINAL_RANDOM, FINAL_SNAPSHOT,
                              FINAL_TEACHER, FIRST_IMITATOR, GAIN_IMITATOR, GAIN_TEACHER, INCONCLUSIVE, L_C, MISSING,
                              MISSING_SEEDS, N_RESAMPLES, N_SEEDS, PER_SEED_METRICS, SEED, SNAPSHOT_FIDELITY,
                              TRANSFER_AUC_RATIO, TRIAL_FINISHED, VERDICT, WINDOW, Curve, bootstrap_ci, ci_columns, missing_seeds,
                              per_seed_metrics, summarise, transfer_auc_ratio, verdict)

# Tests and arms (values of trials.test and trials.arm).
EXTRAPOLATION, TRANSFER, CONTROL = "extrapolation", "transfer", "control"
TESTS = (EXTRAPOLATION, TRANSFER, CONTROL)
IMITATOR, TEACHER, SNAPSHOT, RANDOM = "imitator", "teacher", "snapshot", "random"
ARMS = (IMITATOR, TEACHER, SNAPSHOT, RANDOM)
HISTORY = "history"  # the teacher's recorded history, a required input of the extrapolation test
OK, FAILED, NO_EPISODES = "ok", "failed", "no episodes"
STATUSES = (OK, FAILED, MISSING)
LEARNS_IN_CONTEXT = "learns in context"  # transfer / control verdict replacing EXTRAPOLATES

# Input columns.
TRIAL_ID, TEST, GROUP, TASK_ID, ARM = "trial_id", "test", "group", "task_id", "arm"
SIZE, CONTEXT, CONTEXT_STEPS, HORIZON, STATUS = "size", "context", "context_steps", "horizon", "status"
CUTOFF_STEP = "cutoff_step"  # optional in trials; always in metrics.parquet
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

# Figures.
FIGSIZE, DPI, GRID_POINTS = (8, 5), 120, 300
BAND_RESAMPLES = 2000  # bootstrap resamples of the bands drawn in figures (the table uses n_resamples)
ARM_LABEL = {TEACHER: "continued teacher", SNAPSHOT: "frozen snapshot at cutoff", RANDOM: "random policy"}
SCRATCH_LABEL = "teacher learning from scratch"
ARM_COLOR = {HISTORY: "tab:blue", TEACHER: "tab:green", SNAPSHOT: "tab:orange", RANDOM: "tab:gray"}
IMITATOR_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black")
NAN = float("nan")
EMPTY = Curve(np.zeros(0), np.zeros(0))


@dataclass
class ReportSummary:
    path_md: str  # report.md
    figures: list[str]  # every PNG written
    paragraph: str  # the verdicts in one plain-text paragraph
    table: pd.DataFrame  # summary.parquet's frame: one row per (test, env, group, cutoff, variant)
    path_metrics: str = ""  # metrics.parquet (per-seed rows)
    path_summary: str = ""  # summary.parquet


class TeacherHistory(NamedTuple):
    curve: Curve  # the teacher's episodes over its whole recorded life
    budget: int  # its budget in env steps


# --- inputs --------------------------------------------------------------------------------------


def _require(frame: pd.DataFrame, columns: tuple[str, ...], name: str) -> None:
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise ValueError(f"build_report: {name} lacks columns {absent} (expected {list(columns)})")


def _only(frame: pd.DataFrame, column: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(frame[column]) - set(allowed))
    if unknown:
        raise ValueError(f"build_report: trials.{column} has {unknown}; expected one of {list(allowed)}")


def normalise_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Checked copy of `trials` with plain types; non-imitator arms get the empty variant ("", "", 0)."""
    _require(trials, TRIAL_COLUMNS, "trials")
    blank = [c for c in TRIAL_COLUMNS if c not in VARIANT_KEYS and trials[c].isna().any()]
    if blank:
        raise ValueError(f"build_report: trials has empty values in {blank}")
    trials = trials.copy()
    for column in (TRIAL_ID, TEST, ENV, GROUP, TASK_ID, ARM, STATUS):
        trials[column] = trials[column].astype(str)
    for column, empty in ((SIZE, ""), (CONTEXT, ""), (CONTEXT_STEPS, 0)):
        trials[column] = trials[column].where(trials[ARM] == IMITATOR, empty).fillna(empty)
    trials[[SIZE, CONTEXT]] = trials[[SIZE, CONTEXT]].astype(str)
    trials[[CONTEXT_STEPS, SEED, HORIZON]] = trials[[CONTEXT_STEPS, SEED, HORIZON]].astype(int)
    trials[CUTOFF] = trials[CUTOFF].astype(float)
    for column, allowed in ((TEST, TESTS), (ARM, ARMS), (STATUS, STATUSES)):
        _only(trials, column, allowed)
    twice = trials.duplicated([*GROUP_KEYS, ARM, SEED], keep=False)
    if twice.any():
        raise ValueError(f"build_report: more than one trial per arm and seed: {trials.loc[twice, TRIAL_ID].tolist()}")
    return trials


def trial_curves(trials: pd.DataFrame, episodes: pd.DataFrame) -> dict[str, Curve]:
    """Curve of every trial with status ok and at least one finished episode, by trial id."""
    _require(episodes, EPISODE_COLUMNS, "episodes")
    ok = set(trials.loc[trials[STATUS] == OK, TRIAL_ID])
    results = episodes.assign(**{TRIAL_ID: episodes[TRIAL_ID].astype(str)})
    results = results[results[TRIAL_ID].isin(ok)].rename(columns={EPISODE_STEPS: ENV_STEPS, RETURN: EPISODIC_RETURN})
    curves = {trial: Curve.from_results(frame) for trial, frame in results.groupby(TRIAL_ID)}
    return {trial: curve for trial, curve in curves.items() if len(curve)}


def history_curves(histories: pd.DataFrame) -> dict[tuple, TeacherHistory]:
    """Each teacher's recorded episodes, by (group, env, seed, task_id)."""
    _require(histories, HISTORY_COLUMNS, "histories")
    rows = histories.dropna(subset=[RETURN]).astype({GROUP: str, ENV: str, SEED: int, TASK_ID: str})
    found = {}
    for (group, env, seed, task), frame in rows.groupby([GROUP, ENV, SEED, TASK_ID]):
        frame = frame.sort_values(END_STEP, kind="stable")
        curve = Curve(frame[END_STEP], frame[RETURN])
        found[(group, env, int(seed), task)] = TeacherHistory(curve, int(frame[BUDGET].max()))
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


def cutoff_step_of(trials: list[pd.Series], history: TeacherHistory | None, cutoff: float) -> int | None:
    """The trials' cutoff_step when given, else round(cutoff * budget); None without either."""
    given = [t[CUTOFF_STEP] for t in trials if CUTOFF_STEP in t and pd.notna(t[CUTOFF_STEP])]
    if given:
        return int(given[0])
    return round(cutoff * history.budget) if history is not None else None


def seed_metrics(keys: dict, seed: int, task: str, horizon: int, trials: dict[str, pd.Series | None],
                 curves: dict[str, Curve], histories: dict[tuple, TeacherHistory], window: int) -> dict[str, Any]:
    """The metrics of one seed: pipeline.metrics.per_seed_metrics, plus the transfer AUC ratio."""
    arm = {name: curves.get(t[TRIAL_ID]) if t is not None else None for name, t in trials.items()}
    if keys[TEST] != EXTRAPOLATION:  # no pre-cutoff history on a held-out task: only the arms' returns
        values = per_seed_metrics(EMPTY, arm[TEACHER], arm[IMITATOR], None, horizon_steps=horizon,
                                  random=arm.get(RANDOM), window=window)
        both = arm[IMITATOR] is not None and arm[TEACHER] is not None
        auc_ratio = transfer_auc_ratio(arm[IMITATOR], arm[TEACHER], horizon) if both else NAN
        return {**values, TRANSFER_AUC_RATIO: auc_ratio, CUTOFF_STEP: None, STATUS_OF + HISTORY: ""}
    history = histories.get((keys[GROUP], keys[ENV], seed, task))
    cutoff_step = cutoff_step_of([t for t in trials.values() if t is not None], history, keys[CUTOFF])
    values = per_seed_metrics(history.curve if history else EMPTY, arm[TEACHER], arm[IMITATOR], arm.get(SNAPSHOT),
                              cutoff_step=cutoff_step, horizon_steps=horizon, random=arm.get(RANDOM), window=window)
    history_status = OK if history else MISSING
    return {**values, TRANSFER_AUC_RATIO: NAN, CUTOFF_STEP: cutoff_step, STATUS_OF + HISTORY: history_status}


def seed_row(keys: dict, variant: dict, seed: int, at_seed: pd.DataFrame, arms: tuple[str, ...],
             curves: dict[str, Curve], histories: dict[tuple, TeacherHistory], window: int) -> dict[str, Any]:
    """One row of metrics.parquet: the trials of one variant and seed (and the arms it is compared with)."""
    is_variant = np.logical_and.reduce([at_seed[k] == v for k, v in variant.items()]) | (at_seed[ARM] != IMITATOR)
    trials = {arm: _one(at_seed[is_variant & (at_seed[ARM] == arm)]) for arm in arms}
    present = [t for t in trials.values() if t is not None] or [at_seed.iloc[0]]
    task = (trials[IMITATOR] if trials[IMITATOR] is not None else present[0])[TASK_ID]
    horizon = int(min(t[HORIZON] for t in present))
    row = {**keys, **variant, VARIANT: variant_label(variant), SEED: int(seed), TASK_ID: task, HORIZON_STEPS: horizon}
    for arm in ARMS:
        row[STATUS_OF + arm] = arm_status(trials[arm], curves) if arm in trials else ""
        row[TRIAL_OF + arm] = trials[arm][TRIAL_ID] if trials.get(arm) is not None else None
    row.update(seed_metrics(keys, int(seed), task, horizon, trials, curves, histories, window))
    row[IN_CONTEXT_GAIN] = row[FINAL_IMITATOR] - row[FIRST_IMITATOR]
    return row


def _one(frame: pd.DataFrame) -> pd.Series | None:
    return frame.iloc[0] if len(frame) else None


def per_seed_frame(trials: pd.DataFrame, curves: dict[str, Curve], histories: dict[tuple, TeacherHistory],
                   window: int) -> pd.DataFrame:
    """metrics.parquet: a row for every imitator variant x expected seed of every comparison.

    The expected seeds of a comparison are every seed any of its trials has; its arms are the
    imitator, the teacher, and the snapshot / random arms where the comparison has such trials.
    """
    rows = []
    for test in TESTS:
        for keys, comparison in trials[trials[TEST] == test].groupby([ENV, GROUP, CUTOFF], sort=True):
            keys = dict(zip(COMPARISON, (test, *keys)))
            arms = (IMITATOR, TEACHER, *(a for a in (SNAPSHOT, RANDOM) if a in set(comparison[ARM])))
            imitators = comparison.loc[comparison[ARM] == IMITATOR, list(VARIANT_KEYS)]
            for variant in imitators.drop_duplicates().sort_values(list(VARIANT_KEYS)).to_dict("records"):
                for seed, at_seed in comparison.groupby(SEED, sort=True):
                    rows.append(seed_row(keys, variant, seed, at_seed, arms, curves, histories, window))
    frame = pd.DataFrame(rows)
    frame[CUTOFF_STEP] = frame[CUTOFF_STEP].astype("Int64")
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


def transfer_verdict(group: pd.DataFrame, seeds: list[int], n_resamples: int) -> tuple[list[int], str]:
    """metrics.verdict with the imitator's first-W return as the bar: did it improve in context?"""
    values = [group[c].to_numpy(dtype=np.float64) for c in (FINAL_IMITATOR, FINAL_TEACHER, FIRST_IMITATOR)]
    complete = group[SEED][np.isfinite(np.vstack(values)).all(axis=0)]
    said = verdict(*values, seeds=group[SEED].tolist(), expected_seeds=seeds, n_resamples=n_resamples)
    return missing_seeds(seeds, complete), LEARNS_IN_CONTEXT if said == EXTRAPOLATES else said


def summarise_group(group: pd.DataFrame, n_resamples: int) -> dict[str, Any]:
    """One summary row: metrics.summarise over the group's seeds, with its own expected seeds."""
    test, seeds = group[TEST].iloc[0], sorted(group[SEED].tolist())
    metrics = EXTRAPOLATION_METRICS if test == EXTRAPOLATION else TRANSFER_METRICS
    row = summarise(group[[*GROUP_KEYS, SEED, *metrics]], by=GROUP_KEYS, expected_seeds=seeds,
                    n_resamples=n_resamples).iloc[0].to_dict()
    row[VARIANT] = group[VARIANT].iloc[0]
    row.update(zip(ci_columns(IN_CONTEXT_GAIN), bootstrap_ci(group[IN_CONTEXT_GAIN], n_resamples=n_resamples)))
    row[IN_CONTEXT_GAIN + COUNT] = int(np.isfinite(group[IN_CONTEXT_GAIN].to_numpy(dtype=np.float64)).sum())
    if test == EXTRAPOLATION:
        gains = group[[GAIN_IMITATOR, GAIN_TEACHER]].to_numpy(dtype=np.float64)
        row[EXTRAPOLATION_RATIO + COUNT] = int(np.isfinite(gains).all(axis=1).sum())  # seeds the ratio pairs
    else:
        row[MISSING_SEEDS], row[VERDICT] = transfer_verdict(group, seeds, n_resamples)
        row[EXTRAPOLATION_RATIO_REASON] = f"not part of the {test} test"
    row[MISSING_TRIALS] = missing_trials(group)
    return row


def summary_columns() -> list[str]:
    metrics = [c for m in (*PER_SEED_METRICS, IN_CONTEXT_GAIN) for c in (*ci_columns(m), m + COUNT)]
    return [*GROUP_KEYS, VARIANT, N_SEEDS, MISSING_SEEDS, VERDICT, MISSING_TRIALS, *metrics,
            *ci_columns(EXTRAPOLATION_RATIO), EXTRAPOLATION_RATIO + COUNT, EXTRAPOLATION_RATIO_REASON]


def summary_frame(per_seed: pd.DataFrame, n_resamples: int) -> pd.DataFrame:
    """summary.parquet: one row per (test, env, group, cutoff, variant), tests in TESTS order."""
    rows = [summarise_group(group, n_resamples) for _, group in per_seed.groupby(list(GROUP_KEYS), sort=False)]
    frame = pd.DataFrame(rows).reindex(columns=summary_columns())
    counts = [c for c in frame.columns if c.endswith(COUNT)]
    frame[counts] = frame[counts].fillna(0).astype(int)  # 0 finite seeds where a metric is not part of the test
    return frame


# --- text ----------------------------------------------------------------------------------------


def number(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "—"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def with_ci(row: pd.Series, metric: str) -> str:
    """'180 [150, 210]'; '180 (no CI)' with one seed; '—' without data; '(4/5 seeds)' when seeds lack it."""
    estimate, low, high = (row.get(c, NAN) for c in ci_columns(metric))
    if not np.isfinite(estimate):
        return "—"
    text = f"{number(estimate)} [{number(low)}, {number(high)}]" if np.isfinite(low) else f"{number(estimate)} (no CI)"
    n, expected = row.get(metric + COUNT, row[N_SEEDS]), row[N_SEEDS]
    return text + (f" ({n}/{expected} seeds)" if n < expected else "")


def ratio_cell(row: pd.Series) -> str:
    reason = row[EXTRAPOLATION_RATIO_REASON]
    return with_ci(row, EXTRAPOLATION_RATIO) if not reason else f"— ({reason})"


def seeds_cell(row: pd.Series) -> str:
    return f"{row[N_SEEDS] - len(row[MISSING_SEEDS])}/{row[N_SEEDS]}"


EXTRAPOLATION_TABLE = (
    ("env", lambda r: r[ENV]), ("group", lambda r: r[GROUP]), ("cutoff", lambda r: f"{r[CUTOFF]:g}"),
    ("variant", lambda r: r[VARIANT]), ("complete seeds", seeds_cell),
    ("L_c", lambda r: with_ci(r, L_C)), ("B_c", lambda r: with_ci(r, B_C)),
    ("imitator final", lambda r: with_ci(r, FINAL_IMITATOR)),
    ("continued-teacher final", lambda r: with_ci(r, FINAL_TEACHER)),
    ("snapshot final", lambda r: with_ci(r, FINAL_SNAPSHOT)),
    ("extrapolation ratio", ratio_cell), ("ceiling exceedance", lambda r: with_ci(r, CEILING_EXCEEDANCE)),
    ("snapshot fidelity", lambda r: with_ci(r, SNAPSHOT_FIDELITY)),
    ("verdict", lambda r: f"**{r[VERDICT]}**"), ("missing trials", lambda r: r[MISSING_TRIALS] or "none"),
)
TRANSFER_TABLE = (
    *EXTRAPOLATION_TABLE[:5],
    ("imitator first", lambda r: with_ci(r, FIRST_IMITATOR)), ("imitator final", lambda r: with_ci(r, FINAL_IMITATOR)),
    ("in-context gain", lambda r: with_ci(r, IN_CONTEXT_GAIN)),
    ("scratch-teacher final", lambda r: with_ci(r, FINAL_TEACHER)),
    ("random final", lambda r: with_ci(r, FINAL_RANDOM)),
    ("transfer AUC ratio", lambda r: with_ci(r, TRANSFER_AUC_RATIO)),
    *EXTRAPOLATION_TABLE[-2:],
)


def markdown_table(rows: pd.DataFrame, columns: tuple) -> str:
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(show(row)) for _, show in columns) + " |" for _, row in rows.iterrows()]
    return "\n".join(lines)


def verdict_phrase(said: str, test: str) -> str:
    if said.startswith(MISSING):
        return said
    if test == EXTRAPOLATION:
        return {EXTRAPOLATES: "extrapolates", DOES_NOT: "does not extrapolate"}.get(said, said)
    return {DOES_NOT: "does not learn in context"}.get(said, said)


def evidence(row: pd.Series) -> str:
    if row[TEST] == EXTRAPOLATION:
        text = (f"imitator final {with_ci(row, FINAL_IMITATOR)} vs pre-cutoff best {with_ci(row, B_C)} "
                f"and continued teacher {with_ci(row, FINAL_TEACHER)}")
    else:
        text = (f"imitator return {with_ci(row, FIRST_IMITATOR)} at first, {with_ci(row, FINAL_IMITATOR)} at the end, "
                f"vs teacher from scratch {with_ci(row, FINAL_TEACHER)}; AUC ratio {with_ci(row, TRANSFER_AUC_RATIO)}")
    return text + (f"; {row[MISSING_TRIALS]}" if row[MISSING_TRIALS] else "")


def comparison_sentence(rows: pd.DataFrame) -> str:
    """One sentence per (test, env, group, cutoff); with several variants, the counts and the best one."""
    first = rows.iloc[0]
    test, where = first[TEST], f"{first[ENV]} ({first[GROUP]})"
    name = {EXTRAPOLATION: f"{where} cutoff {first[CUTOFF]:g}",
            TRANSFER: f"Transfer to {first[ENV]} held-out tasks ({first[GROUP]}, cutoff {first[CUTOFF]:g})",
            CONTROL: f"Positive control on {first[ENV]} held-out tasks ({first[GROUP]})"}[test]
    if len(rows) == 1:
        return f"{name}: {verdict_phrase(first[VERDICT], test)} ({evidence(first)})."
    counts = Counter(verdict_phrase(v, test) for v in rows[VERDICT])
    best = rows.loc[rows[FINAL_IMITATOR].fillna(-np.inf).idxmax()]
    tally = ", ".join(f"{phrase}: {n}" for phrase, n in counts.items())
    return (f"{name}, {len(rows)} imitator variants ({tally}); best ({best[VARIANT]}): "
            f"{verdict_phrase(best[VERDICT], test)} ({evidence(best)}).")


def summary_paragraph(summary: pd.DataFrame) -> str:
    sentences = [comparison_sentence(rows) for _, rows in summary.groupby(list(COMPARISON), sort=False)]
    if CONTROL not in set(summary[TEST]):
        sentences.append("No positive control was run, so a null result here is not credible yet.")
    return " ".join(sentences)


# --- figures -------------------------------------------------------------------------------------


def rolling_returns(curve: Curve, window: int) -> np.ndarray:
    """W-episode rolling mean of the returns (mean of those so far for the first W-1 episodes)."""
    sums = np.concatenate([[0.0], np.cumsum(curve.episode_return)])
    end = np.arange(1, len(curve) + 1)
    start = np.maximum(0, end - window)
    return (sums[end] - sums[start]) / (end - start)


def on_grid(curve: Curve | None, grid: np.ndarray, window: int) -> np.ndarray:
    """Rolling return at each grid step: the last finished episode's value carried forward; NaN before any."""
    if curve is None or len(curve) == 0:
        return np.full(len(grid), NAN)
    index = np.searchsorted(curve.end_step, grid, side="right") - 1
    return np.where(index >= 0, rolling_returns(curve, window)[np.maximum(index, 0)], NAN)


def mean_band(values: np.ndarray, n_resamples: int = BAND_RESAMPLES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values (S seeds, G grid points) -> mean over the seeds with data, and its 95% percentile bootstrap band.

    The bootstrap of metrics.bootstrap_ci, vectorised over grid points: a resample of seeds is a row of
    multinomial counts, so its mean at every grid point is one matrix product. One seed: no band.
    """
    seeds = len(values)
    finite = np.isfinite(values)
    counts = np.random.default_rng(BOOTSTRAP_SEED).multinomial(seeds, np.full(seeds, 1.0 / seeds), size=n_resamples)
    alpha = (1.0 - CONFIDENCE) / 2.0
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # grid points where no seed has data yet: NaN
        mean = np.nanmean(values, axis=0)  # (G,)
        samples = (counts @ np.where(finite, values, 0.0)) / (counts @ finite)  # (R, G)
        low, high = np.nanquantile(samples, [alpha, 1.0 - alpha], axis=0)  # (G,) each
    if seeds < 2:
        low, high = np.full_like(mean, NAN), np.full_like(mean, NAN)
    return mean, low, high


def draw_band(ax, x: np.ndarray, values: np.ndarray, label: str, color: str, linestyle: str = "-") -> None:
    mean, low, high = mean_band(values)
    ax.plot(x, mean, color=color, linestyle=linestyle, linewidth=1.8, label=label)
    ax.fill_between(x, low, high, color=color, alpha=0.18, linewidth=0)


def arm_series(rows: pd.DataFrame, scratch: bool) -> list[tuple[str, str, list[str | None]]]:
    """(label, colour, one trial id per seed) of every arm to draw: imitator variants, then the other arms."""
    series = []
    for i, (label, variant) in enumerate(rows.groupby(VARIANT, sort=False)):
        color = IMITATOR_COLORS[i % len(IMITATOR_COLORS)]
        series.append((f"imitator {label}", color, variant[TRIAL_OF + IMITATOR].tolist()))
    one_variant = rows[rows[VARIANT] == rows[VARIANT].iloc[0]]
    for arm in (TEACHER, SNAPSHOT, RANDOM):
        if one_variant[STATUS_OF + arm].ne("").any():
            label = SCRATCH_LABEL if scratch and arm == TEACHER else ARM_LABEL[arm]
            series.append((label, ARM_COLOR[arm], one_variant[TRIAL_OF + arm].tolist()))
    return series


def draw_arms(ax, rows: pd.DataFrame, curves: dict[str, Curve], x0: float, window: int, scratch: bool) -> None:
    """Each arm from x0 on: mean over seeds with a bootstrap band; '(k/N seeds)' when some have no curve."""
    grid = np.linspace(0, int(rows[HORIZON_STEPS].max()), GRID_POINTS)
    for label, color, trial_ids in arm_series(rows, scratch):
        found = [curves.get(t) for t in trial_ids if t is not None and t in curves]
        if not found:
            continue
        if len(found) < len(trial_ids):
            label += f" ({len(found)}/{len(trial_ids)} seeds)"
        draw_band(ax, x0 + grid, np.stack([on_grid(c, grid, window) for c in found]), label, color)


def finish(fig: Figure, ax, title: str, xlabel: str, window: int, path: str) -> str:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"episodic return (mean of last {window} episodes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def learning_curve_figure(rows: pd.DataFrame, curves: dict[str, Curve], histories: dict[tuple, TeacherHistory],
                          window: int, path: str) -> str:
    """Extrapolation test of one (env, group, cutoff): teacher history (seen / unseen), then every arm."""
    first = rows.iloc[0]
    seeds = rows.drop_duplicates(SEED)
    found = [histories[k] for k in zip(seeds[GROUP], seeds[ENV], seeds[SEED], seeds[TASK_ID]) if k in histories]
    cut = float(np.nanmedian(rows[CUTOFF_STEP].astype(float))) if rows[CUTOFF_STEP].notna().any() else 0.0
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    if found:
        grid = np.unique(np.concatenate([np.linspace(0, max(h.budget for h in found), GRID_POINTS), [cut]]))
        values = np.stack([on_grid(h.curve, grid, window) for h in found])  # (S, G)
        seen, unseen = grid <= cut, grid >= cut
        color = ARM_COLOR[HISTORY]
        draw_band(ax, grid[seen], values[:, seen], "teacher history before cutoff (imitator's training data)", color)
        draw_band(ax, grid[unseen], values[:, unseen], "teacher history after cutoff (unseen future)", color, "--")
        if seeds[B_C].notna().any():
            ax.axhline(seeds[B_C].mean(), color="black", linestyle=":", linewidth=1.2,
                       label="pre-cutoff best B_c (mean over seeds)")
    ax.axvline(cut, color="black", linewidth=1.0, label=f"cutoff {first[CUTOFF]:g} (step {cut:.0f})")
    draw_arms(ax, rows, curves, cut, window, scratch=False)
    title = f"{first[ENV]} ({first[GROUP]}): extrapolation past cutoff {first[CUTOFF]:g}"
    return finish(fig, ax, title, "teacher env steps (arms: cutoff step + their own env steps)", window, path)


def transfer_figure(rows: pd.DataFrame, curves: dict[str, Curve], window: int, path: str) -> str:
    """Transfer / control of one (env, group, cutoff): imitators vs the scratch teacher vs random."""
    first = rows.iloc[0]
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    draw_arms(ax, rows, curves, 0.0, window, scratch=True)
    kind = "Positive control" if first[TEST] == CONTROL else "Transfer"
    title = f"{kind}: {first[ENV]} held-out tasks ({first[GROUP]}, cutoff {first[CUTOFF]:g})"
    return finish(fig, ax, title, "env steps on the held-out task", window, path)


def context_panel(ax, rows: pd.DataFrame, metric: str, reference: float, ylabel: str, why_empty: list[str]) -> None:
    """One metric vs context length with its CI as error bars, one line per (size, context mode)."""
    if not np.isfinite(rows[metric].to_numpy(dtype=np.float64)).any():
        ax.text(0.5, 0.5, "not reported:\n" + "\n".join(why_empty or ["no data"]), transform=ax.transAxes,
                ha="center", va="center", fontsize=8)
    for i, ((size, context), line) in enumerate(rows.groupby([SIZE, CONTEXT], sort=True)):
        line = line.sort_values(CONTEXT_STEPS)
        e, lo, hi = (line[c].to_numpy(dtype=np.float64) for c in ci_columns(metric))
        errors = np.nan_to_num(np.vstack([e - lo, hi - e]), nan=0.0).clip(min=0)  # no CI (one seed): no bar
        ax.errorbar(line[CONTEXT_STEPS], e, yerr=errors, marker="o", capsize=3,
                    color=IMITATOR_COLORS[i % len(IMITATOR_COLORS)], label=f"{size} ({context} context)")
    ax.axhline(reference, color="black", linestyle=":", linewidth=1.0)
    steps = rows[CONTEXT_STEPS]
    if steps.min() > 0 and steps.max() / steps.min() >= 20:
        ax.set_xscale("log")
    ax.set_xlabel("context length (env steps)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def context_figure(rows: pd.DataFrame, path: str) -> str:
    """Summary rows of one extrapolation (env, group, cutoff) with several sizes or context lengths."""
    first = rows.iloc[0]
    fig = Figure(figsize=(12, 5))
    left, right = fig.subplots(1, 2)
    reasons = sorted(set(rows[EXTRAPOLATION_RATIO_REASON]) - {""})
    context_panel(left, rows, EXTRAPOLATION_RATIO, 1.0, "extrapolation ratio (imitator gain / teacher gain)", reasons)
    context_panel(right, rows, CEILING_EXCEEDANCE, 0.0, "ceiling exceedance: imitator final - B_c (return)", [])
    left.set_title("extrapolation ratio (1 = as good as the continued teacher)", fontsize=10)
    right.set_title("imitator final minus pre-cutoff best (> 0: beyond what it saw)", fontsize=10)
    fig.suptitle(f"{first[ENV]} ({first[GROUP]}), cutoff {first[CUTOFF]:g}: effect of context length and model size")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def slug(*parts: Any) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(p)).strip("-") for p in parts)


def draw_figures(per_seed: pd.DataFrame, summary: pd.DataFrame, curves: dict[str, Curve],
                 histories: dict[tuple, TeacherHistory], window: int, out_dir: str) -> dict[str, list[str]]:
    """Every figure, by test: curves_* and context_* (extrapolation), transfer_*, control_*."""
    figures: dict[str, list[str]] = {test: [] for test in TESTS}
    for (test, env, group, cutoff), rows in per_seed.groupby(list(COMPARISON), sort=False):
        name = slug(env, group, f"cutoff{cutoff:g}")
        if test == EXTRAPOLATION:
            path = os.path.join(out_dir, f"curves_{name}.png")
            figures[test].append(learning_curve_figure(rows, curves, histories, window, path))
            variants = summary.set_index(list(COMPARISON), drop=False).loc[[(test, env, group, cutoff)]]
            if len(variants.drop_duplicates([SIZE, CONTEXT_STEPS])) > 1:
                figures[test].append(context_figure(variants, os.path.join(out_dir, f"context_{name}.png")))
        else:
            figures[test].append(transfer_figure(rows, curves, window, os.path.join(out_dir, f"{test}_{name}.png")))
    return figures


# --- report.md -----------------------------------------------------------------------------------

SECTIONS = {
    EXTRAPOLATION: ("Extrapolation test (the cutoff test)",
                    "The imitator, trained on histories up to the cutoff, runs H more env steps in the same env "
                    "and tasks; the teacher resumes training from its cutoff checkpoint for the same H steps."),
    TRANSFER: ("Transfer test",
               "The imitator runs on held-out envs or tasks with an empty context; the teacher learns them from "
               "scratch."),
    CONTROL: ("Positive control",
              "Held-out goals, empty context, where Algorithm Distillation reports in-context learning. A null result "
              "in the extrapolation test is credible only if this shows **learns in context**."),
}

HOW_TO_READ = f"""\
- **L_c**: teacher return at the cutoff (mean of its last W episodes before it). **B_c**: best W-episode mean
  anywhere before the cutoff, the ceiling the imitator saw. **final**: mean of an arm's last W episodes within H
  steps. W = {{window}} episodes.
- **extrapolation ratio** = mean imitator gain / mean continued-teacher gain over L_c, reported only where the
  teacher's gain is significantly positive (otherwise the reason is given). 1 means the imitator improved as much
  as the still-training teacher; 0 means it stayed at the snapshot.
- **ceiling exceedance** = imitator final - B_c; above 0 with its CI means the imitator got better than anything
  in its training data. **snapshot fidelity** = imitator's first-W return / L_c (1: it starts where the teacher was).
- **transfer AUC ratio** = area under the imitator's curve / the scratch teacher's, over the same H steps.
- Brackets are {CONFIDENCE:.0%} percentile bootstrap intervals over seeds (teacher seeds, or held-out task
  indices); "(k/N seeds)" marks a value computed on fewer seeds than expected.
- **verdict** (extrapolation): *{EXTRAPOLATES}* if the CI of imitator final - B_c is above 0; *{DOES_NOT}* if not
  and the CI of imitator final - continued-teacher final is below 0; else *{INCONCLUSIVE}*. Transfer and control:
  *{LEARNS_IN_CONTEXT}* if the imitator's final return is significantly above its first-W return; *{DOES_NOT}*
  if not and it ends significantly below the teacher learning from scratch; else *{INCONCLUSIVE}*.
- **{MISSING}: seeds [...]** replaces the verdict when a trial that verdict needs failed, is missing, or finished
  no episode; no verdict is ever drawn over fewer seeds. "missing trials" names each one.
- Figures: lines are means over seeds of the W-episode rolling return, bands their {CONFIDENCE:.0%} bootstrap
  interval. In the learning curves the teacher's history is solid before the cutoff (the imitator's training
  data) and dashed after it (the future the imitator never saw); the arms start at the vertical cutoff line;
  the dotted line is B_c.
"""


def trial_counts(trials: pd.DataFrame) -> str:
    counts = trials[STATUS].value_counts()
    return (f"{len(trials)} expected trials: {counts.get(OK, 0)} ok, {counts.get(FAILED, 0)} failed, "
            f"{counts.get(MISSING, 0)} missing.")


def verdict_section(test: str, summary: pd.DataFrame, figures: list[str]) -> str:
    title, intro = SECTIONS[test]
    rows = summary[summary[TEST] == test]
    if rows.empty:
        absent = " A null result without it is not credible." if test == CONTROL else ""
        return f"## {title}\n\nNo {test} trials in this run.{absent}\n"
    table = markdown_table(rows, EXTRAPOLATION_TABLE if test == EXTRAPOLATION else TRANSFER_TABLE)
    images = "\n\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures)
    return f"## {title}\n\n{intro}\n\n{table}\n\n{images}\n"


def write_markdown(path: str, trials: pd.DataFrame, summary: pd.DataFrame, figures: dict[str, list[str]],
                   paragraph: str, window: int) -> str:
    links = "\n".join(f"- [{os.path.basename(p)}]({os.path.basename(p)})" for test in TESTS for p in figures[test])
    parts = [
        "# Can an imitator keep learning after its teacher's data stops?\n",
        f"{trial_counts(trials)}\n",
        f"## Verdicts\n\n{paragraph}\n",
        *(verdict_section(test, summary, figures[test]) for test in TESTS),
        f"## Figures\n\n{links}\n",
        "## How to read this\n\n" + HOW_TO_READ.format(window=window),
        f"## Files\n\n- `{METRICS_FILE}`: one row per (test, env, group, cutoff, variant, seed).\n"
        f"- `{SUMMARY_FILE}`: one row per (test, env, group, cutoff, variant): estimates, CIs, verdicts.\n",
    ]
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


# --- entry point ---------------------------------------------------------------------------------


def build_report(trials: pd.DataFrame, episodes: pd.DataFrame, histories: pd.DataFrame, out_dir: str, *,
                 window: int = WINDOW, n_resamples: int = N_RESAMPLES) -> ReportSummary:
    """Metrics, summary with bootstrap CIs and verdicts, figures and report.md in `out_dir` (module docstring)."""
    trials = normalise_trials(trials)
    if not (trials[ARM] == IMITATOR).any():
        raise ValueError("build_report: no imitator trials to report on")
    curves, teacher_histories = trial_curves(trials, episodes), history_curves(histories)
    per_seed = per_seed_frame(trials, curves, teacher_histories, window)
    summary = summary_frame(per_seed, n_resamples)
    os.makedirs(out_dir, exist_ok=True)
    path_metrics, path_summary = os.path.join(out_dir, METRICS_FILE), os.path.join(out_dir, SUMMARY_FILE)
    per_seed.to_parquet(path_metrics, index=False)
    summary.to_parquet(path_summary, index=False)
    figures = draw_figures(per_seed, summary, curves, teacher_histories, window, out_dir)
    paragraph = summary_paragraph(summary)
    path_md = write_markdown(os.path.join(out_dir, REPORT_FILE), trials, summary, figures, paragraph, window)
    return ReportSummary(path_md, [p for test in TESTS for p in figures[test]], paragraph, summary,
                         path_metrics, path_summary)


# --- the stage: trial results and histories from the store -> build_report -> {experiment}/report ---


def read_trial_results(store, experiment: str, trial_id: str) -> tuple[str, list[dict]]:
    """(status, reported rows) of one Tune trial from its result.json in the store: "ok" when its
    last attempt finished, "failed" when it did not, "missing" when the trial never started. A
    retried trial's rows are those of its last attempt."""
    path = f"{experiment}/tune/{trial_id}/result.json"
    try:
        lines = store.read_bytes(path).decode().splitlines()
    except FileNotFoundError:
        return "missing", []
    rows = [json.loads(line) for line in lines if line.strip()]
    starts = [i for i, row in enumerate(rows) if row.get("training_iteration") == 1]
    rows = rows[starts[-1]:] if starts else rows
    return ("ok" if rows and rows[-1].get(TRIAL_FINISHED) else "failed"), rows


def gather(preset, store, experiment: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The three frames of build_report for the preset's grid, from what evaluate left in the store."""
    from pipeline.evaluate import trial_specs
    from pipeline.train import imitator_specs

    variants = {s.name: s for s in imitator_specs(preset)}
    trials, episodes, teachers = [], [], {}
    for trial in trial_specs(preset):
        status, rows = read_trial_results(store, experiment, trial.trial_id)
        variant = variants.get(trial.imitator)
        trials.append({
            "trial_id": trial.trial_id, "test": trial.test, "env": trial.env_id, "group": trial.group,
            "cutoff": trial.cutoff, "cutoff_step": trial.cutoff_step, "seed": trial.seed, "task_id": trial.task_id,
            "arm": trial.arm, "context": trial.context,
            "context_steps": variant.model_args["context_steps"] if variant else 0,
            "size": trial.imitator.removeprefix(f"{trial.group}-").rsplit("-ctx", 1)[0] if variant else "",
            "horizon": trial.horizon, "status": status})
        episodes += [{"trial_id": trial.trial_id, "env_steps": row[ENV_STEPS], "episodic_return": row[EPISODIC_RETURN]}
                     for row in rows if row.get(EPISODIC_RETURN) is not None]
        if trial.test == "extrapolation":
            teachers[trial.teacher["teacher_id"]] = trial
    histories = [row for trial in teachers.values() for row in history_rows(store, experiment, trial)]
    return (pd.DataFrame(trials), pd.DataFrame(episodes, columns=["trial_id", "env_steps", "episodic_return"]),
            pd.DataFrame(histories, columns=list(HISTORY_COLUMNS)))  # no extrapolation test: no history rows, same columns


def history_rows(store, experiment: str, trial) -> list[dict]:
    """One row per finished episode of the teacher's whole recorded history."""
    from pipeline.history import TeacherHistory

    teacher = trial.teacher
    table = TeacherHistory(store, experiment, teacher["env_id"], teacher["teacher_id"]).read()
    curve = Curve.from_transitions(table["step"].to_numpy(), table["reward"].to_numpy(),
                                   (pa.compute.or_(table["terminated"], table["truncated"])).to_numpy(zero_copy_only=False))
    return [{"group": trial.group, "env": trial.env_id, "seed": trial.seed, "task_id": trial.task_id, "end_step": int(step),
             "episodic_return": float(value), "budget": teacher["budget"]}
            for step, value in zip(curve.end_step, curve.episode_return)]


def report(preset, store, experiment: str, log=print) -> ReportSummary | None:
    """Write {experiment}/report/ from the evaluation's trial results, compared with the preset's other
    reruns in the store (pipeline.compare); prints the verdict paragraph."""
    from pipeline.compare import across_reruns  # compare builds on this module's tables

    trials, episodes, histories = gather(preset, store, experiment)
    if trials.empty:
        log("report: the preset lists no evaluation tests (evaluate.imitators): nothing to report")
        return None
    with tempfile.TemporaryDirectory() as local:
        summary = build_report(trials, episodes, histories, local, window=preset.evaluate.window)
        reruns = across_reruns(store, preset, experiment, summary.table, local)
        store.upload_dir(local, f"{experiment}/report")
    where = store.url(f"{experiment}/report/{REPORT_FILE}")
    log(f"report: {where}")
    log(f"report: {reruns.line}")
    log(summary.paragraph)
    return replace(summary, path_md=where)
