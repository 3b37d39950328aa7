"""The report stage: the trials' results and the teachers' histories from the store -> build_report in a
local folder -> uploaded to {store}/{experiment}/report/ with the comparison across reruns
(pipeline.compare; this is the only module of the report that calls it).

    summary = build_report(trials, episodes, histories, out_dir)   # pure: frames in, files out
    report(preset, store, experiment)                              # python -m pipeline report --preset quick
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace

import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from pipeline import layout
from pipeline.arms import EXTRAPOLATION, IMITATOR, TESTS
from pipeline.compare import across_reruns
from pipeline.history import TeacherHistory
from pipeline.metrics import (CUTOFF, ENV, ENV_STEPS, EPISODIC_RETURN, SEED, TRIAL_FINISHED, UNIT, WINDOW,
                              Curve, VerdictRules)
from pipeline.plan import TrialSpec, imitator_specs, trial_batches, trial_specs
from pipeline.report.figures import draw_figures
from pipeline.report.tables import (ARM, BUDGET, CONTEXT, CONTEXT_STEPS, CUTOFF_STEP, END_STEP, EPISODE_COLUMNS, PRIME_STEP,
                                    EPISODE_STEPS, FAILED, GROUP, HISTORY_COLUMNS, HORIZON, METRICS_FILE, MISSING,
                                    OK, REPORT_FILE, RETURN, SIZE, STATUS, SUMMARY_FILE, TASK_ID, TEST, TRIAL_ID,
                                    ReportError, history_curves, normalise_trials, per_seed_frame, summary_frame,
                                    trial_curves)
from pipeline.report.text import summary_paragraph, write_markdown


@dataclass
class ReportSummary:
    path_md: str  # report.md
    figures: list[str]  # every PNG written
    paragraph: str  # the verdicts in one plain-text paragraph
    table: pd.DataFrame  # summary.parquet's frame: one row per (test, env, group, cutoff, variant)
    path_metrics: str = ""  # metrics.parquet (per-seed rows)
    path_summary: str = ""  # summary.parquet


def build_report(trials: pd.DataFrame, episodes: pd.DataFrame, histories: pd.DataFrame, out_dir: str, *,
                 window: int = WINDOW, rules: VerdictRules | None = None) -> ReportSummary:
    """Metrics, summary with t-intervals and verdicts, figures and report.md in `out_dir` (the column
    contract and the outputs: pipeline/report/__init__.py). Malformed frames raise ReportError."""
    trials = normalise_trials(trials)
    if not (trials[ARM] == IMITATOR).any():
        raise ReportError("report: no imitator trials to report on (trials.arm has no 'imitator')")
    curves, teacher_histories = trial_curves(trials, episodes), history_curves(histories)
    per_seed = per_seed_frame(trials, curves, teacher_histories, window)
    rules = rules or VerdictRules()
    summary = summary_frame(per_seed, rules)
    os.makedirs(out_dir, exist_ok=True)
    path_metrics, path_summary = os.path.join(out_dir, METRICS_FILE), os.path.join(out_dir, SUMMARY_FILE)
    per_seed.to_parquet(path_metrics, index=False)
    summary.to_parquet(path_summary, index=False)
    figures = draw_figures(per_seed, summary, curves, teacher_histories, window, out_dir)
    paragraph = summary_paragraph(summary)
    path_md = write_markdown(os.path.join(out_dir, REPORT_FILE), trials, summary, figures, paragraph, window, rules)
    return ReportSummary(path_md, [p for test in TESTS for p in figures[test]], paragraph, summary,
                         path_metrics, path_summary)


# --- the three frames, from what collect and evaluate left in the store --------------------------


def read_trial_results(store, experiment: str, trial_id: str) -> tuple[str, list[dict]]:
    """(status, reported rows) of one Tune trial (a batch of units) from its result.json in the
    store: "ok" when its last attempt finished, "failed" when it did not, "missing" when the trial
    never started. A retried trial's rows are those of its last attempt. A line that is not a JSON
    object raises ReportError naming the file."""
    path = layout.trial_result(experiment, trial_id)
    try:
        data = store.read_bytes(path)
    except FileNotFoundError:
        return MISSING, []
    rows = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # bytes: UTF-8 decoding errors are ValueErrors too
        except ValueError as error:
            row, why = None, str(error)
        else:
            why = f"a JSON {type(row).__name__}, not an object"
        if not isinstance(row, dict):
            raise ReportError(f"report: trial {trial_id}: {store.url(path)} line {number} is damaged ({why}); "
                              "the trial's results cannot be read")
        rows.append(row)
    starts = [i for i, row in enumerate(rows) if row.get("training_iteration") == 1]
    rows = rows[starts[-1]:] if starts else rows
    return (OK if rows and rows[-1].get(TRIAL_FINISHED) else FAILED), rows


def trials_of_units(preset, store, experiment: str) -> dict[str, str]:
    """Unit trial_id -> the Tune trial (batch) that ran it: as evaluate recorded it in _grid.json,
    else as the preset plans it. A grid recorded before evaluate.lockstep ran each unit as its own
    trial, named by its trial_id."""
    path = layout.grid_file(experiment)
    try:
        grid = json.loads(store.read_bytes(path))
    except FileNotFoundError:
        return {u.trial_id: b.batch_id for b in trial_batches(trial_specs(preset), preset.evaluate.lockstep) for u in b.units}
    except ValueError as error:
        raise ReportError(f"report: {store.url(path)} is damaged ({error}); which trial ran which unit is unknown") from error
    if isinstance(grid, list):
        return {trial["trial_id"]: trial["trial_id"] for trial in grid}
    return {unit: batch for batch, units in grid["batches"].items() for unit in units}


def gather(preset, store, experiment: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The three frames of build_report for the preset's grid, from what evaluate left in the store.
    A unit has the status of the Tune trial that ran it and the episodes reported under its trial_id
    (rows without a unit, from trials of one unit recorded before lockstep, are that unit's)."""
    variants = {spec.name: spec for spec in imitator_specs(preset)}
    batch_of, batch_results = trials_of_units(preset, store, experiment), {}
    trials, episodes, teachers = [], [], {}
    for trial in trial_specs(preset):
        batch = batch_of.get(trial.trial_id)
        if batch not in batch_results:
            batch_results[batch] = read_trial_results(store, experiment, batch) if batch else (MISSING, [])
        status, rows = batch_results[batch]
        variant = variants.get(trial.imitator)
        trials.append({
            TRIAL_ID: trial.trial_id, TEST: trial.test, ENV: trial.env_id, GROUP: trial.group,
            CUTOFF: trial.cutoff, CUTOFF_STEP: trial.cutoff_step, PRIME_STEP: trial.prime_step,
            SEED: trial.seed, TASK_ID: trial.task_id,
            ARM: trial.arm, CONTEXT: trial.context,
            CONTEXT_STEPS: variant.model_args["context_steps"] if variant else 0,
            SIZE: variant.size if variant else "",
            HORIZON: trial.horizon, STATUS: status})
        episodes += [{TRIAL_ID: trial.trial_id, EPISODE_STEPS: row[ENV_STEPS], RETURN: row[EPISODIC_RETURN]}
                     for row in rows if row.get(EPISODIC_RETURN) is not None and row.get(UNIT, trial.trial_id) == trial.trial_id]
        if trial.test == EXTRAPOLATION:
            teachers[trial.teacher_spec.teacher_id] = trial
    histories = [row for trial in teachers.values() for row in episode_rows(store, experiment, trial)]
    return (pd.DataFrame(trials), pd.DataFrame(episodes, columns=list(EPISODE_COLUMNS)),
            pd.DataFrame(histories, columns=list(HISTORY_COLUMNS)))  # no extrapolation test: no history rows, same columns


def episode_rows(store, experiment: str, trial: TrialSpec) -> list[dict]:
    """One row per finished episode of the trial's teacher, over its whole recorded history."""
    teacher = trial.teacher_spec
    table = TeacherHistory(store, experiment, teacher.env_id, teacher.teacher_id).read()
    curve = Curve.from_transitions(table["step"].to_numpy(), table["reward"].to_numpy(),
                                   (pa.compute.or_(table["terminated"], table["truncated"])).to_numpy(zero_copy_only=False))
    return [{GROUP: trial.group, ENV: trial.env_id, SEED: trial.seed, TASK_ID: trial.task_id, END_STEP: int(step),
             RETURN: float(value), BUDGET: teacher.budget}
            for step, value in zip(curve.end_step, curve.episode_return)]


# --- the stage -----------------------------------------------------------------------------------


def report(preset, store, experiment: str, log=print) -> ReportSummary | None:
    """Write {experiment}/report/ from the evaluation's trial results, compared with the preset's other
    reruns in the store (pipeline.compare); prints the verdict paragraph."""
    trials, episodes, histories = gather(preset, store, experiment)
    if trials.empty:
        log("report: the preset lists no evaluation tests (evaluate.imitators): nothing to report")
        return None
    with tempfile.TemporaryDirectory() as local:
        summary = build_report(trials, episodes, histories, local, window=preset.evaluate.window,
                               rules=preset.evaluate.verdict)
        reruns = across_reruns(store, preset, experiment, summary.table, local)
        store.upload_dir(local, layout.report_dir(experiment))
    where = store.url(f"{layout.report_dir(experiment)}/{REPORT_FILE}")
    log(f"report: {where}")
    log(f"report: {reruns.line}")
    log(summary.paragraph)
    return replace(summary, path_md=where)
