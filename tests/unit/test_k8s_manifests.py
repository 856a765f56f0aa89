"""The scaled-out platform's Kubernetes manifests (infra/k8s/), validated offline.

Core kinds are checked against the Kubernetes API's schemas, custom resources against the
pinned operators' own CRDs (Strimzi, Spark operator, KubeRay; fetched once into
var/k8s-crds), Airflow chart values against Airflow's config, and the LAMBDALAKE_* values
a Serve config the way lambdalake reads them, and the security policy (one test per rule,
each on a copy of the shipped files broken in that one way). Every check is shown to
fail on a broken copy, so a green run means the shipped files pass, not that nothing ran.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.k8s import (
    MANIFESTS_DIR,
    SIGNING_KEY_SECRET,
    VERIFY_KEY_SECRET,
    airflow_values_problems,
    check_document,
    check_manifests,
    crd_schemas,
    ensure_crds,
    load_manifests,
    policy_problems,
    serve_config_problems,
    settings_problems,
)
from lakehouse.config import load_settings
from lakehouse.serve import ray_local_env
from speed.model_service import ServiceArgs

REPO = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO / "var" / "k8s-crds"


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    return crd_schemas(ensure_crds(CRDS_DIR))


@pytest.fixture(scope="module")
def shipped() -> dict[str, dict[str, Any]]:
    """The shipped objects by kind (the first of each kind)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(MANIFESTS_DIR.glob("*.yaml")):
        if not path.name.endswith("-values.yaml"):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    objects.setdefault(doc["kind"], doc)
    return objects


def test_the_shipped_manifests_are_valid_and_cover_the_scaled_out_platform(shipped) -> None:
    assert check_manifests(MANIFESTS_DIR, crds_dir=CRDS_DIR) == []
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "SparkApplication", "RayCluster",
            "Deployment", "Service", "ConfigMap", "NetworkPolicy"} <= set(shipped)
    assert (MANIFESTS_DIR / "airflow-values.yaml").is_file()


def test_the_operators_crds_are_the_pinned_releases(crds) -> None:
    for key in [("kafka.strimzi.io/v1", "Kafka"), ("kafka.strimzi.io/v1", "KafkaNodePool"),
                ("kafka.strimzi.io/v1", "KafkaTopic"), ("kafka.strimzi.io/v1", "KafkaUser"),
                ("ray.io/v1", "RayService"), ("ray.io/v1", "RayCluster"),
                ("sparkoperator.k8s.io/v1beta2", "SparkApplication")]:
        assert key in crds


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value
    return mutate


@pytest.mark.parametrize(("kind", "mutate", "where", "says"), [
    ("Kafka", _set("spec.kafka.listners", []), "spec.kafka", "'listners' was unexpected"),
    ("Kafka", _set("spec.kafka.listeners.0.port", "9092"), "spec.kafka.listeners[0].port",
     "is not of type 'integer'"),
    ("KafkaNodePool", _set("spec.roles", ["leader"]), "spec.roles[0]", "is not one of"),
    ("KafkaTopic", _set("spec.partitions", "twelve"), "spec.partitions", "not of type"),
    ("SparkApplication", _set("spec.mode", "sideways"), "spec.mode", "is not one of"),
    ("SparkApplication", _set("spec.driver.memroy", "4g"), "spec.driver", "'memroy' was unexpected"),
    ("RayCluster", _set("spec.headGroupSpec.replicas", 2),
     "spec.headGroupSpec", "'replicas' was unexpected"),
    ("RayCluster", _set("spec.authOptions.mode", "password"), "spec.authOptions.mode", "is not one of"),
    ("Deployment", _set("spec.template.spec.containers.0.imagee", "x"),
     "spec.template.spec.containers[0]", "'imagee' was unexpected"),
    ("Deployment", _set("spec.replicas", "3"), "spec.replicas", "is not of type"),
    ("Service", _set("spec.ports.0.port", "http"), "spec.ports[0].port", "is not of type"),
    ("ConfigMap", _set("dta", {}), "", "'dta' was unexpected"),
    ("KafkaTopic", _set("metadata.name", "Events_DLQ"), "metadata.name", "DNS-1123"),
])
def test_each_kind_is_checked_against_its_own_schema(crds, shipped, kind, mutate, where, says) -> None:
    doc = copy.deepcopy(shipped[kind])
    mutate(doc)
    problems = check_document(doc, crds)
    assert any(path == where and says in message for path, message in problems), problems


def test_a_kind_no_schema_knows_is_a_problem(crds) -> None:
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "no schema for example.com/v1 Widget" in check_document(doc, crds)[0][1]
    assert check_document(["not", "an", "object"], crds) == [
        ("", "not a Kubernetes object (no apiVersion and kind)")]


SERVE_CONFIG = """\
proxy_location: EveryNode
applications:
  - name: model
    import_path: speed.model_service:build_app
    args: {tracking_uri: "http://mlflow.lambdalake.svc:5000", model_name: fraud,
           verify_key_file: /etc/lambdalake/verify-key/model-signing.pem.pub}
"""


def test_a_ray_service_serve_config_must_build_the_model_service() -> None:
    """No RayService is shipped (KubeRay reaches its Serve config through the dashboard port,
    which no Service may expose), but one written by hand is still checked."""
    config = yaml.safe_load(SERVE_CONFIG)
    ServiceArgs(**config["applications"][0]["args"])  # what build_app does on each replica
    assert serve_config_problems(SERVE_CONFIG) == []
    broken = SERVE_CONFIG.replace("verify_key_file", "verify_key")
    assert any("unexpected keyword argument 'verify_key'" in m for _, m in serve_config_problems(broken))
    broken = SERVE_CONFIG.replace("proxy_location: EveryNode", "proxy_location: Nowhere")
    assert any(where == "serveConfigV2" for where, _ in serve_config_problems(broken))


def test_the_model_service_takes_exactly_one_verify_key(tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one of verify_key_pem"):
        ServiceArgs(tracking_uri="http://mlflow:5000", model_name="fraud")
    with pytest.raises(ValueError, match="exactly one of verify_key_pem"):
        ServiceArgs(tracking_uri="x", model_name="fraud", verify_key_pem="PEM", verify_key_file="/k")
    key = tmp_path / "key.pub"
    key.write_text("-----BEGIN PUBLIC KEY-----\n")
    args = ServiceArgs(tracking_uri="x", model_name="fraud", verify_key_file=str(key))
    assert args.public_key_pem() == b"-----BEGIN PUBLIC KEY-----\n"


def test_lambdalake_settings_in_the_manifests_are_read_as_lambdalake_reads_them() -> None:
    assert settings_problems({"LAMBDALAKE_KAFKA_PARTITIONS": "12"}) == []
    problems = settings_problems({"LAMBDALAKE_KAFKA_PARTITIONZ": "12",
                                  "LAMBDALAKE_SPARK_MASTER": "kubernetes://cluster"})
    assert problems[0] == ("LAMBDALAKE_KAFKA_PARTITIONZ",
                           "is not a lambdalake setting (see the README's Configuration)")
    assert "LAMBDALAKE_SPARK_MASTER" in problems[1][1]


def test_kafka_security_settings_from_a_secret_count_as_set() -> None:
    kafka = {"LAMBDALAKE_MANAGE_KAFKA": "false", "LAMBDALAKE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
             "LAMBDALAKE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "LAMBDALAKE_KAFKA_SASL_USERNAME": "airflow",
             "LAMBDALAKE_KAFKA_SASL_PASSWORD": None}  # valueFrom.secretKeyRef
    assert settings_problems(kafka) == []
    del kafka["LAMBDALAKE_KAFKA_SASL_PASSWORD"]
    (problem,) = settings_problems(kafka)
    assert "LAMBDALAKE_KAFKA_SASL_PASSWORD" in problem[1]


def test_the_airflow_task_pods_settings_are_checked_with_the_platforms(tmp_path) -> None:
    for path in MANIFESTS_DIR.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    values = (MANIFESTS_DIR / "airflow-values.yaml").read_text()
    (tmp_path / "airflow-values.yaml").write_text(
        values.replace("LAMBDALAKE_KAFKA_SASL_USERNAME", "LAMBDALAKE_KAFKA_SASL_USER", 1))
    problems = [str(p) for p in check_manifests(tmp_path, crds_dir=CRDS_DIR)]
    assert any("LAMBDALAKE_KAFKA_SASL_USER: is not a lambdalake setting" in p for p in problems), problems


def test_airflow_chart_values_are_checked_against_airflows_own_config() -> None:
    values = yaml.safe_load((MANIFESTS_DIR / "airflow-values.yaml").read_text())
    assert airflow_values_problems(values) == []
    broken = {**values, "executor": "KubeExecutor",
              "config": {"core": {"dag_folder": "/dags"}, "nosuch": {"a": "1"}},
              "env": [{"name": "AIRFLOW__CORE__LOAD_EXAMPLEZ", "value": "False"},
                      {"name": "LAMBDALAKE_TRAIN_EPOCHS", "value": "0"}]}
    problems = dict(airflow_values_problems(broken))
    assert "is not one of Airflow's executors" in problems["executor"]
    assert problems["config.core.dag_folder"] == "Airflow's [core] section has no option 'dag_folder'"
    assert problems["config.nosuch"] == "Airflow has no such config section"
    assert "[core] load_examplez" in problems["env[0]"]
    assert "LAMBDALAKE_TRAIN_EPOCHS" in problems["env"]


def test_k8s_check_cli_names_the_file_object_and_field(tmp_path) -> None:
    for path in MANIFESTS_DIR.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    broken = (MANIFESTS_DIR / "kafka.yaml").read_text().replace("partitions: 12", "partitions: lots", 1)
    (tmp_path / "kafka.yaml").write_text(broken)
    cli = Path(sys.executable).parent / "lambdalake"
    result = subprocess.run([str(cli), "k8s-check", str(tmp_path)], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "LAMBDALAKE_STATE_DIR": str(REPO / "var")})
    assert result.returncode == 1, result.stderr
    assert "kafka.yaml: KafkaTopic/events spec.partitions: 'lots' is not of type 'integer'" in result.stderr
    assert '"problems": 1' in result.stdout


def test_the_image_entrypoint_runs_a_spark_driver_as_spark_on_kubernetes_starts_it(tmp_path) -> None:
    script = tmp_path / "job.py"
    script.write_text("import sys\nfrom pyspark.sql import SparkSession\n"
                      "spark = SparkSession.builder.getOrCreate()\n"
                      "print('rows', spark.range(7).count(), 'args', *sys.argv[1:])\n")
    env = {**os.environ, "SPARK_DRIVER_BIND_ADDRESS": "127.0.0.1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("SPARK_HOME", None)
    entrypoint = str(MANIFESTS_DIR / "entrypoint.sh")
    driver = subprocess.run(
        [entrypoint, "driver", "--master", "local[1]", "--conf", "spark.ui.enabled=false",
         str(script), "batch", "run"], capture_output=True, text=True, env=env, timeout=300)
    assert driver.returncode == 0, driver.stderr[-2000:]
    assert "rows 7 args batch run" in driver.stdout
    passthrough = subprocess.run([entrypoint, "lambdalake", "--help"], capture_output=True,
                                 text=True, env=env, timeout=120)
    assert passthrough.returncode == 0 and "k8s-check" in passthrough.stdout


# --- the platform's security policy, checked on the shipped files and on broken copies ------

@pytest.fixture(scope="module")
def manifests() -> dict[str, list[Any]]:
    return load_manifests(MANIFESTS_DIR)


def _find(manifests: dict[str, list[Any]], file: str, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in manifests[file] if d.get("kind") == kind and d["metadata"]["name"] == name]
    return doc


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def _ray(manifests: dict[str, list[Any]]) -> dict[str, Any]:
    return _find(manifests, "ray-cluster.yaml", "RayCluster", "lambdalake-model")["spec"]


def _head(manifests: dict[str, list[Any]]) -> dict[str, Any]:
    return _ray(manifests)["headGroupSpec"]["template"]["spec"]["containers"][0]


def _env(container: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [e for e in container["env"] if e["name"] == name]
    return entry


def _private_key_in_the_api(m: dict[str, list[Any]]) -> None:
    _pod(_find(m, "apps.yaml", "Deployment", "api"))["volumes"].append(
        {"name": "signing", "secret": {"secretName": SIGNING_KEY_SECRET, "defaultMode": 0o440}})


def _private_key_on_the_ray_workers(m: dict[str, list[Any]]) -> None:
    volumes = _ray(m)["workerGroupSpecs"][0]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v.get("secret", {}).get("secretName") == VERIFY_KEY_SECRET]
    volume["secret"].update(secretName=SIGNING_KEY_SECRET, defaultMode=0o440)


def _private_key_as_env_of_the_speed_layer(m: dict[str, list[Any]]) -> None:
    _pod(_find(m, "apps.yaml", "Deployment", "speed-layer"))["containers"][0]["env"].append(
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": SIGNING_KEY_SECRET, "key": "model-signing.pem"}}})


def _private_key_on_every_airflow_pod(m: dict[str, list[Any]]) -> None:
    m["airflow-values.yaml"][0].setdefault("volumes", []).append(
        {"name": "signing", "secret": {"secretName": SIGNING_KEY_SECRET, "defaultMode": 0o440}})


def _dashboard_port_on_the_head(m: dict[str, list[Any]]) -> None:
    _head(m)["ports"].append({"name": "dashboard", "containerPort": 8265})


def _no_ports_on_the_head(m: dict[str, list[Any]]) -> None:
    del _head(m)["ports"]


def _a_service_for_the_ray_client(m: dict[str, list[Any]]) -> None:
    m["apps.yaml"].append({"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": "ray-client", "namespace": "lambdalake"},
                           "spec": {"selector": {"ray.io/node-type": "head"},
                                    "ports": [{"name": "client", "port": 10001}]}})


def _dashboard_on_every_interface(m: dict[str, list[Any]]) -> None:
    _ray(m)["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "0.0.0.0"


def _no_ray_auth_options(m: dict[str, list[Any]]) -> None:
    del _ray(m)["authOptions"]


def _ray_auth_disabled(m: dict[str, list[Any]]) -> None:
    _ray(m)["authOptions"]["mode"] = "disabled"


def _speed_layer_without_the_ray_token(m: dict[str, list[Any]]) -> None:
    container = _pod(_find(m, "apps.yaml", "Deployment", "speed-layer"))["containers"][0]
    container["env"].remove(_env(container, "RAY_AUTH_TOKEN"))


def _mlflow_without_basic_auth(m: dict[str, list[Any]]) -> None:
    container = _pod(_find(m, "platform.yaml", "Deployment", "mlflow"))["containers"][0]
    at = container["command"].index("--app-name")
    del container["command"][at:at + 2]


def _mlflow_admin_password_in_the_manifest(m: dict[str, list[Any]]) -> None:
    container = _pod(_find(m, "platform.yaml", "Deployment", "mlflow"))["containers"][0]
    entry = _env(container, "MLFLOW_AUTH_ADMIN_PASSWORD")
    entry.pop("valueFrom")
    entry["value"] = "password1234"


def _kafka_listener_without_authentication(m: dict[str, list[Any]]) -> None:
    del _find(m, "kafka.yaml", "Kafka", "lambdalake")["spec"]["kafka"]["listeners"][0]["authentication"]


def _a_plain_kafka_listener(m: dict[str, list[Any]]) -> None:
    _find(m, "kafka.yaml", "Kafka", "lambdalake")["spec"]["kafka"]["listeners"].append(
        {"name": "plain", "port": 9092, "type": "internal", "tls": False})


def _no_default_deny(m: dict[str, list[Any]]) -> None:
    m["network-policies.yaml"].remove(_find(m, "network-policies.yaml", "NetworkPolicy", "default-deny"))


def _a_default_deny_that_allows_ingress(m: dict[str, list[Any]]) -> None:
    _find(m, "network-policies.yaml", "NetworkPolicy", "default-deny")["spec"]["ingress"] = [{}]


def _no_policy_for_the_api(m: dict[str, list[Any]]) -> None:
    m["network-policies.yaml"].remove(_find(m, "network-policies.yaml", "NetworkPolicy", "api"))


def _api_keys_readable_by_everyone(m: dict[str, list[Any]]) -> None:
    (volume,) = _pod(_find(m, "apps.yaml", "Deployment", "api"))["volumes"]
    volume["secret"]["defaultMode"] = 0o644


def _signing_key_in_kubernetes_default_mode(m: dict[str, list[Any]]) -> None:
    volumes = _find(m, "spark-batch.yaml", "SparkApplication", "lambdalake-batch")["spec"]["volumes"]
    (volume,) = [v for v in volumes if v.get("secret", {}).get("secretName") == SIGNING_KEY_SECRET]
    del volume["secret"]["defaultMode"]


def _signing_key_item_readable_by_everyone(m: dict[str, list[Any]]) -> None:
    volumes = m["airflow-values.yaml"][0]["workers"]["extraVolumes"]
    (volume,) = [v for v in volumes if v.get("secret", {}).get("secretName") == SIGNING_KEY_SECRET]
    volume["secret"]["items"] = [{"key": "model-signing.pem", "path": "model-signing.pem", "mode": 0o444}]


def _api_as_root_with_group_readable_keys(m: dict[str, list[Any]]) -> None:
    _pod(_find(m, "apps.yaml", "Deployment", "api"))["securityContext"]["runAsUser"] = 0


@pytest.mark.parametrize(("mutate", "expected"), [
    (_private_key_in_the_api,
     f"apps.yaml: Deployment/api spec.template.spec.volumes[1].secret.secretName: references the "
     f"private model-signing key (Secret {SIGNING_KEY_SECRET}), which only training may hold "
     f"(the SparkApplication, Airflow's task pods under workers.*): mount {VERIFY_KEY_SECRET} "
     f"(the public key) instead"),
    (_private_key_on_the_ray_workers,
     "ray-cluster.yaml: RayCluster/lambdalake-model spec.workerGroupSpecs[0].template.spec.volumes[0]"
     ".secret.secretName: references the private model-signing key"),
    (_private_key_as_env_of_the_speed_layer,
     "apps.yaml: Deployment/speed-layer spec.template.spec.containers[0].env[7].valueFrom.secretKeyRef"
     ".name: references the private model-signing key"),
    (_private_key_on_every_airflow_pod,
     "airflow-values.yaml: Airflow chart values volumes[0].secret.secretName: references the private "
     "model-signing key"),
    (_dashboard_port_on_the_head,
     "ray-cluster.yaml: RayCluster/lambdalake-model spec.headGroupSpec.template.spec.containers[0]"
     ".ports[1]: Ray's dashboard port (8265) on the head container: KubeRay puts every head "
     "container port into the head Service; remove it"),
    (_no_ports_on_the_head,
     "ray-cluster.yaml: RayCluster/lambdalake-model spec.headGroupSpec.template.spec.containers[0]"
     ".ports: no ports on the head container: KubeRay then gives the head Service its defaults, "
     "which include the dashboard (8265) and client (10001) ports; list only gcs-server (6379)"),
    (_a_service_for_the_ray_client,
     "apps.yaml: Service/ray-client spec.ports[0]: exposes Ray's client port (10001): no Service "
     "may expose Ray's dashboard or client port; remove it"),
    (_dashboard_on_every_interface,
     "ray-cluster.yaml: RayCluster/lambdalake-model spec.headGroupSpec.rayStartParams.dashboard-host: "
     "the dashboard listens on '0.0.0.0': bind it to 127.0.0.1 (KubeRay's default is 0.0.0.0)"),
    (_no_ray_auth_options,
     "ray-cluster.yaml: RayCluster/lambdalake-model spec.authOptions: Ray's token authentication is "
     "off: set authOptions {mode: token, secretName: lambdalake-ray-token}"),
    (_ray_auth_disabled,
     "ray-cluster.yaml: RayCluster/lambdalake-model spec.authOptions.mode: Ray's token "
     "authentication is off ('disabled')"),
    (_speed_layer_without_the_ray_token,
     "apps.yaml: Deployment/speed-layer spec.template.spec.containers[0].env: connects to Ray "
     "without its token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret "
     "lambdalake-ray-token (key auth_token)"),
    (_mlflow_without_basic_auth,
     "platform.yaml: Deployment/mlflow spec.template.spec.containers[0].command: the MLflow server "
     "runs without authentication: add --app-name basic-auth"),
    (_mlflow_admin_password_in_the_manifest,
     "platform.yaml: Deployment/mlflow spec.template.spec.containers[0].env[1]: "
     "MLFLOW_AUTH_ADMIN_PASSWORD is written in the manifest: take it from a Secret (valueFrom.secretKeyRef)"),
    (_kafka_listener_without_authentication,
     "kafka.yaml: Kafka/lambdalake spec.kafka.listeners[0]: listener 'tls' (port 9093) accepts "
     "clients without authentication: set authentication.type to scram-sha-512 or tls"),
    (_a_plain_kafka_listener,
     "kafka.yaml: Kafka/lambdalake spec.kafka.listeners[1]: listener 'plain' (port 9092) accepts "
     "clients without authentication"),
    (_no_default_deny,
     "network-policies.yaml: Namespace/lambdalake: no default-deny NetworkPolicy (podSelector {}, "
     "policyTypes [Ingress, Egress], no rules): add one, then allow each connection explicitly"),
    (_a_default_deny_that_allows_ingress,
     "network-policies.yaml: Namespace/lambdalake: no default-deny NetworkPolicy"),
    (_no_policy_for_the_api,
     "apps.yaml: Deployment/api spec.template.metadata.labels: no NetworkPolicy selects these pods "
     "by their labels ({'app.kubernetes.io/name': 'api', 'app.kubernetes.io/part-of': 'lambdalake'}), "
     "so the default deny cuts them off: add a policy that allows what they connect to"),
    (_api_keys_readable_by_everyone,
     "apps.yaml: Deployment/api spec.template.spec.volumes[0].secret.defaultMode: Secret "
     "lambdalake-api-keys (the API keys) is mounted with mode 0644: everyone can read it, and "
     "lambdalake refuses such a file; set defaultMode: 0440 (a non-root pod reads it through its "
     "fsGroup) or 0400 (a pod that runs as root)"),
    (_signing_key_in_kubernetes_default_mode,
     "spark-batch.yaml: SparkApplication/lambdalake-batch spec.volumes[0].secret: Secret "
     "lambdalake-model-signing-key (the private model-signing key) is mounted with mode 0644 "
     "(Kubernetes' default): everyone can read it"),
    (_signing_key_item_readable_by_everyone,
     "airflow-values.yaml: Airflow chart values workers.extraVolumes[0].secret.items[0].mode: Secret "
     "lambdalake-model-signing-key (the private model-signing key) is mounted with mode 0444: "
     "everyone can read it"),
    (_api_as_root_with_group_readable_keys,
     "apps.yaml: Deployment/api spec.template.spec.volumes[0].secret.defaultMode: Secret "
     "lambdalake-api-keys (the API keys) is mounted with mode 0440 in a pod that runs as root: "
     "its group can read it"),
])
def test_each_policy_rule_reports_exactly_its_violation(manifests, mutate, expected) -> None:
    broken = copy.deepcopy(manifests)
    mutate(broken)
    problems = [str(p) for p in policy_problems(broken)]
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_the_shipped_manifests_pass_every_policy_rule(manifests) -> None:
    assert policy_problems(manifests) == []


def test_k8s_check_reports_a_policy_violation(tmp_path) -> None:
    for path in MANIFESTS_DIR.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    kafka = (tmp_path / "kafka.yaml").read_text()
    (tmp_path / "kafka.yaml").write_text(kafka.replace("        authentication: {type: scram-sha-512}\n", "", 1))
    problems = [str(p) for p in check_manifests(tmp_path, crds_dir=CRDS_DIR)]
    assert len(problems) == 1 and "accepts clients without authentication" in problems[0], problems


# --- Ray's token in a pod is the pod's, not the local platform's ---------------------------

def test_the_local_platform_environment_applies_to_a_local_ray_head_only() -> None:
    local = load_settings(manage_ray=True, ray_address="127.0.0.1:6379")
    assert ray_local_env(local, environ={})["RAY_AUTH_MODE"] == "disabled"
    own_head = load_settings(manage_ray=False, ray_address="localhost:6379")  # started by hand
    assert ray_local_env(own_head, environ={})["RAY_AUTH_MODE"] == "disabled"
    for remote in ("lambdalake-model-head-svc.lambdalake.svc:6379", "ray://10.0.0.7:10001"):
        assert ray_local_env(load_settings(manage_ray=False, ray_address=remote), environ={}) == {}


def test_an_explicit_ray_auth_mode_is_never_overridden() -> None:
    local = load_settings(manage_ray=True, ray_address="127.0.0.1:6379")
    env = ray_local_env(local, environ={"RAY_AUTH_MODE": "token"})
    assert "RAY_AUTH_MODE" not in env and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert "RAY_AUTH_MODE" not in ray_local_env(environ={"RAY_AUTH_MODE": "token"})  # no settings given


def test_the_shipped_ray_clients_keep_their_pods_token(manifests) -> None:
    config = _find(manifests, "platform.yaml", "ConfigMap", "lambdalake-config")["data"]
    settings = load_settings(**{name[len("LAMBDALAKE_"):].lower(): value for name, value in config.items()})
    for name in ("speed-layer", "api"):
        container = _pod(_find(manifests, "apps.yaml", "Deployment", name))["containers"][0]
        pod_env = {**config, **{e["name"]: e.get("value", "<from a Secret>") for e in container["env"]}}
        assert pod_env["RAY_AUTH_MODE"] == "token"
        assert ray_local_env(settings, environ=pod_env) == {}
