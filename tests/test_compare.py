"""Across reruns (pipeline/compare.py): drift on synthetic summaries with known values, how reruns are
found and dated, and two reruns of the smoke preset through the real evaluate and report stages."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from pipeline.__main__ import main
from pipeline.compare import (DATE, DRIFT_FIRST, DRIFT_PREVIOUS, KEY, KEY_METRICS, ORDER, RECORD_FILE, RERUN,
                              RERUNS_FIGURE, RERUNS_FILE, Rerun, find_reruns, rerun_date, rerun_figure, rerun_table,
                              section)
from pipeline.metrics import (CEILING_EXCEEDANCE, COUNT, CUTOFF, ENV, FINAL_IMITATOR, HIGH, LOW, N_SEEDS,
                              VERDICT)
from pipeline.report.tables import GROUP, SUMMARY_FILE, TEST, VARIANT
from pipeline.store import Store

LINE_A = {TEST: "extrapolation", ENV: "DarkRoom-v0", GROUP: "darkroom", CUTOFF: 0.5, VARIANT: "tiny, 20 steps primed"}
LINE_B = {**LINE_A, CUTOFF: 0.25}
LINE_C = {**LINE_A, ENV: "CartPole-v1", GROUP: "cartpole"}


def summary(lines: list[tuple[dict, float]]) -> pd.DataFrame:
    """Summary rows with FINAL_IMITATOR = the given value (CI +-1, 5 seeds), other key metrics NaN."""
    rows = []
    for line, value in lines:
        row = {**line, VERDICT: "inconclusive", N_SEEDS: 5, FINAL_IMITATOR: value, FINAL_IMITATOR + LOW: value - 1,
               FINAL_IMITATOR + HIGH: value + 1, FINAL_IMITATOR + COUNT: 5}
        rows.append(row)
    return pd.DataFrame(rows)


def rerun(name: str, lines, reported_at: str = "2026-11-30T00:00:00+00:00") -> Rerun:
    return Rerun(name, rerun_date(name, "smoke", reported_at), reported_at, "abc", summary(lines))


def at(table: pd.DataFrame, line: dict, name: str) -> pd.Series:
    rows = table[(table[RERUN] == name) & np.logical_and.reduce([table[k] == v for k, v in line.items()])]
    assert len(rows) == 1, rows
    return rows.iloc[0]


# --- pure ----------------------------------------------------------------------------------------


def test_drift_from_the_previous_and_the_first_rerun_of_each_line():
    reruns = [  # given out of date order
        rerun("smoke-2026-11-22", [(LINE_A, 2.0), (LINE_B, 4.0), (LINE_C, 4.0)]),
        rerun("smoke-2026-11-20", [(LINE_A, 1.0), (LINE_B, 5.0), (LINE_C, 1.0)]),
        rerun("smoke-2026-11-21", [(LINE_A, 3.0), (LINE_C, np.nan)]),  # LINE_B absent, LINE_C without a value
    ]
    table = rerun_table(reruns)
    previous, first = FINAL_IMITATOR + DRIFT_PREVIOUS, FINAL_IMITATOR + DRIFT_FIRST
    a = table[np.logical_and.reduce([table[k] == v for k, v in LINE_A.items()])]
    assert a[RERUN].tolist() == ["smoke-2026-11-20", "smoke-2026-11-21", "smoke-2026-11-22"]  # date order
    assert a[DATE].tolist() == ["2026-11-20", "2026-11-21", "2026-11-22"]
    np.testing.assert_allclose(a[previous], [np.nan, 2.0, -1.0])
    np.testing.assert_allclose(a[first], [0.0, 2.0, 1.0])
    b = at(table, LINE_B, "smoke-2026-11-22")  # compared with the last rerun that has the line
    assert b[previous] == pytest.approx(-1.0) and b[first] == pytest.approx(-1.0)
    c = [at(table, LINE_C, f"smoke-2026-11-{day}") for day in (20, 21, 22)]
    assert np.isnan(c[1][previous]) and np.isnan(c[1][first])  # no value, no drift
    assert np.isnan(c[2][previous]) and c[2][first] == pytest.approx(3.0)  # the previous had none
    assert all(np.isnan(table[CEILING_EXCEEDANCE + DRIFT_PREVIOUS])) and set(KEY_METRICS) <= set(table.columns)


def test_reruns_of_one_day_are_ordered_by_report_time():
    late = rerun("smoke-2026-11-22", [(LINE_A, 1.0)], reported_at="2026-11-22T23:00:00+00:00")
    early = rerun("smoke-2026-11-22-0600", [(LINE_A, 3.0)], reported_at="2026-11-22T06:30:00+00:00")
    table = rerun_table([late, early])
    assert table.sort_values(ORDER)[RERUN].tolist() == ["smoke-2026-11-22-0600", "smoke-2026-11-22"]
    assert at(table, LINE_A, "smoke-2026-11-22")[FINAL_IMITATOR + DRIFT_PREVIOUS] == pytest.approx(-2.0)


def test_rerun_date_comes_from_the_name_else_the_report_time():
    written = "2026-11-25T03:04:05+00:00"
    assert rerun_date("quick-2026-11-22", "quick", written) == "2026-11-22"
    assert rerun_date("quick-2026-11-22-1830", "quick", written) == "2026-11-22"
    assert rerun_date("quick-2026-11-22-1830-2", "quick", written) == "2026-11-22"
    assert rerun_date("quick-try2", "quick", written) == "2026-11-25"
    assert rerun_date("quick-2026-13-45", "quick", written) == "2026-11-25"  # not a date
    assert rerun_date("cartpole-2026-11-22", "quick", written) == "2026-11-25"  # another preset's pattern


def test_section_lists_the_reruns_and_the_drifts():
    reruns = [rerun("smoke-2026-11-20", [(LINE_A, 1.0)]), rerun("smoke-2026-11-21", [(LINE_A, 3.5)])]
    table = rerun_table(reruns)
    text = section(table, sorted(reruns, key=lambda r: r.date), "smoke", "smoke-2026-11-21", "/x/reruns.png")
    assert text.startswith("## Across reruns")
    assert "| **smoke-2026-11-21** (this report) | 2026-11-21 |" in text and "| smoke-2026-11-20 | 2026-11-20 |" in text
    assert "3.50 [2.50, 4.50]; Δ +2.50 prev, +2.50 first" in text
    assert "![reruns.png](reruns.png)" in text


def test_many_reruns_show_the_first_the_latest_and_this_one(tmp_path):
    reruns = [rerun(f"smoke-2026-11-{day:02d}", [(LINE_A, float(day)), (LINE_C, -float(day))]) for day in range(1, 21)]
    table = rerun_table(reruns)
    assert len(table) == 40 and (table[FINAL_IMITATOR + DRIFT_FIRST].abs() == table[ORDER]).all()
    text = section(table, reruns, "smoke", "smoke-2026-11-05", "reruns.png")
    listed = [name for name in (f"smoke-2026-11-{day:02d}" for day in range(1, 21)) if f"| {name} |" in text
              or f"| **{name}** (this report) |" in text]
    assert listed == ["smoke-2026-11-01", "smoke-2026-11-05", *(f"smoke-2026-11-{day}" for day in range(15, 21))]
    assert "all 20 are in `reruns.parquet`" in text
    path = rerun_figure(table, reruns, "smoke", str(tmp_path / RERUNS_FIGURE))
    pixels = imread(path)
    assert pixels.shape[0] >= 2 * 400 and pixels[..., :3].std() > 0.05  # one row of panels per env


def test_find_reruns_reads_only_finished_reports_of_the_same_preset(tmp_path):
    store = Store(str(tmp_path))
    frame = summary([(LINE_A, 1.0)])

    def experiment(name, record=None, with_summary=True, raw=None):
        folder = tmp_path / name / "report"
        folder.mkdir(parents=True)
        if record is not None or raw is not None:
            (folder / RECORD_FILE).write_text(raw if raw is not None else json.dumps(record))
        if with_summary:
            frame.to_parquet(folder / SUMMARY_FILE)

    written = "2026-11-23T10:00:00+00:00"
    experiment("smoke-2026-11-21", {"preset": "smoke", "settings": "s1", "reported_at": written})
    experiment("smoke-2026-11-22", {"preset": "smoke", "settings": "s1", "reported_at": written}, with_summary=False)
    experiment("quick-2026-11-21", {"preset": "quick", "settings": "s2", "reported_at": written})
    experiment("smoke-old")  # a report from before _preset.json existed
    experiment("broken", raw="{not json")
    experiment("smoke-2026-11-23", {"preset": "smoke", "settings": "s1", "reported_at": written})  # excluded: this one
    (tmp_path / "loose-file").write_text("x")
    found = find_reruns(store, "smoke", exclude="smoke-2026-11-23")
    assert [(r.experiment, r.date, r.settings) for r in found] == [("smoke-2026-11-21", "2026-11-21", "s1")]
    pd.testing.assert_frame_equal(found[0].summary, frame)


# --- two smoke reruns through the pipeline -------------------------------------------------------

FIRST, SECOND, OTHER = "smoke-2026-11-22", "smoke-2026-11-23", "quick-2026-11-22"
SECOND_OVERRIDES = ["--set", "evaluate.imitators.darkroom.horizon=200"]  # a rerun whose numbers move


@pytest.fixture(scope="module")
def reruns(tmp_path_factory, trained):
    """FIRST and SECOND both reuse the session's collected histories and trained imitators (copied)
    and run their own evaluation and report, SECOND with a longer horizon; OTHER, another preset's
    finished report, must be left out."""
    root = tmp_path_factory.mktemp("reruns")
    store = ["--preset", "smoke", "--store", str(root)]
    for name in (FIRST, SECOND):
        for part in ("histories", "teachers", "imitators"):
            shutil.copytree(trained[0] / "exp" / part, root / name / part)
    assert main(["evaluate", *store, "--experiment", FIRST]) == 0
    assert main(["report", *store, "--experiment", FIRST]) == 0
    shutil.copytree(root / FIRST / "report", root / OTHER / "report")
    record = json.loads((root / OTHER / "report" / RECORD_FILE).read_text())
    (root / OTHER / "report" / RECORD_FILE).write_text(json.dumps({**record, "preset": "quick"}))
    assert main(["evaluate", *store, "--experiment", SECOND, *SECOND_OVERRIDES]) == 0
    assert main(["report", *store, "--experiment", SECOND, *SECOND_OVERRIDES]) == 0
    return root


def test_first_run_says_so(reruns):
    report = (reruns / FIRST / "report" / "report.md").read_text()
    assert "## Across reruns" in report and "first run of preset `smoke` in this store" in report
    assert not (reruns / FIRST / "report" / RERUNS_FILE).exists()
    assert json.loads((reruns / FIRST / "report" / RECORD_FILE).read_text())["preset"] == "smoke"


def test_second_rerun_lists_both_with_dates_and_drift_from_their_metrics(reruns):
    folder = reruns / SECOND / "report"
    table = pd.read_parquet(folder / RERUNS_FILE)
    assert sorted(set(table[RERUN])) == [FIRST, SECOND]  # OTHER (preset quick) is not a rerun of smoke
    assert dict(zip(table[RERUN], table[DATE])) == {FIRST: "2026-11-22", SECOND: "2026-11-23"}
    summaries = {name: pd.read_parquet(reruns / name / "report" / SUMMARY_FILE).set_index(list(KEY))
                 for name in (FIRST, SECOND)}
    assert len(table) == len(summaries[FIRST]) + len(summaries[SECOND])
    assert FINAL_IMITATOR in KEY_METRICS
    for key, line in table.groupby(list(KEY)):
        assert line[RERUN].tolist() == [FIRST, SECOND]  # date order
        before, after = summaries[FIRST].loc[key], summaries[SECOND].loc[key]
        for metric in KEY_METRICS:
            drift = after[metric] - before[metric]
            for column in (metric + DRIFT_PREVIOUS, metric + DRIFT_FIRST):
                # assert_allclose takes NaN for equal to NaN: where both reruns have the metric, the
                # drift must be a number, so that a table of NaN drifts cannot pass.
                assert np.isfinite(line[column].iloc[1]) == np.isfinite(drift), f"{key} {column}"
                np.testing.assert_allclose(line[column].iloc[1], drift, err_msg=f"{key} {column}")
            assert np.isnan(line[metric + DRIFT_PREVIOUS].iloc[0])
            assert line[metric + DRIFT_FIRST].iloc[0] == 0 or not np.isfinite(before[metric])  # the first vs itself
        # Every line's imitator ran in both reruns: its final return, and so its drift, is a number.
        assert np.isfinite(before[FINAL_IMITATOR]) and np.isfinite(after[FINAL_IMITATOR]), key
        assert np.isfinite(line[FINAL_IMITATOR + DRIFT_PREVIOUS].iloc[1]), key
    records = [json.loads((reruns / name / "report" / RECORD_FILE).read_text()) for name in (FIRST, SECOND)]
    assert records[0]["settings"] != records[1]["settings"]  # the second ran with a --set override

    report = (folder / "report.md").read_text()
    across = report.split("## Across reruns", 1)[1]
    assert f"| {FIRST} | 2026-11-22 |" in across and f"| **{SECOND}** (this report) | 2026-11-23 |" in across
    assert OTHER not in across
    assert f"| {FIRST} | 2026-11-22 | " in across.split("### Extrapolation test", 1)[1]
    assert f"![{RERUNS_FIGURE}]({RERUNS_FIGURE})" in across


def test_rerun_figure_is_a_readable_png(reruns):
    path = reruns / SECOND / "report" / RERUNS_FIGURE
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 1000 and pixels[..., :3].std() > 0.05
