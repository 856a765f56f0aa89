"""The scaled-out platform's Kubernetes manifests (infra/k8s/), validated offline.

Core kinds are checked against the Kubernetes API's schemas, custom resources against the
pinned operators' own CRDs (Strimzi, Spark operator, KubeRay; fetched once into
var/k8s-crds), Airflow chart values against Airflow's config, and the LAMBDALAKE_* values
and the RayService's Serve config the way lambdalake reads them. Every check is shown to
fail on a broken copy, so a green run means the shipped files pass, not that nothing ran.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from infra.k8s import (
    MANIFESTS_DIR,
    airflow_values_problems,
    check_document,
    check_manifests,
    crd_schemas,
    ensure_crds,
    settings_problems,
)
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
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "SparkApplication", "RayService",
            "Deployment", "Service", "ConfigMap"} <= set(shipped)
    assert (MANIFESTS_DIR / "airflow-values.yaml").is_file()


def test_the_operators_crds_are_the_pinned_releases(crds) -> None:
    for key in [("kafka.strimzi.io/v1", "Kafka"), ("kafka.strimzi.io/v1", "KafkaNodePool"),
                ("kafka.strimzi.io/v1", "KafkaTopic"), ("ray.io/v1", "RayService"),
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
    ("RayService", _set("spec.rayClusterConfig.headGroupSpec.replicas", 2),
     "spec.rayClusterConfig.headGroupSpec", "'replicas' was unexpected"),
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


def test_the_ray_service_serve_config_builds_the_model_service(crds, shipped) -> None:
    doc = copy.deepcopy(shipped["RayService"])
    text = doc["spec"]["serveConfigV2"]
    config = yaml.safe_load(text)
    ServiceArgs(**config["applications"][0]["args"])  # what build_app does on each replica

    doc["spec"]["serveConfigV2"] = text.replace("verify_key_file", "verify_key")
    assert any("unexpected keyword argument 'verify_key'" in m for _, m in check_document(doc, crds))
    doc["spec"]["serveConfigV2"] = text.replace("proxy_location: EveryNode", "proxy_location: Nowhere")
    assert any(where == "serveConfigV2" for where, _ in check_document(doc, crds))


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
