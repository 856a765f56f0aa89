"""Offline checks of the scaled-out platform's Kubernetes manifests (`infra/k8s/`).

Every object is checked against the schema its API server would apply, and unknown fields
are refused, as `kubectl apply` (strict field validation) refuses them:
- core kinds (Deployment, Service, ConfigMap, ...) against the Kubernetes API's own JSON
  schemas for `KUBERNETES_VERSION`, shipped by the `kubernetes-validate` package;
- custom resources against the `openAPIV3Schema` of their operator's CRD at a pinned
  release: Strimzi (Kafka, KafkaNodePool, KafkaTopic), the Kubeflow Spark operator
  (SparkApplication) and KubeRay (RayService). `ensure_crds` fetches the CRDs once from
  Maven Central (Strimzi's `api` test jar) and the Go module proxy (the operators' Go
  modules) into `<state_dir>/k8s-crds`.

Then the parts our own code reads are checked the way our code reads them:
- every `LAMBDALAKE_*` variable names a setting and the values parse together
  (`lakehouse.config.load_settings`);
- a RayService's `serveConfigV2` is a valid Ray Serve config (`ray.serve.schema`) whose
  applications' `args` build the model service's `ServiceArgs`;
- a `*-values.yaml` file is Helm values for the official Airflow chart: each `config`
  section and option, and each `AIRFLOW__SECTION__OPTION` variable, is one Airflow itself
  defines (its `config.yml`), and the executor is one of Airflow's own.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from lakehouse.errors import ServiceError

MANIFESTS_DIR = Path(__file__).resolve().parent / "k8s"
KUBERNETES_VERSION = "1.34.0"
ENV_PREFIX = "LAMBDALAKE_"
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
    CrdSource("kuberay", "go", "github.com/ray-project/kuberay/ray-operator@v1.5.0",
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
        for entry in container.get("env") or []:
            name = entry.get("name", "")
            if name.startswith(ENV_PREFIX):
                found[name] = str(entry["value"]) if "value" in entry else None
    return found


def settings_problems(env: dict[str, str | None]) -> list[tuple[str, str]]:
    """Names that are no setting, and values lambdalake would refuse."""
    from lakehouse.config import CONFIG_FILE_ENV, Settings, load_settings
    from lakehouse.errors import ConfigError

    problems, values = [], {}
    for name, value in sorted(env.items()):
        field = name[len(ENV_PREFIX):].lower()
        if name == CONFIG_FILE_ENV:
            continue
        if field not in Settings.model_fields:
            problems.append((name, "is not a lambdalake setting (see the README's Configuration)"))
        elif value is not None:
            values[field] = value
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

    from speed.model_service import ServiceArgs

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
            continue
        for doc in docs:
            for where, message in check_document(doc, crds):
                problems.append(Problem(label, _object_name(doc), where, message))
            if isinstance(doc, dict):
                env.update(lambdalake_env(doc))
    for where, message in settings_problems(env):
        problems.append(Problem(str(directory.name), "LAMBDALAKE_* settings", where, message))
    return problems
