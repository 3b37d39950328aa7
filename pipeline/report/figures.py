"""The report's figures (object-oriented matplotlib: Agg canvas, no display, no pyplot state), and the
error-bar helper pipeline/compare.py's rerun figure shares.

    curves_*    the extrapolation test of one (env, group, cutoff): the teacher's recorded history, then
                every arm from the cutoff on
    transfer_*, control_*   the arms on held-out tasks, from their first step
    context_*   extrapolation ratio and ceiling exceedance against context length, one line per
                (model size, context mode); only when a comparison has several sizes or context lengths

How to read the figures
-----------------------
Every line is a mean over seeds of the W-episode rolling mean return (each seed's episodes put on a
common step grid, the last value carried forward), with a shaded 95% Student-t band across seeds;
its legend entry ends with "(n=K)", the K seeds it is over ("(n=4 of 5 seeds)" where some seeds have
no curve), so a wide band over two seeds reads as such. The legend sits right of the axes, never over
the data. In curves_*, the teacher's recorded history is solid up to the cutoff (what the imitator was
trained on) and dashed after it (the unseen future), drawn thinner and above the arms so that it stays
visible where the continued teacher (green) retraces it; the arms start at the cutoff's vertical
line. An imitator that merely copies its snapshot runs flat near the orange snapshot line and under
the dotted pre-cutoff best B_c (de-biased, as the verdict uses it), while the continued teacher climbs
along the dashed history; an imitator that extrapolates climbs above the dotted line. The in-data
control (dotted, in its imitator's colour) runs from c' to the cutoff: an imitator that reproduces
its data climbs there as the solid history did.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.arms import ARMS, CONTROL, EXTRAPOLATION, IMITATOR, IMITATOR_COLORS, IN_DATA, TESTS, arm_label
from pipeline.metrics import (B_C_DEBIASED, CEILING_EXCEEDANCE, CONFIDENCE, COUNT, CUTOFF, ENV, t_half_width,
                              EXTRAPOLATION_RATIO, EXTRAPOLATION_RATIO_REASON, SEED, Curve, ci_columns)
from pipeline.report.tables import (COMPARISON, CONTEXT, CONTEXT_STEPS, CUTOFF_STEP, GROUP, HORIZON_STEPS, NAN,
                                    PRIME_STEP, SIZE, STATUS_OF, TASK_ID, TEST, TRIAL_OF, VARIANT, RecordedCurve)

FIGSIZE, DPI, GRID_POINTS = (11.5, 5), 120, 300  # wide enough for the legend right of the axes
HISTORY_COLOR = "tab:blue"  # the teacher's recorded history
ARM_LINE = dict(linewidth=1.8, zorder=2)
HISTORY_LINE = dict(linewidth=1.2, zorder=3)  # thinner and above the arms: the continued teacher may retrace it
LEGEND = dict(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, framealpha=0.85)


# --- curves on a common grid ---------------------------------------------------------------------


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


def mean_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values (S seeds, G grid points) -> mean over the seeds with data at each point, and its 95%
    Student-t band (as the tables' intervals); no band where fewer than 2 seeds have data."""
    seeds = np.isfinite(values).sum(axis=0)  # (G,)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # grid points where no seed has data yet: NaN
        mean = np.nanmean(values, axis=0)  # (G,)
        half = np.where(seeds >= 2, t_half_width(np.nanstd(values, axis=0, ddof=1), np.maximum(seeds, 2), CONFIDENCE), NAN)
    return mean, mean - half, mean + half


# --- drawing -------------------------------------------------------------------------------------


def with_n(label: str, n: int, expected: int | None = None) -> str:
    """'label (n=5)', or 'label (n=4 of 5 seeds)' when some of the expected seeds have no data."""
    return f"{label} (n={n})" if expected is None or n >= expected else f"{label} (n={n} of {expected} seeds)"


def draw_band(ax, x: np.ndarray, values: np.ndarray, label: str, color: str, linestyle: str = "-",
              line: dict = ARM_LINE) -> None:
    """The mean of `values` (seeds x grid) as a line, its t-band shaded below every line."""
    mean, low, high = mean_band(values)
    ax.plot(x, mean, color=color, linestyle=linestyle, label=label, **line)
    ax.fill_between(x, low, high, color=color, alpha=0.18, linewidth=0, zorder=1)


def errorbars(ax, x, rows: pd.DataFrame, metric: str, *, color: str, label: str) -> None:
    """`metric`'s estimate at `x` with its CI (columns metric, metric_low, metric_high) as error bars;
    a point without a CI (one seed) gets no bar. Used by the context figure and compare's rerun figure."""
    estimate, low, high = (rows[c].to_numpy(dtype=np.float64) for c in ci_columns(metric))
    errors = np.nan_to_num(np.vstack([estimate - low, high - estimate]), nan=0.0).clip(min=0)
    ax.errorbar(x, estimate, yerr=errors, marker="o", capsize=3, color=color, label=label)


class Series(NamedTuple):
    label: str
    color: str
    trial_ids: list[str | None]  # one per seed
    arm: str
    linestyle: str = "-"


def arm_series(rows: pd.DataFrame, scratch: bool) -> list[Series]:
    """Every arm to draw: each imitator variant (with its in-data control, dotted, where it ran),
    then the other arms."""
    series = []
    for i, (label, variant) in enumerate(rows.groupby(VARIANT, sort=False)):
        color = IMITATOR_COLORS[i % len(IMITATOR_COLORS)]
        series.append(Series(f"imitator {label}", color, variant[TRIAL_OF + IMITATOR].tolist(), IMITATOR))
        if variant[STATUS_OF + IN_DATA].ne("").any():
            series.append(Series(f"{ARMS[IN_DATA].label}, {label}", color, variant[TRIAL_OF + IN_DATA].tolist(), IN_DATA, ":"))
    one_variant = rows[rows[VARIANT] == rows[VARIANT].iloc[0]]
    for arm in ARMS:
        if arm not in (IMITATOR, IN_DATA) and one_variant[STATUS_OF + arm].ne("").any():
            series.append(Series(arm_label(arm, scratch), ARMS[arm].color, one_variant[TRIAL_OF + arm].tolist(), arm))
    return series


def draw_arms(ax, rows: pd.DataFrame, curves: dict[str, Curve], x0: float, window: int, scratch: bool,
              in_data_span: tuple[float, float] | None = None) -> None:
    """Each arm from x0 on (the in-data control over in_data_span, its start and length): mean over
    the seeds that have a curve, with a t-band; '(n=K)'."""
    grid = np.linspace(0, int(rows[HORIZON_STEPS].max()), GRID_POINTS)
    for arm in arm_series(rows, scratch):
        found = [curves.get(t) for t in arm.trial_ids if t is not None and t in curves]
        start, span = in_data_span if arm.arm == IN_DATA and in_data_span else (x0, grid)
        if found:
            values = np.stack([on_grid(c, span, window) for c in found])
            draw_band(ax, start + span, values, with_n(arm.label, len(found), len(arm.trial_ids)), arm.color, arm.linestyle)


def fit_lines(ax, margin: float = 0.25) -> bool:
    """Set the y range to the drawn curves (not their bands) with a margin; True when a band is cut.
    Over two or three seeds a t-band can be ten times the curves' range and would flatten them."""
    curves = [line.get_ydata() for line in ax.lines if len(line.get_xdata()) > 2]
    values = np.concatenate([np.asarray(y, dtype=float) for y in curves]) if curves else np.zeros(0)
    values = values[np.isfinite(values)]
    if not len(values):
        return False
    low, high = values.min(), values.max()
    pad = margin * max(high - low, 1e-9)
    before = ax.get_ylim()
    ax.set_ylim(low - pad, high + pad)
    return before[0] < low - pad or before[1] > high + pad


def finish(fig: Figure, ax, title: str, xlabel: str, window: int, path: str) -> str:
    cut = fit_lines(ax)
    ax.set_title(title + ("\n(bands wider than the plot are cut at its edges)" if cut else ""), fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"episodic return (mean of last {window} episodes)")
    ax.grid(alpha=0.3)
    ax.legend(**LEGEND)  # right of the axes: tight_layout shrinks the axes to make room
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


# --- figures -------------------------------------------------------------------------------------


def learning_curve_figure(rows: pd.DataFrame, curves: dict[str, Curve], histories: dict[tuple, RecordedCurve],
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
        n, expected = len(found), len(seeds)
        draw_band(ax, grid[seen], values[:, seen], with_n("teacher history before cutoff (imitator's training data)",
                                                           n, expected), HISTORY_COLOR, line=HISTORY_LINE)
        draw_band(ax, grid[unseen], values[:, unseen], with_n("teacher history after cutoff (unseen future)", n, expected),
                  HISTORY_COLOR, "--", line=HISTORY_LINE)
        if seeds[B_C_DEBIASED].notna().any():
            ax.axhline(seeds[B_C_DEBIASED].mean(), color="black", linestyle=":", linewidth=1.2,
                       label=with_n("pre-cutoff best B_c, de-biased (mean over seeds)", int(seeds[B_C_DEBIASED].notna().sum())))
    ax.axvline(cut, color="black", linewidth=1.0, label=f"cutoff {first[CUTOFF]:g} (step {cut:.0f})")
    prime = float(np.nanmedian(rows[PRIME_STEP].astype(float))) if rows[PRIME_STEP].notna().any() else None
    draw_arms(ax, rows, curves, cut, window, scratch=False,
              in_data_span=(prime, np.linspace(0, cut - prime, GRID_POINTS)) if prime is not None else None)
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
        counts = sorted(set(line[metric + COUNT])) if metric + COUNT in line else []
        n = "" if not counts else f" (n={counts[0]})" if len(counts) == 1 else f" (n={counts[0]}-{counts[-1]})"
        errorbars(ax, line[CONTEXT_STEPS], line, metric, color=IMITATOR_COLORS[i % len(IMITATOR_COLORS)],
                  label=f"{size} ({context} context){n}")
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
                 histories: dict[tuple, RecordedCurve], window: int, out_dir: str) -> dict[str, list[str]]:
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
