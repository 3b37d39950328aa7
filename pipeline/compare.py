"""Across reruns: one preset rerun on a schedule, one experiment per rerun, compared with the others.

    comparison = across_reruns(store, preset, "quick-2026-11-23", summary.table, out_dir)   # inside report()
    print(comparison.line)   # "across reruns: 3 reruns of preset quick in this store, ... reruns.png"

A scheduled rerun is its own experiment, named `{preset}-{YYYY-MM-DD}` (UTC; `jobs/submit.py --dated`
adds `-HHMM` only when that name is taken). Nothing in collect, train or evaluate records which preset
produced an experiment, so the report stage does: `report/_preset.json` holds the preset's name, a
digest of its settings (file and --set overrides) and when the report was written. A rerun counts once
its report is finished, i.e. once `report/_preset.json` and `report/summary.parquet` are in the store.

`across_reruns` finds the other experiments of the same preset in the store (by their `_preset.json`),
reads their `report/summary.parquet` (not TensorBoard), and writes beside this rerun's report:

reruns.parquet   every summary row of every rerun, in date order per (test, env, group, cutoff, variant),
                 with `rerun`, `date`, `reported_at`, `settings`, and for each of KEY_METRICS
                 `<metric>_drift_previous` (minus the previous rerun that has this row) and
                 `<metric>_drift_first` (minus the first rerun that has it). NaN stays NaN: a metric a
                 rerun could not compute has no drift, and neither does the rerun after it.
reruns.png       the imitator's final return and the verdict margin (ceiling exceedance in the
                 extrapolation test, in-context gain in transfer and control: the quantity whose CI
                 above 0 gives the positive verdict) against rerun date; one row of panels per env, one
                 line per (test, group, cutoff, variant), 95% CI bars (t-intervals) where there are >= 2 seeds.
report.md        gets a last section "## Across reruns": the reruns compared, one table per test (each
                 cell: estimate [CI]; drift from the previous and from the first rerun), the figure. On
                 the first run of a preset in a store it says so instead.

The rerun date is the date in the experiment's name when it is `{preset}-{YYYY-MM-DD}[-anything]`, else
the UTC day its report was written; reruns are ordered by (date, report time, name).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import TypeAdapter

from pipeline import layout
from pipeline.arms import CONTROL, EXTRAPOLATION, IMITATOR_COLORS, TESTS, TRANSFER
from pipeline.config import Preset
from pipeline.metrics import (CEILING_EXCEEDANCE, CUTOFF, ENV, EXTRAPOLATION_RATIO, FINAL_IMITATOR, FINAL_TEACHER,
                              HIGH, LOW, TRANSFER_AUC_RATIO, VERDICT)
from pipeline.report.figures import DPI, errorbars
from pipeline.report.tables import GROUP, IN_CONTEXT_GAIN, REPORT_FILE, SUMMARY_FILE, TEST, VARIANT
from pipeline.report.text import SECTIONS, markdown_table, number, with_ci

RECORD_FILE = layout.PRESET_RECORD_FILE  # in {experiment}/report/: which preset produced the experiment
RERUNS_FILE, RERUNS_FIGURE = "reruns.parquet", "reruns.png"
HEADING = "## Across reruns"

# Columns added to the summary rows.
RERUN, DATE, REPORTED_AT, SETTINGS, ORDER = "rerun", "date", "reported_at", "settings", "rerun_order"
DRIFT_PREVIOUS, DRIFT_FIRST = "_drift_previous", "_drift_first"  # suffixes: final_return_imitator_drift_first
KEY = (TEST, ENV, GROUP, CUTOFF, VARIANT)  # one line followed across reruns
KEY_METRICS = (FINAL_IMITATOR, FINAL_TEACHER, CEILING_EXCEEDANCE, EXTRAPOLATION_RATIO, IN_CONTEXT_GAIN,
               TRANSFER_AUC_RATIO)
TABLE_METRICS = {
    EXTRAPOLATION: (("imitator final", FINAL_IMITATOR), ("continued-teacher final", FINAL_TEACHER),
                    ("ceiling exceedance", CEILING_EXCEEDANCE), ("extrapolation ratio", EXTRAPOLATION_RATIO)),
    TRANSFER: (("imitator final", FINAL_IMITATOR), ("scratch-teacher final", FINAL_TEACHER),
               ("in-context gain", IN_CONTEXT_GAIN), ("transfer AUC ratio", TRANSFER_AUC_RATIO)),
}
TABLE_METRICS[CONTROL] = TABLE_METRICS[TRANSFER]
MARGIN = {EXTRAPOLATION: CEILING_EXCEEDANCE, TRANSFER: IN_CONTEXT_GAIN, CONTROL: IN_CONTEXT_GAIN}
MAX_SHOWN = 8  # reruns in report.md's tables; reruns.parquet and the figure have all of them
_DATED = r"(\d{4}-\d{2}-\d{2})(?:-.+)?"  # what follows "{preset}-" in a dated name (jobs/submit.py makes them)


@dataclass(frozen=True)
class Rerun:
    experiment: str  # the experiment's folder in the store
    date: str  # YYYY-MM-DD (module docstring)
    reported_at: str  # ISO 8601 UTC, when its report was written
    settings: str  # digest of the preset's settings
    summary: pd.DataFrame  # its report/summary.parquet


@dataclass(frozen=True)
class Comparison:
    reruns: list[str]  # every rerun compared, this one included, in date order; [this one] on a first run
    table: pd.DataFrame | None  # reruns.parquet's frame; None on a first run
    figure: str | None  # reruns.png in out_dir; None on a first run
    line: str  # one line for the log


# --- the record of which preset produced an experiment -------------------------------------------


def settings_digest(preset: Preset) -> str:
    """12 hex digits that change when any setting of the preset (file or --set override) does."""
    settings = TypeAdapter(Preset).dump_python(preset, mode="json")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def record(preset: Preset, now: dt.datetime | None = None) -> dict[str, str]:
    now = now or dt.datetime.now(dt.timezone.utc)
    return {"preset": preset.name, "settings": settings_digest(preset),
            REPORTED_AT: now.astimezone(dt.timezone.utc).isoformat(timespec="seconds")}


def rerun_date(experiment: str, preset_name: str, reported_at: str) -> str:
    """The date in `{preset}-{YYYY-MM-DD}[-suffix]`, else the UTC day of `reported_at`."""
    match = re.fullmatch(re.escape(preset_name) + "-" + _DATED, experiment)
    if match:
        try:
            return dt.date.fromisoformat(match.group(1)).isoformat()
        except ValueError:
            pass
    return reported_at[:10]


def find_reruns(store, preset_name: str, exclude: str) -> list[Rerun]:
    """Every experiment in the store, except `exclude`, whose finished report says `preset_name` produced it."""
    names = [n for n in store.list_names("") if n != exclude]
    records = store.read_many([f"{layout.report_dir(n)}/{RECORD_FILE}" for n in names])
    found = []
    for path, data in records.items():
        experiment = path.split("/", 1)[0]
        try:
            said = json.loads(data)
        except ValueError:
            continue  # not ours, or damaged: not a rerun we can date
        if not isinstance(said, dict) or said.get("preset") != preset_name:
            continue
        try:
            summary = pd.read_parquet(io.BytesIO(store.read_bytes(f"{layout.report_dir(experiment)}/{SUMMARY_FILE}")))
        except FileNotFoundError:
            continue  # report still being uploaded
        reported_at = str(said.get(REPORTED_AT, ""))
        found.append(Rerun(experiment, rerun_date(experiment, preset_name, reported_at), reported_at,
                           str(said.get("settings", "")), summary))
    return found


# --- the table: pure -----------------------------------------------------------------------------


def in_order(reruns: list[Rerun]) -> list[Rerun]:
    return sorted(reruns, key=lambda r: (r.date, r.reported_at, r.experiment))


def add_drift(frame: pd.DataFrame, metrics: tuple[str, ...] = KEY_METRICS) -> pd.DataFrame:
    """Rows sorted by KEY then ORDER, with `<metric>_drift_previous` and `<metric>_drift_first` per metric.

    The previous / first value is that of the previous / first rerun that has a row with the same KEY.
    """
    frame = frame.sort_values([*KEY, ORDER], kind="stable").reset_index(drop=True)
    lines = frame.groupby(list(KEY), sort=False, dropna=False)
    for metric in metrics:
        values = frame[metric].astype(np.float64)
        line = lines[metric]
        frame[metric + DRIFT_PREVIOUS] = values - line.shift(1).astype(np.float64)
        frame[metric + DRIFT_FIRST] = values - line.transform(lambda s: s.iloc[0]).astype(np.float64)
    return frame


def rerun_table(reruns: list[Rerun]) -> pd.DataFrame:
    """Every summary row of every rerun, tagged with its rerun, in date order per KEY, with drifts."""
    frames = []
    for order, rerun in enumerate(in_order(reruns)):
        frame = rerun.summary.copy()
        for column in (c for metric in KEY_METRICS for c in (metric, metric + LOW, metric + HIGH)):
            if column not in frame.columns:  # a summary from an older report
                frame[column] = np.nan
        frame[RERUN], frame[DATE], frame[REPORTED_AT], frame[SETTINGS] = (
            rerun.experiment, rerun.date, rerun.reported_at, rerun.settings)
        frame[ORDER] = order
        frames.append(frame)
    return add_drift(pd.concat(frames, ignore_index=True))


# --- report.md section ---------------------------------------------------------------------------


def signed(x: float) -> str:
    return "—" if x is None or not np.isfinite(x) else ("+" if x >= 0 else "-") + number(abs(x))


def metric_cell(row: pd.Series, metric: str) -> str:
    text = with_ci(row, metric)
    if row[ORDER] == row["_first_order"] or not np.isfinite(row[metric]):
        return text  # the first rerun of this line, or no value: nothing to drift
    return f"{text}; Δ {signed(row[metric + DRIFT_PREVIOUS])} prev, {signed(row[metric + DRIFT_FIRST])} first"


def test_table(rows: pd.DataFrame, test: str, current: str) -> str:
    rows = rows.assign(_first_order=rows.groupby(list(KEY), sort=False)[ORDER].transform("min"))
    mark = lambda r: f"**{r[RERUN]}**" if r[RERUN] == current else r[RERUN]  # noqa: E731
    columns = (("env", lambda r: r[ENV]), ("group", lambda r: r[GROUP]), ("cutoff", lambda r: f"{r[CUTOFF]:g}"),
               ("variant", lambda r: r[VARIANT]), ("rerun", mark), ("date", lambda r: r[DATE]),
               *((name, lambda r, m=metric: metric_cell(r, m)) for name, metric in TABLE_METRICS[test]),
               ("verdict", lambda r: f"**{r[VERDICT]}**"))
    return markdown_table(rows, columns)


def shown(reruns: list[Rerun], current: str) -> list[Rerun]:
    """The reruns report.md tables show: all up to MAX_SHOWN, else the first, the last ones and this one."""
    if len(reruns) <= MAX_SHOWN:
        return reruns
    keep = {reruns[0].experiment, current, *(r.experiment for r in reruns[-(MAX_SHOWN - 2):])}
    return [r for r in reruns if r.experiment in keep]


def section(table: pd.DataFrame, reruns: list[Rerun], preset_name: str, current: str, figure: str) -> str:
    """The "## Across reruns" section of report.md; `reruns` in date order."""
    listed = shown(reruns, current)
    table = table[table[RERUN].isin({r.experiment for r in listed})]
    listing = markdown_table(pd.DataFrame([{"experiment": r.experiment, "date": r.date, "reported_at": r.reported_at,
                                            "settings": r.settings} for r in listed]), (
        ("rerun", lambda r: f"**{r['experiment']}** (this report)" if r["experiment"] == current else r["experiment"]),
        ("date", lambda r: r["date"]), ("report written (UTC)", lambda r: r["reported_at"].replace("T", " ")[:16]),
        ("settings digest", lambda r: r["settings"] or "?")))
    parts = [f"{HEADING}\n",
             f"{len(reruns)} runs of preset `{preset_name}` in this store have a finished report; in date order"
             + (":\n" if len(listed) == len(reruns) else
                f" (the first, this one and the latest; all {len(reruns)} are in `{RERUNS_FILE}` and the figure):\n"),
             listing + "\n",
             "A different settings digest means the preset file or its `--set` overrides changed between reruns. "
             "Each cell: estimate [95% CI]; Δ from the previous rerun and from the first rerun with that row. "
             f"Every summary column of every rerun, with the drifts: `{RERUNS_FILE}`.\n"]
    for test in TESTS:
        rows = table[table[TEST] == test]
        if len(rows):
            parts.append(f"### {SECTIONS[test][0]}\n\n{test_table(rows, test, current)}\n")
    parts.append(f"![{os.path.basename(figure)}]({os.path.basename(figure)})\n")
    return "\n".join(parts)


def first_run_section(preset_name: str) -> str:
    return (f"{HEADING}\n\nThis is the first run of preset `{preset_name}` in this store (no other experiment of it "
            "has a finished report), so there is nothing to compare yet. Later reruns, e.g. "
            f"`python jobs/submit.py --preset {preset_name} --dated ...`, are compared here.\n")


# --- figure --------------------------------------------------------------------------------------


def rerun_figure(table: pd.DataFrame, reruns: list[Rerun], preset_name: str, path: str) -> str:
    """Imitator final return and verdict margin vs rerun, one row of panels per env, one line per KEY."""
    envs = sorted(table[ENV].unique())
    fig = Figure(figsize=(13, 4.2 * len(envs)))
    axes = np.atleast_2d(fig.subplots(len(envs), 2, squeeze=False))
    ticks = [r.experiment.removeprefix(f"{preset_name}-") if r.experiment.startswith(f"{preset_name}-{r.date}")
             else f"{r.date}\n{r.experiment}" for r in in_order(reruns)]
    for (left, right), env in zip(axes, envs):
        rows = table[table[ENV] == env]
        for i, (key, line) in enumerate(rows.groupby(list(KEY), sort=False)):
            test, _, group, cutoff, variant = key
            color = IMITATOR_COLORS[i % len(IMITATOR_COLORS)]
            label = f"{test}: {group}, cutoff {cutoff:g}, {variant}"
            for ax, metric in ((left, FINAL_IMITATOR), (right, MARGIN[test])):
                errorbars(ax, line[ORDER], line, metric, color=color, label=label)
        left.set_ylabel(f"{env}\nimitator final return")
        right.set_ylabel("verdict margin (return)")
        right.axhline(0.0, color="black", linestyle=":", linewidth=1.0)
        every = -(-len(ticks) // 12)  # at most about 12 labelled reruns
        for ax in (left, right):
            ax.set_xticks(range(0, len(ticks), every), ticks[::every], fontsize=8)
            ax.set_xlim(-0.5, len(ticks) - 0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
    axes[0, 0].set_title("imitator final return (mean of last W episodes)", fontsize=10)
    axes[0, 1].set_title("ceiling exceedance (extrapolation), in-context gain (transfer, control);\n"
                         "CI above 0 gives the positive verdict", fontsize=10)
    axes[-1, 0].set_xlabel("rerun (date)")
    axes[-1, 1].set_xlabel("rerun (date)")
    fig.suptitle(f"Preset {preset_name}: key metrics across reruns (bars: 95% t-interval over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


# --- entry point (called by the report stage, pipeline/report/stage.py) --------------------------


def across_reruns(store, preset: Preset, experiment: str, summary: pd.DataFrame, out_dir: str,
                  now: dt.datetime | None = None) -> Comparison:
    """Write _preset.json in out_dir, compare with the preset's other reruns in the store, append the
    "## Across reruns" section to out_dir/report.md (module docstring)."""
    said = record(preset, now)
    with open(os.path.join(out_dir, RECORD_FILE), "w") as f:
        json.dump(said, f, indent=1)
    others = find_reruns(store, preset.name, exclude=experiment)
    this = Rerun(experiment, rerun_date(experiment, preset.name, said[REPORTED_AT]), said[REPORTED_AT],
                 said["settings"], summary)
    reruns = in_order([this, *others])
    with open(os.path.join(out_dir, REPORT_FILE), "a") as f:
        if not others:
            f.write("\n" + first_run_section(preset.name))
            return Comparison([experiment], None, None, f"across reruns: first run of preset {preset.name} in this store")
        table = rerun_table(reruns)
        table.to_parquet(os.path.join(out_dir, RERUNS_FILE), index=False)
        figure = rerun_figure(table, reruns, preset.name, os.path.join(out_dir, RERUNS_FIGURE))
        f.write("\n" + section(table, reruns, preset.name, experiment, figure))
    names = ", ".join(r.experiment for r in reruns)
    return Comparison([r.experiment for r in reruns], table, figure,
                      f"across reruns: {len(reruns)} runs of preset {preset.name} in this store ({names}): "
                      f"{RERUNS_FILE}, {RERUNS_FIGURE}")
