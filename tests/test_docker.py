"""The cluster image: docker/Dockerfile, its install step docker/install.sh, and .dockerignore.

There is no Docker engine on the dev machines or in CI, so the install step is checked by running
docker/install.sh itself, on a copy of exactly the build context the Dockerfile copies from:

- test_install_resolves_from_nothing: the `deps` stage as a pip dry run in an empty environment:
  the whole dependency set resolves from scratch under constraints.txt, torch is the CPU build,
  no CUDA wheel comes along (about a minute, mostly index look-ups).
- the `image` fixture and the test_image_* tests: the whole script for real in a fresh environment
  whose layer below holds the project's run-time dependencies as the dev venv installed them from
  the same constraints (dev-only packages left out; the Ray image's own layers lie below the
  project's likewise), then what a cluster node needs from it: the imports, the CLI, the presets,
  Breakout's ROM (about a minute).
- CUTOFF_FULL_INSTALL=1: the `image` fixture installs everything for real from an empty
  environment instead, about 2 GB (5 minutes measured on a busy 2-core machine, 2 CPU-minutes);
  run it after changing dependencies.

On these machines the torch index is not reachable and pip's configured index serves the CPU build,
so the test passes TORCH_INDEX_URL empty where the CPU image passes download.pytorch.org/whl/cpu.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import distribution, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

ROOT = Path(REPO)
DOCKERFILE = ROOT / "docker" / "Dockerfile"
FULL_INSTALL = os.environ.get("CUTOFF_FULL_INSTALL") == "1"


# --- the Dockerfile and .dockerignore, read as Docker reads them ---


def instructions(path=DOCKERFILE):
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(arguments.split())))
    return out


def copy_sources(steps):
    """The build-context paths that the COPY instructions among steps take, in order."""
    sources = []
    for keyword, arguments in steps:
        if keyword == "COPY":
            words = [w for w in arguments.split() if not w.startswith("--")]
            sources += [w.rstrip("/") for w in words[:-1]]
    return sources


def _pattern_regex(pattern):
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path=ROOT / ".dockerignore"):
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keep = line.startswith("!")
            rules.append((keep, _pattern_regex(os.path.normpath(line.lstrip("!")).lstrip("/"))))
    return rules


def in_context(relative_path, rules):
    """Docker's rule: the last pattern that matches the path, or a folder above it, decides."""
    parts = Path(relative_path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    sent = True
    for keep, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            sent = keep
    return sent


def build_context(destination):
    """Copy what `docker build -f docker/Dockerfile .` would let the COPY instructions see."""
    rules = dockerignore_rules()
    for source in copy_sources(instructions()):
        files = [ROOT / source] if (ROOT / source).is_file() else sorted((ROOT / source).rglob("*"))
        for file in files:
            relative = file.relative_to(ROOT)
            if file.is_file() and in_context(relative, rules):
                (destination / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, destination / relative)
    return destination


def test_dockerfile_builds_on_the_ray_image_of_the_pinned_versions():
    steps = instructions()
    args = {a.split("=")[0]: a.split("=", 1)[1] for k, a in steps if k == "ARG" and "=" in a}
    first_from = next(i for i, (k, _) in enumerate(steps) if k == "FROM")
    assert "RAY_IMAGE_TAG" in [a.split("=")[0] for k, a in steps[:first_from] if k == "ARG"]
    assert steps[first_from][1] == "rayproject/ray:${RAY_IMAGE_TAG}"
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert args["RAY_IMAGE_TAG"] == f"{version('ray')}-{python_tag}-cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert ("USER", "ray") in steps and ("WORKDIR", "/home/ray/cutoff") in steps


# The `docker build` commands shown to users: the Dockerfile's header, docker/README.md, README.md.
BUILD_DOCS = [DOCKERFILE, ROOT / "docker" / "README.md", ROOT / "README.md"]


def build_commands():
    """(where, words) of every `docker build` command in BUILD_DOCS (comment markers and line
    continuations removed, what follows a shell operator left out)."""
    found = []
    for path in BUILD_DOCS:
        text = "\n".join(re.sub(r"^\s*#", "", line) if path == DOCKERFILE else line
                         for line in path.read_text().splitlines()).replace("\\\n", " ")
        for line in text.splitlines():
            for match in re.finditer(r"(?<![\w`])docker build\b", line):
                words = shlex.split(line[match.start():], comments=True)
                found.append((path.relative_to(ROOT).as_posix(), words[: words.index("&&")] if "&&" in words else words))
    return found


def what_build_makes(words):
    """What `docker build` with these words builds, read as Docker reads them: (Dockerfile path,
    context, tags, the image it builds FROM and TORCH_INDEX_URL, with the build args applied)."""
    assert words[:2] == ["docker", "build"], words
    options, positional, rest = {"-f": [], "-t": [], "--build-arg": []}, [], iter(words[2:])
    for word in rest:
        if word in options:
            options[word].append(next(rest))
        else:
            assert not word.startswith("-"), f"unexpected option {word} in {shlex.join(words)}"
            positional.append(word)
    (dockerfile,), (context,) = options["-f"], positional
    build_args = dict(arg.split("=", 1) for arg in options["--build-arg"])
    steps = instructions(ROOT / context / dockerfile)
    declared = {a.split("=")[0]: a.split("=", 1)[1] if "=" in a else None for k, a in steps if k == "ARG"}
    assert set(build_args) <= set(declared), f"build args the Dockerfile does not declare: {set(build_args) - set(declared)}"
    values = {**declared, **build_args}
    base = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], next(a for k, a in steps if k == "FROM"))
    return dockerfile, context, options["-t"], base, values["TORCH_INDEX_URL"]


BUILDS = build_commands()


def test_build_commands_are_shown_for_both_variants():
    assert {where for where, _ in BUILDS} == {"docker/Dockerfile", "docker/README.md", "README.md"}
    for where in ("docker/Dockerfile", "docker/README.md", "README.md"):
        variants = {what_build_makes(words)[3].rsplit("-", 1)[1] == "cpu" for w, words in BUILDS if w == where}
        assert variants == {True, False}, f"{where}: a CPU and a GPU build command"


@pytest.mark.parametrize("where,words", BUILDS, ids=[f"{w}:{' '.join(c[4:6])}" for w, c in BUILDS])
def test_build_command_builds_a_matching_ray_image_and_torch(where, words):
    dockerfile, context, tags, base, torch_index = what_build_makes(words)
    assert (dockerfile, context) == ("docker/Dockerfile", "."), "run from the repository root, which is the context"
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    # Ray tags are {ray version}-py{python}-{cpu|cuXYZ}; the torch index the build installs from
    # must be the same build: https://download.pytorch.org/whl/{cpu|cuXYZ}.
    match = re.fullmatch(rf"rayproject/ray:{re.escape(version('ray'))}-{python_tag}-(cpu|cu\d+)", base)
    assert match, f"{shlex.join(words)} builds FROM {base}"
    assert torch_index == f"https://download.pytorch.org/whl/{match.group(1)}", shlex.join(words)
    (tag,) = tags
    assert tag.endswith("-gpu") == (match.group(1) != "cpu"), f"{tag} for a {match.group(1)} image"


def test_dockerfile_runs_the_install_script_dependencies_first():
    steps = instructions()
    runs = [a for k, a in steps if k == "RUN"]
    deps = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "docker/install.sh deps" in a)
    project = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "docker/install.sh project" in a)
    # The dependency layer sees only what it needs, so a code change does not reinstall 2 GB.
    assert set(copy_sources(steps[:deps])) == {"pyproject.toml", "constraints.txt", "docker/install.sh"}
    assert {"README.md", "pipeline", "jobs"} <= set(copy_sources(steps[:project]))
    assert 'TORCH_INDEX_URL="${TORCH_INDEX_URL}"' in steps[deps][1]
    # Every pip command of the image is in the script, where the tests below run it.
    assert not [r for r in runs if "pip install" in r]


def test_dockerignore_sends_the_copied_files_and_nothing_heavy():
    rules = dockerignore_rules()
    for source in copy_sources(instructions()):
        assert (ROOT / source).exists(), source
        assert in_context(source, rules), f"{source} is copied by the Dockerfile but left out by .dockerignore"
    for path in ["pipeline/config.py", "pipeline/envs/darkroom.py", "jobs/presets/atari.yaml"]:
        assert in_context(path, rules), path
    for path in [
        ".venv/bin/python",
        "runs/quick/histories/x.parquet",
        ".git/HEAD",
        "tests/test_docker.py",
        "bench/collect_throughput.py",
        "cutoff.egg-info/PKG-INFO",
        "pipeline/__pycache__/config.cpython-311.pyc",
        "jobs/.venv/bin/python",
        ".pytest_cache/v/cache/nodeids",
        "build/lib/pipeline/config.py",
    ]:
        assert not in_context(path, rules), path


# --- the install step, run ---


def run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def fresh_environment(folder):
    """A virtual environment with nothing installed (the dev venv's pip installs into it)."""
    run([sys.executable, "-m", "venv", "--without-pip", str(folder)])
    python = folder / "bin" / "python"
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PATH=f"{folder / 'bin'}{os.pathsep}{env['PATH']}",
        PYTHON=str(python),
        PIP=f"{sys.executable} -m pip --python {python}",
        TORCH_INDEX_URL="",  # pip's configured index: the CPU build here, see the module docstring
        PIP_NO_COMPILE="1",  # bytecode compilation is not what is tested
    )
    return python, site_packages, env


def runtime_distributions():
    """The distributions the project needs at run time, as installed in the dev venv: the
    dependencies of pyproject.toml, theirs, and so on, with the extras asked for (not the dev extra)."""
    wanted = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    found, done = {}, set()
    while wanted:
        requirement = wanted.pop()
        name = canonicalize_name(requirement.name)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        for extra in {""} | set(requirement.extras):
            if (name, extra) in done:
                continue
            done.add((name, extra))
            found[name] = found.get(name) or distribution(name)
            for child in map(Requirement, found[name].requires or []):
                if child.marker is None or child.marker.evaluate({"extra": extra}):
                    child.marker = None
                    wanted.append(child)
    return found


def dependency_layer(folder):
    """The runtime distributions of the dev venv (installed from the same constraints.txt), as one
    folder of links to their files, to put under a fresh environment with a .pth file."""
    folder.mkdir()
    site_packages = Path(sysconfig.get_path("purelib"))
    for dist in runtime_distributions().values():
        for top in {file.parts[0] for file in dist.files or [] if file.parts[0] != ".."}:
            if (site_packages / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(site_packages / top)
    return folder


def test_install_resolves_from_nothing(tmp_path):
    context = build_context(tmp_path / "context")
    python, _, env = fresh_environment(tmp_path / "venv")
    report = tmp_path / "report.json"
    env.update(PIP_DRY_RUN="1", PIP_REPORT=str(report))
    output = run(["bash", "docker/install.sh", "deps"], cwd=context, env=env)
    # The last command's report: every dependency of pyproject.toml, resolved in an empty environment.
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert resolved["torch"] == "2.13.0+cpu"
    assert resolved["ray"] == version("ray") and resolved["ale-py"] and resolved["gymnasium"]
    assert not [n for n in resolved if n.startswith(("nvidia-", "triton"))], "a CUDA build of torch came along"
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    pins = {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in pins.items()}
    for name, got in resolved.items():
        if re.sub(r"[-_.]+", "-", name) in pins:
            assert got.split("+")[0] == pins[re.sub(r"[-_.]+", "-", name)], name
    assert "Would install" in output


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A fresh environment after docker/install.sh, and the image's working directory."""
    folder = tmp_path_factory.mktemp("image")
    context = build_context(folder / "cutoff")
    python, site_packages, env = fresh_environment(folder / "venv")
    if not FULL_INSTALL:
        (site_packages / "image-base-layer.pth").write_text(f"{dependency_layer(folder / 'base-layer')}\n")
    output = run(["bash", "docker/install.sh"], cwd=context, env=env)
    return {"python": python, "site_packages": site_packages, "workdir": context, "env": env, "output": output}


def test_install_script_installs_the_project_not_editable(image):
    assert "Successfully installed cutoff-0.1.0" in image["output"]
    if not FULL_INSTALL:
        # Everything but the project was satisfied by the layer below: nothing else changed.
        assert image["output"].strip().splitlines()[-1].strip() == "Successfully installed cutoff-0.1.0"
    installed = list(image["site_packages"].glob("cutoff-*.dist-info"))
    assert len(installed) == 1 and not list(image["site_packages"].glob("__editable__*"))
    assert (image["site_packages"] / "pipeline" / "config.py").is_file()
    run([sys.executable, "-m", "pip", "--python", str(image["python"]), "check"], env=image["env"])


CHECK = """
import sys, ale_py, gymnasium as gym, pipeline, ray, torch
assert pipeline.__file__.startswith(sys.prefix), pipeline.__file__  # the installed copy, not a source tree
assert torch.__version__.split("+")[0] == "2.13.0" and torch.version.cuda is None, torch.__version__
gym.register_envs(ale_py)
env = gym.make("ALE/Breakout-v5")  # fails without the ROM
observation, _ = env.reset(seed=0)
env.step(env.action_space.sample())
assert observation.shape == (210, 160, 3), observation.shape
print("ok", ray.__version__, torch.__version__, ale_py.__version__)
"""


def test_image_environment_imports_and_plays_breakout(image, tmp_path):
    output = run([image["python"], "-c", CHECK], cwd=tmp_path, env=image["env"])
    assert output.startswith(f"ok {version('ray')} 2.13.0")


def test_image_command_line_and_presets(image, tmp_path):
    python, env = image["python"], image["env"]
    assert "collect" in run([python, "-m", "pipeline", "--help"], cwd=tmp_path, env=env)
    console_script = image["python"].parent / "cutoff"  # the same main; not run again (20 s of imports)
    assert os.access(console_script, os.X_OK) and "pipeline.__main__" in console_script.read_text()
    # In the image's working directory a preset loads by path, and by name (the source copy there
    # comes first on sys.path for python -m / python -c, and its jobs/presets sits beside it).
    load = "from pipeline.config import load_preset; print(*(type(load_preset(p)).__name__ for p in {!r}))"
    presets = ["jobs/presets/atari.yaml", "quick"]
    assert run([python, "-c", load.format(presets)], cwd=image["workdir"], env=env).split() == ["Preset"] * 2


def test_installed_package_finds_presets_by_name_anywhere(image, tmp_path):
    # The Dockerfile's ENV points the installed package at the image's presets; here the image's
    # /home/ray/cutoff is the test's build context.
    env_lines = re.findall(r"^ENV (\w+)=(\S+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    env = {**image["env"], **{k: v.replace("/home/ray/cutoff", str(image["workdir"])) for k, v in env_lines}}
    assert "CUTOFF_PRESETS_DIR" in env
    load = "from pipeline.config import load_preset; print(load_preset('smoke').name)"
    assert run([image["python"], "-c", load], cwd=tmp_path, env=env).strip() == "smoke"
