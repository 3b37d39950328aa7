"""Command line of the pipeline (also installed as `cutoff`).

    python -m pipeline run --preset quick                  # collect, train, evaluate, report; local Ray, ./runs/quick
    python -m pipeline collect --preset smoke --store s3://bucket/prefix --experiment try1
    python -m pipeline collect --preset quick --set collect.teachers.darkroom.budget=4000
    python -m pipeline collect --preset quick --smoke      # any preset shrunk to seconds
    python -m pipeline train --preset quick                # the imitators, on the collected histories

Bad input (unknown preset key, wrong type, unknown env id, unusable store) prints one line naming
the culprit and exits with status 2 before any work starts; a failed run exits with status 1 and
keeps everything it committed, so rerunning the same command resumes it.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.collect import CollectError, collect
from pipeline.config import ConfigError, Preset, load_preset
from pipeline.history import HistoryError
from pipeline.report import report
from pipeline.schema import SchemaError
from pipeline.store import Store, StoreError
from pipeline.evaluate import EvaluateError, evaluate
from pipeline.train import TrainError, train

DEFAULT_STORE = "./runs"
# The stages of DESIGN.md in order; those not built yet are named so `run` can say so.
STAGES = {"collect": collect, "train": train, "evaluate": evaluate, "report": report}


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
        store = Store(args.store)
    except (ConfigError, StoreError) as error:
        print(f"cutoff: error: {error}", file=sys.stderr)
        return 2
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address  # stages start Ray only once they have work
    experiment = args.experiment or preset.name
    stages = list(STAGES) if args.command == "run" else [args.command]
    try:
        for stage in stages:
            STAGES[stage](preset, store, experiment)
    except (ConfigError, StoreError) as error:  # found before the stage starts any work
        print(f"cutoff: error: {error}", file=sys.stderr)
        return 2
    except (CollectError, TrainError, EvaluateError, HistoryError, SchemaError) as error:
        print(f"cutoff: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
