"""KubeRay manifests (k8s/), the container image (Dockerfile) and their pins, checked offline.

What a user would otherwise find out from `kubectl apply` or a failed pod: a manifest the API
server rejects or silently prunes, a pod spec Kubernetes refuses, an entrypoint that names a
missing file or a flag the CLI does not know, a Ray version that differs between the image and
the cluster, a job whose Ray resources never fit a pod (it waits forever), an open cluster or
pod, a Serve app with no auth or an untrained model, a credential committed to the repository.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from raydeeplab import storage
from raydeeplab.cli import build_parser, config_from_args
from raydeeplab.config import PredictConfig, ServeConfig, TrainConfig
from raydeeplab.train import BEST

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_SCHEMAS = REPO / "tests" / "schemas" / "kuberay"  # SOURCE.md there says where they come from
SECRET_EXAMPLE = K8S / "s3-credentials-secret.example.yaml"
SERVE_CONFIG = REPO / "configs" / "serve_config.yaml"
# Core schemas bundled in kubernetes-validate; 1.33 is recent and still served by the managed
# Kubernetes offerings, and a pod spec valid there stays valid on later releases.
KUBERNETES_VERSION = "1.33.0"
GPU = "nvidia.com/gpu"

CRD_SCHEMA_FILES = {
    "RayCluster": "raycluster.v1.json",
    "RayJob": "rayjob.v1.json",
    "RayService": "rayservice.v1.json",
}
CLUSTER_SPEC_PATH = {
    "RayCluster": ("spec",),
    "RayJob": ("spec", "rayClusterSpec"),
    "RayService": ("spec", "rayClusterConfig"),
}
# jobs/<file>.py runs `raydeeplab <verb>` with the same flags.
JOB_VERBS = {"jobs/batch_infer.py": "predict", "jobs/train.py": "train", "jobs/evaluate.py": "evaluate"}
# The config class each GPU verb merges its --config file and flags into, as the CLI does.
CONFIGS = {"predict": PredictConfig, "train": TrainConfig}
# Share of a GPU pod's CPUs that the GPU work may take: the rest decodes and augments (Ray Data
# tasks) or parses requests; a pod whose CPUs all go to its GPU actor starves the GPU.
MAX_GPU_WORK_CPU_SHARE = 0.5
OPERATOR_VERSION = re.compile(r"helm install kuberay-operator kuberay/kuberay-operator --version (\d+\.\d+\.\d+)")
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|SESSION_KEY|CREDENTIAL", re.IGNORECASE)
PLACEHOLDER = re.compile(r"^<[^<>]+>$")
# AWS access key ids, PEM private keys, GitHub tokens, long hex or base64 runs: what a pasted key looks like.
KEY_SHAPED = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY-----|\bgh[pousr]_[A-Za-z0-9]{36}\b"
    r"|\b[0-9a-f]{40,}\b|[A-Za-z0-9+/]{40,}={0,2}"
)
DOCKERFILE_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
# Ray's CPU image: CUDA comes once, from jax[cuda12]'s wheels, not also from a -gpu/-cuXX base.
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>3)(?P<minor>\d+)$")


# ---------------------------------------------------------------- loading


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every YAML document under k8s/."""
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


MANIFESTS = load_manifests()
RAY_MANIFESTS = [(name, doc) for name, doc in MANIFESTS if doc["kind"] in CRD_SCHEMA_FILES]
RAY_JOBS = [(name, doc) for name, doc in RAY_MANIFESTS if doc["kind"] == "RayJob"]
RAY_SERVICES = [(name, doc) for name, doc in RAY_MANIFESTS if doc["kind"] == "RayService"]
CORE_MANIFESTS = [(name, doc) for name, doc in MANIFESTS if doc["kind"] not in CRD_SCHEMA_FILES]


def ids(manifests: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{name}:{doc['kind']}" for name, doc in manifests]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc
    for key in CLUSTER_SPEC_PATH[doc["kind"]]:
        spec = spec[key]
    return spec


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) for the head, each worker group and a RayJob's submitter."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in pod_templates(doc):
        for container in template["spec"].get("containers", []) + template["spec"].get("initContainers", []):
            yield f"{where} container {container['name']}", container


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_ray_version() -> str:
    (ray,) = [Requirement(d) for d in pyproject()["project"]["dependencies"] if Requirement(d).name == "ray"]
    (pin,) = ray.specifier
    assert pin.operator == "==", f"pyproject.toml must pin ray exactly, got {ray}"
    return pin.version


# ---------------------------------------------------------------- KubeRay CRD schemas


def closed(schema: Any) -> Any:
    """The schema with unknown object fields rejected, as `kubectl apply --validate=strict` does.

    CRD schemas leave `additionalProperties` open because the API server prunes unknown fields
    instead of refusing them: a misspelt `enableInTreeAutoScaling` would vanish silently.
    """
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Validator:
    schema = closed(json.loads((CRD_SCHEMAS / CRD_SCHEMA_FILES[kind]).read_text()))
    return jsonschema.Draft7Validator(schema)  # OpenAPI v3 schemas are a subset of draft 7


def crd_errors(doc: dict[str, Any]) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1", f"expected apiVersion ray.io/v1, got {doc['apiVersion']}"
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in crd_validator(doc["kind"]).iter_errors(doc)
    ]


def test_k8s_holds_a_cluster_jobs_a_service_and_the_secret_example():
    assert {doc["kind"] for _, doc in MANIFESTS} >= {"RayCluster", "RayJob", "RayService", "Secret"}


@pytest.mark.parametrize("name, doc", RAY_MANIFESTS, ids=ids(RAY_MANIFESTS))
def test_manifest_matches_kuberay_crd(name, doc):
    assert crd_errors(doc) == []


def raycluster() -> dict[str, Any]:
    (doc,) = [doc for _, doc in RAY_MANIFESTS if doc["kind"] == "RayCluster"]
    return copy.deepcopy(doc)


def set_ray_version_int(doc):
    doc["spec"]["rayVersion"] = 2


def misspell_autoscaling(doc):
    doc["spec"]["enableInTreeAutoScaling"] = doc["spec"].pop("enableInTreeAutoscaling")


def drop_max_replicas(doc):
    del doc["spec"]["workerGroupSpecs"][0]["maxReplicas"]


def drop_head_template(doc):
    del doc["spec"]["headGroupSpec"]["template"]


@pytest.mark.parametrize(
    "break_it, where",
    [
        (set_ray_version_int, "spec.rayVersion"),
        (misspell_autoscaling, "spec"),
        (drop_max_replicas, "spec.workerGroupSpecs.0"),
        (drop_head_template, "spec.headGroupSpec"),
    ],
)
def test_crd_validation_rejects_a_broken_raycluster(break_it, where):
    doc = raycluster()
    break_it(doc)
    errors = crd_errors(doc)
    assert any(error.startswith(f"{where}:") for error in errors), errors


# ---------------------------------------------------------------- core Kubernetes schemas


def core_errors(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except jsonschema.ValidationError as error:
        return f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
    return None


def as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    """A PodTemplate object around a PodTemplateSpec, so the core schema for it applies."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


POD_TEMPLATES = [(f"{name}:{where}", t) for name, doc in RAY_MANIFESTS for where, t in pod_templates(doc)]


@pytest.mark.parametrize("where, template", POD_TEMPLATES, ids=[where for where, _ in POD_TEMPLATES])
def test_pod_template_matches_core_kubernetes_schema(where, template):
    assert core_errors(as_pod_template(template)) is None


def test_core_validation_rejects_a_broken_pod_template():
    template = copy.deepcopy(raycluster()["spec"]["headGroupSpec"]["template"])
    container = template["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # unknown field: would be dropped
    assert "resource" in core_errors(as_pod_template(template))
    del container["name"]
    assert "'name' is a required property" in core_errors(as_pod_template(template))


@pytest.mark.parametrize("name, doc", CORE_MANIFESTS, ids=ids(CORE_MANIFESTS))
def test_other_manifest_matches_core_kubernetes_schema(name, doc):
    assert core_errors(doc) is None


# ---------------------------------------------------------------- entrypoints


def entrypoint_argv(doc: dict[str, Any]) -> tuple[str, list[str]]:
    """`python jobs/x.py --flag value ...` -> ("jobs/x.py", [flags])."""
    python, script, *flags = shlex.split(doc["spec"]["entrypoint"])
    assert python == "python", f"entrypoint must start with python, got {python!r}"
    return script, flags


def test_job_verbs_cover_the_job_entrypoints():
    assert sorted(JOB_VERBS) == sorted(str(p.relative_to(REPO)) for p in (REPO / "jobs").glob("*.py"))


def job_args(name: str, doc: dict[str, Any]):
    """(verb, parsed flags) of a RayJob's entrypoint, parsed by the CLI's own parser."""
    script, flags = entrypoint_argv(doc)
    assert (REPO / script).is_file(), f"{name}: entrypoint names {script}, which is not in the repository"
    verb = JOB_VERBS[script]
    try:
        return verb, build_parser().parse_args([verb, *flags])
    except SystemExit:
        pytest.fail(f"{name}: `raydeeplab {verb} {shlex.join(flags)}` is refused by the CLI")


def job_config(name: str, doc: dict[str, Any]):
    """The RayJob's run configuration: its --config file merged with its flags, as the CLI does
    (relative paths are the image's working directory: the repository root)."""
    verb, args = job_args(name, doc)
    if args.config:
        args.config = str(REPO / args.config)
    return config_from_args(CONFIGS[verb], args)


@pytest.mark.parametrize("name, doc", RAY_JOBS, ids=ids(RAY_JOBS))
def test_rayjob_entrypoint_runs_a_repo_script_with_flags_the_cli_accepts(name, doc):
    verb, args = job_args(name, doc)
    if args.config:
        assert (REPO / args.config).is_file(), f"{name}: --config {args.config} is not in the repository"


# ---------------------------------------------------------------- Ray resources per pod


def cpu_count(quantity: str | int | float) -> float:
    """Kubernetes CPU quantity -> cores; KubeRay rounds it up for `ray start --num-cpus`."""
    text = str(quantity)
    return float(-(-int(text[:-1]) // 1000)) if text.endswith("m") else float(text)


def pod_resources(group: dict[str, Any]) -> dict[str, float]:
    """The CPUs and GPUs `ray start` offers in one pod of a group, as KubeRay sets them:
    rayStartParams num-cpus/num-gpus when given, else the Ray container's limits (else requests)."""
    params = group["rayStartParams"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    amounts = {**resources.get("requests", {}), **resources.get("limits", {})}
    return {
        "CPU": float(params["num-cpus"]) if "num-cpus" in params else cpu_count(amounts.get("cpu", 0)),
        "GPU": float(params.get("num-gpus", amounts.get(GPU, 0))),
    }


@dataclasses.dataclass(frozen=True)
class Demand:
    """``count`` Ray actors or workers of ``cpus`` + ``gpus`` each (one bundle must fit one pod)."""

    what: str
    count: int
    cpus: float
    gpus: float
    warm: int = 0  # how many must run with the groups at minReplicas (Serve's min_replicas)


def fit_errors(spec: dict[str, Any], demand: Demand) -> list[str]:
    """Why ``demand`` would not schedule on the cluster ``spec``, checked per pod, not in total."""
    if demand.gpus <= 0:  # on a GPU pod it would see every GPU with no CUDA_VISIBLE_DEVICES set
        return [f"{demand.what} ask for no GPU: the work runs on GPU pods, unaccounted"]
    errors, capacity, warm = [], 0, 0
    for group in spec["workerGroupSpecs"]:
        pod = pod_resources(group)
        if pod["GPU"] == 0:
            continue
        per_pod = int(pod["GPU"] // demand.gpus)
        where = f"group {group['groupName']} ({pod['GPU']:g} GPU, {pod['CPU']:g} CPU per pod)"
        if per_pod == 0:
            errors.append(f"{demand.what} ask for {demand.gpus:g} GPUs each; {where} has fewer")
            continue
        taken = per_pod * demand.cpus
        if taken > pod["CPU"] * MAX_GPU_WORK_CPU_SHARE:
            errors.append(
                f"{per_pod} x {demand.what} take {taken:g} CPUs of {where}: "
                f"more than {MAX_GPU_WORK_CPU_SHARE:.0%}, too few left for the data pipeline"
            )
            continue
        capacity += per_pod * group["maxReplicas"]
        warm += per_pod * group["minReplicas"]
    if not errors and capacity < demand.count:
        errors.append(f"{demand.count} {demand.what} but the GPU groups hold {capacity} at maxReplicas")
    if not errors and warm < demand.warm:
        errors.append(f"{demand.warm} {demand.what} must stay up but minReplicas hold {warm}")
    return errors


def job_demand(name: str, doc: dict[str, Any]) -> Demand:
    cfg = job_config(name, doc)
    if isinstance(cfg, TrainConfig):  # placed all at once, checked against the nodes present at start
        return Demand("Ray Train workers", cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker, warm=cfg.workers)
    # The GPU group starts empty: the defaults would count no GPU and run one actor on CPU.
    assert cfg.actors and cfg.gpus_per_actor, f"{name}: give actors and gpus_per_actor explicitly"
    return Demand("GPU actors", cfg.actors, cfg.cpus_per_actor, cfg.gpus_per_actor)


@pytest.mark.parametrize("name, doc", RAY_JOBS, ids=ids(RAY_JOBS))
def test_rayjob_workers_fit_one_pod_each_and_leave_cpus_for_the_data_pipeline(name, doc):
    assert fit_errors(cluster_spec(doc), job_demand(name, doc)) == []


def test_training_batch_splits_evenly_over_the_gpus():
    for name, doc in RAY_JOBS:
        cfg = job_config(name, doc)
        if isinstance(cfg, TrainConfig):
            devices = cfg.workers * max(cfg.gpus_per_worker, 1)
            assert cfg.batch_size % devices == 0, f"{name}: batch {cfg.batch_size} over {devices} GPUs"


def test_fit_check_refuses_what_never_schedules():
    """The training config this replaced, and its first fix, on the 1-GPU, 8-CPU pods (0 to 8)."""
    spec = cluster_spec(dict(RAY_JOBS)["rayjob-batch.yaml"])
    assert "has fewer" in fit_errors(spec, Demand("workers", 2, 8, 8))[0]
    assert "data pipeline" in fit_errors(spec, Demand("workers", 8, 8, 1))[0]
    assert "at maxReplicas" in fit_errors(spec, Demand("workers", 9, 2, 1))[0]
    assert "no GPU" in fit_errors(spec, Demand("replicas", 1, 1, 0))[0]
    assert "must stay up" in fit_errors(spec, Demand("replicas", 1, 1, 1, warm=1))[0]


@pytest.mark.parametrize("name, doc", RAY_JOBS, ids=ids(RAY_JOBS))
def test_rayjob_cleans_up_its_cluster_and_sets_its_environment(name, doc):
    spec = doc["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, (
        f"{name}: a finished job must give its GPU cluster back"
    )
    env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), f"Ray wants string env_vars, got {env_vars}"
    assert env_vars["KERAS_BACKEND"] == "jax"


# ---------------------------------------------------------------- versions, image, GPUs


@pytest.mark.parametrize("name, doc", RAY_MANIFESTS, ids=ids(RAY_MANIFESTS))
def test_ray_version_matches_pyproject_image_and_installed_ray(name, doc):
    import ray

    pinned = pinned_ray_version()
    assert cluster_spec(doc)["rayVersion"] == pinned == dockerfile_base()["ray"] == ray.__version__


def images() -> set[str]:
    return {container["image"] for _, doc in RAY_MANIFESTS for _, container in containers(doc)}


def test_every_pod_runs_one_project_image_under_an_immutable_tag():
    """A tag per commit (or a digest): pods never run a stale image cached under a reused tag."""
    (image,) = images()
    if "@" in image:
        repository, digest = image.split("@")
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image
    else:
        repository, tag = image.rsplit(":", 1)
        assert tag == "GIT_SHA" or re.fullmatch(r"[0-9a-f]{7,40}", tag), f"{image}: tag it with the commit"
    assert repository.endswith("/raydeeplab"), image


def tolerates_gpu_taint(toleration: dict[str, Any]) -> bool:
    """True for the `nvidia.com/gpu:NoSchedule` taint GPU node pools carry (any value)."""
    return (
        toleration.get("key") == GPU
        and toleration.get("operator", "Equal") in ("Exists", "Equal")
        and toleration.get("effect") in (None, "NoSchedule")
    )


@pytest.mark.parametrize("name, doc", RAY_MANIFESTS, ids=ids(RAY_MANIFESTS))
def test_gpu_groups_request_what_they_limit_and_tolerate_the_gpu_taint(name, doc):
    spec = cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            resources = container["resources"]
            requested, limited = resources.get("requests", {}).get(GPU), resources.get("limits", {}).get(GPU)
            if requested is None and limited is None:
                continue
            gpu_groups += 1
            where = f"{name} group {group['groupName']}"
            assert requested == limited, f"{where}: {GPU} requests {requested} != limits {limited}"
            assert any(tolerates_gpu_taint(t) for t in pod.get("tolerations", [])), f"{where}: no {GPU} toleration"
            assert pod.get("nodeSelector"), f"{where}: no nodeSelector: it would wait on any node the taint allows"
    assert gpu_groups >= 1, f"{name}: no worker group asks for {GPU}"
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert GPU not in head_limits, f"{name}: the head is CPU only"


@pytest.mark.parametrize("name, doc", RAY_MANIFESTS, ids=ids(RAY_MANIFESTS))
def test_head_serves_dashboard_and_metrics_on_its_declared_ports(name, doc):
    head = cluster_spec(doc)["headGroupSpec"]
    params = head["rayStartParams"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert params["dashboard-host"] == "0.0.0.0"
    assert ports["dashboard"] == 8265 and ports["metrics"] == int(params["metrics-export-port"])


# ---------------------------------------------------------------- locked down: security context, auth


def security_errors(where: str, context: dict[str, Any] | None, mounts: list[dict[str, Any]]) -> list[str]:
    """What a container's securityContext leaves open (the base image's `ray` has passwordless sudo)."""
    context = context or {}
    errors = []
    if context.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{where}: allowPrivilegeEscalation must be false (sudo is one command away)")
    if context.get("capabilities", {}).get("drop") != ["ALL"] or context.get("capabilities", {}).get("add"):
        errors.append(f"{where}: capabilities must drop ALL and add none")
    if context.get("privileged") or context.get("runAsUser") == 0:
        errors.append(f"{where}: privileged or root")
    if context.get("readOnlyRootFilesystem") is not True:
        errors.append(f"{where}: readOnlyRootFilesystem must be true")
    elif "/tmp" not in {m["mountPath"] for m in mounts}:
        errors.append(f"{where}: a read-only root needs a writable /tmp (Ray's session folder)")
    return errors


def pod_errors(where: str, spec: dict[str, Any]) -> list[str]:
    """What a pod spec leaves open: root or an unnamed user, host namespaces, host folders, a
    /tmp that is not the pod's own scratch space."""
    pod = spec.get("securityContext", {})
    errors = []
    if pod.get("runAsNonRoot") is not True or not isinstance(pod.get("runAsUser"), int) or pod["runAsUser"] == 0:
        errors.append(f"{where}: runAsNonRoot must be true with an explicit non-zero runAsUser")
    if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        errors.append(f"{where}: seccompProfile must be RuntimeDefault")
    errors += [f"{where}: {key} shares the node's namespace" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    errors += [f"{where}: volume {name} mounts a node folder (hostPath)" for name, v in volumes.items() if "hostPath" in v]
    for container in spec["containers"] + spec.get("initContainers", []):
        tmp = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        if tmp and "emptyDir" not in volumes.get(tmp[0], {}):
            errors.append(f"{where} {container['name']}: /tmp must be an emptyDir (Ray's session folder, per pod)")
    return errors


@pytest.mark.parametrize("where, template", POD_TEMPLATES, ids=[where for where, _ in POD_TEMPLATES])
def test_every_pod_runs_as_non_root_without_privilege_escalation(where, template):
    spec = template["spec"]
    errors = pod_errors(where, spec)
    for container in spec["containers"] + spec.get("initContainers", []):
        context, mounts = container.get("securityContext"), container.get("volumeMounts", [])
        errors += security_errors(f"{where} {container['name']}", context, mounts)
    assert errors == []


def test_pod_check_finds_root_host_access_and_a_shared_tmp():
    spec = copy.deepcopy(raycluster()["spec"]["headGroupSpec"]["template"]["spec"])
    assert pod_errors("head", spec) == []
    del spec["securityContext"]["runAsUser"]  # the image's user would decide: root for many images
    spec["hostNetwork"] = True
    tmp = next(v for v in spec["volumes"] if v["name"] == "tmp")
    del tmp["emptyDir"]
    tmp["hostPath"] = {"path": "/tmp"}
    errors = pod_errors("head", spec)
    assert len(errors) == 4, errors
    assert "runAsUser" in errors[0] and "hostNetwork" in errors[1] and "hostPath" in errors[2] and "emptyDir" in errors[3]


def test_security_check_finds_what_an_open_container_leaves():
    container = copy.deepcopy(raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert security_errors("head", container["securityContext"], container["volumeMounts"]) == []
    del container["securityContext"]["allowPrivilegeEscalation"]
    container["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/tmp"]
    errors = security_errors("head", container["securityContext"], container["volumeMounts"])
    assert len(errors) == 3, errors
    assert "allowPrivilegeEscalation" in errors[0] and "drop ALL" in errors[1] and "/tmp" in errors[2]


@pytest.mark.parametrize("name, doc", RAY_MANIFESTS, ids=ids(RAY_MANIFESTS))
def test_autoscaler_sidecar_is_locked_down_too(name, doc):
    options = cluster_spec(doc)["autoscalerOptions"]
    assert security_errors(f"{name} autoscaler", options.get("securityContext"), options.get("volumeMounts", [])) == []


@pytest.mark.parametrize("name, doc", RAY_MANIFESTS, ids=ids(RAY_MANIFESTS))
def test_every_cluster_requires_the_ray_auth_token(name, doc):
    """`ray start --head` (what KubeRay runs) has no auth without it: 8265/10001 run anyone's code."""
    assert cluster_spec(doc).get("authOptions", {}).get("mode") == "token", f"{name}: set authOptions.mode: token"


def test_operator_version_is_pinned_and_the_crd_schemas_are_its_own():
    """authOptions needs KubeRay >= 1.6; 1.7.0 also stops the RayJob submitter racing the dashboard."""
    pins = OPERATOR_VERSION.findall((K8S / "README.md").read_text())
    assert pins, "k8s/README.md must install the operator with --version X.Y.Z"
    (version,) = set(pins)
    assert tuple(map(int, version.split("."))) >= (1, 7, 0), version
    assert f"v{version}" in (CRD_SCHEMAS / "SOURCE.md").read_text(), "tests/schemas/kuberay/ is from another release"


@pytest.mark.parametrize("name, doc", RAY_JOBS, ids=ids(RAY_JOBS))
def test_rayjob_gives_up_instead_of_waiting_forever(name, doc):
    spec = doc["spec"]
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"], f"{name}: deadlines"
    assert spec["backoffLimit"] >= 0 and spec["submitterConfig"]["backoffLimit"] >= 1, f"{name}: retries"
    assert "submitterPodTemplate" in spec, f"{name}: KubeRay's default submitter has no security context"


# ---------------------------------------------------------------- credentials


def literal_settings(value: Any) -> Iterator[tuple[str, Any]]:
    """(name, literal value) of every env entry and env_vars item, embedded YAML strings included."""
    if isinstance(value, dict):
        if "name" in value and "value" in value:
            yield value["name"], value["value"]
        for key, item in value.items():
            if key in ("runtimeEnvYAML", "serveConfigV2"):
                item = yaml.safe_load(item)
            if key == "env_vars":
                yield from item.items()
            yield from literal_settings(item)
    elif isinstance(value, list):
        for item in value:
            yield from literal_settings(item)


def secret_names(container: dict[str, Any]) -> set[str]:
    """Secrets a container reads through `envFrom: secretRef` or `env.valueFrom.secretKeyRef`."""
    refs = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
    keys = [e["valueFrom"].get("secretKeyRef") for e in container.get("env", []) if "valueFrom" in e]
    return refs | {key["name"] for key in keys if key}


NOT_EXAMPLES = [(name, doc) for name, doc in MANIFESTS if name != SECRET_EXAMPLE.name]


@pytest.mark.parametrize("name, doc", NOT_EXAMPLES, ids=ids(NOT_EXAMPLES))
def test_manifest_holds_no_literal_credentials(name, doc):
    literal = [key for key, _ in literal_settings(doc) if CREDENTIAL_NAME.search(str(key))]
    assert literal == [], f"{name}: credentials given as literal values: {literal}"
    assert doc["kind"] != "Secret", f"{name}: Secrets are created with kubectl, not committed"


def credential_sources(doc: dict[str, Any]) -> list[str]:
    """Credential-named env vars of every container not taken from a Secret (a ConfigMap or a
    field is readable by anyone who may read the pod or the map)."""
    wrong = []
    for where, container in containers(doc):
        for entry in container.get("env", []):
            if CREDENTIAL_NAME.search(entry["name"]) and "secretKeyRef" not in entry.get("valueFrom", {}):
                wrong.append(f"{where}: {entry['name']}")
        wrong += [f"{where}: envFrom {s['configMapRef']['name']}" for s in container.get("envFrom", []) if "configMapRef" in s]
    return wrong


@pytest.mark.parametrize("name, doc", NOT_EXAMPLES, ids=ids(NOT_EXAMPLES))
def test_credentials_come_only_from_secrets(name, doc):
    assert credential_sources(doc) == []
    text = yaml.safe_dump(doc)
    assert not KEY_SHAPED.findall(text), f"{name}: a literal that looks like a key: {KEY_SHAPED.findall(text)}"


def test_credential_check_finds_a_configmap_and_a_literal_key():
    doc = raycluster()
    container = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"configMapKeyRef": {"name": "s3", "key": "k"}}})
    container["envFrom"].append({"configMapRef": {"name": "settings"}})
    # The manifest's YAML anchors share env lists among its containers: each one reports both.
    assert {found.split(": ", 1)[1] for found in credential_sources(doc)} == {"AWS_SECRET_ACCESS_KEY", "envFrom settings"}
    container["env"].append({"name": "NOTE", "value": "AKIAIOSFODNN7EXAMPLE"})  # AWS's documented example id
    assert KEY_SHAPED.findall(yaml.safe_dump(doc))


@pytest.mark.parametrize("name, doc", RAY_MANIFESTS, ids=ids(RAY_MANIFESTS))
def test_every_ray_pod_reads_the_s3_secret(name, doc):
    (secret,) = yaml.safe_load_all(SECRET_EXAMPLE.read_text())
    # The submitter only talks to the dashboard; head and workers run the code that reads S3.
    read = {where: secret_names(c) for where, c in containers(doc) if not where.startswith("submitter")}
    assert read == {where: {secret["metadata"]["name"]} for where in read}


def test_example_secret_holds_only_placeholders():
    (secret,) = yaml.safe_load_all(SECRET_EXAMPLE.read_text())
    assert secret["kind"] == "Secret" and "data" not in secret
    not_placeholders = {k: v for k, v in secret["stringData"].items() if not PLACEHOLDER.match(v)}
    assert not_placeholders == {}


# ---------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the repository's Dockerfile, as dockerfile-parse reads it
    (continuation lines joined, comments dropped)."""
    from dockerfile_parse import DockerfileParser

    structure = DockerfileParser(path=str(REPO / "Dockerfile")).structure
    return [(item["instruction"], item["value"]) for item in structure if item["instruction"] != "COMMENT"]


def dockerfile_base() -> dict[str, str]:
    froms = [arguments for instruction, arguments in dockerfile() if instruction == "FROM"]
    assert len(froms) == 1, f"expected one build stage, got FROM {froms}"
    match = RAY_IMAGE.match(froms[0])
    assert match, f"FROM must be a rayproject/ray GPU image, got {froms[0]}"
    return match.groupdict()


def test_dockerfile_is_made_of_known_instructions_from_one_base():
    instructions = [instruction for instruction, _ in dockerfile()]
    assert instructions[0] == "FROM", instructions
    assert set(instructions) <= DOCKERFILE_INSTRUCTIONS, set(instructions) - DOCKERFILE_INSTRUCTIONS


def test_dockerfile_runs_as_the_non_root_ray_user_and_bakes_in_no_credentials():
    """rayproject/ray's user is `ray` (uid 1000, the pods' runAsUser); a USER root line would
    leave files root-owned that the read-only-root pods cannot fix."""
    instructions = dockerfile()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users in ([], ["ray"], ["1000"]) or users[-1] in ("ray", "1000"), users
    names = [item.split("=", 1)[0] for i, args in instructions if i in ("ENV", "ARG") for item in shlex.split(args)]
    assert [n for n in names if CREDENTIAL_NAME.search(n)] == [], "credentials are Secrets, never image layers"
    assert not KEY_SHAPED.findall((REPO / "Dockerfile").read_text())


def test_dockerfile_python_is_one_the_project_supports():
    base = dockerfile_base()
    python = f"{base['major']}.{base['minor']}"
    assert python in SpecifierSet(pyproject()["project"]["requires-python"]), python


def run_commands(arguments: str) -> list[list[str]]:
    """A RUN line's shell commands, split on `&&`."""
    commands, current = [], []
    for word in shlex.split(arguments):
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return commands + [current]


def pip_installs() -> list[tuple[int, list[str]]]:
    """(instruction index, argv) of every `pip install` in the Dockerfile."""
    return [
        (index, argv)
        for index, (instruction, arguments) in enumerate(dockerfile())
        if instruction == "RUN"
        for argv in run_commands(arguments)
        if argv[:2] == ["pip", "install"]
    ]


def install_targets(argv: list[str]) -> list[str]:
    """The requirements a `pip install` names itself (not options, files or the project)."""
    targets, skip = [], False
    for word in argv[2:]:
        if skip or word in ("-r", "-c", "--requirement", "--constraint"):
            skip = not skip
        elif not word.startswith("-") and word != ".":
            targets.append(word)
    return targets


def copied(arguments: str) -> list[str]:
    return [a for a in shlex.split(arguments) if not a.startswith("--")]


def test_dockerfile_installs_dependencies_before_copying_the_code():
    """A code edit must reuse the dependency layer instead of reinstalling TensorFlow and CUDA."""
    instructions = dockerfile()
    (code,) = [i for i, (ins, args) in enumerate(instructions) if ins == "COPY" and copied(args)[0] == "."]
    early_copies = [copied(args)[:-1] for ins, args in instructions[:code] if ins == "COPY"]
    assert early_copies == [["pyproject.toml"]], early_copies
    before = [argv for index, argv in pip_installs() if index < code]
    after = [argv for index, argv in pip_installs() if index > code]
    assert any("-r" in argv for argv in before), "dependencies are installed from pyproject.toml first"
    assert after == [["pip", "install", "--no-cache-dir", "--no-deps", "."]], after


def test_dockerfile_pins_jax_with_one_cuda_and_tensorflow_cpu():
    import jax

    pins = {r.name: r for _, argv in pip_installs() for r in map(Requirement, install_targets(argv))}
    assert pins["jax"].extras == {"cuda12"}, "CUDA from jax's wheels, on Ray's CPU base image"
    assert str(pins["jax"].specifier) == f"=={jax.__version__}", "the image runs the JAX the tests run"
    (tensorflow,) = [Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("tensorflow")]
    assert str(pins["tensorflow-cpu"].specifier) == str(tensorflow.specifier), "same TensorFlow, CPU build"
    runs = [argv for ins, args in dockerfile() if ins == "RUN" for argv in run_commands(args)]
    assert ["pip", "uninstall", "-y", "tensorflow"] in runs, "the CUDA build of TensorFlow would claim the GPU"


def test_dockerfile_puts_the_repository_in_the_working_directory_with_the_jax_backend():
    instructions = dockerfile()
    (workdir,) = [args for instruction, args in instructions if instruction == "WORKDIR"]
    copies = [copied(args) for instruction, args in instructions if instruction == "COPY"]
    assert [".", "."] in copies or [".", workdir] in copies, f"the entrypoints' relative paths need the code in {workdir}"
    env = dict(item.split("=", 1) for i, args in instructions if i == "ENV" for item in shlex.split(args))
    assert env["KERAS_BACKEND"] == "jax"


# ---------------------------------------------------------------- RayService


@pytest.mark.parametrize("name, doc", RAY_SERVICES, ids=ids(RAY_SERVICES))
def test_rayservice_serves_the_repository_serve_config(name, doc):
    assert SERVE_CONFIG.is_file(), "configs/serve_config.yaml is missing"
    assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())


@pytest.mark.parametrize("name, doc", RAY_SERVICES, ids=ids(RAY_SERVICES))
def test_rayservice_import_paths_resolve(name, doc):
    for application in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
        module, attribute = application["import_path"].split(":")
        assert hasattr(importlib.import_module(module), attribute), application["import_path"]


def serve_args(doc: dict[str, Any]) -> ServeConfig:
    """The builder arguments of the RayService's one application, validated as Serve will."""
    (application,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "raydeeplab.serve:app_builder", "only a builder takes `args`"
    return ServeConfig.from_dict(application["args"])


def trained_models() -> set[str]:
    """Where the training RayJobs publish their best preset."""
    return {
        storage.join(cfg.output, BEST)
        for name, doc in RAY_JOBS
        if isinstance(cfg := job_config(name, doc), TrainConfig)
    }


@pytest.mark.parametrize("name, doc", RAY_SERVICES, ids=ids(RAY_SERVICES))
def test_rayservice_serves_the_trained_model(name, doc):
    assert serve_args(doc).model.rstrip("/") in trained_models(), "serve what rayjob-train.yaml trains"


@pytest.mark.parametrize("name, doc", RAY_JOBS, ids=ids(RAY_JOBS))
def test_batch_jobs_predict_with_the_trained_model(name, doc):
    cfg = job_config(name, doc)
    if isinstance(cfg, PredictConfig):
        assert cfg.model.rstrip("/") in trained_models(), f"{name}: predict with what rayjob-train.yaml trains"


@pytest.mark.parametrize("name, doc", RAY_SERVICES, ids=ids(RAY_SERVICES))
def test_rayservice_replicas_fit_gpu_pods_and_autoscale_within_the_groups(name, doc):
    args = serve_args(doc)
    scaling = args.autoscaling_config
    assert scaling, f"{name}: a fixed replica count keeps its GPUs idle at night and drops requests at peak"
    warm = scaling.get("min_replicas", 1)
    demand = Demand("Serve replicas", scaling["max_replicas"], args.cpus_per_replica, args.gpus_per_replica, warm)
    assert fit_errors(cluster_spec(doc), demand) == []


@pytest.mark.parametrize("name, doc", RAY_SERVICES, ids=ids(RAY_SERVICES))
def test_rayservice_requires_a_bearer_token_mounted_from_a_secret(name, doc):
    """The token file is read where replicas run: every GPU pod, from a Secret, never a literal."""
    args = serve_args(doc)
    assert args.auth_token_file and not args.auth_token_env, f"{name}: Serve auth must be on"
    folder = str(Path(args.auth_token_file).parent)
    for group in cluster_spec(doc)["workerGroupSpecs"]:
        if pod_resources(group)["GPU"] == 0:
            continue
        spec = group["template"]["spec"]
        secrets = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0].get("volumeMounts", [])}
        assert mounts.get(folder) in secrets, f"{name} group {group['groupName']}: {folder} is not a Secret mount"
