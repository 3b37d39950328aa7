"""The README's reading examples run as written, on a real collected experiment."""

import contextlib
import io
import re

import pytest

from conftest import REPO
from pipeline.collect import collect
from pipeline.config import load_preset
from pipeline.store import Store

SNIPPETS = re.findall(r"```python\n(.*?)```", open(f"{REPO}/README.md").read(), re.S)


@pytest.fixture(scope="module")
def collected(tmp_path_factory, ray_address):
    folder = tmp_path_factory.mktemp("readme")
    collect(load_preset("smoke"), Store(str(folder)), "quick", log=lambda line: None)
    return folder


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.split("\n")[0] for s in SNIPPETS])
def test_readme_snippet_runs(snippet, collected, monkeypatch):
    monkeypatch.chdir(collected.parent)
    code = snippet.replace("runs/quick", f"{collected.name}/quick")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().strip()
    if "duckdb" in snippet:
        assert "4800" in printed.getvalue() and "DarkRoom-v0" in printed.getvalue()


def test_readme_starts_with_the_two_commands():
    text = open(f"{REPO}/README.md").read()
    first_block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "run"], ["make", "test"]]
