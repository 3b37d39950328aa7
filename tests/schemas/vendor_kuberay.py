"""Vendor KubeRay's CRD schemas (RayCluster, RayJob, RayCronJob; API ray.io/v1) for tests/test_cluster_files.py.

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python tests/schemas/vendor_kuberay.py /tmp/kuberay v1.7.0

Reads ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,raycronjobs}.yaml at that git
revision and keeps each CRD's v1 openAPIV3Schema as it is, except that `description`s are dropped
and the subtrees the CRDs repeat (the pod template; RayClusterSpec inside RayJob; RayJobSpec
inside RayCronJob) are stored once under $defs and referenced, after checking that the copies
are identical. Writes tests/schemas/kuberay-<revision>.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
CRD_PATH = "ray-operator/config/crd/bases/ray.io_{}.yaml"


def strip_descriptions(schema):
    """A copy of an OpenAPI v3 schema without `description` keywords (a property named description stays)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = strip_descriptions(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strip_descriptions(sub) for sub in value]
        else:
            out[key] = value
    return out


def replace_subtree(node, target, ref: str, counter: list[int]):
    """`node` with every subtree equal to `target` replaced by {"$ref": ref}; counter[0] counts them."""
    if node == target:
        counter[0] += 1
        return {"$ref": ref}
    if isinstance(node, dict):
        return {key: replace_subtree(value, target, ref, counter) for key, value in node.items()}
    if isinstance(node, list):
        return [replace_subtree(value, target, ref, counter) for value in node]
    return node


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout


def main(repo: str, rev: str) -> None:
    commit = git(repo, "rev-parse", f"{rev}^{{commit}}").strip()
    kinds = {}
    for kind, plural in CRDS.items():
        crd = yaml.safe_load(git(repo, "show", f"{commit}:{CRD_PATH.format(plural)}"))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        kinds[kind] = strip_descriptions(version["schema"]["openAPIV3Schema"])

    counts: dict[str, int] = {}

    def share(name: str, target) -> None:
        nonlocal kinds
        counter = [0]
        kinds = {kind: replace_subtree(schema, target, f"#/$defs/{name}", counter) for kind, schema in kinds.items()}
        counts[name] = counter[0]

    pod = kinds["RayCluster"]["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    share("PodTemplateSpec", pod)
    cluster_spec = kinds["RayCluster"]["properties"]["spec"]
    job_spec = kinds["RayJob"]["properties"]["spec"]
    assert job_spec["properties"]["rayClusterSpec"] == cluster_spec, "RayJob.spec.rayClusterSpec differs from RayCluster.spec"
    assert kinds["RayCronJob"]["properties"]["spec"]["properties"]["jobTemplate"] == job_spec, \
        "RayCronJob.spec.jobTemplate differs from RayJob.spec"
    share("RayJobSpec", job_spec)
    share("RayClusterSpec", cluster_spec)
    defs = {"PodTemplateSpec": pod, "RayClusterSpec": cluster_spec,
            "RayJobSpec": replace_subtree(job_spec, cluster_spec, "#/$defs/RayClusterSpec", [0])}

    out = {
        "$comment": (f"KubeRay CRD schemas, API ray.io/v1, vendored by tests/schemas/vendor_kuberay.py from "
                     f"github.com/ray-project/kuberay {rev} (commit {commit}), "
                     f"{', '.join(CRD_PATH.format(p) for p in CRDS.values())}: the v1 openAPIV3Schema of each, "
                     f"descriptions dropped, repeated subtrees moved to $defs (copies replaced: {counts})."),
        "kuberay_revision": rev,
        "kuberay_commit": commit,
        "$defs": {**defs, **kinds},
    }
    path = Path(__file__).with_name(f"kuberay-{rev.rsplit('/', 1)[-1]}.json")
    path.write_text(json.dumps(out, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {path} ({path.stat().st_size:,} bytes); copies replaced: {counts}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
