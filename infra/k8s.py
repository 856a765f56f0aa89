"""Offline checks of the scaled-out platform's Kubernetes manifests (`infra/k8s/`).

Every object is checked against the schema its API server would apply, and unknown fields
are refused, as `kubectl apply` (strict field validation) refuses them:
- core kinds (Deployment, Service, ConfigMap, ...) against the Kubernetes API's own JSON
  schemas for `KUBERNETES_VERSION`, shipped by the `kubernetes-validate` package;
- custom resources against the `openAPIV3Schema` of their operator's CRD at a pinned
  release: Strimzi (Kafka, KafkaNodePool, KafkaTopic, KafkaUser), the Kubeflow Spark
  operator (SparkApplication) and KubeRay (RayCluster; 1.6 for `authOptions.secretName`).
  `ensure_crds` fetches the CRDs once from Maven Central (Strimzi's `api` test jar) and the
  Go module proxy (the operators' Go modules) into `<state_dir>/k8s-crds`.

Then the parts our own code reads are checked the way our code reads them:
- every `LAMBDALAKE_*` variable names a setting and the values parse together
  (`lakehouse.config.load_settings`);
- a RayService's `serveConfigV2` is a valid Ray Serve config (`ray.serve.schema`) whose
  applications' `args` build the model service's `ServiceArgs`;
- a `*-values.yaml` file is Helm values for the official Airflow chart: each `config`
  section and option, and each `AIRFLOW__SECTION__OPTION` variable, is one Airflow itself
  defines (its `config.yml`), and the executor is one of Airflow's own.

Then the platform's security policy (`policy_problems`, a function per rule): the private
model-signing key only where training runs; no Service exposes Ray's dashboard or client
port and Ray's token authentication is on, for the cluster and its clients; MLflow runs
with basic-auth and its admin from a Secret; every Kafka listener authenticates; each
namespace has a default-deny NetworkPolicy and every pod a policy that selects it; a Secret
volume with the private key or the API keys is mounted with a mode lambdalake reads.

`lambdalake k8s-check [DIR]` runs all of this; tests/unit/test_k8s_manifests.py too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lakehouse.config import CONFIG_FILE_ENV, ENV_PREFIX, Settings, load_settings
from lakehouse.errors import ConfigError, ServiceError
from lakehouse.secret_files import exposure
from speed.model_service import ServiceArgs

MANIFESTS_DIR = Path(__file__).resolve().parent / "k8s"
KUBERNETES_VERSION = "1.34.0"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class CrdSource:
    """Where one operator's CRDs come from: a Maven artifact or a Go module, and the
    folder inside it that holds the CRD YAML files."""

    name: str
    registry: str  # "maven" or "go"
    coordinate: str  # group:artifact:version:jar:classifier, or module@version
    folder: str


CRD_SOURCES = (
    CrdSource("strimzi", "maven", "io.strimzi:api:0.51.0:jar:tests", "crds/v1"),
    CrdSource("spark-operator", "go", "github.com/kubeflow/spark-operator/v2@v2.5.0",
              "config/crd/bases"),
    CrdSource("kuberay", "go", "github.com/ray-project/kuberay/ray-operator@v1.6.2",
              "config/crd/bases"),
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one object of one manifest file."""

    file: str
    obj: str  # Kind/name, or the values file's chart
    path: str  # where inside the object, dotted
    message: str

    def __str__(self) -> str:
        where = f" {self.path}" if self.path else ""
        return f"{self.file}: {self.obj}{where}: {self.message}"


# --- fetching the CRDs ------------------------------------------------------------------

def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServiceError(f"`{name}` is needed once to fetch the operators' CRDs: install "
                           f"it (`apt-get install {package}`, or `make install`)")
    return path


def _run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ServiceError(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-2000:]}")
    return result.stdout


def _fetch_maven(source: CrdSource, scratch: Path, destination: Path) -> None:
    mvn = _tool("mvn", "maven")
    _run([mvn, "-q", "-B", "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy",
          f"-Dartifact={source.coordinate}", f"-DoutputDirectory={scratch}"], cwd=scratch)
    (jar,) = scratch.glob("*.jar")
    prefix = source.folder.rstrip("/") + "/"
    with zipfile.ZipFile(jar) as archive:
        for member in archive.namelist():
            if member.startswith(prefix) and member.endswith(".yaml") and "/" not in member[len(prefix):]:
                (destination / Path(member).name).write_bytes(archive.read(member))


def _fetch_go(source: CrdSource, scratch: Path, destination: Path) -> None:
    go = _tool("go", "golang-go")
    # outside any Go module, `go mod download` just fetches (and checksums) the module zip
    info = json.loads(_run([go, "mod", "download", "-json", source.coordinate], cwd=scratch))
    if info.get("Error"):
        raise ServiceError(f"the Go module proxy could not give {source.coordinate}: {info['Error']}")
    for crd in sorted((Path(info["Dir"]) / source.folder).glob("*.yaml")):
        shutil.copyfile(crd, destination / crd.name)


def ensure_crds(directory: Path) -> Path:
    """Fetch every operator's CRDs into `directory` (once per pinned source); returns it."""
    for source in CRD_SOURCES:
        target = directory / source.name
        marker = target / f".source-{hashlib.sha256(repr(source).encode()).hexdigest()[:16]}"
        if marker.exists():
            continue
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="lambdalake-crds-") as scratch:
            fetch = _fetch_maven if source.registry == "maven" else _fetch_go
            fetch(source, Path(scratch), target)
        if not any(target.glob("*.yaml")):
            raise ServiceError(f"no CRD files under {source.folder} in {source.coordinate}")
        marker.touch()
    return directory


# --- schemas ------------------------------------------------------------------------------

def _strict(schema: Any) -> Any:
    """A CRD schema as a JSON Schema that refuses unknown fields and accepts `nullable`."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) if key not in ("properties", "enum", "default", "example") else value
           for key, value in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if ("additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


@functools.cache
def crd_schemas(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → strict JSON schema, for every served version of every CRD."""
    import yaml

    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(directory.glob("*/*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served") and "schema" in version:
                    schema = _strict(version["schema"]["openAPIV3Schema"])
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def _dotted(path: Iterable[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _schema_problems(doc: dict[str, Any], schema: dict[str, Any]) -> Iterator[tuple[str, str]]:
    from jsonschema import Draft7Validator

    for error in sorted(Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)):
        yield _dotted(error.absolute_path), error.message


def _core_problems(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The first problem the Kubernetes API's schema finds (kubernetes-validate stops there)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        yield "", (f"no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes "
                   f"{KUBERNETES_VERSION} nor in the pinned operators' CRDs")
    except kubernetes_validate.ValidationError as error:
        yield _dotted(error.absolute_path), error.message


# --- what our own code reads --------------------------------------------------------------

def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container spec in an object, wherever its kind nests them."""
    def walk(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    yield from (c for c in value if isinstance(c, dict))
                elif key in ("driver", "executor") and isinstance(value, dict) and "env" in value:
                    yield value  # SparkApplication pods take env directly
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
    return walk(doc.get("spec", {}))


def lambdalake_env(doc: dict[str, Any]) -> dict[str, str | None]:
    """LAMBDALAKE_* variables an object sets: name → value (None: from a Secret/ConfigMap)."""
    found: dict[str, str | None] = {}
    if doc.get("kind") == "ConfigMap":
        found.update({k: str(v) for k, v in (doc.get("data") or {}).items() if k.startswith(ENV_PREFIX)})
    for container in _containers(doc):
        found.update(container_lambdalake_env(container))
    return found


def container_lambdalake_env(container: dict[str, Any]) -> dict[str, str | None]:
    """LAMBDALAKE_* variables of one container's `env` (None: from a Secret/ConfigMap)."""
    return {entry["name"]: str(entry["value"]) if "value" in entry else None
            for entry in container.get("env") or [] if str(entry.get("name", "")).startswith(ENV_PREFIX)}


def settings_problems(env: dict[str, str | None]) -> list[tuple[str, str]]:
    """Names that are no setting, and values lambdalake would refuse."""
    from pydantic import SecretStr

    problems, values = [], {}
    for name, value in sorted(env.items()):
        field = name[len(ENV_PREFIX):].lower()
        if name == CONFIG_FILE_ENV:
            continue
        if field not in Settings.model_fields:
            problems.append((name, "is not a lambdalake setting (see the README's Configuration)"))
        elif value is not None:
            values[field] = value
        elif Settings.model_fields[field].annotation is SecretStr:
            values[field] = "from-a-secret"  # set (a secretKeyRef), so rules that need it hold
    try:
        load_settings(**values)
    except ConfigError as error:
        problems.append(("", str(error)))
    return problems


def serve_config_problems(text: str) -> list[tuple[str, str]]:
    """A RayService's serveConfigV2: a Ray Serve config whose model apps' args build."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as error:
        return [("serveConfigV2", str(error))]
    problems = []
    for app in config.applications:
        if app.import_path == "speed.model_service:build_app":
            try:
                ServiceArgs(**(app.args or {}))
            except (TypeError, ValueError) as error:
                problems.append((f"serveConfigV2 {app.name}.args", str(error)))
    return problems


@functools.cache
def _airflow_options() -> dict[str, set[str]]:
    import airflow.config_templates
    import yaml

    path = Path(airflow.config_templates.__file__).parent / "config.yml"
    return {section: set((body or {}).get("options") or {})
            for section, body in yaml.safe_load(path.read_text()).items()}


def airflow_values_problems(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Helm values of the official Airflow chart, checked against Airflow's own config."""
    from airflow.executors.executor_constants import CORE_EXECUTOR_NAMES

    options = _airflow_options()
    problems = []
    for executor in str(values.get("executor", "")).split(","):
        if executor.strip() not in CORE_EXECUTOR_NAMES:
            problems.append(("executor", f"{executor!r} is not one of Airflow's executors "
                                         f"{sorted(CORE_EXECUTOR_NAMES)}"))
    for section, body in (values.get("config") or {}).items():
        for option in body or {}:
            if section not in options:
                problems.append((f"config.{section}", "Airflow has no such config section"))
                break
            if option not in options[section]:
                problems.append((f"config.{section}.{option}",
                                 f"Airflow's [{section}] section has no option {option!r}"))
    env = {}
    for index, entry in enumerate(values.get("env") or []):
        name = entry.get("name", "")
        match = re.fullmatch(r"AIRFLOW__([A-Z0-9_]+?)__([A-Z0-9_]+?)(_CMD|_SECRET)?", name)
        if match:
            section, option = match.group(1).lower(), match.group(2).lower()
            if option not in options.get(section, ()):
                problems.append((f"env[{index}]", f"{name}: Airflow has no option [{section}] {option}"))
        elif name.startswith(ENV_PREFIX):
            env[name] = entry.get("value")
    problems += [(f"env {name}".strip(), message) for name, message in settings_problems(env)]
    return problems


# --- checking a folder -------------------------------------------------------------------

def _object_name(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def check_document(doc: Any, crds: dict[tuple[str, str], dict[str, Any]]) -> list[tuple[str, str]]:
    """Schema problems of one Kubernetes object: (dotted path, message)."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return [("", "not a Kubernetes object (no apiVersion and kind)")]
    problems: list[tuple[str, str]] = []
    schema = crds.get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        problems += _core_problems(doc)
    else:
        problems += _schema_problems(doc, schema)
        name = (doc.get("metadata") or {}).get("name", "")
        if not (isinstance(name, str) and _DNS_SUBDOMAIN.match(name) and len(name) <= 253):
            problems.append(("metadata.name", f"{name!r} is not a DNS-1123 subdomain name"))
    if doc["kind"] == "RayService":
        problems += serve_config_problems(doc.get("spec", {}).get("serveConfigV2", ""))
    return problems


def check_manifests(directory: Path = MANIFESTS_DIR, *, crds_dir: Path) -> list[Problem]:
    """Every problem in every `*.yaml` file under `directory` (none: all valid)."""
    import yaml

    crds = crd_schemas(ensure_crds(crds_dir))
    problems: list[Problem] = []
    env: dict[str, str | None] = {}
    files = sorted(directory.glob("*.yaml"))
    if not files:
        return [Problem(str(directory), "", "", "no *.yaml manifests here")]
    for path in files:
        label = path.name
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as error:
            problems.append(Problem(label, "", "", f"not YAML: {error}"))
            continue
        if path.name.endswith("-values.yaml"):
            for where, message in airflow_values_problems(docs[0] if docs else {}):
                problems.append(Problem(label, "Airflow chart values", where, message))
            if docs and isinstance(docs[0], dict):  # the task pods' own settings (Kafka user ...)
                env.update(container_lambdalake_env(docs[0].get("workers") or {}))
            continue
        for doc in docs:
            for where, message in check_document(doc, crds):
                problems.append(Problem(label, _object_name(doc), where, message))
            if isinstance(doc, dict):
                env.update(lambdalake_env(doc))
    for where, message in settings_problems(env):
        problems.append(Problem(str(directory.name), "LAMBDALAKE_* settings", where, message))
    if not any(p.message.startswith("not YAML") for p in problems):
        problems += policy_problems(load_manifests(directory))
    return problems


# --- the platform's security policy ---------------------------------------------------------

SIGNING_KEY_SECRET = "lambdalake-model-signing-key"  # the private key: training only
VERIFY_KEY_SECRET = "lambdalake-model-verify-key"  # the public key: scorers and training


def load_manifests(directory: Path = MANIFESTS_DIR) -> dict[str, list[Any]]:
    """File name → its YAML documents (a values file: one document, the values)."""
    import yaml

    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            for path in sorted(directory.glob("*.yaml"))}


RAY_TOKEN_SECRET_KEY = "auth_token"  # the key KubeRay reads in authOptions.secretName
RAY_PRIVATE_PORTS = {8265: "dashboard", 10001: "client"}  # arbitrary code for whoever reaches them
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_WORKLOAD_TEMPLATES = {"Deployment": ("spec", "template"), "StatefulSet": ("spec", "template"),
                       "DaemonSet": ("spec", "template"), "ReplicaSet": ("spec", "template"),
                       "Job": ("spec", "template"), "CronJob": ("spec", "jobTemplate", "spec", "template")}


@dataclass(frozen=True)
class Pods:
    """The pods one object makes (as far as the manifests say): where, labelled how."""

    file: str
    obj: str
    path: tuple[Any, ...]  # to the pod template (or the SparkApplication's driver/executor)
    namespace: str
    labels: dict[str, str]
    spec: dict[str, Any]  # the pod spec (containers, volumes), or the Spark pod section


def _at(doc: Any, *path: Any) -> Any:
    for part in path:
        if isinstance(doc, dict):
            doc = doc.get(part)
        elif isinstance(doc, list) and isinstance(part, int) and part < len(doc):
            doc = doc[part]
        else:
            return None
    return doc


def _ray_cluster_spec(doc: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]] | None:
    if doc.get("kind") == "RayCluster":
        return ("spec",), doc.get("spec") or {}
    if doc.get("kind") == "RayService":
        return ("spec", "rayClusterConfig"), _at(doc, "spec", "rayClusterConfig") or {}
    return None


def _kube_objects(manifests: dict[str, list[Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for file, docs in manifests.items():
        if not file.endswith("-values.yaml"):
            yield from ((file, d) for d in docs if isinstance(d, dict) and "kind" in d)


def _airflow_values(manifests: dict[str, list[Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for file, docs in manifests.items():
        if file.endswith("-values.yaml") and docs and isinstance(docs[0], dict):
            yield file, docs[0]


AIRFLOW_VALUES = "Airflow chart values"
# the official chart's pods (labels tier=airflow, component=...); `workers` are the task pods
_AIRFLOW_COMPONENTS = ("scheduler", "api-server", "dag-processor", "triggerer", "statsd", "worker")


def pods(manifests: dict[str, list[Any]]) -> list[Pods]:
    """Every group of pods the manifests make, with the labels their pods will carry."""
    found: list[Pods] = []
    for file, doc in _kube_objects(manifests):
        kind, name = doc["kind"], (doc.get("metadata") or {}).get("name", "?")
        namespace = (doc.get("metadata") or {}).get("namespace", "default")
        obj = f"{kind}/{name}"
        if kind in _WORKLOAD_TEMPLATES:
            path = _WORKLOAD_TEMPLATES[kind]
            template = _at(doc, *path) or {}
            found.append(Pods(file, obj, path, namespace, dict(_at(template, "metadata", "labels") or {}),
                              template.get("spec") or {}))
        elif (ray := _ray_cluster_spec(doc)) is not None:
            prefix, spec = ray
            groups = [(("headGroupSpec",), "head")] + [
                (("workerGroupSpecs", i), "worker") for i in range(len(spec.get("workerGroupSpecs") or []))]
            for where, node_type in groups:
                template = _at(spec, *where, "template") or {}
                labels = {**(_at(template, "metadata", "labels") or {}), "ray.io/node-type": node_type}
                found.append(Pods(file, obj, (*prefix, *where, "template"), namespace, labels,
                                  template.get("spec") or {}))
        elif kind == "SparkApplication":
            for role in ("driver", "executor"):
                section = _at(doc, "spec", role) or {}
                labels = {**(section.get("labels") or {}), "spark-role": role,
                          "sparkoperator.k8s.io/app-name": name}
                found.append(Pods(file, obj, ("spec", role), namespace, labels, section))
        elif kind == "Kafka":  # Strimzi's pods: the node pools' brokers and the entity operator
            labels = {"strimzi.io/cluster": name, "strimzi.io/kind": "Kafka"}
            found.append(Pods(file, obj, (), namespace, {**labels, "strimzi.io/name": f"{name}-kafka"}, {}))
            if (doc.get("spec") or {}).get("entityOperator") is not None:
                found.append(Pods(file, obj, ("spec", "entityOperator"), namespace,
                                  {**labels, "strimzi.io/name": f"{name}-entity-operator"}, {}))
    for file, values in _airflow_values(manifests):
        namespace = _namespace_of(manifests)
        for component in _AIRFLOW_COMPONENTS:
            section = "workers" if component == "worker" else component
            found.append(Pods(file, AIRFLOW_VALUES, (section,), namespace,
                              {"tier": "airflow", "component": component}, values.get(section) or {}))
        if (values.get("postgresql") or {}).get("enabled"):
            found.append(Pods(file, AIRFLOW_VALUES, ("postgresql",), namespace,
                              {"app.kubernetes.io/name": "postgresql"}, {}))
    return found


def _namespace_of(manifests: dict[str, list[Any]]) -> str:
    """The namespace the manifests create (where the chart is installed, `-n` in its header)."""
    names = [d["metadata"]["name"] for _, d in _kube_objects(manifests) if d["kind"] == "Namespace"]
    return names[0] if names else "default"


def _secret_refs(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(path, Secret name) for each reference to a Secret: a volume, a projected source, an
    envFrom secretRef, an env secretKeyRef."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "secretName" and isinstance(value, str):
                yield (*path, key), value
            elif key in ("secretRef", "secretKeyRef", "secret") and isinstance(value, dict) \
                    and isinstance(value.get("name"), str):
                yield (*path, key, "name"), value["name"]
            elif key == "extraEnvFrom" and isinstance(value, str):  # chart values: a YAML string
                import yaml

                yield from _secret_refs(yaml.safe_load(value), (*path, key))
            else:
                yield from _secret_refs(value, (*path, key))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _secret_refs(item, (*path, index))


def private_key_problems(manifests: dict[str, list[Any]]) -> Iterator[Problem]:
    """The private signing key is referenced only where training runs: the SparkApplication
    (the batch job, which trains and signs) and Airflow's task pods (`workers.*`)."""
    message = (f"references the private model-signing key (Secret {SIGNING_KEY_SECRET}), which only "
               f"training may hold (the SparkApplication, Airflow's task pods under workers.*): "
               f"mount {VERIFY_KEY_SECRET} (the public key) instead")
    for file, doc in _kube_objects(manifests):
        if doc["kind"] != "SparkApplication":
            for path, name in _secret_refs(doc.get("spec"), ("spec",)):
                if name == SIGNING_KEY_SECRET:
                    yield Problem(file, _object_name(doc), _dotted(path), message)
    for file, values in _airflow_values(manifests):
        for path, name in _secret_refs(values):
            if name == SIGNING_KEY_SECRET and path[0] != "workers":
                yield Problem(file, AIRFLOW_VALUES, _dotted(path), message)


def ray_port_problems(manifests: dict[str, list[Any]]) -> Iterator[Problem]:
    """No Service exposes Ray's dashboard or client port, and the dashboard listens on the
    head pod's loopback only. KubeRay builds the head Service from the head container's
    ports (its defaults, dashboard and client included, when there are none)."""
    for file, doc in _kube_objects(manifests):
        obj = _object_name(doc)
        if (ray := _ray_cluster_spec(doc)) is not None:
            prefix, spec = ray
            head = (*prefix, "headGroupSpec")
            container = (*head, "template", "spec", "containers", 0)
            ports = _at(doc, *container, "ports")
            if not ports:
                yield Problem(file, obj, _dotted((*container, "ports")),
                              "no ports on the head container: KubeRay then gives the head Service "
                              "its defaults, which include the dashboard (8265) and client (10001) "
                              "ports; list only gcs-server (6379)")
            for index, port in enumerate(ports or []):
                number = port.get("containerPort")
                label = RAY_PRIVATE_PORTS.get(number) or (
                    port.get("name") if port.get("name") in RAY_PRIVATE_PORTS.values() else None)
                if label:
                    yield Problem(file, obj, _dotted((*container, "ports", index)),
                                  f"Ray's {label} port ({number}) on the head container: KubeRay "
                                  f"puts every head container port into the head Service; remove it")
            host = str((_at(doc, *head, "rayStartParams") or {}).get("dashboard-host", "0.0.0.0"))
            if host not in _LOOPBACK:
                yield Problem(file, obj, _dotted((*head, "rayStartParams", "dashboard-host")),
                              f"the dashboard listens on {host!r}: bind it to 127.0.0.1 "
                              f"(KubeRay's default is 0.0.0.0)")
        elif doc["kind"] == "Service":
            for index, port in enumerate(_at(doc, "spec", "ports") or []):
                for value in (port.get("port"), port.get("targetPort")):
                    label = RAY_PRIVATE_PORTS.get(value) or (
                        value if value in RAY_PRIVATE_PORTS.values() else None)
                    if label:
                        number = {v: k for k, v in RAY_PRIVATE_PORTS.items()}[label]
                        yield Problem(file, obj, _dotted(("spec", "ports", index)),
                                      f"exposes Ray's {label} port ({number}): no Service may expose "
                                      f"Ray's dashboard or client port; remove it")
                        break


def _env_entry(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((e for e in container.get("env") or [] if e.get("name") == name), None)


def _runs_ray_driver(container: dict[str, Any]) -> bool:
    """lambdalake commands that connect to the Ray cluster: the speed layer, the API, the
    model service's deploy commands."""
    command = [str(c) for c in (container.get("command") or []) + (container.get("args") or [])]
    return len(command) >= 2 and command[0] == "lambdalake" and command[1] in ("speed", "serve", "model")


def ray_auth_problems(manifests: dict[str, list[Any]]) -> Iterator[Problem]:
    """Ray's token authentication is on, and every client brings the cluster's token."""
    token_secrets = set()
    for file, doc in _kube_objects(manifests):
        if (ray := _ray_cluster_spec(doc)) is not None:
            prefix, spec = ray
            auth = spec.get("authOptions")
            if not isinstance(auth, dict):
                yield Problem(file, _object_name(doc), _dotted((*prefix, "authOptions")),
                              "Ray's token authentication is off: set authOptions {mode: token, "
                              "secretName: lambdalake-ray-token}")
            elif auth.get("mode", "token") != "token":
                yield Problem(file, _object_name(doc), _dotted((*prefix, "authOptions", "mode")),
                              f"Ray's token authentication is off ({auth.get('mode')!r}): set mode: token")
            else:
                token_secrets.add(auth.get("secretName") or doc["metadata"]["name"])
    if len(token_secrets) != 1:
        return  # no Ray cluster with a token (reported above), or no one token to check against
    (secret,) = token_secrets
    message = (f"connects to Ray without its token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
               f"from the Secret {secret} (key {RAY_TOKEN_SECRET_KEY})")

    def has_token(container: dict[str, Any]) -> bool:
        mode, token = _env_entry(container, "RAY_AUTH_MODE"), _env_entry(container, "RAY_AUTH_TOKEN")
        return (mode is not None and mode.get("value") == "token" and token is not None
                and _at(token, "valueFrom", "secretKeyRef") == {"name": secret, "key": RAY_TOKEN_SECRET_KEY})

    for group in pods(manifests):
        if group.obj == AIRFLOW_VALUES:
            if group.labels.get("component") == "worker" and not has_token(group.spec):
                yield Problem(group.file, group.obj, "workers.env", message)  # task pods roll out
            continue
        for index, container in enumerate(group.spec.get("containers") or []):
            if _runs_ray_driver(container) and not has_token(container):
                yield Problem(group.file, group.obj,
                              _dotted((*group.path, "spec", "containers", index, "env")), message)


def mlflow_auth_problems(manifests: dict[str, list[Any]]) -> Iterator[Problem]:
    """The MLflow server authenticates every request, with its admin from a Secret."""
    for group in pods(manifests):
        for index, container in enumerate(group.spec.get("containers") or []):
            command = [str(c) for c in (container.get("command") or []) + (container.get("args") or [])]
            if command[:2] != ["mlflow", "server"]:
                continue
            where = (*group.path, "spec", "containers", index)
            joined = " ".join(command)
            if "--app-name basic-auth" not in joined and "--app-name=basic-auth" not in joined:
                yield Problem(group.file, group.obj, _dotted((*where, "command")),
                              "the MLflow server runs without authentication: add --app-name basic-auth")
                continue
            secret_set = False
            for at, entry in enumerate(container.get("env") or []):
                if entry.get("name") in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
                    if "value" in entry:
                        yield Problem(group.file, group.obj, _dotted((*where, "env", at)),
                                      f"{entry['name']} is written in the manifest: take it from a "
                                      f"Secret (valueFrom.secretKeyRef)")
                    elif entry["name"] == "MLFLOW_AUTH_ADMIN_PASSWORD":
                        secret_set = _at(entry, "valueFrom", "secretKeyRef") is not None
            if not secret_set and _env_entry(container, "MLFLOW_AUTH_ADMIN_PASSWORD") is None:
                yield Problem(group.file, group.obj, _dotted((*where, "env")),
                              "the MLflow admin's password comes from no Secret: set "
                              "MLFLOW_AUTH_ADMIN_PASSWORD from a secretKeyRef")


def kafka_auth_problems(manifests: dict[str, list[Any]]) -> Iterator[Problem]:
    """Every Kafka listener authenticates its clients (SCRAM-SHA-512 or mutual TLS)."""
    for file, doc in _kube_objects(manifests):
        if doc["kind"] != "Kafka":
            continue
        for index, listener in enumerate(_at(doc, "spec", "kafka", "listeners") or []):
            if not _at(listener, "authentication", "type"):
                yield Problem(file, _object_name(doc), _dotted(("spec", "kafka", "listeners", index)),
                              f"listener {listener.get('name')!r} (port {listener.get('port')}) accepts "
                              f"clients without authentication: set authentication.type to "
                              f"scram-sha-512 or tls")


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = expression.get("values") or []
        present = key in labels
        matched = {"In": present and labels[key] in values, "NotIn": labels.get(key) not in values,
                   "Exists": present, "DoesNotExist": not present}.get(operator, False)
        if not matched:
            return False
    return True


def _is_default_deny(policy: dict[str, Any]) -> bool:
    spec = policy.get("spec") or {}
    selector = spec.get("podSelector") or {}
    return (not selector.get("matchLabels") and not selector.get("matchExpressions")
            and {"Ingress", "Egress"} <= set(spec.get("policyTypes") or [])
            and not spec.get("ingress") and not spec.get("egress"))


def network_policy_problems(manifests: dict[str, list[Any]]) -> Iterator[Problem]:
    """Each namespace denies all traffic by default, and every pod is selected by name (its
    labels) by a policy that allows what it connects to."""
    policies = [(file, doc) for file, doc in _kube_objects(manifests) if doc["kind"] == "NetworkPolicy"]
    groups = pods(manifests)
    for namespace in sorted({g.namespace for g in groups}):
        mine = [(f, p) for f, p in policies
                if (p.get("metadata") or {}).get("namespace", "default") == namespace]
        if not any(_is_default_deny(p) for _, p in mine):
            namespace_files = [f for f, d in _kube_objects(manifests) if d["kind"] == "Namespace"]
            file = mine[0][0] if mine else (namespace_files or ["infra/k8s"])[0]
            yield Problem(file, f"Namespace/{namespace}", "",
                          "no default-deny NetworkPolicy (podSelector {}, policyTypes [Ingress, "
                          "Egress], no rules): add one, then allow each connection explicitly")
        # a policy for every pod (DNS) does not count: it would select pods whatever their labels
        named = [p for _, p in mine if _at(p, "spec", "podSelector", "matchLabels")
                 or _at(p, "spec", "podSelector", "matchExpressions")]
        for group in (g for g in groups if g.namespace == namespace):
            if not any(_selects(_at(p, "spec", "podSelector"), group.labels) for p in named):
                where = _dotted((*group.path, "metadata", "labels")) if group.path else ""
                yield Problem(group.file, group.obj, where,
                              f"no NetworkPolicy selects these pods by their labels ({group.labels}), "
                              f"so the default deny cuts them off: add a policy that allows what "
                              f"they connect to")


API_KEYS_SECRET = "lambdalake-api-keys"
# Secrets lambdalake reads as files only when nobody but their owner (or, for a root-owned
# file, its group) can read them (lakehouse.secret_files): what each holds
SECRET_FILES = {SIGNING_KEY_SECRET: "the private model-signing key", API_KEYS_SECRET: "the API keys"}
KUBERNETES_SECRET_MODE = 0o644  # a Secret volume's files when no defaultMode or mode says
IMAGE_USER = 50000  # the lambdalake image's USER (Dockerfile), and the Airflow chart's uid


_Volume = tuple[str, str, tuple[Any, ...], dict[str, Any], int]


def _secret_volumes(manifests: dict[str, list[Any]]) -> Iterator[_Volume]:
    """(file, object, path, volume, uid of the pods that mount it) for every volume."""
    for group in pods(manifests):
        if group.obj == AIRFLOW_VALUES:
            pod = _at(group.spec, "securityContexts", "pod") or {}
            uid = pod.get("runAsUser", IMAGE_USER)
            for index, volume in enumerate(group.spec.get("extraVolumes") or []):
                yield group.file, group.obj, (*group.path, "extraVolumes", index), volume, uid
        elif group.obj.startswith("SparkApplication/"):
            (doc,) = [d for f, d in _kube_objects(manifests)
                      if f == group.file and _object_name(d) == group.obj]
            uid = _at(group.spec, "podSecurityContext", "runAsUser")
            uid = IMAGE_USER if uid is None else uid
            mounted = {m.get("name") for m in group.spec.get("volumeMounts") or []}
            for index, volume in enumerate(_at(doc, "spec", "volumes") or []):
                if volume.get("name") in mounted:
                    yield group.file, group.obj, ("spec", "volumes", index), volume, uid
        else:
            uid = _at(group.spec, "securityContext", "runAsUser")
            uid = IMAGE_USER if uid is None else uid
            for index, volume in enumerate(group.spec.get("volumes") or []):
                yield group.file, group.obj, (*group.path, "spec", "volumes", index), volume, uid
    for file, values in _airflow_values(manifests):  # the chart's volumes for every component
        uid = _at(values, "securityContexts", "pod", "runAsUser")
        uid = values.get("uid", IMAGE_USER) if uid is None else uid
        for index, volume in enumerate(values.get("volumes") or []):
            yield file, AIRFLOW_VALUES, ("volumes", index), volume, uid


def secret_mode_problems(manifests: dict[str, list[Any]]) -> Iterator[Problem]:
    """A Secret volume holding the private key or the API keys is mounted with a mode that
    lambdalake's own check accepts (`lakehouse.secret_files.exposure`): Kubernetes mounts it
    owned by root, 0644 unless told; 0440 serves a non-root pod through its fsGroup, 0400 a
    pod that runs as root."""
    seen: set[tuple[str, str, tuple[Any, ...]]] = set()
    for file, obj, path, volume, uid in _secret_volumes(manifests):
        sources: list[tuple[tuple[Any, ...], Any, Any]] = \
            [(("secret",), volume["secret"], volume["secret"].get("defaultMode"))] \
            if isinstance(volume.get("secret"), dict) else []
        projected = volume.get("projected")
        if isinstance(projected, dict):
            sources += [(("projected", "sources", i, "secret"), source["secret"],
                         projected.get("defaultMode"))
                        for i, source in enumerate(projected.get("sources") or [])
                        if isinstance(source.get("secret"), dict)]
        for where, secret, default_mode in sources:
            name = secret.get("secretName", secret.get("name"))
            if name not in SECRET_FILES or (file, obj, (*path, *where)) in seen:
                continue
            seen.add((file, obj, (*path, *where)))
            by_default = default_mode is None
            modes: list[tuple[tuple[Any, ...], Any, bool]] = [
                ((*where, "defaultMode") if not by_default else where,
                 KUBERNETES_SECRET_MODE if by_default else default_mode, by_default)]
            modes += [((*where, "items", i, "mode"), item["mode"], False)
                      for i, item in enumerate(secret.get("items") or []) if "mode" in item]
            if secret.get("items") and all("mode" in item for item in secret["items"]):
                modes = modes[1:]  # every file has its own mode: the default applies to none
            for at, mode, by_default in modes:
                readers = exposure(int(mode), owner=0, me=int(uid))
                if readers is None:
                    continue
                root = " in a pod that runs as root" if uid == 0 else ""
                note = " (Kubernetes' default)" if by_default else ""
                yield Problem(file, obj, _dotted((*path, *at)),
                              f"Secret {name} ({SECRET_FILES[name]}) is mounted with mode "
                              f"{int(mode):04o}{note}{root}: {readers} can read it, and lambdalake "
                              f"refuses such a file; set defaultMode: 0440 (a non-root pod reads it "
                              f"through its fsGroup) or 0400 (a pod that runs as root)")


POLICY_CHECKS = (private_key_problems, ray_port_problems, ray_auth_problems, mlflow_auth_problems,
                 kafka_auth_problems, network_policy_problems, secret_mode_problems)


def policy_problems(manifests: dict[str, list[Any]]) -> list[Problem]:
    """What the platform's security policy refuses in a set of parsed manifests (file → docs)."""
    return [problem for check in POLICY_CHECKS for problem in check(manifests)]
