"""Offline checks of the Kubernetes deployment in k8s/.

Every variant is rendered with the pinned kustomize (k8s/tools.sh) and validated against the
Kubernetes schemas (kubernetes-validate, strict) and KubeRay's RayService CRD; its
serveConfigV2 must import the real app builder, pass ServeConfig, and fit the GPUs and CPUs
of the worker group. The Dockerfile is linted with hadolint. No cluster, no Docker engine.
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.resources import files
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# In CI, shared/ sits beside the repository clone (here: /work/shared).
RAYSERVICE_CRD = REPO.parent / "shared" / "k8s-schemas" / "ray.io_rayservices.yaml"
# The oldest Kubernetes we support and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.30", "1.37")
VARIANTS = ("qwen3-vl-8b/pvc", "qwen3-vl-8b/download", "gemma3-12b/pvc", "gemma3-12b/download")
FAMILY = {"qwen3-vl-8b": "qwen3-vl", "gemma3-12b": "gemma3"}
GATED = {"qwen3-vl-8b": False, "gemma3-12b": True}
IMAGE = "ghcr.io/popserve/popserve"
STAGES = ("ingress", "encoder", "prefill", "decode")


# ---- rendering ----------------------------------------------------------------------------
def run_tool(*args: str) -> subprocess.CompletedProcess:
    # tools.sh installs its pinned tools into this interpreter's environment when missing.
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(K8S / "tools.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


@functools.cache
def _render(path: str) -> str:
    proc = run_tool("render", path)
    if proc.returncode != 0:
        raise AssertionError(f"kustomize failed for {path}:\n{proc.stderr}")
    return proc.stdout


def render(path: Path | str) -> list[dict]:
    """Fresh objects on every call, so a test may mutate them."""
    return [d for d in yaml.safe_load_all(_render(str(path))) if d]


def variant_docs(variant: str) -> list[dict]:
    return render(K8S / "overlays" / variant)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ---- schema validation --------------------------------------------------------------------
def _structural(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as plain JSON schema, applied the way the API server does."""
    if schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for sub in schema.get("properties", {}).values():
        _structural(sub)
    if isinstance(schema.get("additionalProperties"), dict):
        _structural(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        _structural(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            _structural(sub)
    # Unknown fields are refused by kubectl's strict field validation (the default since
    # 1.27) and silently pruned by the API server: either way a typo is a bug.
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


def _unique_map_keys(validator, keys, instance, schema):
    # x-kubernetes-list-type: map lists (containers, volumes, env, ...) need unique keys.
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(item.get(k) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for {dict(zip(keys, key))}")
            seen.add(key)


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_map_keys})


@functools.cache
def rayservice_validator() -> jsonschema.protocols.Validator:
    assert RAYSERVICE_CRD.is_file(), f"RayService CRD schema missing: {RAYSERVICE_CRD}"
    # 18,000 lines of YAML: the C loader, where PyYAML has it, takes seconds instead of ten.
    crd = yaml.load(RAYSERVICE_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "ray.io"
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _structural(copy.deepcopy(v1["schema"]["openAPIV3Schema"]))
    CRDValidator.check_schema(schema)
    return CRDValidator(schema)


@functools.cache
def core_validator(name: str, version: str) -> jsonschema.protocols.Validator:
    """A strict validator for one core type that kubernetes-validate ships, by file name."""
    root = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    schema = json.loads((root / f"{name}.json").read_text())
    defs = json.loads((root / "_definitions.json").read_text())
    registry = Registry().with_resources(
        [(s["$id"], Resource.from_contents(s)) for s in (schema, defs)])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def pod_templates(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]]


def validate(doc: dict, version: str) -> None:
    """Raise jsonschema.ValidationError when a rendered object is invalid."""
    api_group = doc["apiVersion"].split("/")[0]
    if doc["apiVersion"] == "ray.io/v1":
        rayservice_validator().validate(doc)
        core_validator("objectmeta-meta-v1", version).validate(doc["metadata"])
        # The CRD embeds pod templates; check them against core PodTemplateSpec too.
        for template in pod_templates(doc):
            core_validator("podtemplatespec-v1", version).validate(template)
    elif api_group == "monitoring.coreos.com":
        # No schema for Prometheus Operator kinds here: check the core parts they embed.
        core_validator("objectmeta-meta-v1", version).validate(doc["metadata"])
        core_validator("labelselector-meta-v1", version).validate(doc["spec"]["selector"])
    else:
        kubernetes_validate.validate(doc, version, strict=True)


# ---- serve config and capacity ------------------------------------------------------------
def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def app_args(rayservice: dict):
    from popserve.service.config import ServeConfig

    [app] = serve_config(rayservice)["applications"]
    return ServeConfig.model_validate(app["args"])


@functools.cache
def _build(import_path: str, args_json: str, name: str) -> tuple[dict, ...]:
    # Ray Serve internals, the steps its controller runs for a serveConfigV2 application:
    # call the builder with args, then build the deployment graph.
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    module, _, attr = import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    built = build_app(call_user_app_builder_with_args_if_necessary(builder, json.loads(args_json)),
                      name=name)
    built.validate_single_fastapi_ingress()
    deployments = []
    for d in built.deployments:
        auto = d._deployment_config.autoscaling_config
        deployments.append({
            "name": d.name,
            "num_gpus": float(d.ray_actor_options.get("num_gpus") or 0),
            "num_cpus": float(d.ray_actor_options.get("num_cpus", 1)),
            "min": auto.min_replicas if auto else d.num_replicas,
            "max": auto.max_replicas if auto else d.num_replicas,
        })
    return tuple(deployments)


def built_deployments(rayservice: dict) -> list[dict]:
    """The Serve deployments the real popserve builder makes from this serveConfigV2."""
    [app] = serve_config(rayservice)["applications"]
    return list(_build(app["import_path"], json.dumps(app["args"], sort_keys=True), app["name"]))


def quantity(value) -> float:
    """Kubernetes CPU / count quantity ("8", "500m", 2) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def bytes_of(value) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(value))
    assert match, f"unsupported quantity {value!r}"
    return int(match[1]) * units.get(match[2], 1)


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def check_fit(rayservice: dict) -> None:
    """Every deployment's replicas (at max) fit the GPUs and CPUs of the worker group at
    maxReplicas, and the min replicas fit the pods that run before any autoscaling."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    # The head offers Ray no CPU and no GPU, so a replica that asks for either avoids it.
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0" and head.get("num-gpus") == "0"
    [group] = cluster["workerGroupSpecs"]
    limits = ray_container(group["template"])["resources"]["limits"]
    pod_gpus = quantity(limits.get("nvidia.com/gpu", 0))
    pod_cpus = quantity(group["rayStartParams"].get("num-cpus", limits["cpu"]))
    assert quantity(group["rayStartParams"].get("num-gpus", pod_gpus)) == pod_gpus

    deployments = built_deployments(rayservice)
    for d in deployments:
        assert d["num_cpus"] > 0 or d["num_gpus"] > 0, f"{d['name']} could land on the head"
        # A replica must fit on one pod, and a fraction of a GPU on one GPU.
        assert d["num_gpus"] <= pod_gpus, f"{d['name']}: num_gpus {d['num_gpus']} > {pod_gpus}"
        assert d["num_gpus"] <= 1 or d["num_gpus"].is_integer(), d["name"]
        assert d["num_cpus"] <= pod_cpus, f"{d['name']}: num_cpus {d['num_cpus']} > {pod_cpus}"
    for count, pods in (("max", group["maxReplicas"]), ("min", group["minReplicas"])):
        # Ray accounts resources in units of 1e-4.
        gpus = round(sum(d[count] * d["num_gpus"] for d in deployments), 4)
        cpus = round(sum(d[count] * d["num_cpus"] for d in deployments), 4)
        assert gpus <= pod_gpus * pods, f"{count} replicas need {gpus} GPUs, {pods} pods have {pod_gpus * pods}"
        assert cpus <= pod_cpus * pods, f"{count} replicas need {cpus} CPUs, {pods} pods have {pod_cpus * pods}"


# ---- the variants -------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_validates(variant, version):
    docs = variant_docs(variant)
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap", "PodDisruptionBudget", "PodDisruptionBudget", "RayService", "Service"]
    for doc in docs:
        validate(doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", ["base", "monitoring", "weights"])
def test_other_manifests_validate(path, version):
    if path == "weights":  # plain files applied with kubectl apply -f
        docs = [d for f in sorted((K8S / path).glob("*.yaml"))
                for d in yaml.safe_load_all(f.read_text()) if d]
        assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "Job"}
    else:
        docs = render(K8S / path)
    assert docs
    for doc in docs:
        validate(doc, version)


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_config_imports_the_builder_and_validates(variant):
    from ray.serve.schema import ServeDeploySchema

    from popserve.service.app import build_app

    rayservice = one(variant_docs(variant), "RayService")
    config = serve_config(rayservice)
    ServeDeploySchema.model_validate(config)  # what the Serve REST API accepts
    [app] = config["applications"]
    assert app["route_prefix"] == "/"
    module_name, _, attr = app["import_path"].partition(":")
    assert getattr(importlib.import_module(module_name), attr) is build_app

    args = app_args(rayservice)
    model = variant.split("/")[0]
    # Explicit, so building the app on the head (no GPU, no weights) decides nothing.
    assert args.family == FAMILY[model]
    assert args.device == "cuda" and args.dtype == "bfloat16" and args.served_model_name
    assert args.limits.max_prompt_tokens + args.limits.max_tokens_limit <= args.engine.max_seq_len
    for name in STAGES:
        assert getattr(args, name).autoscaling, f"{name} has no autoscaling"
    # The four stages and nothing more (no unpruned A/B prefill on the GPUs).
    assert sorted(d["name"] for d in built_deployments(rayservice)) == [
        "Decode", "Ingress", "Prefill", "VisionEncoder"]
    # Serve's proxy port is the container port the Services and probes use.
    assert config["http_options"]["port"] == 8000
    for template in pod_templates(rayservice):
        assert {"name": "serve", "containerPort": 8000} in ray_container(template)["ports"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_replicas_fit_the_gpu_worker_group(variant):
    check_fit(one(variant_docs(variant), "RayService"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_cluster_shape(variant):
    rayservice = one(variant_docs(variant), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_container = ray_container(head["template"])
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    # Head probes are left to KubeRay (Serve health must not gate the head; see README).
    assert "readinessProbe" not in head_container and "livenessProbe" not in head_container
    assert cluster["enableInTreeAutoscaling"] is True

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    [group] = cluster["workerGroupSpecs"]
    for template in pod_templates(rayservice):
        spec = template["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["image"] == f"{IMAGE}:{version}"
        container = ray_container(template)
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], "requests must equal limits"
        assert spec["securityContext"]["runAsNonRoot"] is True
        # Ray's object store lives in a memory-backed /dev/shm larger than the store.
        shm = next(v for v in spec["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        params = (head if template is head["template"] else group)["rayStartParams"]
        store = int(params["object-store-memory"])
        assert store < bytes_of(shm["emptyDir"]["sizeLimit"]) <= bytes_of(resources["limits"]["memory"])
        assert template["metadata"]["annotations"]["prometheus.io/port"] == params["metrics-export-port"]

    spec = group["template"]["spec"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert quantity(ray_container(group["template"])["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    probe = " ".join(ray_container(group["template"])["readinessProbe"]["exec"]["command"])
    for url in ("localhost:52365/api/local_raylet_healthz", "localhost:8000/-/healthz"):
        assert url in probe
    # Not the app's /health: the whole app's state, not the pod's; an outage would fail every pod at once.
    assert "8000/health" not in probe


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_mount(variant):
    model, weights = variant.split("/")
    docs = variant_docs(variant)
    rayservice = one(docs, "RayService")
    model_env = one(docs, "ConfigMap", "popserve-model")["data"]
    assert app_args(rayservice).model == model_env["MODEL_DIR"]
    assert model_env["MODEL_DIR"].startswith("/models/")

    cluster = rayservice["spec"]["rayClusterConfig"]
    [group] = cluster["workerGroupSpecs"]
    spec = group["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "models")
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in \
        ray_container(group["template"])["volumeMounts"]
    # The head builds the app from explicit args and needs no weights.
    assert all(v["name"] != "models" for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"])
    if weights == "pvc":
        assert volume["persistentVolumeClaim"] == {"claimName": "popserve-models", "readOnly": True}
        assert "initContainers" not in spec
        pvc = yaml.safe_load((K8S / "weights" / "pvc.yaml").read_text())
        assert pvc["metadata"]["name"] == "popserve-models"
        job = yaml.safe_load((K8S / "weights" / f"fetch-{model}.yaml").read_text())
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MODEL_DIR"]["value"] == model_env["MODEL_DIR"]
        assert env["HF_MODEL_ID"]["value"] == model_env["HF_MODEL_ID"]
    else:
        assert "emptyDir" in volume
        [init] = spec["initContainers"]
        assert init["envFrom"] == [{"configMapRef": {"name": "popserve-model"}}]
        assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
        token = next(e for e in init["env"] if e["name"] == "HF_TOKEN")["valueFrom"]["secretKeyRef"]
        assert token["name"] == "hf-token" and token["key"] == "token"
        assert token["optional"] is not GATED[model], "a gated model must require the token"
        assert "hf download" in " ".join(init["command"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_pdbs_and_monitors_select_the_pods(variant):
    docs = variant_docs(variant)
    rayservice = one(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]
    [worker] = [g["template"] for g in cluster["workerGroupSpecs"]]
    # KubeRay adds ray.io/serve=true to worker pods whose Serve proxy may take traffic.
    worker_labels = {**worker["metadata"]["labels"], "ray.io/serve": "true"}

    def selects(selector: dict, labels: dict) -> bool:
        return selector.items() <= labels.items()

    service = one(docs, "Service", "popserve-openai")
    assert selects(service["spec"]["selector"], worker_labels)
    assert not selects(service["spec"]["selector"], head["metadata"]["labels"])
    ports = {p["name"] for p in ray_container(worker)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports

    pdbs = {p["metadata"]["name"]: p["spec"]["selector"]["matchLabels"]
            for p in docs if p["kind"] == "PodDisruptionBudget"}
    assert selects(pdbs["popserve-gpu-workers"], worker["metadata"]["labels"])
    assert selects(pdbs["popserve-head"], head["metadata"]["labels"])
    assert not selects(pdbs["popserve-gpu-workers"], head["metadata"]["labels"])

    monitors = {d["kind"]: d for d in render(K8S / "monitoring")}
    # Every metric, popserve's included, is on Ray's port 8080 of every pod: one PodMonitor
    # scrapes it. A ServiceMonitor on /metrics as well would count the same samples twice.
    assert set(monitors) == {"PodMonitor"}
    pod_selector = monitors["PodMonitor"]["spec"]["selector"]
    for template in (head, worker):
        labels = template["metadata"]["labels"]
        assert selects(pod_selector["matchLabels"], labels)
        for expr in pod_selector["matchExpressions"]:
            assert expr["operator"] == "In" and labels[expr["key"]] in expr["values"]
        assert "metrics" in {p["name"] for p in ray_container(template)["ports"]}


# ---- the image ----------------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    proc = run_tool("lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_what_it_installs():
    dockerfile = (K8S / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-cu\d+", base)
    assert re.findall(r"^USER\s+(\S+)", dockerfile, re.M)[-1] == "1000:100"  # not root
    assert "COPY --chown=1000:100 . ." in dockerfile and "-c /tmp/constraints-gpu.txt ." in dockerfile

    pins = {}
    for line in (K8S / "constraints-gpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            [spec] = req.specifier
            assert spec.operator == "==", f"{line}: not pinned"
            pins[req.name.lower().replace("_", "-")] = spec.version
    # The pins must satisfy the project's own ranges.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in map(Requirement, project["dependencies"]):
        name = dep.name.lower().replace("_", "-")
        assert name in pins, f"{dep.name} is not pinned in k8s/constraints-gpu.txt"
        assert dep.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {dep.specifier}"
    # The explicit pins in the Dockerfile agree with the constraints.
    for name, version in re.findall(r"\b([a-z][a-z0-9_-]*)==([0-9][^\s\"]*)", dockerfile):
        assert pins.get(name.lower().replace("_", "-")) == version, f"{name}=={version}"
    assert pins["ray"] in base


# ---- the checks themselves catch broken manifests -----------------------------------------
def broken_rayservice(change) -> dict:
    rayservice = one(variant_docs("qwen3-vl-8b/download"), "RayService")
    change(rayservice)
    return rayservice


def _worker(rs):
    return rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


@pytest.mark.parametrize("change", [
    # a misspelt field
    lambda rs: _worker(rs).update(maxReplica=4),
    # rayStartParams values must be strings
    lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
    # not a quantity
    lambda rs: ray_container(_worker(rs)["template"])["resources"]["limits"].update({"nvidia.com/gpu": "one"}),
    # two volumes with one name
    lambda rs: _worker(rs)["template"]["spec"]["volumes"].append({"name": "shm", "emptyDir": {}}),
    # required field missing
    lambda rs: _worker(rs).pop("groupName"),
], ids=["typo", "int-param", "bad-quantity", "duplicate-volume", "missing-groupName"])
def test_crd_validation_rejects_a_broken_rayservice(change):
    rayservice = broken_rayservice(change)
    with pytest.raises(jsonschema.ValidationError):
        validate(rayservice, K8S_VERSIONS[0])


def test_core_validation_rejects_a_broken_pod_template_and_service():
    # The pod templates inside the RayService are also checked as core PodTemplateSpecs.
    rayservice = broken_rayservice(
        lambda rs: ray_container(_worker(rs)["template"])["readinessProbe"].update(periodSecond=5))
    with pytest.raises(jsonschema.ValidationError, match="periodSecond"):
        core_validator("podtemplatespec-v1", K8S_VERSIONS[0]).validate(_worker(rayservice)["template"])
    service = one(variant_docs("gemma3-12b/pvc"), "Service")
    service["spec"]["ports"][0]["port"] = "http"
    with pytest.raises(jsonschema.ValidationError):
        validate(service, K8S_VERSIONS[0])


def set_args(**changes):
    """A change for broken_rayservice that edits the application's args."""
    def change(rs):
        config = serve_config(rs)
        args = config["applications"][0]["args"]
        for key, value in changes.items():
            *parents, leaf = key.split("__")
            target = args
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value
        rs["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return change


def test_fit_check_rejects_what_would_not_schedule():
    with pytest.raises(AssertionError, match="GPUs"):
        check_fit(broken_rayservice(set_args(decode__num_gpus=0.6)))
    with pytest.raises(AssertionError, match="CPUs"):
        check_fit(broken_rayservice(set_args(ingress__autoscaling__max_replicas=40)))
    # The A/B full-prefill deployment takes the prefill stage's resources: turning it on without
    # room for it on the GPU workers must not pass.
    with pytest.raises(AssertionError, match="GPUs"):
        check_fit(broken_rayservice(set_args(pop_off_prefill=True)))
    # A replica bigger than a pod.
    with pytest.raises(AssertionError, match="num_cpus"):
        check_fit(broken_rayservice(
            lambda rs: ray_container(_worker(rs)["template"])["resources"]["limits"].update(cpu="500m")))


def test_serve_config_validation_rejects_unknown_args():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="num_gpu"):
        app_args(broken_rayservice(set_args(prefill__num_gpu=0.4)))


def test_render_and_lint_fail_on_broken_input(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    assert run_tool("render", str(tmp_path)).returncode != 0
    (tmp_path / "Dockerfile").write_text("FROM python\nRUN pip install flask\n")
    proc = run_tool("lint", str(tmp_path / "Dockerfile"))
    assert proc.returncode != 0 and "DL3013" in proc.stdout
