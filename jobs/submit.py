"""Submit the pipeline to a Ray cluster as a Ray job: `python -m pipeline run` on the cluster.

    python jobs/submit.py --address http://HEAD:8265 --preset quick --store s3://bucket/cutoff --dated
    python jobs/submit.py --preset atari --store s3://bucket/cutoff --experiment atari-try2 --no-wait
    python jobs/submit.py --preset quick --store s3://bucket/cutoff --dated --image      # project in the image
    python jobs/submit.py --preset quick --store s3://bucket/cutoff --dated --set evaluate.max_concurrent_trials=16
    python jobs/submit.py --preset smoke --store s3://bucket/cutoff --dated --dry-run    # print, submit nothing

What to expect: the job runs `python -m pipeline run --preset P --store S --experiment NAME [--set ...]`
on the head node (collect, train, evaluate, report, each a Ray workload spread over the cluster). With
--wait (the default) this script prints the job's log as it runs and exits with 0 when the job SUCCEEDED,
1 when it FAILED or was STOPPED; Ctrl-C stops following, not the job. The report then lies at
`{store}/{experiment}/report/report.md`, with a section comparing it with the preset's earlier reruns
in the same store (pipeline/compare.py). Resubmitting the same --experiment resumes it.

Experiment names: --dated names the run `{preset}-{YYYY-MM-DD}` (UTC), the name scheduled reruns use;
`-HHMM` (then `-HHMM-2`, ...) is added only when that name is taken, i.e. the experiment already exists
in the store (when this machine can list it) or a job on this cluster already used it. To resume a
failed dated run, pass its name with --experiment.

Code: by default the repo (--working-dir, default the checkout this script is in) is uploaded with the
job, without .git, .venv, runs/ and build outputs; the cluster's Python needs the project's
dependencies (the cluster image). --image submits no working dir: the image already has the project
installed, and --preset names a preset shipped in it (or a path on the cluster).

Credentials: none travel with the job. Nothing from this machine's environment goes into the job's
runtime_env or command line; the job reads the store with the cluster's own credentials (an IAM role or
a Kubernetes service account; AWS_ENDPOINT_URL and the like for a non-AWS S3 must be set in the cluster
nodes' environment). This machine needs only to reach the dashboard (default: RAY_API_SERVER_ADDRESS,
else RAY_ADDRESS, else http://127.0.0.1:8265; an explicit --address wins over both). A cluster with token
authentication (the default for clusters Ray starts locally) needs RAY_AUTH_MODE=token and the cluster's
token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) here, which Ray's client sends as a header.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the job: the local virtualenv, results, git history, caches and build outputs.
EXCLUDES = [".git", ".venv", "runs", "build", "__pycache__", "*.egg-info", ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Job metadata keys, so that later submissions can see which experiments this cluster has run.
META_PRESET, META_EXPERIMENT, META_STORE = "cutoff_preset", "cutoff_experiment", "cutoff_store"


class SubmitError(Exception):
    """Bad arguments or an unreachable cluster: one line, exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jobs/submit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None,
                        help=f"Ray dashboard address (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, {DEFAULT_ADDRESS})")
    parser.add_argument("--preset", required=True, help="a name in jobs/presets/ or a YAML path inside the working dir")
    parser.add_argument("--store", required=True,
                        help="where the job writes, e.g. s3://bucket/cutoff; a local folder only if every node sees it")
    name = parser.add_mutually_exclusive_group(required=True)
    name.add_argument("--experiment", help="experiment folder in the store; an existing one is resumed")
    name.add_argument("--dated", action="store_true", help="name it {preset}-{YYYY-MM-DD} (UTC), -HHMM if taken")
    code = parser.add_mutually_exclusive_group()
    code.add_argument("--working-dir", default=str(REPO), help="folder uploaded with the job (default: this repo)")
    code.add_argument("--image", action="store_true", help="the cluster image has the project installed: upload nothing")
    parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="follow the job's log and exit with its status (default), or return once submitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="passed to the pipeline as --set (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the job that would be submitted and exit")
    return parser.parse_args(argv)


# --- the job -------------------------------------------------------------------------------------


def preset_argument(preset: str, working_dir: Path | None) -> tuple[str, str]:
    """(what the job passes as --preset, the preset's name). A YAML path must lie in the working dir,
    which is the job's current directory on the cluster."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        return preset, preset  # a name in jobs/presets/
    if working_dir is None:
        return preset, path.stem  # --image: a path on the cluster
    try:
        return path.resolve().relative_to(working_dir.resolve()).as_posix(), path.stem
    except ValueError:
        raise SubmitError(f"preset file {preset} is outside the working dir {working_dir}, so the job would not "
                          "have it; put it in jobs/presets/ or pass --working-dir") from None


def store_argument(store: str, address: str) -> str:
    """The store as the job must see it: URIs as given, local folders made absolute (the job's current
    directory is a temporary copy of the working dir, different on every node)."""
    if "://" in store:
        return store
    folder = os.path.abspath(os.path.expanduser(store))
    if not is_loopback(address):
        print(f"submit: note: store {folder} is a local folder; every node of the cluster must see it at that "
              "path (a shared mount), else use s3://...", file=sys.stderr)
    return folder


def is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def entrypoint(preset: str, store: str, experiment: str, overrides: list[str]) -> str:
    """The job's command line. Ray runs it through /bin/sh, so every argument is quoted: a --set value
    such as `seeds=[0, 1]` reaches the pipeline as written, with no glob or $VARIABLE expansion."""
    words = ["python", "-m", "pipeline", "run", "--preset", preset, "--store", store, "--experiment", experiment]
    for override in overrides:
        words += ["--set", override]
    return shlex.join(words)


def runtime_env(working_dir: Path | None) -> dict:
    """Code and unbuffered output only: no credentials, no variables copied from this machine."""
    env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}  # the log streams line by line
    if working_dir is not None:
        env |= {"working_dir": str(working_dir), "excludes": EXCLUDES}
    return env


# --- the experiment's name -----------------------------------------------------------------------


def dated_name(preset_name: str, taken: set[str], now: dt.datetime) -> str:
    """{preset}-{YYYY-MM-DD} (UTC); -HHMM, then -HHMM-2, ... only when needed to be unique.
    pipeline/compare.py reads the date back from such names."""
    now = now.astimezone(dt.timezone.utc)
    day = f"{preset_name}-{now:%Y-%m-%d}"
    if day not in taken:
        return day
    name, n = f"{day}-{now:%H%M}", 2
    while name in taken:
        name, n = f"{day}-{now:%H%M}-{n}", n + 1
    return name


def experiments_in_store(store: str) -> set[str]:
    """Folders at the store's top level, if this machine can list it (else empty, with a note)."""
    try:
        sys.path.insert(0, str(REPO))
        from pipeline.store import Store

        return set(Store(store).list_names(""))
    except Exception as error:  # no pipeline dependencies here, no credentials, ...: the cluster check remains
        print(f"submit: note: cannot list the store from here ({type(error).__name__}); the dated name is "
              "checked against this cluster's jobs only", file=sys.stderr)
        return set()


def cluster_experiments(jobs) -> dict[str, str]:
    """experiment -> status of the latest job that ran it on this cluster."""
    found = {}
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        experiment = (job.metadata or {}).get(META_EXPERIMENT)
        if experiment:
            found[experiment] = str(getattr(job.status, "value", job.status))
    return found


# --- submit and follow ---------------------------------------------------------------------------


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given; pin ours.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        return JobSubmissionClient(address)
    except Exception as error:  # ConnectionError, or an HTTP error such as 401 without the token
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {str(error).splitlines()[0]}") from None


def follow(client, job_id: str) -> str:
    """Print the job's log until it ends; return its final status."""
    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = str(client.get_job_status(job_id).value)
    deadline = time.time() + 60  # the log can end a moment before the status is final
    while status not in TERMINAL and time.time() < deadline:
        time.sleep(1)
        status = str(client.get_job_status(job_id).value)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    working_dir = None if args.image else Path(args.working_dir).resolve()
    try:
        if working_dir is not None and not (working_dir / "pipeline").is_dir():
            raise SubmitError(f"working dir {working_dir} has no pipeline/ package; pass the repo or use --image")
        preset, preset_name = preset_argument(args.preset, working_dir)
        store = store_argument(args.store, address)
        client = None if args.dry_run else connect(address)
        on_cluster = cluster_experiments(client.list_jobs()) if client else {}
        if args.dated:
            experiment = dated_name(preset_name, set(on_cluster) | experiments_in_store(store),
                                    dt.datetime.now(dt.timezone.utc))
        else:
            experiment = args.experiment
            if on_cluster.get(experiment) in ("PENDING", "RUNNING"):
                raise SubmitError(f"a job on this cluster is already running experiment {experiment!r}; "
                                  "wait for it or stop it (ray job stop)")
    except SubmitError as error:
        print(f"submit: error: {error}", file=sys.stderr)
        return 2

    job = dict(entrypoint=entrypoint(preset, store, experiment, args.overrides), runtime_env=runtime_env(working_dir),
               submission_id=f"cutoff-{experiment}-{uuid.uuid4().hex[:6]}",
               metadata={META_PRESET: preset_name, META_EXPERIMENT: experiment, META_STORE: store})
    if args.dry_run:
        print(json.dumps({"address": address, **job}, indent=1))
        return 0
    job_id = client.submit_job(**job)
    report = f"{store.rstrip('/')}/{experiment}/report/report.md"
    print(f"submit: job {job_id} on {address}: experiment {experiment}; report when done: {report}", flush=True)
    if not args.wait:
        print(f"submit: follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nsubmit: stopped following; the job goes on (ray job stop --address {address} {job_id})")
        return 130
    print(f"submit: job {job_id} {status}" + (f"; report: {report}" if status == "SUCCEEDED" else ""), flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
