"""KubeRay manifests (k8s/), the container image (Dockerfile) and their pins, checked offline.

What a user would otherwise find out from `kubectl apply` or a failed pod: a manifest the API
server rejects or silently prunes, a pod spec Kubernetes refuses, an entrypoint that names a
missing file or a flag the CLI does not know, a Ray version that differs between the image and
the cluster, a GPU pod that never schedules, a credential committed to the repository.
"""

from __future__ import annotations

import copy
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

from raydeeplab.cli import build_parser

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
# (count flag, GPUs-each flag) of the verbs whose flags size the job's GPU demand.
GPU_DEMAND_FLAGS = {"predict": ("actors", "gpus_per_actor"), "train": ("workers", "gpus_per_worker")}
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|SESSION_KEY|CREDENTIAL", re.IGNORECASE)
PLACEHOLDER = re.compile(r"^<[^<>]+>$")
DOCKERFILE_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>3)(?P<minor>\d+)-(?:gpu|cu\d+)$")


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


@pytest.mark.parametrize("name, doc", RAY_JOBS, ids=ids(RAY_JOBS))
def test_rayjob_entrypoint_runs_a_repo_script_with_flags_the_cli_accepts(name, doc, capsys):
    script, flags = entrypoint_argv(doc)
    assert (REPO / script).is_file(), f"{name}: entrypoint names {script}, which is not in the repository"
    verb = JOB_VERBS[script]
    try:
        args = build_parser().parse_args([verb, *flags])
    except SystemExit:
        error = capsys.readouterr().err.strip().splitlines()[-1]  # "raydeeplab: error: ..."
        pytest.fail(f"{name}: `raydeeplab {verb} {shlex.join(flags)}` -> {error}")
    if args.config:
        assert (REPO / args.config).is_file(), f"{name}: --config {args.config} is not in the repository"
    if verb in GPU_DEMAND_FLAGS:
        count, each = (getattr(args, flag) for flag in GPU_DEMAND_FLAGS[verb])
        if count and each:
            capacity = gpu_capacity(cluster_spec(doc))
            assert count * each <= capacity, f"{name}: asks for {count * each} GPUs, the cluster has {capacity}"


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


def test_every_pod_runs_the_project_image_tagged_with_the_project_version():
    (image,) = images()
    repository, tag = image.rsplit(":", 1)
    assert repository.endswith("/raydeeplab") and tag == pyproject()["project"]["version"], image


def gpu_capacity(spec: dict[str, Any]) -> float:
    """GPUs of the cluster at its largest: maxReplicas x GPUs per pod, over the worker groups."""
    total = 0.0
    for group in spec.get("workerGroupSpecs", []):
        limits = [c["resources"].get("limits", {}) for c in group["template"]["spec"]["containers"]]
        per_pod = sum(float(limit.get(GPU, 0)) for limit in limits)
        total += group["maxReplicas"] * per_pod
    return total


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
    assert spec["enableInTreeAutoscaling"] is True
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


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction; continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker also drops comment and blank lines inside a continuation
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() not in DOCKERFILE_INSTRUCTIONS:
            raise ValueError(f"Dockerfile line {number}: unknown instruction {keyword!r}")
        instructions.append((keyword.upper(), arguments.strip()))
    if pending:
        raise ValueError("Dockerfile ends inside a line continuation")
    if not instructions or instructions[0][0] != "FROM":
        raise ValueError(f"Dockerfile must start with FROM, got {instructions[:1]}")
    return instructions


def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def dockerfile_base() -> dict[str, str]:
    froms = [arguments for instruction, arguments in dockerfile() if instruction == "FROM"]
    assert len(froms) == 1, f"expected one build stage, got FROM {froms}"
    match = RAY_IMAGE.match(froms[0])
    assert match, f"FROM must be a rayproject/ray GPU image, got {froms[0]}"
    return match.groupdict()


def test_dockerfile_parser_rejects_what_docker_would():
    with pytest.raises(ValueError, match="unknown instruction 'FORM'"):
        parse_dockerfile("FORM rayproject/ray:2.60.0-py311-gpu\n")
    with pytest.raises(ValueError, match="must start with FROM"):
        parse_dockerfile("RUN true\nFROM scratch\n")
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM scratch\nRUN true \\\n")


def test_dockerfile_python_is_one_the_project_supports():
    base = dockerfile_base()
    python = f"{base['major']}.{base['minor']}"
    assert python in SpecifierSet(pyproject()["project"]["requires-python"]), python


def test_dockerfile_installs_the_project_with_its_cuda_extra():
    runs = [shlex.split(args) for instruction, args in dockerfile() if instruction == "RUN"]
    installs = [argv for argv in runs if argv[:2] == ["pip", "install"]]
    assert len(installs) == 1, installs
    argv = installs[0]
    targets = [a for a in argv[argv.index("install") + 1 :] if not a.startswith("-")]
    assert targets == [".[cuda]"], targets
    assert "cuda" in pyproject()["project"]["optional-dependencies"]
    assert any(Requirement(r).name == "jax" for r in pyproject()["project"]["optional-dependencies"]["cuda"])


def test_dockerfile_puts_the_repository_in_the_working_directory_with_the_jax_backend():
    instructions = dockerfile()
    (workdir,) = [args for instruction, args in instructions if instruction == "WORKDIR"]
    copies = [[a for a in shlex.split(args) if not a.startswith("--")] for i, args in instructions if i == "COPY"]
    assert [".", workdir] in copies, f"the entrypoints' relative paths need `COPY . {workdir}`, got {copies}"
    env = dict(item.split("=", 1) for i, args in instructions if i == "ENV" for item in shlex.split(args))
    assert env["KERAS_BACKEND"] == "jax"


# ---------------------------------------------------------------- RayService


@pytest.mark.parametrize("name, doc", RAY_SERVICES, ids=ids(RAY_SERVICES))
def test_rayservice_serves_the_repository_serve_config(name, doc):
    assert SERVE_CONFIG.is_file(), "configs/serve_config.yaml (`serve build raydeeplab.serve:app`) is missing"
    assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())


@pytest.mark.parametrize("name, doc", RAY_SERVICES, ids=ids(RAY_SERVICES))
def test_rayservice_import_paths_resolve(name, doc):
    for application in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
        module, attribute = application["import_path"].split(":")
        assert hasattr(importlib.import_module(module), attribute), application["import_path"]
