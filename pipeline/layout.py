"""Every path of an experiment in the store, relative to the store's root, and the rule for names
that become paths. Pure: no I/O beyond `record_settings`, no Ray, no torch.

    {experiment}/histories/env={env}/teacher={id}/part-{first_step:012d}.parquet   committed shards
    {experiment}/histories/env={env}/teacher={id}/_manifest.json   the commit record (pipeline/history.py)
    {experiment}/histories/env={env}/teacher={id}/_teacher.json    what the teacher is (plan.TeacherSpec)
    {experiment}/teachers/{id}/step={t}/                           teacher checkpoints
    {experiment}/imitators/cutoff={c}/{imitator}/                  Ray Train run: checkpoint_*/, tensorboard/,
                                                                   _imitator.json (plan.ImitatorSpec), _done.json
    {experiment}/tune/                                             Tune storage: {batch_id}/result.json, ...
    {experiment}/_grid.json                                        the evaluation grid: units (plan.TrialSpec)
                                                                   and the Tune trial (plan.TrialBatch) of each
    {experiment}/report/                                           report.md, *.parquet, *.png, _preset.json
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable
from urllib.parse import quote

from pipeline.errors import BadInput, ConfigError, PipelineError

TEACHER_SPEC_FILE = "_teacher.json"  # beside a teacher's history
MANIFEST_FILE = "_manifest.json"
IMITATOR_SPEC_FILE = "_imitator.json"  # in an imitator's folder; a rerun with other settings is refused
DONE_FILE = "_done.json"  # written once an imitator finished training: final metrics and checkpoint path
GRID_FILE = "_grid.json"  # the units of an experiment and their Tune trials; a rerun with another grid is refused
TUNE_DIR = "tune"
REPORT_DIR = "report"
TRIAL_RESULT_FILE = "result.json"  # what Tune writes in each trial's folder
PRESET_RECORD_FILE = "_preset.json"  # in report/: which preset produced the experiment (pipeline/compare.py)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(what: str, name: str) -> str:
    """`name` if it is one path segment of letters, digits, '_', '.' and '-' (not starting with '.'
    or '-', no '..'); else BadInput naming `what`. Every name that becomes a path passes here."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name or len(name) > 200:
        raise BadInput(f"{what}: {name!r} is not a usable name: use one path segment of letters, digits, "
                       "'_', '.' and '-', starting with a letter or digit, without '..'")
    return name


# --- collect ---


def histories_dir(experiment: str) -> str:
    return f"{experiment}/histories"


def history_dir(experiment: str, env_id: str, teacher_id: str) -> str:
    # Env ids such as ALE/Breakout-v5 are URI-encoded; pyarrow and DuckDB decode hive values.
    return f"{histories_dir(experiment)}/env={quote(env_id, safe='')}/teacher={teacher_id}"


def teacher_checkpoints(teacher_id: str) -> str:
    """A teacher's checkpoint folder relative to the experiment, as its manifest lists it."""
    return f"teachers/{teacher_id}"


def teacher_checkpoint(teacher_id: str, step: int) -> str:
    """The checkpoint taken after `step` env steps, relative to the experiment."""
    return f"{teacher_checkpoints(teacher_id)}/step={step}"


# --- train ---


def imitators_dir(experiment: str, cutoff: float | None = None) -> str:
    root = f"{experiment}/imitators"
    return root if cutoff is None else f"{root}/cutoff={cutoff:g}"


def imitator_dir(experiment: str, cutoff: float, imitator: str) -> str:
    return f"{imitators_dir(experiment, cutoff)}/{imitator}"


# --- evaluate and report ---


def tune_dir(experiment: str) -> str:
    return f"{experiment}/{TUNE_DIR}"


def trial_result(experiment: str, batch_id: str) -> str:
    """The result.json of one Tune trial, a batch of units (plan.TrialBatch): every unit's episodes."""
    return f"{tune_dir(experiment)}/{batch_id}/{TRIAL_RESULT_FILE}"


def grid_file(experiment: str) -> str:
    return f"{experiment}/{GRID_FILE}"


def report_dir(experiment: str) -> str:
    return f"{experiment}/{REPORT_DIR}"


# --- settings stored on first use ---


def check_rerun(stored: bytes | None, settings: dict, *, what: str, experiment: str, where: str,
                upgrade: Callable[[Any], Any] = lambda old: old) -> bool:
    """Whether `settings` still have to be stored (nothing is at `where` yet). Raises ConfigError
    when the experiment already holds `what` with other settings, naming those that differ, and
    PipelineError when the stored record is not readable. `upgrade` brings a record written by an
    older version to today's form before comparing."""
    if stored is None:
        return True
    settings = json.loads(json.dumps(settings))  # as it would read back: tuples become lists
    try:
        old = upgrade(json.loads(stored))
    except (ValueError, KeyError, TypeError) as error:
        raise PipelineError(f"{where}: not valid JSON of its kind ({error}). Nothing was changed.") from error
    if old == settings:
        return False
    if isinstance(old, dict) and isinstance(settings, dict):
        keys = [k for k in settings if old.get(k) != settings[k]] + [k for k in old if k not in settings]
        differ = " (" + ", ".join(f"{k}: {_short(old.get(k))} then, {_short(settings.get(k))} now" for k in keys) + ")"
    else:
        differ = ""
    raise ConfigError(f"experiment {experiment!r} already holds {what} with other settings{differ}; "
                        "use another --experiment, or the settings it was started with")


def record_settings(store, path: str, settings: Any, *, what: str, experiment: str,
                    upgrade: Callable[[Any], Any] = lambda old: old) -> None:
    """Store `settings` at `path` on first use; on a rerun, refuse other settings (check_rerun)."""
    try:
        stored = store.read_bytes(path)
    except FileNotFoundError:
        stored = None
    if check_rerun(stored, settings, what=what, experiment=experiment, where=store.url(path), upgrade=upgrade):
        store.write_bytes(path, json.dumps(settings, sort_keys=True, indent=1).encode())


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
