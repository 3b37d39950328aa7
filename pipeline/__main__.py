"""Command line of the pipeline (also installed as `cutoff`).

    python -m pipeline run --preset quick                  # collect, train, evaluate, report; local Ray, ./runs/quick
    python -m pipeline collect --preset smoke --store s3://bucket/prefix --experiment try1
    python -m pipeline collect --preset quick --set collect.teachers.darkroom.budget=4000
    python -m pipeline collect --preset quick --smoke      # any preset shrunk to seconds
    python -m pipeline train --preset quick                # the imitators, on the collected histories

Every error ends as one line naming the culprit (pipeline/errors.py), without a traceback: bad
input (unknown preset key, wrong type, unknown env id, an unusable name or store) exits with
status 2 before any work starts; a failed stage exits with status 1 and keeps everything it
committed, so rerunning the same command resumes it.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.collect import collect
from pipeline.config import Preset, load_preset
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.layout import check_name
from pipeline.report.stage import report
from pipeline.store import Store
from pipeline.train import train

DEFAULT_STORE = "./runs"
STAGES = {"collect": collect, "train": train, "evaluate": evaluate, "report": report}  # in the order `run` runs them


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cutoff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*STAGES, "run"], help="a stage, or run: every stage in order")
    parser.add_argument("--preset", required=True, help="a name in jobs/presets/ or a path to a YAML file")
    parser.add_argument("--store", default=DEFAULT_STORE, help="local folder or URI such as s3://bucket/prefix (default ./runs)")
    parser.add_argument("--experiment", help="folder in the store; rerunning the same one resumes it (default: the preset name)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a preset field, e.g. collect.teachers.darkroom.budget=4000 (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="shrink the preset to a run of seconds, same envs and algorithms")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start Ray on this machine)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        preset: Preset = load_preset(args.preset, args.overrides, smoke=args.smoke)
        experiment = check_name("--experiment", args.experiment or preset.name)
        store = Store(args.store)
        if args.address:
            os.environ["RAY_ADDRESS"] = args.address  # stages start Ray only once they have work
        for stage in list(STAGES) if args.command == "run" else [args.command]:
            STAGES[stage](preset, store, experiment)
    except PipelineError as error:
        print(f"cutoff: error: {error}", file=sys.stderr)
        return error.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
