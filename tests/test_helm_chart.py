"""The Helm chart (helm/moerge), rendered offline with Helm's own engine (the Helm v4 Go SDK, through
helm-python-sdk) and checked as a cluster would check it.

Every core resource is validated against the Kubernetes OpenAPI schema (kubernetes-validate, strict:
unknown fields fail). The RayService is a CRD that kubernetes-validate does not know and that no
installed package ships a schema for, so its structure is asserted here, its pod templates are
validated as core PodTemplates, its Serve config with Ray's own schema and its `args.config` with
moerge's ServeConfig.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from sqlalchemy.engine import make_url

CHART = Path(__file__).resolve().parents[1] / "helm" / "moerge"
GPU_EXTERNAL_DB = CHART / "ci" / "gpu-external-db-values.yaml"
KUBE_VERSION = "1.34"
RELEASE, NAMESPACE = "prod", "ml"
FULLNAME = "prod-moerge"  # <release>-<chart>
RAY_CONTAINERS = ("ray-head", "ray-worker")


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def gpu_values() -> dict:
    return yaml.safe_load(GPU_EXTERNAL_DB.read_text())


def render(chart, values: dict | None = None) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(chart, values: dict | None = None) -> list[dict]:
    docs = []
    for path, text in render(chart, values).items():
        if path.endswith(".yaml"):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = of_kind(docs, kind)
    return doc


def ray_pod_templates(rayservice: dict) -> dict[str, dict]:
    """Pod templates by group: "head" and each worker group's name."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        templates[group["groupName"]] = group["template"]
    return templates


def serve_config_v2(rayservice: dict) -> dict:
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "KubeRay takes serveConfigV2 as a YAML string"
    return yaml.safe_load(text)


def env_of(container: dict) -> dict[str, dict]:
    return {var["name"]: var for var in container.get("env", [])}


def hooks(doc: dict) -> set[str]:
    return set(doc["metadata"].get("annotations", {}).get("helm.sh/hook", "").split(",")) - {""}


def hook_weight(doc: dict) -> int:
    return int(doc["metadata"]["annotations"]["helm.sh/hook-weight"])


def secret_value(secret: dict, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def render_error(chart, values: dict) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render(chart, values)
    return str(caught.value)


# --- the chart as Helm sees it ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "gpu-external-db"])
def test_lint_is_clean_in_strict_mode(variant):
    values = gpu_values() if variant != "default" else None
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert problems == []


def test_values_schema_refuses_unknown_keys_and_bad_values(chart):
    assert "additional properties 'enable'" in render_error(chart, {"postgresql": {"enable": False}})
    assert "gpus" in render_error(chart, {"ray": {"gpuWorkers": {"enabled": True, "gpus": 0}}})
    assert "accessModes" in render_error(chart, {"persistence": {"accessModes": ["ReadWriteSometimes"]}})


def test_default_release_renders_the_rayservice_postgres_and_their_plumbing(chart):
    docs = manifests(chart)
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in docs)
    assert kinds == [
        ("Job", f"{FULLNAME}-migrate"),
        ("PersistentVolumeClaim", f"{FULLNAME}-home"),
        ("RayService", FULLNAME),
        ("Secret", f"{FULLNAME}-database"),
        ("Service", f"{FULLNAME}-postgresql"),
        ("StatefulSet", f"{FULLNAME}-postgresql"),
    ]


@pytest.mark.parametrize("variant", ["default", "gpu-external-db"])
def test_core_resources_and_ray_pod_templates_pass_the_kubernetes_schema(chart, variant):
    docs = manifests(chart, gpu_values() if variant != "default" else None)
    checked = 0
    for doc in docs:
        if doc["apiVersion"] == "ray.io/v1":
            for group, template in ray_pod_templates(doc).items():
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{doc['metadata']['name']}-{group}"},
                    "template": template,
                }
                kubernetes_validate.validate(pod_template, KUBE_VERSION, strict=True)
                checked += 1
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            checked += 1
    assert checked >= len(docs)


# --- the RayService -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "gpu-external-db"])
def test_rayservice_runs_one_moerge_serve_application(chart, variant):
    values = gpu_values() if variant != "default" else {}
    rayservice = one(manifests(chart, values), "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["metadata"]["name"] == FULLNAME

    serve = serve_config_v2(rayservice)
    (application,) = serve["applications"]
    assert application["name"] == "moerge"
    assert application["route_prefix"] == "/"
    assert application["import_path"] == "services.serving.app:build_app"
    assert set(application) == {"name", "route_prefix", "import_path", "args"}

    # The whole document is a valid Ray Serve deploy config, by Ray's own schema.
    with warnings.catch_warnings():  # Ray's pydantic models warn about their own Field(...) use
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve)

    # args.config is moerge's serve config, exactly the chart's `serve` values (plus overrides).
    from services.serving.config import ServeConfig

    config = application["args"]["config"]
    parsed = ServeConfig.model_validate(config)
    assert parsed.host == "0.0.0.0"
    assert parsed.gateway.require_keys is True
    defaults = ServeConfig.model_validate(yaml.safe_load((CHART / "values.yaml").read_text())["serve"])
    if variant == "default":
        assert parsed == defaults
    else:
        assert config["engines"]["bases"] == values["serve"]["engines"]["bases"]
        assert parsed.gateway == defaults.gateway

    # The gateway listens where KubeRay's <name>-serve-svc sends traffic: the head's "serve" port.
    assert serve["http_options"] == {"host": "0.0.0.0", "port": parsed.port}
    head = ray_pod_templates(rayservice)["head"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": parsed.port} in head["ports"]


def test_names_fit_kuberay_limits_for_the_longest_release_name(chart):
    release = "r" * 53  # Helm's longest release name
    docs = [
        doc
        for path, text in chart.render(None, name=release, namespace=NAMESPACE).items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    # KubeRay refuses RayService names over 47 characters (its RayCluster gets a 6-character suffix).
    assert len(one(docs, "RayService")["metadata"]["name"]) <= 47
    assert all(len(doc["metadata"]["name"]) <= 63 for doc in docs)


def test_rayservice_cluster_head_and_cpu_group_come_from_values(chart):
    values = {
        "image": {"repository": "registry.example/moerge", "tag": "1.2.3", "pullPolicy": "Always"},
        "ray": {
            "head": {
                "resources": {"limits": {"cpu": "3", "memory": "6Gi"}},
                "rayStartParams": {"num-cpus": 0},
            },
            "cpuWorkers": {"replicas": 2, "minReplicas": 1, "maxReplicas": 5},
        },
    }
    rayservice = one(manifests(chart, values), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == chart.values["ray"]["version"]
    # KubeRay's rayStartParams is a map of strings.
    assert cluster["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    (cpu,) = cluster["workerGroupSpecs"]
    assert cpu["groupName"] == "cpu"
    assert (cpu["minReplicas"], cpu["replicas"], cpu["maxReplicas"]) == (1, 2, 5)
    for template in ray_pod_templates(rayservice).values():
        (container,) = template["spec"]["containers"]
        assert container["image"] == "registry.example/moerge:1.2.3"
        assert container["imagePullPolicy"] == "Always"
    head = ray_pod_templates(rayservice)["head"]["spec"]["containers"][0]
    assert head["resources"]["limits"] == {"cpu": "3", "memory": "6Gi"}


def test_gpu_worker_group_appears_only_when_enabled(chart):
    default = one(manifests(chart), "RayService")
    assert list(ray_pod_templates(default)) == ["head", "cpu"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(default)

    values = gpu_values()
    rayservice = one(manifests(chart, values), "RayService")
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert list(groups) == ["cpu", "gpu"]
    gpu = groups["gpu"]
    assert (gpu["minReplicas"], gpu["replicas"], gpu["maxReplicas"]) == (1, 2, 4)
    pod = gpu["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["cpu"] == "8"  # the group's own resources are kept
    assert container["image"] == "moerge:0.1.0-vllm"  # the group's image; the rest keep the default
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"] == "moerge:0.1.0"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "nvidia.com/gpu" not in yaml.safe_dump(groups["cpu"])
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True

    two = one(manifests(chart, {"ray": {"gpuWorkers": {"enabled": True, "gpus": 2}}}), "RayService")
    container = ray_pod_templates(two)["gpu"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2


@pytest.mark.parametrize("variant", ["default", "gpu-external-db"])
def test_every_ray_pod_gets_the_database_url_and_the_artifact_store(chart, variant):
    values = gpu_values() if variant != "default" else None
    docs = manifests(chart, values)
    rayservice = one(docs, "RayService")
    claim = one(docs, "PersistentVolumeClaim")
    secret = one(docs, "Secret")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    if values:
        assert claim["spec"]["storageClassName"] == "nfs-client"
    else:
        assert "storageClassName" not in claim["spec"]  # the cluster's default class

    for group, template in ray_pod_templates(rayservice).items():
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["moerge-home"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        for container in pod["containers"] + pod.get("initContainers", []):
            env = env_of(container)
            ref = env["MOERGE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "database-url"), group
            assert ("HF_HUB_OFFLINE" in env) == bool(values), group
            if container["name"] in RAY_CONTAINERS:
                mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
                assert env["MOERGE_HOME"]["value"] == mounts["moerge-home"] == "/var/lib/moerge"
                assert mounts["dshm"] == "/dev/shm"
        if values:
            names = [var["name"] for var in pod["containers"][0]["env"]]
            assert names[-2:] == ["HF_HOME", "VLLM_LOGGING_LEVEL"]  # env.extra, after the chart's own


def test_ray_pods_carry_the_ingress_switches_moerge_serve_sets(chart):
    """The serve config's ingress is decided where Ray starts: the chart must put in every Ray
    pod exactly what `moerge serve` puts in a local Ray's environment."""
    from services.serving.ingress import INGRESS_ENV

    for ingress in ("haproxy", "proxy"):
        rayservice = one(manifests(chart, {"serve": {"ingress": ingress}}), "RayService")
        assert serve_config_v2(rayservice)["applications"][0]["args"]["config"]["ingress"] == ingress
        for group, template in ray_pod_templates(rayservice).items():
            for container in template["spec"]["containers"]:
                env = env_of(container)
                ray_serve = {k: v["value"] for k, v in env.items() if k.startswith("RAY_SERVE_")}
                assert ray_serve == INGRESS_ENV[ingress], (ingress, group)


def test_existing_claim_is_mounted_instead_of_a_new_one(chart):
    docs = manifests(chart, {"persistence": {"existingClaim": "shared-models"}})
    assert of_kind(docs, "PersistentVolumeClaim") == []
    for template in ray_pod_templates(one(docs, "RayService")).values():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["moerge-home"]["persistentVolumeClaim"]["claimName"] == "shared-models"


# --- the database -------------------------------------------------------------------------------


def test_bundled_postgres_secret_carries_a_url_with_its_percent_encoded_password(chart):
    password = "p@ss w/rd+%:"
    docs = manifests(chart, {"postgresql": {"auth": {"password": password}}})
    secret = one(docs, "Secret")
    url = make_url(secret_value(secret, "database-url"))
    assert url.drivername == "postgresql+psycopg"  # psycopg 3, moerge's driver
    assert (url.username, url.password) == ("moerge", password)
    assert (url.host, url.port, url.database) == (
        f"{FULLNAME}-postgresql.{NAMESPACE}.svc.cluster.local",
        5432,
        "moerge",
    )
    assert secret_value(secret, "postgres-password") == password

    statefulset = one(docs, "StatefulSet")
    service = one(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless, the StatefulSet's governing Service
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    (postgres,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert postgres["image"] == "postgres:17"
    env = env_of(postgres)
    ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "postgres-password")
    assert (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]) == ("moerge", "moerge")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"


def test_bundled_postgres_password_is_generated_when_not_given(chart):
    secret = one(manifests(chart), "Secret")
    password = secret_value(secret, "postgres-password")
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
    assert make_url(secret_value(secret, "database-url")).password == password


def test_external_database_url_replaces_the_bundled_postgres(chart):
    values = gpu_values()
    docs = manifests(chart, values)
    assert of_kind(docs, "StatefulSet") == []
    assert of_kind(docs, "Service") == []
    secret = one(docs, "Secret")
    assert set(secret["data"]) == {"database-url"}
    assert secret_value(secret, "database-url") == values["database"]["url"]
    assert make_url(secret_value(secret, "database-url")).password == "s3cr@t"


def test_external_database_from_an_existing_secret(chart):
    values = {
        "postgresql": {"enabled": False},
        "database": {"existingSecret": "prod-db", "existingSecretKey": "url"},
    }
    docs = manifests(chart, values)
    assert of_kind(docs, "Secret") == [] and of_kind(docs, "StatefulSet") == []
    job = one(docs, "Job")
    pods = [t["spec"] for t in ray_pod_templates(one(docs, "RayService")).values()] + [job["spec"]["template"]["spec"]]
    for pod in pods:
        for container in pod["containers"]:
            ref = env_of(container)["MOERGE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("prod-db", "url")


def test_database_settings_that_do_not_add_up_fail_with_a_message_that_says_what_to_set(chart):
    message = render_error(chart, {"postgresql": {"enabled": False}})
    assert "postgresql.enabled=false: set database.url" in message and "database.existingSecret" in message

    message = render_error(chart, {"postgresql": {"enabled": False}, "database": {"url": "postgresql://u:p@db/moerge"}})
    assert "database.url must start with postgresql+psycopg://" in message
    assert "u:p" not in message  # the password stays out of the error

    message = render_error(chart, {"database": {"url": "postgresql+psycopg://u:p@db/moerge"}})
    assert "set postgresql.enabled=false" in message

    both = {
        "postgresql": {"enabled": False},
        "database": {"url": "postgresql+psycopg://u@db/m", "existingSecret": "x"},
    }
    assert "not both" in render_error(chart, both)


# --- migrations ---------------------------------------------------------------------------------


def test_migration_job_is_a_hook_that_runs_moerge_db_upgrade(chart):
    bundled = manifests(chart)
    job, secret = one(bundled, "Job"), one(bundled, "Secret")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["moerge", "db", "upgrade"]
    assert container["image"] == "moerge:0.1.0"
    assert pod["restartPolicy"] == "Never"
    # The bundled database only exists once the release is installed: the first migration runs
    # post-install, waiting for PostgreSQL to answer; every upgrade migrates before the new pods.
    assert hooks(job) == {"post-install", "pre-upgrade"}
    (wait,) = pod["initContainers"]
    host = f"{FULLNAME}-postgresql.{NAMESPACE}.svc.cluster.local"
    assert f'until pg_isready -h {host} -p 5432 -U "moerge"; do' in wait["command"][-1]
    # The Secret is a hook too, created before the Job whatever the phase.
    assert hooks(secret) == {"pre-install", "pre-upgrade"}
    assert hook_weight(secret) < hook_weight(job)

    external = one(manifests(chart, gpu_values()), "Job")
    assert hooks(external) == {"pre-install", "pre-upgrade"}
    assert "initContainers" not in external["spec"]["template"]["spec"]

    docs = manifests(chart, {"migrations": {"enabled": False}})
    assert of_kind(docs, "Job") == []


@pytest.mark.slow
def test_the_ray_head_waits_for_the_migrated_schema(chart, tmp_path):
    """The head's init container loops on `moerge db current` until the database is at the head
    revision: run its script here against a SQLite database, before and after `moerge db upgrade`."""
    head = ray_pod_templates(one(manifests(chart), "RayService"))["head"]["spec"]
    (wait,) = head["initContainers"]
    assert wait["image"] == head["containers"][0]["image"]
    script = wait["command"]
    assert script[:2] == ["sh", "-c"]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MOERGE_HOME": str(tmp_path),
        "MOERGE_DATABASE_URL": f"sqlite:///{tmp_path / 'moerge.db'}",
    }

    waiting = subprocess.Popen(script, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert "waiting for the database schema" in waiting.stdout.readline()
    finally:
        os.killpg(waiting.pid, signal.SIGTERM)
        waiting.wait(timeout=30)

    subprocess.run([sys.executable, "-m", "services.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run(script, env=env, check=True, timeout=120, capture_output=True)

    assert "waitInHead" in chart.values["migrations"]
    no_wait = ray_pod_templates(one(manifests(chart, {"migrations": {"waitInHead": False}}), "RayService"))
    assert "initContainers" not in no_wait["head"]["spec"]


# --- notes --------------------------------------------------------------------------------------


def test_notes_say_how_to_reach_the_gateway_and_make_an_admin_key_with_the_real_cli(chart):
    notes = render(chart)["moerge/templates/NOTES.txt"]
    assert f"svc/{FULLNAME}-serve-svc 8000:8000" in notes
    assert f"kubectl -n {NAMESPACE} get rayservice {FULLNAME}" in notes
    command = re.search(r"moerge keys create .+", notes).group(0)
    assert command == "moerge keys create admin --scope admin"
    # The CLI parses these exact arguments (an unknown option would exit 2 before --help runs).
    args = command.split()[1:] + ["--help"]
    done = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "--scope" in done.stdout

    open_gateway = render(chart, {"serve": {"gateway": {"require_keys": False}}})["moerge/templates/NOTES.txt"]
    assert "moerge keys create" not in open_gateway
    assert "without an API key" in open_gateway
