"""A real two-node Ray cluster on this machine, and the smoke preset submitted to it with jobs/submit.py;
plus jobs/submit.py's own pieces (names, quoting, what travels with the job).

The cluster runs in subprocesses with an environment of its own, beside the test session's Ray
(conftest's ray_address, which this module neither uses nor touches): the session's RAY_* and AWS_*
variables are dropped, every node gets its own temp dir (two nodes sharing one share the runtime-env
cache, and one node's cleanup then deletes the job's working dir under the other), the ports are free
ones, token authentication is on with a token of its own, and a marker variable is in the environment
of every process the cluster starts. It is stopped by SIGTERM to the two `ray start --block` processes,
which end what they started (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 skips the 30 s drain); `ray stop`
cannot be used, since it ends every Ray process on the machine, the session's included. Whatever still
carries the marker afterwards is killed by pid.
"""

import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

BIN = os.path.dirname(sys.executable)  # the repo's .venv/bin
RAY = os.path.join(BIN, "ray")
MARKER = "CUTOFF_TEST_CLUSTER"
# Keeps the smoke run short: no validation split (one Ray Data pipeline less); all four stages still run.
OVERRIDES = ["train.imitators.darkroom.val_fraction=0"]


def load_submit():
    spec = importlib.util.spec_from_file_location("submit", os.path.join(REPO, "jobs", "submit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- jobs/submit.py, without a cluster -----------------------------------------------------------


def test_dated_names_get_a_time_or_counter_only_when_taken():
    dated_name = load_submit().dated_name
    now = dt.datetime(2026, 11, 23, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-6)))  # 10:05 UTC
    assert dated_name("quick", set(), now) == "quick-2026-11-23"
    assert dated_name("quick", {"quick-2026-11-23"}, now) == "quick-2026-11-23-1005"
    assert dated_name("quick", {"quick-2026-11-23", "quick-2026-11-23-1005"}, now) == "quick-2026-11-23-1005-2"


def test_the_job_carries_no_credentials_and_quotes_its_arguments(tmp_path):
    secrets = {"AWS_ACCESS_KEY_ID": "AKIA-secret-id", "AWS_SECRET_ACCESS_KEY": "secret-key", "AWS_SESSION_TOKEN": "tok"}
    env = {**os.environ, **secrets}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    store = str(tmp_path / "store")  # local: the dry run lists it to pick the dated name
    command = [sys.executable, "jobs/submit.py", "--preset", "smoke", "--store", store, "--dated",
               "--set", "collect.teachers.darkroom.seeds=[0, 1]", "--set", "description=$HOME *", "--dry-run"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert not any(value in done.stdout for value in secrets.values())
    assert set(job["runtime_env"]) == {"working_dir", "excludes", "env_vars"}
    assert set(job["runtime_env"]["env_vars"]) == {"PYTHONUNBUFFERED"}
    assert {".git", ".venv", "runs"} <= set(job["runtime_env"]["excludes"])
    assert re.fullmatch(r"smoke-\d{4}-\d{2}-\d{2}(-\d{4})?", job["metadata"]["cutoff_experiment"])
    # Ray runs the entrypoint with /bin/sh: the words sh makes of it must be the arguments as given.
    parsed = subprocess.run(["sh", "-c", "printf '%s\\n' " + job["entrypoint"].removeprefix("python ")],
                            capture_output=True, text=True).stdout.splitlines()
    assert parsed == ["-m", "pipeline", "run", "--preset", "smoke", "--store", store, "--experiment",
                      job["metadata"]["cutoff_experiment"], "--set", "collect.teachers.darkroom.seeds=[0, 1]",
                      "--set", "description=$HOME *"]


# --- a two-node cluster --------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries this cluster's marker: the ones it started."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else f"({path} absent)"


def wait_for(condition, timeout: float, what: str, logs: list[Path]):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"{what} within {timeout:.0f} s\n" + "\n".join(f"--- {p}\n{tail(p)}" for p in logs))


class Cluster:
    def __init__(self, root: Path):
        self.root, self.marker = root, uuid.uuid4().hex
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        self.env = {**base, "PATH": BIN + os.pathsep + base.get("PATH", ""), MARKER: self.marker,
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        # Short temp dirs: Ray's unix sockets live there and their paths must stay under ~107 bytes.
        self.temp = [Path(tempfile.mkdtemp(prefix="cutoff-ray-", dir="/tmp")) for _ in range(2)]
        self.gcs_port, self.dashboard_port, client, *agents = free_ports(7)
        self.gcs, self.dashboard = f"127.0.0.1:{self.gcs_port}", f"http://127.0.0.1:{self.dashboard_port}"
        self.logs = [root / "head.log", root / "worker.log"]
        self.processes = []
        head = ["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}"]
        self.nodes = [(head, agents[0:2]), ([f"--address={self.gcs}"], agents[2:4])]

    def start_node(self, i: int) -> None:
        args, (agent, metrics) = self.nodes[i]
        command = [RAY, "start", *args, "--num-cpus=1", f"--temp-dir={self.temp[i]}", "--block",
                   f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}"]
        with open(self.logs[i], "w") as log:
            self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def alive_nodes(self) -> int:
        done = subprocess.run([RAY, "list", "nodes", "--address", self.dashboard, "--format", "json"],
                              env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            return 0
        return sum(node["state"] == "ALIVE" for node in json.loads(done.stdout))

    def started(self, i: int) -> bool:
        if self.processes[i].poll() is not None:
            raise AssertionError(f"ray start exited with {self.processes[i].returncode}\n{tail(self.logs[i])}")
        return "--block" in self.logs[i].read_text(errors="replace")  # printed once the node is up

    def stop(self) -> list[int]:
        """SIGTERM the nodes (worker first), then kill by pid whatever still carries the marker; returns those."""
        for process in reversed(self.processes):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        time.sleep(1)
        leftovers = marked_pids(self.marker)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for folder in self.temp:
            shutil.rmtree(folder, ignore_errors=True)
        return leftovers


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_node(0)
        wait_for(lambda: cluster.started(0), 120, "the head node did not start", cluster.logs[:1])
        cluster.start_node(1)
        wait_for(lambda: cluster.started(1), 120, "the second node did not start", cluster.logs)
        wait_for(lambda: cluster.alive_nodes() == 2, 60, "the cluster did not show 2 alive nodes", cluster.logs)
        yield cluster
    finally:
        leftovers = cluster.stop()
        if leftovers:
            warnings.warn(f"{len(leftovers)} processes of the test cluster outlived SIGTERM to its nodes; killed")


def test_smoke_preset_runs_on_a_two_node_cluster_through_submit(cluster, tmp_path):
    started = time.time()
    store = tmp_path / "store"
    command = [sys.executable, "jobs/submit.py", "--address", cluster.dashboard, "--preset", "smoke",
               "--store", str(store), "--experiment", "ms", "--wait", *[a for o in OVERRIDES for a in ("--set", o)]]
    done = subprocess.run(command, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=540)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert re.search(r"submit: job cutoff-ms-\w+ SUCCEEDED", output), output[-3000:]
    for stage in ("collect: done", "train: done", "evaluate: 8/8 trials finished", "report: "):
        assert stage in output, stage

    check_smoke_report(store / "ms" / "report")
    # The second node ran workers of the job: their logs are under its own temp dir.
    worker_logs = list(cluster.temp[1].glob("session_*/logs/worker-*.out"))
    assert worker_logs, sorted(p.name for p in cluster.temp[1].glob("session_*/logs/*"))[:40]
    print(f"two-node smoke job: {time.time() - started:.0f} s from submission to SUCCEEDED")


SECTIONS = {"extrapolation": "## Extrapolation test", "transfer": "## Transfer test", "control": "## Positive control"}


def section(report: str, test: str) -> str:
    return report.split(SECTIONS[test], 1)[1].split("\n## ", 1)[0]


def check_smoke_report(folder: Path) -> None:
    """What the smoke preset's report must say after a run in which every trial delivered."""
    summary = pd.read_parquet(folder / "summary.parquet")
    # Its one imitator group (Dark Room, group darkroom) at its one cutoff, 0.5: the extrapolation test
    # on the teachers' own goals and the transfer test on the held-out goal; no cutoff 1.0, no control.
    lines = sorted(zip(summary["test"], summary["env"], summary["group"], summary["cutoff"]))
    assert lines == [("extrapolation", "DarkRoom-v0", "darkroom", 0.5), ("transfer", "DarkRoom-v0", "darkroom", 0.5)]
    # evaluate.imitators.darkroom has teachers 1 and heldout 1: one seed per line, every trial of it
    # delivered (so no "missing" anywhere), and one seed gives no interval: the ladder cannot show
    # that the continued teacher improved (not testable here), transfer draws no verdict either way.
    assert summary["n_seeds"].tolist() == [1, 1]
    assert summary["missing_trials"].tolist() == ["", ""] and all(len(seeds) == 0 for seeds in summary["missing_seeds"])
    assert summary["verdict"].tolist() == ["not testable here", "inconclusive"]
    for column in ("final_return_imitator", "final_return_teacher", "first_return_imitator"):
        assert np.isfinite(summary[column]).all(), column

    report = (folder / "report.md").read_text()
    for _, row in summary.iterrows():  # each line has its row in its test's verdict table, as in summary.parquet
        table = section(report, row["test"])
        rows = [[cell.strip() for cell in line.strip().strip("|").split(" | ")]
                for line in table.splitlines() if line.startswith("| DarkRoom-v0 |")]
        assert len(rows) == 1, table
        cells = rows[0]
        assert cells[:5] == ["DarkRoom-v0", "darkroom", "0.5", row["variant"], "1/1"], cells
        assert cells[-2].startswith(f"**{row['verdict']}**") and cells[-1] == "none", cells
    assert "| DarkRoom-v0 |" not in section(report, "control")
    assert "first run of preset `smoke` in this store" in report
