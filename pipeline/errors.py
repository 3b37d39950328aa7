"""The one error type of the command line: every stage raises a PipelineError, and `main` prints it
as one line (`cutoff: error: ...`) with its exit status, never a traceback.

    BadInput       the user's input is at fault (preset, override, name, store URI): exit 2,
                   raised before any work starts
    PipelineError  a stage failed on what it found (missing or damaged data, a failed teacher or
                   trial): exit 1; what was committed stays, and rerunning resumes
"""

from __future__ import annotations


class PipelineError(Exception):
    """A stage cannot go on; the message names the thing at fault."""

    exit_status = 1


class BadInput(PipelineError, ValueError):
    """Bad input, found before any work starts."""

    exit_status = 2


class ConfigError(BadInput):
    """A preset, an override or a rerun's settings are invalid; the message names the key and the value."""
