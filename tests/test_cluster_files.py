"""The cluster, job and schedule files (cluster/, jobs/) parse, validate against the schemas of the
tools that read them, agree with each other and with the presets, hold no credentials and expose
no dashboard.

- cluster/aws.yaml: Ray's own cluster-launcher schema (ray/autoscaler/ray-schema.json, with
  jsonschema) and Ray's prepare_config + validate_config, offline.
- cluster/kuberay/*.yaml, jobs/schedule/raycronjob.yaml: the openAPIV3Schema of KubeRay's CRDs
  (tests/schemas/kuberay-v1.7.0.json, vendored by tests/schemas/vendor_kuberay.py), with
  unknown fields made errors, as `kubectl apply` with strict field validation does.
- jobs/schedule/cronjob.yaml: no Kubernetes schema is installed, so the CronJob's fields are
  checked by hand and its pod template against the PodTemplateSpec schema of the KubeRay CRDs
  (the same core/v1 type).
No cluster is started: a few seconds of work.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from conftest import REPO

ROOT = Path(REPO)
FILES = sorted(p for folder in ("cluster", "jobs") for p in (ROOT / folder).rglob("*")
               if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
AWS = ROOT / "cluster" / "aws.yaml"
KUBERAY = ROOT / "cluster" / "kuberay"
SCHEDULE = ROOT / "jobs" / "schedule"
PRESETS = ROOT / "jobs" / "presets"
KUBERAY_SCHEMAS = ROOT / "tests" / "schemas" / "kuberay-v1.7.0.json"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")
IMAGE = re.compile(r"^ghcr\.io/OWNER/cutoff:(?P<tag>latest(?P<gpu>-gpu)?)$")  # docker/Dockerfile's image, user's registry
KUBECTL_IMAGE = re.compile(r"^registry\.k8s\.io/kubectl:v\d+\.\d+\.\d+$")


def documents(path: Path) -> list:
    text = path.read_text()
    return [json.loads(text)] if path.suffix == ".json" else [d for d in yaml.safe_load_all(text) if d is not None]


def manifests() -> list[tuple[Path, dict]]:
    """Every Kubernetes object in cluster/kuberay/ and jobs/schedule/."""
    return [(path, doc) for folder in (KUBERAY, SCHEDULE) for path in sorted(folder.glob("*.yaml"))
            for doc in documents(path)]


def of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in manifests() if doc.get("kind") == kind]


def one(kind: str) -> dict:
    (found,) = of_kind(kind)
    return found[1]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- every file parses --------------------------------------------------------------------------


def test_there_are_cluster_and_schedule_files():
    names = {rel(p) for p in FILES}
    assert {"cluster/aws.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
            "jobs/schedule/raycronjob.yaml", "jobs/schedule/cronjob.yaml", "jobs/presets/atari.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=rel)
def test_file_parses_to_mappings(path):
    docs = documents(path)
    assert docs, f"{rel(path)} is empty"
    assert all(isinstance(doc, dict) for doc in docs), f"{rel(path)}: every document must be a mapping"


# --- cluster/aws.yaml: Ray's cluster launcher ------------------------------------------------------


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load(AWS.read_text())


def test_aws_config_validates_against_rays_schema(aws):
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(aws), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_aws_config_passes_rays_own_checks(aws):
    # What `ray up` does before it talks to AWS: fill in the defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_rays_schema_check_is_not_vacuous(aws):
    broken = copy.deepcopy(aws)
    broken["available_node_types"]["gpu"]["min_worker"] = 0  # a typo of min_workers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(RAY_SCHEMA.read_text()))


def test_aws_nodes_fit_the_atari_preset(aws):
    preset = yaml.safe_load((PRESETS / "atari.yaml").read_text())
    train = preset["train"]
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs the driver only: no teachers or trials on it"
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for name, t in types.items() if name != aws["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and cpu
    for node in gpu:  # one Ray Train worker needs 1 GPU and the preset's CPUs on one node
        assert node["resources"]["CPU"] >= train["cpus_per_worker"]
        assert node["max_workers"] >= train["num_workers"]
        assert node["min_workers"] == 0, "GPU nodes only while imitators train"
    teachers = sum(len(g["seeds"]) * len(g.get("tasks", [{}])) for g in preset["collect"]["teachers"].values())
    # collect starts one teacher actor per CPU present when it starts
    assert sum(t["min_workers"] * t["resources"]["CPU"] for t in cpu) >= teachers
    assert sum(t["max_workers"] for t in types.values() if t is not head) <= aws["max_workers"]
    for name, node in types.items():
        assert node["node_config"].get("IamInstanceProfile"), f"{name}: S3 access comes from the instance profile"


def test_aws_dashboard_listens_on_localhost_only(aws):
    commands = " ".join(aws["head_start_ray_commands"] + aws["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands
    assert "0.0.0.0" not in commands


# --- KubeRay manifests: the CRDs' schemas ---------------------------------------------------------


def strict(schema):
    """A CRD schema as jsonschema should check it: x-kubernetes-* extensions dropped, and unknown
    fields an error wherever the schema lists the properties (unless it preserves unknown fields),
    as the API server's strict field validation (kubectl's default) rejects them."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items() if not key.startswith("x-kubernetes-")}
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def kuberay_defs() -> dict:
    vendored = json.loads(KUBERAY_SCHEMAS.read_text())
    assert vendored["kuberay_revision"] == "v1.7.0" and len(vendored["kuberay_commit"]) == 40
    return strict(vendored["$defs"])


def validator(defs: dict, name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": defs})


def schema_errors(defs: dict, name: str, doc: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(defs, name).iter_errors(doc))


KUBERAY_DOCS = [(path, doc) for path, doc in manifests() if doc.get("kind") in KUBERAY_KINDS]


@pytest.mark.parametrize("path,doc", KUBERAY_DOCS, ids=[f"{rel(p)}:{d['kind']}" for p, d in KUBERAY_DOCS])
def test_kuberay_manifest_validates_against_the_crd(path, doc, kuberay_defs):
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["metadata"].get("name") or doc["metadata"].get("generateName")
    assert not schema_errors(kuberay_defs, doc["kind"], doc)


def test_there_is_one_of_each_kuberay_kind():
    assert sorted(doc["kind"] for _, doc in KUBERAY_DOCS) == sorted(KUBERAY_KINDS)


@pytest.mark.parametrize("where,typo", [
    (("spec",), "schedul"),  # RayCronJob.spec.schedule
    (("spec", "jobTemplate"), "shutdownAfterJobFinish"),
    (("spec", "jobTemplate", "rayClusterSpec", "headGroupSpec"), "rayStartParam"),
    (("spec", "jobTemplate", "rayClusterSpec", "workerGroupSpecs", 1, "template", "spec", "containers", 0), "resource"),
])
def test_crd_validation_catches_a_misspelled_field(where, typo, kuberay_defs):
    doc = copy.deepcopy(one("RayCronJob"))
    node = doc
    for key in where:
        node = node[key]
    original = typo + next(k[len(typo):] for k in node if k.startswith(typo) and k != typo)
    node[typo] = node.pop(original)
    assert any(typo in error for error in schema_errors(kuberay_defs, "RayCronJob", doc))


def test_embedded_specs_are_the_same_everywhere():
    cluster = one("RayCluster")["spec"]
    job = one("RayJob")["spec"]
    assert job["rayClusterSpec"] == cluster, "rayjob.yaml's rayClusterSpec differs from raycluster.yaml's spec"
    assert one("RayCronJob")["spec"]["jobTemplate"] == job, "raycronjob.yaml's jobTemplate differs from rayjob.yaml's spec"
    assert job["shutdownAfterJobFinishes"] is True


def test_kuberay_cluster_fits_the_atari_preset():
    preset = yaml.safe_load((PRESETS / "atari.yaml").read_text())["train"]
    spec = one("RayCluster")["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in container(g)["resources"]["limits"]]
    assert len(gpu_groups) == 1
    (gpu,) = gpu_groups
    limits = container(gpu)["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1 and int(limits["cpu"]) >= preset["cpus_per_worker"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= preset["num_workers"]


def test_kuberay_and_aws_clusters_have_the_same_shape(aws):
    groups = {g["groupName"]: g for g in one("RayCluster")["spec"]["workerGroupSpecs"]}
    types = aws["available_node_types"]
    assert set(groups) == set(types) - {aws["head_node_type"]}
    for name, group in groups.items():
        node = types[name]
        assert (group["minReplicas"], group["maxReplicas"]) == (node["min_workers"], node["max_workers"]), name
        ray_cpus = group["rayStartParams"].get("num-cpus", container(group)["resources"]["limits"]["cpu"])
        if name == "cpu":  # the CPUs teachers and trials get: set by memory, not by cores
            assert int(ray_cpus) == node["resources"]["CPU"]
        gpus = int(container(group)["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert gpus == node["resources"].get("GPU", 0), name


def container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in the Kubernetes manifests."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.append((where, node))
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}.{index}")

    for path, doc in manifests():
        walk(doc, f"{rel(path)}:{doc['kind']}")
    return found


def test_ray_pods_run_as_the_s3_service_account():
    accounts = {doc["metadata"]["name"] for _, doc in of_kind("ServiceAccount")}
    ray_pods = [(where, pod) for where, pod in pod_specs() if ":CronJob" not in where]
    assert len(ray_pods) == 9  # head, cpu and gpu groups in RayCluster, RayJob and RayCronJob
    for where, pod in ray_pods:
        assert pod.get("serviceAccountName") == "cutoff-ray", where
    assert "cutoff-ray" in accounts
    annotation = one_service_account("cutoff-ray")["metadata"].get("annotations", {})
    assert annotation.get("eks.amazonaws.com/role-arn", "").startswith("arn:aws:iam::"), "IRSA role of the Ray pods"


def one_service_account(name: str) -> dict:
    (doc,) = [doc for _, doc in of_kind("ServiceAccount") if doc["metadata"]["name"] == name]
    return doc


def header_commands(path: Path) -> list[list[str]]:
    """The shell commands in the comment a file starts with, as words (line continuations joined,
    trailing comments and what follows a pipe or ; left out)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:])
    commands = []
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        if re.match(r"\s+(kubectl|ray|python|export)\b", line):
            words = shlex.split(re.sub(r"\$\([^)]*\)", "SUBSTITUTED", line), comments=True)
            cut = [i for i, word in enumerate(words) if word in ("|", ";", "&&")]
            commands.append(words[: cut[0]] if cut else words)
    return commands


# --- jobs/schedule/cronjob.yaml: the batch/v1 CronJob fallback, by hand ---------------------------

CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]  # minute hour day-of-month month day-of-week
NAMES = {3: "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split(), 4: "SUN MON TUE WED THU FRI SAT".split()}


def cron_errors(schedule: str) -> list[str]:
    """Problems with a standard 5-field cron expression (as Kubernetes and KubeRay parse it)."""
    fields = schedule.split()
    if len(fields) != 5:
        return [f"{schedule!r}: expected 5 fields, got {len(fields)}"]
    errors = []
    for index, (field, (low, high)) in enumerate(zip(fields, CRON_FIELDS)):
        for part in field.split(","):
            match = re.fullmatch(r"(\*|\w+(?:-\w+)?)(?:/(\d+))?", part)
            if not match or (match.group(2) is not None and int(match.group(2)) == 0):
                errors.append(f"field {index + 1} {part!r}: not a cron range")
                continue
            if match.group(1) == "*":
                continue
            for value in match.group(1).split("-"):
                names = NAMES.get(index, [])
                number = names.index(value.upper()) + (1 if index == 3 else 0) if value.upper() in names else \
                    int(value) if value.isdigit() else None
                if number is None or not low <= number <= high:
                    errors.append(f"field {index + 1} {part!r}: {value} is outside {low}-{high}")
    return errors


def test_cron_checker_rejects_bad_schedules():
    assert not cron_errors("0 3 1 * *") and not cron_errors("*/15 0-6 * JAN-MAR mon,FRI")
    assert cron_errors("0 3 1 *") and cron_errors("60 3 * * *") and cron_errors("0 24 * * *")
    assert cron_errors("0 3 0 * *") and cron_errors("0 3 * 13 *") and cron_errors("*/0 * * * *")


SCHEDULES = [(rel(path), doc["spec"]) for path, doc in of_kind("RayCronJob") + of_kind("CronJob")]


@pytest.mark.parametrize("where,spec", SCHEDULES, ids=[w for w, _ in SCHEDULES])
def test_schedule_is_valid_cron_in_utc(where, spec):
    assert not cron_errors(spec["schedule"])
    assert spec["timeZone"] == "Etc/UTC"  # the experiment's date stamp is the UTC day too


def test_both_schedules_agree():
    (cron,), (raycron,) = [[doc["spec"] for _, doc in of_kind(kind)] for kind in ("CronJob", "RayCronJob")]
    assert cron["schedule"] == raycron["schedule"] and cron["timeZone"] == raycron["timeZone"]


CRONJOB_SPEC = {"schedule", "timeZone", "startingDeadlineSeconds", "concurrencyPolicy", "suspend", "jobTemplate",
                "successfulJobsHistoryLimit", "failedJobsHistoryLimit"}
JOB_SPEC = {"parallelism", "completions", "activeDeadlineSeconds", "podFailurePolicy", "successPolicy", "backoffLimit",
            "backoffLimitPerIndex", "maxFailedIndexes", "selector", "manualSelector", "template",
            "ttlSecondsAfterFinished", "completionMode", "suspend", "podReplacementPolicy", "managedBy"}


def test_cronjob_fields(kuberay_defs):
    doc = one("CronJob")
    assert doc["apiVersion"] == "batch/v1" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert set(spec) <= CRONJOB_SPEC and {"schedule", "jobTemplate"} <= set(spec)
    assert spec["concurrencyPolicy"] in ("Allow", "Forbid", "Replace")
    assert set(spec["jobTemplate"]) <= {"metadata", "spec"}
    job = spec["jobTemplate"]["spec"]
    assert set(job) <= JOB_SPEC and "template" in job
    assert job["backoffLimit"] == 0, "a retried pod would create a second RayJob"
    template = job["template"]
    assert not schema_errors(kuberay_defs, "PodTemplateSpec", template)  # core/v1 PodTemplateSpec, from the CRDs
    pod = template["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (box,) = pod["containers"]
    assert KUBECTL_IMAGE.match(box["image"])
    assert box["command"][:3] == ["kubectl", "create", "-f"]
    mounted = {m["name"]: m["mountPath"] for m in box["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (name,) = [n for n in mounted if box["command"][3].startswith(mounted[n] + "/")]
    configmap = volumes[name]["configMap"]["name"]
    # The ConfigMap is made by the `kubectl create configmap` command the file's header gives: it must
    # create that ConfigMap, holding rayjob.yaml's RayJob under the key the pod's command reads.
    (create,) = [words for words in header_commands(SCHEDULE / "cronjob.yaml") if words[:3] == ["kubectl", "create", "configmap"]]
    assert create[3] == configmap
    (source,) = [word.split("=", 1)[1] for word in create if word.startswith("--from-file=")]
    key, path = source.split("=", 1)
    assert f"{mounted[name]}/{key}" == box["command"][3]
    assert documents(ROOT / path) == documents(KUBERAY / "rayjob.yaml")
    # ... and the header's run-it-now command starts a job from this CronJob.
    (now,) = [words for words in header_commands(SCHEDULE / "cronjob.yaml") if words[:3] == ["kubectl", "create", "job"]]
    assert f"--from=cronjob/{doc['metadata']['name']}" in now


def test_cronjob_may_only_create_rayjobs():
    pod_account = one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert one_service_account(pod_account)
    (role,) = [doc for _, doc in of_kind("Role") if doc["metadata"]["name"] == pod_account]
    assert role["apiVersion"] == "rbac.authorization.k8s.io/v1"
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]
    (binding,) = [doc for _, doc in of_kind("RoleBinding") if doc["roleRef"]["name"] == pod_account]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": pod_account}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod_account}]
    assert not of_kind("ClusterRole") and not of_kind("ClusterRoleBinding")


# --- entrypoints: presets, options, the date stamp ------------------------------------------------


ENTRYPOINTS = [(rel(path), doc["spec"]["entrypoint"]) for path, doc in of_kind("RayJob")] + \
              [(rel(path), doc["spec"]["jobTemplate"]["entrypoint"]) for path, doc in of_kind("RayCronJob")]


DATE = "$(date -u +%Y-%m-%d)"  # the shell's command substitution that dates each run


def entrypoint_options(entrypoint: str) -> dict[str, list[str]]:
    words = shlex.split(entrypoint.replace(DATE, "@DATE@"))
    assert words[:4] == ["python", "-m", "pipeline", "run"], entrypoint
    options: dict[str, list[str]] = {}
    for flag, value in zip(words[4::2], words[5::2]):
        assert flag.startswith("--"), f"{flag} in {entrypoint!r}"
        options.setdefault(flag, []).append(value)
    assert len(words[4:]) % 2 == 0, entrypoint
    return options


@pytest.mark.parametrize("where,entrypoint", ENTRYPOINTS, ids=[w for w, _ in ENTRYPOINTS])
def test_entrypoint_runs_a_shipped_preset_on_s3(where, entrypoint):
    from pipeline.config import load_preset
    from pipeline.plan import trial_batches, trial_specs

    options = entrypoint_options(entrypoint)
    (preset_name,) = options["--preset"]
    assert (PRESETS / f"{preset_name}.yaml").is_file(), f"{where}: no preset {preset_name}"
    (store,) = options["--store"]
    assert store.startswith("s3://")
    (experiment,) = options["--experiment"]
    assert experiment == f"{preset_name}-@DATE@", f"each run gets its own dated experiment: {preset_name}-{DATE}"
    preset = load_preset(preset_name, overrides=options.get("--set", []))  # the overrides are valid keys and values
    # Tune asks for every trial at once, so that the autoscaler adds the nodes to run them.
    assert preset.evaluate.max_concurrent_trials >= len(trial_batches(trial_specs(preset), preset.evaluate.lockstep))
    assert preset.collect.num_actors == sum(len(g.seeds) * len(g.tasks) for g in preset.collect.teachers.values())


@pytest.fixture(scope="module")
def stub_bin(tmp_path_factory) -> Path:
    """`python` that prints its arguments as JSON, and `ray` that does what `ray job submit -- ...`
    and Ray's job supervisor do with an entrypoint: subprocess.list2cmdline of the words after
    `--` (ray/dashboard/modules/job/cli.py), run with shell=True (job_supervisor.py)."""
    folder = tmp_path_factory.mktemp("bin")
    (folder / "python").write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    (folder / "ray").write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import subprocess, sys
        words = sys.argv[sys.argv.index("--") + 1:]
        sys.exit(subprocess.run(subprocess.list2cmdline(words), shell=True).returncode)
        """))
    for name in ("python", "ray"):
        (folder / name).chmod(0o755)
    return folder


def dated_experiment(stdout: str) -> str:
    argv = json.loads(stdout.strip().splitlines()[-1])
    return argv[argv.index("--experiment") + 1]


def utc_days() -> set[str]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {(now + datetime.timedelta(seconds=s)).strftime("%Y-%m-%d") for s in (-60, 0, 60)}


@pytest.mark.parametrize("where,entrypoint", ENTRYPOINTS, ids=[w for w, _ in ENTRYPOINTS])
def test_date_stamp_expands_when_kuberay_submits(where, entrypoint, stub_bin):
    env = {**os.environ, "PATH": f"{stub_bin}{os.pathsep}{os.environ['PATH']}"}
    # K8sJobMode (the default): KubeRay's submitter pod runs `/bin/bash -ce -- "<words joined by spaces>"`
    # with the entrypoint pasted in after `ray job submit ... --` (ray-operator/controllers/ray/common/job.go).
    script = f"ray job submit --address http://head:8265 --no-wait -- {entrypoint.strip()} ;"
    submitted = subprocess.run(["/bin/bash", "-ce", "--", script], env=env, capture_output=True, text=True, check=True)
    # HTTPMode: the entrypoint string goes to Ray's job supervisor, which runs it with shell=True.
    direct = subprocess.run(entrypoint, shell=True, env=env, capture_output=True, text=True, check=True)
    preset = entrypoint_options(entrypoint)["--preset"][0]
    for run in (submitted, direct):
        experiment = dated_experiment(run.stdout)
        assert experiment.startswith(f"{preset}-") and experiment[len(preset) + 1:] in utc_days(), experiment


# --- images, credentials, dashboards -------------------------------------------------------------


def images() -> list[tuple[str, str, bool]]:
    """(where, image, needs a GPU) of every Ray image in the cluster files."""
    aws = yaml.safe_load(AWS.read_text())
    found = [("aws.yaml docker.image", aws["docker"]["image"], False)]
    for key in ("head_image", "worker_image"):
        if key in aws["docker"]:
            found.append((f"aws.yaml docker.{key}", aws["docker"][key], False))
    for name, node in aws["available_node_types"].items():
        if "worker_image" in node.get("docker", {}):
            found.append((f"aws.yaml {name}", node["docker"]["worker_image"], node["resources"].get("GPU", 0) > 0))
        elif node["resources"].get("GPU", 0) > 0:
            found.append((f"aws.yaml {name} (global image)", aws["docker"]["image"], True))
    for where, pod in pod_specs():
        for box in pod["containers"] + pod.get("initContainers", []):
            if not KUBECTL_IMAGE.match(box["image"]):
                gpu = "nvidia.com/gpu" in box.get("resources", {}).get("limits", {})
                found.append((f"{where}.{box['name']}", box["image"], gpu))
    return found


def test_images_are_one_image_with_a_gpu_variant():
    found = images()
    assert len(found) >= 11
    for where, image, gpu in found:
        match = IMAGE.match(image)
        assert match, f"{where}: {image} is not the project's image"
        assert bool(match.group("gpu")) == gpu, f"{where}: {image} on a {'GPU' if gpu else 'CPU'} node"
    # The image is built on the Ray release the manifests and this venv use.
    base = dockerfile_base_image()
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{ray.__version__}-{python_tag}-cpu", base


def dockerfile_base_image(path: Path = ROOT / "docker" / "Dockerfile") -> str:
    """The image docker/Dockerfile builds FROM by default: its first FROM instruction with the ARG
    defaults declared before it substituted (comments are not instructions)."""
    assert path.is_file(), f"{rel(path)} is missing: the cluster files name the image it builds"
    defaults = {}
    for line in path.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "ARG" and "=" in words[1]:
            defaults.setdefault(*words[1].split("=", 1))
        elif words[0].upper() == "FROM":
            return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], words[1])
    raise AssertionError(f"{rel(path)} has no FROM instruction")


SECRETS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"(?i)aws_(secret_access_key|access_key_id|session_token)\W{0,3}\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{8,}"),
    re.compile(r"(?i)\b(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN)\b"),  # not even as env var names
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{20,}"),
    re.compile(r"(?i)\b(password|passwd|secret|token|api[_-]?key)\s*[:=]\s*['\"]?[A-Za-z0-9/+=_-]{16,}"),
]


def credential_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if any(p.search(line) for p in SECRETS)]


def test_credential_check_is_not_vacuous():
    planted = ["AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
               "- {name: AWS_ACCESS_KEY_ID, value: x}", "token: 0123456789abcdef0123456789"]
    assert all(credential_lines(line) for line in planted)
    assert not credential_lines("eks.amazonaws.com/role-arn: arn:aws:iam::ACCOUNT_ID:role/cutoff-ray-s3")


@pytest.mark.parametrize("path", [p for p in FILES if "presets" not in p.parts] + [KUBERAY_SCHEMAS], ids=rel)
def test_no_credentials_in_files(path):
    assert not credential_lines(path.read_text()), f"{rel(path)} holds something like a credential"


def test_no_credentials_in_pod_environments():
    assert not of_kind("Secret"), "secrets are made by KubeRay (the Ray token) or the cloud, not shipped"
    for where, pod in pod_specs():
        for box in pod["containers"]:
            for variable in box.get("env", []):
                assert not re.search(r"(?i)key|secret|token|password", variable["name"]), f"{where}: {variable['name']}"


def test_dashboards_are_not_exposed():
    for path, doc in manifests():
        assert doc["kind"] not in ("Ingress", "Gateway", "HTTPRoute"), rel(path)
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", rel(path)
    clusters = [one("RayCluster")["spec"], one("RayJob")["spec"]["rayClusterSpec"],
                one("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"]]
    for spec in clusters:
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress", False)
        assert head["rayStartParams"].get("dashboard-host") in (None, "127.0.0.1", "localhost")
        assert spec["authOptions"]["mode"] == "token", "the dashboard and GCS ask for KubeRay's token"
    for path in FILES:  # no field or command anywhere opens a service or the dashboard to the outside
        for where, value in leaves(documents(path), rel(path)):
            assert value not in ("LoadBalancer", "NodePort"), where
            assert not re.search(r"dashboard-host\W+0\.0\.0\.0", str(value)), where
            assert not (where.endswith(("dashboard-host", "dashboard_host")) and value == "0.0.0.0"), where


def leaves(node, where: str):
    """(where, value) of every scalar in a parsed document, keys included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{where}.{key}", key
            yield from leaves(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaves(value, f"{where}.{index}")
    else:
        yield where, node


def test_port_forward_reaches_the_head_dashboard():
    # Inside the pod KubeRay binds the dashboard to all interfaces (for the ClusterIP service), so
    # it is reached with kubectl port-forward to the head service KubeRay makes: {cluster}-head-svc,
    # with the head container's named ports.
    cluster = one("RayCluster")
    head = container(cluster["spec"]["headGroupSpec"])
    dashboard_port = {port["name"]: port["containerPort"] for port in head["ports"]}["dashboard"]
    readme = " ".join(re.findall(r"`(kubectl port-forward [^`]+)`", (ROOT / "README.md").read_text()))
    forwards = [words for words in header_commands(KUBERAY / "raycluster.yaml") if words[:2] == ["kubectl", "port-forward"]]
    forwards += [shlex.split(command) for command in re.findall(r"kubectl port-forward [^`]+", readme)]
    assert len(forwards) >= 2, "raycluster.yaml's header and the README both show the port-forward"
    for words in forwards:
        service, ports = words[2], words[3]
        assert service == f"service/{cluster['metadata']['name']}-head-svc", words
        assert int(ports.split(":")[-1]) == dashboard_port, words


def test_paths_named_in_the_files_exist():
    texts = {rel(p): p.read_text() for p in FILES}
    texts["README.md"] = (ROOT / "README.md").read_text()
    for where, text in texts.items():
        for named in re.findall(r"\b((?:cluster|jobs|tests/schemas)/[\w./-]+\.(?:ya?ml|json))", text):
            assert (ROOT / named).is_file(), f"{where} names {named}, which does not exist"
