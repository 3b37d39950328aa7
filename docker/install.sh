#!/usr/bin/env bash
# The install step of the cutoff image, and its one source of truth: docker/Dockerfile runs it in
# the Ray image, tests/test_docker.py runs the same file in a fresh virtual environment.
#
#   docker/install.sh deps      torch, then every dependency of pyproject.toml (needs pyproject.toml
#                               and constraints.txt only, so the image keeps it in a layer of its own)
#   docker/install.sh project   the project itself, not editable (needs README.md, pipeline/ too)
#   docker/install.sh           both
#
# Run it from the folder holding those files. Environment:
#   TORCH_INDEX_URL  the index torch comes from: the Dockerfile passes
#                    https://download.pytorch.org/whl/cpu (CPU image) or .../whl/cu128 (GPU image).
#                    Empty: pip's configured index (on the dev machines, the CPU build on disk).
#   PYTHON           the interpreter to install into (default: python, the first on PATH)
#   PIP              the pip command (default: $PYTHON -m pip)
# pip's own variables apply too (PIP_NO_COMPILE, PIP_DRY_RUN, PIP_REPORT, PIP_CACHE_DIR, ...).
set -euo pipefail

PYTHON="${PYTHON:-python}"
read -r -a pip <<< "${PIP:-$PYTHON -m pip}"
stage="${1:-all}"

install_deps() {
    # torch alone, without its dependencies, from its own index, at the project's one pin. Its local
    # version (2.13.0+cpu, 2.13.0+cu128) satisfies torch==2.13.0, so the next command keeps it
    # instead of taking PyPI's build, and resolves torch's own dependencies (for a CUDA build, the
    # nvidia-* wheels) from PyPI like every other one.
    local torch_version
    torch_version=$(sed -n 's/^torch==//p' constraints.txt)
    "${pip[@]}" install --no-deps ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${torch_version}"

    # The dependencies listed in pyproject.toml, at the versions constraints.txt pins.
    local requirements
    requirements=$(mktemp)
    "$PYTHON" -c 'import sys, tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' > "$requirements"
    "${pip[@]}" install -c constraints.txt -r "$requirements"
    rm -f "$requirements"
}

install_project() {
    # Not editable: the image holds the package in site-packages, whatever the working directory.
    # Everything it needs is there already after `deps`; pip checks that against constraints.txt.
    "${pip[@]}" install -c constraints.txt .
}

case "$stage" in
    deps) install_deps ;;
    project) install_project ;;
    all) install_deps; install_project ;;
    *) echo "usage: $0 [deps|project]" >&2; exit 2 ;;
esac
