"""The command line as a user runs it, in subprocesses."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pipeline.plan import teacher_specs
from pipeline.config import load_preset
from pipeline.store import Store

from conftest import REPO
from helpers import assert_histories_match, teacher_actor_pids, wait_until_mid_run


AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL")
UNREACHABLE = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}


def cli(*args, env=None, **kwargs):
    base = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=300, **kwargs)


@pytest.mark.parametrize("args, env, message", [
    (["--set", "collect.teachers.darkroom.budgt=5"], {}, "collect.teachers.darkroom.budgt: unknown key"),
    (["--set", "collect.teachers.darkroom.env=DarkRoomm-v0"], {}, "unknown Gymnasium env id 'DarkRoomm-v0'"),
    (["--set", "collect.teachers.darkroom.budget=-1"], {}, "collect.teachers.darkroom.budget: Input should be greater than 0"),
    (["--store", "s3://cutoff-bucket/x"], UNREACHABLE, "cannot reach the store's server (http://127.0.0.1:9)"),
    (["--store", "s3://cutoff-bucket/x"], {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "no credentials found"),
    (["--set", "evaluate.imitators.darkroom.contexts=[]"], {},
     "--set evaluate.imitators.darkroom.contexts=[]: evaluate.imitators.darkroom.contexts: List should have at least 1 item"),
    (["--experiment", "../escape"], {}, "--experiment: '../escape' is not a usable name"),
    (["--experiment", "/tmp/elsewhere"], {}, "--experiment: '/tmp/elsewhere' is not a usable name"),
])
def test_bad_input_is_one_clear_line_and_exit_status_2(args, env, message, tmp_path):
    result = cli("collect", "--preset", "smoke", "--store", str(tmp_path), *args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cutoff: error:") and message in lines[0], result.stderr
    assert not any(tmp_path.iterdir())  # nothing was written
    assert not os.path.exists(tmp_path.parent / "escape")


def test_a_damaged_trial_result_fails_the_report_with_one_line_naming_it(trained, tmp_path):
    import shutil

    from pipeline.evaluate import evaluate

    shutil.copytree(trained[0] / "exp", tmp_path / "exp")
    evaluate(trained[1], Store(str(tmp_path)), "exp", log=lambda line: None)
    damaged = next((tmp_path / "exp" / "tune").glob("*/result.json"))
    damaged.write_text(damaged.read_text()[:-20])  # a result cut short mid-line
    result = cli("report", "--preset", "smoke", "--store", str(tmp_path), "--experiment", "exp")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cutoff: error:") and str(damaged) in lines[0], result.stderr


def test_killed_collect_process_then_same_command_gives_one_clean_timeline(ray_address, tmp_path):
    budget = 40_000  # eight commits per teacher: the kill lands mid-run
    overrides = ["--set", f"collect.teachers.darkroom.budget={budget}", "--set", "collect.shard_steps=5000",
                 "--set", "collect.checkpoint_steps=5000"]
    command = [sys.executable, "-m", "pipeline", "collect", "--preset", "smoke", "--store", str(tmp_path),
               "--experiment", "killed", "--address", ray_address, *overrides]
    store = Store(str(tmp_path))
    specs = teacher_specs(load_preset("smoke", overrides[1::2]))
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_mid_run(store, "killed", specs)
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.time() + 30
    while teacher_actor_pids() and time.time() < deadline:  # Ray reaps the dead driver's actors
        time.sleep(0.05)
    second = cli(*command[3:])
    assert second.returncode == 0, second.stderr
    collected_now = int(re.search(r"\(([\d,]+) collected by this run\)", second.stdout).group(1).replace(",", ""))
    assert collected_now < 4 * budget, second.stdout  # it resumed what the killed run had committed
    assert_histories_match(store, "killed", specs)
    again = cli("run", *command[4:])
    assert again.returncode == 0 and "4 complete, 0 to run" in again.stdout
    assert re.search(r"^report: .*/killed/report/report.md$", again.stdout, re.M)  # every stage ran, ending in the report
