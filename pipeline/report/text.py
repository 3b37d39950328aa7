"""The report's words: numbers with their CIs, the verdict tables, the verdict paragraph and report.md.
pipeline/compare.py builds its "## Across reruns" section from the same pieces.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from pipeline.arms import CONTROL, EXTRAPOLATION, TESTS, TRANSFER
from pipeline.metrics import (B_C_DEBIASED, CEILING_EXCEEDANCE, CONFIDENCE, COUNT, CUTOFF, DEGRADES, DOES_NOT, ENV,
                              EXTRAPOLATES, EXTRAPOLATION_RATIO, EXTRAPOLATION_RATIO_REASON, FIDELITY, FINAL_IMITATOR,
                              FINAL_RANDOM, FINAL_SNAPSHOT, FINAL_TEACHER, FIRST_IMITATOR, GAIN_TEACHER,
                              IMITATION_FAILED, IN_DATA_RATIO, INCONCLUSIVE, L_C, MISSING, MISSING_SEEDS, N_SEEDS,
                              NOT_TESTABLE, TRANSFER_AUC_RATIO, VERDICT, VERDICT_REASON, VerdictRules, ci_columns)
from pipeline.report.tables import (COMPARISON, FAILED, GROUP, IN_CONTEXT_GAIN, LEARNS_IN_CONTEXT, METRICS_FILE,
                                    MISSING_TRIALS, NAN, OK, STATUS, SUMMARY_FILE, TEST, VARIANT)

# --- cells ---------------------------------------------------------------------------------------


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


def verdict_cell(row: pd.Series) -> str:
    """'**does not** (extrapolation ratio ...); degrades' for the ladder, the bare verdict for transfer."""
    reason = row.get(VERDICT_REASON) or ""
    return f"**{row[VERDICT]}**" + (f" ({reason})" if reason else "") + ("; **degrades**" if row.get(DEGRADES) is True else "")


# --- tables --------------------------------------------------------------------------------------

EXTRAPOLATION_TABLE = (
    ("env", lambda r: r[ENV]), ("group", lambda r: r[GROUP]), ("cutoff", lambda r: f"{r[CUTOFF]:g}"),
    ("variant", lambda r: r[VARIANT]), ("complete seeds", seeds_cell),
    ("L_c", lambda r: with_ci(r, L_C)), ("B_c (de-biased)", lambda r: with_ci(r, B_C_DEBIASED)),
    ("teacher gain", lambda r: with_ci(r, GAIN_TEACHER)),
    ("imitator final", lambda r: with_ci(r, FINAL_IMITATOR)),
    ("continued-teacher final", lambda r: with_ci(r, FINAL_TEACHER)),
    ("snapshot final", lambda r: with_ci(r, FINAL_SNAPSHOT)),
    ("fidelity", lambda r: with_ci(r, FIDELITY)), ("in-data ratio", lambda r: with_ci(r, IN_DATA_RATIO)),
    ("extrapolation ratio", ratio_cell), ("ceiling exceedance", lambda r: with_ci(r, CEILING_EXCEEDANCE)),
    ("verdict", verdict_cell), ("missing trials", lambda r: r[MISSING_TRIALS] or "none"),
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


# --- the verdict paragraph -----------------------------------------------------------------------


def verdict_phrase(said: str, test: str) -> str:
    if said.startswith(MISSING):
        return said
    if test == EXTRAPOLATION:
        return {EXTRAPOLATES: "extrapolates", DOES_NOT: "does not extrapolate"}.get(said, said)
    return {DOES_NOT: "does not learn in context"}.get(said, said)


def evidence(row: pd.Series) -> str:
    if row[TEST] == EXTRAPOLATION:
        text = (f"{row[VERDICT_REASON]}; imitator final {with_ci(row, FINAL_IMITATOR)} vs de-biased pre-cutoff best "
                f"{with_ci(row, B_C_DEBIASED)} and continued teacher {with_ci(row, FINAL_TEACHER)}"
                + ("; the imitator degrades" if row.get(DEGRADES) is True else ""))
    else:
        text = (f"imitator return {with_ci(row, FIRST_IMITATOR)} at first, {with_ci(row, FINAL_IMITATOR)} at the end, "
                f"vs teacher from scratch {with_ci(row, FINAL_TEACHER)}; AUC ratio {with_ci(row, TRANSFER_AUC_RATIO)}")
    return text + (f"; {row[MISSING_TRIALS]}" if row[MISSING_TRIALS] else "")


def comparison_sentence(rows: pd.DataFrame) -> str:
    """One sentence per (test, env, group, cutoff), with every variant's own verdict (none is picked)."""
    first = rows.iloc[0]
    test, where = first[TEST], f"{first[ENV]} ({first[GROUP]})"
    name = {EXTRAPOLATION: f"{where} cutoff {first[CUTOFF]:g}",
            TRANSFER: f"Transfer to {first[ENV]} held-out tasks ({first[GROUP]}, cutoff {first[CUTOFF]:g})",
            CONTROL: f"Positive control on {first[ENV]} held-out tasks ({first[GROUP]})"}[test]
    if len(rows) == 1:
        return f"{name}: {verdict_phrase(first[VERDICT], test)} ({evidence(first)})."
    variants = "; ".join(f"{row[VARIANT]}: {verdict_phrase(row[VERDICT], test)} ({evidence(row)})" for _, row in rows.iterrows())
    return f"{name}, {len(rows)} imitator variants: {variants}."


def summary_paragraph(summary: pd.DataFrame) -> str:
    sentences = [comparison_sentence(rows) for _, rows in summary.groupby(list(COMPARISON), sort=False)]
    if CONTROL not in set(summary[TEST]):
        sentences.append("No positive control was run, so a null result here is not credible yet.")
    return " ".join(sentences)


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
- Brackets are {CONFIDENCE:.0%} Student-t intervals over seeds (Fieller's for the ratio; teacher seeds, or held-out task
  indices); "(k/N seeds)" marks a value computed on fewer seeds than expected.
- **verdict** (extrapolation), the first rung of this ladder that applies, with its numbers beside it:
  *{MISSING}*: a seed lacks a value the ladder needs; *{NOT_TESTABLE}*: the continued teacher's gain over L_c is not
  significantly above 0; *{IMITATION_FAILED}*: mean fidelity = (imitator first-W - random) / (L_c - random) below
  {{fidelity}}, or mean in-data ratio below {{in_data}} (the imitator primed at c' = a fraction of the cutoff and
  rolled out to c must gain as the teacher did from L_c' to L_c: an improvement in its own data);
  *{EXTRAPOLATES}*: the CI of imitator final - de-biased B_c (the best window chosen on half the episodes,
  measured on the other half) is above 0; *{DOES_NOT}* (extrapolate): the in-data control ran and passed and the
  extrapolation ratio's CI upper bound is below {{margin}}; else *{INCONCLUSIVE}*, which says the largest ratio
  the interval leaves open, or that no in-data control verified the imitation. **degrades** beside it: the CI of
  imitator final - its first-W return is below 0. Every variant has its own verdict. Transfer and control:
  *{LEARNS_IN_CONTEXT}* if the imitator's final return is significantly above its first-W return; *{DOES_NOT}*
  if not and it ends significantly below the teacher learning from scratch; else *{INCONCLUSIVE}*.
- **{MISSING}: seeds [...]** replaces the verdict when a trial that verdict needs failed, is missing, or finished
  no episode; no verdict is ever drawn over fewer seeds. "missing trials" names each one.
- Figures: lines are means over seeds of the W-episode rolling return, bands their {CONFIDENCE:.0%} Student-t
  interval; each legend entry ends with "(n=K)", the number of seeds its line and band are over (a band over
  two seeds can span the plot). In the learning curves the teacher's history is solid before the cutoff (the
  imitator's training data) and dashed after it (the future the imitator never saw), drawn thinner and on top
  of the arms so it stays visible where the continued teacher follows it; the arms start at the vertical cutoff
  line; the dotted line is B_c.
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
                   paragraph: str, window: int, rules: VerdictRules) -> str:
    links = "\n".join(f"- [{os.path.basename(p)}]({os.path.basename(p)})" for test in TESTS for p in figures[test])
    parts = [
        "# Can an imitator keep learning after its teacher's data stops?\n",
        f"{trial_counts(trials)}\n",
        f"## Verdicts\n\n{paragraph}\n",
        *(verdict_section(test, summary, figures[test]) for test in TESTS),
        f"## Figures\n\n{links}\n",
        "## How to read this\n\n" + HOW_TO_READ.format(window=window, **vars(rules)),
        f"## Files\n\n- `{METRICS_FILE}`: one row per (test, env, group, cutoff, variant, seed).\n"
        f"- `{SUMMARY_FILE}`: one row per (test, env, group, cutoff, variant): estimates, CIs, verdicts.\n",
    ]
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
