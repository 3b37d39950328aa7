"""Report stage: from the evaluation trials' episodes to metrics, figures and a verdict table.

    from pipeline.report.stage import build_report, report
    summary = build_report(trials, episodes, histories, out_dir="runs/quick/report")
    print(summary.paragraph)   # e.g. "CartPole-v1 (cartpole-dqn) cutoff 0.5: does not extrapolate (...)."

    python -m pipeline report --preset quick      # after evaluate: {store}/{experiment}/report/report.md

The package, by job:
    tables.py   pure tables and statistics: the column contract, input checks, curves, per-seed rows,
                the summary over seeds and its verdicts
    text.py     numbers with CIs, the verdict tables and paragraph, report.md
    figures.py  every figure (and how to read them), the error-bar helper pipeline/compare.py shares
    stage.py    build_report (frames in, files out) and the stage `report()`: it builds the three input
                frames from the trials' result.json files that Tune wrote in the store and from the
                teachers' histories, runs build_report in a local folder, compares with the preset's
                other reruns (pipeline/compare.py) and uploads it all to {store}/{experiment}/report/.

Malformed input frames, and a damaged result.json in the store, raise ReportError (a PipelineError:
the command line prints it as one line and exits 1).

Inputs (the column contract)
----------------------------
trials     one row per EXPECTED trial, whether it ran or not:
             trial_id (str), test ("extrapolation" | "transfer" | "control"), env (env id), group
             (teacher / imitator group), cutoff (fraction of the teacher budget; 1.0 for the control),
             seed (int, the unit intervals are over: teacher seed or held-out task index), task_id (str),
             arm (a name in pipeline.arms.ARMS: "imitator" | "teacher" | "snapshot" | "random" |
             "in_data"; in transfer and control "teacher" is a teacher learning the held-out task
             from scratch), context ("primed" | "empty"; "" for arms without an imitator),
             context_steps (int; 0 for those), size (the model size's name; "" for those), horizon
             (int, H env steps the arm runs), status ("ok" | "failed" | "missing").
             Optional: cutoff_step (int, the teacher's global step at the cutoff as collect saved
             its checkpoint, see plan.cutoff_steps); without it, cutoff step = round(cutoff * budget).
             prime_step (int, c' of an in_data trial: where its context ends and its steps start).
episodes   one row per finished episode of a trial: trial_id, env_steps (steps the arm had taken
             when the episode ended, 0 = the cutoff, or c' for the in-data control), episodic_return.
histories  the teachers' recorded learning curves, one row per finished episode: group, env, seed,
             task_id, end_step (the teacher's global step when the episode ended), episodic_return,
             budget (the teacher's budget in env steps; one value per teacher).

Arms are compared within one (test, env, group, cutoff, seed); an imitator variant is one
(size, context, context_steps). Every arm of a seed is cut at the smallest horizon among that
seed's trials, so arms are compared over the same H steps (the in-data control keeps its own,
from c' to the cutoff). A trial that failed, is missing, or
finished no episode has no curve: its metrics are NaN, `metrics.summarise` turns that into the
verdict "missing: seeds [...]", and the table says which trial it was ("imitator failed: seeds [2]").

Outputs (in out_dir)
--------------------
metrics.parquet   one row per (test, env, group, cutoff, variant, seed): the per-seed metrics
                  (column names from pipeline.metrics), arm statuses `status_<arm>`, trial ids
                  `trial_<arm>`, the cutoff step and horizon.
summary.parquet   one row per (test, env, group, cutoff, variant): each metric's mean over seeds
                  with its t-interval `_low`, `_high` and `_n`; the extrapolation ratio (Fieller's
                  interval) and its reason; verdict, its reason and the degrades flag, missing seeds
                  and missing trials.
report.md         verdict paragraph, one verdict table per test, the positive control, the figures.
*.png             curves_*: the extrapolation test per (env, group, cutoff); transfer_* and
                  control_*: arms on held-out tasks; context_*: ratio and ceiling exceedance
                  against context length, one line per model size (only when several exist).
                  How to read them: pipeline/report/figures.py.

Verdicts (extrapolation): the ladder of `metrics.extrapolation_verdict` (docs/design.md, "Verdict
rules"): missing, not testable here, imitation failed, extrapolates, does not, inconclusive, with
the preset's thresholds (evaluate.verdict). Transfer and control use `metrics.verdict` with the imitator's own first-W
return as the bar: "learns in context" when its final return is significantly above where it
started, "does not" when not and it ends significantly below the teacher learning from scratch.
"""
