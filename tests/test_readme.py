"""What a new user meets, following the README literally.

- Every command of the pipeline shown to users (`python -m pipeline ...`, `cutoff ...`,
  `python jobs/submit.py ...`) in README.md (code blocks and inline code), docker/README.md and the
  header comments of jobs/presets/*.yaml, cluster/**/*.yaml and jobs/schedule/*.yaml is parsed with
  its own argument parser, and its preset with its overrides (and --smoke) is validated by
  load_preset: seconds each, nothing is run. A command on a cloud store (s3://) is validated all
  the same; only its store is not contacted.
- The README calls the project's tools through .venv (a fresh shell has no `ray` module).
- The reading examples (```python blocks) run as written on a store that the README's own
  `collect --preset quick --smoke` command wrote (one CartPole DQN teacher, two Dark Room
  Q-learning teachers: two envs whose `obs` columns have different types), and what they print
  is checked against the histories, read another way.
"""

import contextlib
import importlib.util
import io
import math
import re
import shlex
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import REPO
from pipeline.__main__ import main, parse_args
from pipeline.config import ConfigError, load_preset
from pipeline.layout import check_name
from pipeline.store import Store

ROOT = Path(REPO)
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^([ \t]*)```[^\n]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)
STAGES = ("collect", "train", "evaluate", "report", "run")
# Where a command of the pipeline starts: python -m pipeline, the cutoff script, jobs/submit.py; with
# or without a path to the interpreter (.venv/bin/python).
START = re.compile(r"(?<![\w./-])(?:[\w.-]*/)*(?:python3? -m pipeline\b|cutoff (?=(?:%s)\b)|python3? jobs/submit\.py\b)"
                   % "|".join(STAGES))
SHELL_OPERATORS = {";", "&&", "||", "|", "&", ")"}


# --- finding the commands -------------------------------------------------------------------------


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a Markdown text, dedented (some are in list items)."""
    return [textwrap.dedent(body) for _, body in FENCE.findall(text)]


def markdown_code(text: str) -> list[str]:
    """The fenced code blocks and the inline code spans of a Markdown text."""
    spans = re.findall(r"`([^`]+)`", FENCE.sub("", text))
    return code_blocks(text) + [span.replace("\n", " ") for span in spans]


def header_comment(path: Path) -> list[str]:
    """The comment lines a YAML file starts with, without their '#'."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return ["\n".join(lines)]


def logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def commands_in(text: str) -> list[list[str]]:
    """Each command of the pipeline in a text, as words (shell comments and what follows a shell
    operator left out; a $(...) substitution stands as one word)."""
    found = []
    for line in logical_lines(text):
        for match in START.finditer(line):
            tail = re.sub(r"\$\([^)]*\)", "SUBSTITUTED", line[match.start():])
            words = []
            for word in shlex.split(tail, comments=True):
                if word in SHELL_OPERATORS:
                    break
                words.append(word)
            found.append(words)
    return found


def sources() -> list[tuple[str, str]]:
    """(where, text) of every place that shows users commands."""
    texts = [("README.md", code) for code in markdown_code(README)]
    texts += [("docker/README.md", code) for code in markdown_code((ROOT / "docker" / "README.md").read_text())]
    yaml_files = sorted((ROOT / "jobs" / "presets").glob("*.yaml")) + sorted((ROOT / "cluster").rglob("*.yaml")) \
        + sorted((ROOT / "jobs" / "schedule").glob("*.yaml"))
    texts += [(str(path.relative_to(ROOT)), text) for path in yaml_files for text in header_comment(path)]
    return texts


COMMANDS = [(where, words) for where, text in sources() for words in commands_in(text)]


def load_submit():
    spec = importlib.util.spec_from_file_location("submit", ROOT / "jobs" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arguments(words: list[str]):
    """(parsed arguments, smoke) of a command, with the parser of the program it runs."""
    program = Path(words[0]).name
    try:
        if program == "cutoff":
            args = parse_args(words[1:])
        elif words[1:3] == ["-m", "pipeline"]:
            args = parse_args(words[3:])
        else:
            assert words[1] == "jobs/submit.py", words
            args = load_submit().parse_args(words[2:])
            args.smoke = False  # the job runs the preset as given
    except SystemExit as exit_:  # argparse's way of rejecting arguments
        pytest.fail(f"{shlex.join(words)}: arguments rejected (exit status {exit_.code})")
    return args


# --- the commands ---------------------------------------------------------------------------------


def test_commands_are_found_everywhere_they_are_shown():
    found = defaultdict(list)
    for where, words in COMMANDS:
        found[where].append(words)
    # The README's command-line block, the atari laptop run and the cluster submission at least.
    assert len(found["README.md"]) >= 11, found["README.md"]
    assert len(found["jobs/presets/atari.yaml"]) == 2, found["jobs/presets/atari.yaml"]
    readme_presets = {arguments(words).preset for words in found["README.md"]}
    assert {"quick", "smoke", "atari"} <= readme_presets
    # Every line of a README code block that calls the pipeline gave a command.
    for code in code_blocks(README):
        for line in logical_lines(code):
            if re.search(r"-m pipeline|jobs/submit\.py", line.split("#")[0]):
                assert commands_in(line), line


@pytest.mark.parametrize("where,words", COMMANDS, ids=[f"{w}: {shlex.join([Path(c[0]).name, *c[1:]])[:90]}" for w, c in COMMANDS])
def test_documented_command_is_valid(where, words, tmp_path, monkeypatch):
    args = arguments(words)
    try:
        preset = load_preset(args.preset, args.overrides, smoke=args.smoke)
    except ConfigError as error:
        pytest.fail(f"{where}: {shlex.join(words)}\n  cutoff: error: {error}")
    assert preset.collect.teachers
    check_name("--experiment", getattr(args, "experiment", None) or preset.name)
    if "://" not in args.store:  # a cloud store is not contacted; a local one must be a usable path
        monkeypatch.chdir(tmp_path)
        assert Store(args.store).is_local


def test_readme_commands_use_the_venv():
    """A fresh shell has none of the project's tools: the README calls them through .venv."""
    bare = re.compile(r"(?<![\w./-])(?:python3?|tensorboard|ray|cutoff) +(?=-m |jobs/|--logdir|up |down |dashboard |"
                      r"(?:%s)\b)" % "|".join(STAGES))
    offenders = [line for code in markdown_code(README) for line in logical_lines(code) if bare.search(line)]
    assert not offenders, offenders
    for where, words in COMMANDS:
        if where == "README.md" or where.startswith("jobs/presets/"):
            assert words[0].startswith(".venv/bin/"), f"{where}: {shlex.join(words)}"


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```sh\n(.*?)```", README, re.S).group(1)
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "run"], ["make", "test"]]


def test_readme_links_stay_in_the_repository():
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if "://" in target or target.startswith("#"):
            continue
        assert not target.startswith(".."), target
        assert (ROOT / target.split("#")[0]).exists(), target


# --- the reading examples ---------------------------------------------------------------------------


def readme_smoke_collect() -> list[str]:
    """The README's own command that collects the quick preset shrunk, as its arguments."""
    (words,) = [w for where, w in COMMANDS if where == "README.md" and w[-4:] == ["collect", "--preset", "quick", "--smoke"]]
    return words[3:]


@pytest.fixture(scope="module")
def collected(tmp_path_factory, ray_address):
    """The README's `collect --preset quick --smoke`, into a store of its own; returns the folder of
    the experiment ("quick-smoke") and the preset."""
    store = tmp_path_factory.mktemp("readme") / "runs"
    assert main([*readme_smoke_collect(), "--store", str(store)]) == 0
    preset = load_preset("quick", smoke=True)
    return store / preset.name, preset


def run_snippet(snippet: str, experiment: Path) -> str:
    code = snippet.replace("runs/quick", str(experiment))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    return printed.getvalue()


def group_sizes(preset) -> dict[str, tuple[int, int]]:
    """env -> (teachers, budget) of the preset's teacher groups."""
    sizes = {}
    for group in preset.collect.teachers.values():
        assert group.env not in sizes  # one group per env in this preset
        sizes[group.env] = (len(group.seeds) * len(group.tasks), group.budget)
    return sizes


def quarter_returns(experiment: Path, env: str, budget: int) -> list[float]:
    """Mean episode return by the quarter of the budget an episode starts in, from one env's folder
    read whole (obs included), episode by episode."""
    frame = ds.dataset(experiment / "histories" / f"env={env}", partitioning="hive").to_table().to_pandas()
    by_quarter = defaultdict(list)
    for _, rows in frame.groupby("teacher_id"):
        rows = rows.sort_values("step")
        assert (rows["step"].to_numpy() == np.arange(budget)).all()
        for _, episode in rows.groupby("episode"):
            by_quarter[1 + 4 * int(episode["step"].min()) // budget].append(float(episode["reward"].sum()))
    assert sorted(by_quarter) == [1, 2, 3, 4]
    return [float(np.mean(by_quarter[q])) for q in (1, 2, 3, 4)]


def test_snippets_are_the_two_readers():
    assert len(SNIPPETS) == 2
    assert "pyarrow.dataset" in SNIPPETS[0] and "duckdb" in SNIPPETS[1]


def test_pyarrow_snippet_prints_the_mean_return_per_quarter_of_each_env(collected):
    experiment, preset = collected
    sizes = group_sizes(preset)
    assert set(sizes) == {"CartPole-v1", "DarkRoom-v0"}  # obs: float32 lists and int64 cells
    printed = run_snippet(SNIPPETS[0], experiment)
    lines = printed.strip().splitlines()
    assert lines[0].split() == ["quarter", "1", "2", "3", "4"], printed
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines if line.split()[0] in sizes}
    assert sorted(rows) == sorted(sizes), printed
    for env, (_, budget) in sizes.items():
        assert len(rows[env]) == 4 and all(math.isfinite(v) for v in rows[env]), printed
        assert rows[env] == pytest.approx(quarter_returns(experiment, env, budget), rel=1e-5), env
    assert all(v > 0 for v in rows["CartPole-v1"])  # at least one step per episode, +1 per step
    assert rows["DarkRoom-v0"][3] > rows["DarkRoom-v0"][0], "the Q-learners find their goal: the return rises"


def test_duckdb_snippet_lists_each_env_with_its_teachers_and_budget(collected):
    experiment, preset = collected
    printed = run_snippet(SNIPPETS[1], experiment)
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in printed.splitlines()
            if re.match(r"│ [\w/-]+-v\d+ ", line)]
    expected = [[env, str(teachers), str(teachers * budget), str(budget)]
                for env, (teachers, budget) in sorted(group_sizes(preset).items())]
    assert rows == expected, printed
