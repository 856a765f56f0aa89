"""The model service: one Ray Serve deployment that every score goes through.

`ModelScorer` serves the registry's `champion` version of the model. Each replica downloads
the signed bundle from MLflow, verifies it with the public key and checks that it was made
for the spec the service runs (`ServiceArgs.spec_fingerprint` and `feature_names`, the
platform's spec unless told otherwise): an unsigned or changed bundle, or one of another
spec, is refused (the replica does not start, or keeps its current model). It scores on the GPU
when Ray gave it one. The API's calls (`score` through a deployment handle) and HTTP
`/predict` requests are batched together with `@serve.batch`; the speed layer's micro-batch
is a batch already and is scored at once (`score_batch`), without waiting for company. A background task polls
the registry; when the alias moves, the new version is loaded and verified beside the old
one and swapped in between two batches, so no request fails or is dropped.

Deploy with `lambdalake model serve`, or with a standard Serve config file:

    applications:
      - name: model
        route_prefix: /model
        import_path: speed.model_service:build_app
        args: {tracking_uri: "http://127.0.0.1:5000", model_name: fraud,
               verify_key_pem: "-----BEGIN PUBLIC KEY-----..."}

(or `verify_key_file: /path/to/key.pub` where the key is mounted, as on the KubeRay
RayCluster's workers in `infra/k8s/ray-cluster.yaml`.)

(`serve run config.yaml` / `serve deploy config.yaml`; `lambdalake model config` prints one
for the current settings.)
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lakehouse import registry
from lakehouse.bundle import (
    ModelSpecError,
    check_bundle_spec,
    load_verify_key,
    public_pem,
    spec_fingerprint_of,
)
from lakehouse.config import SETTING, Settings, options_from_settings, setting_field
from lakehouse.errors import ServiceError, SpeedError, ValidationError
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.model import load_bundle
from lakehouse.registry import CHAMPION
from lakehouse.serve import DEPLOYMENT, app_name, connect
from lakehouse.spec import PlatformSpec

if TYPE_CHECKING:
    from ray.serve import Application

log = logging.getLogger("lambdalake.model_service")


@dataclass(frozen=True)
class ServiceArgs:
    """What a replica needs to find, verify and serve the model (the app's `args`). A field
    whose metadata names a setting (`setting_field`, `SETTING`) takes its default from it and
    its value from the settings in `from_settings`."""

    tracking_uri: str = field(metadata={SETTING: "mlflow_uri"})  # no default: always given
    model_name: str = field(metadata={SETTING: "model_name"})
    verify_key_pem: str = ""  # the public key itself, or
    verify_key_file: str = ""  # a path to it on each replica's node (a mounted Secret)
    alias: str = CHAMPION
    poll_s: float = 5.0
    max_batch_size: int = 256
    batch_wait_timeout_s: float = 0.005
    min_replicas: int = setting_field("serve_min_replicas")
    max_replicas: int = setting_field("serve_max_replicas")
    target_ongoing_requests: float = 8.0
    num_gpus: float = setting_field("serve_num_gpus")
    num_cpus: float = 0.25
    # the spec the service runs: a bundle made for another one is refused
    spec_fingerprint: str = field(default_factory=FRAUD_SPEC.fingerprint)
    feature_names: list[str] = field(default_factory=lambda: list(FRAUD_SPEC.feature_names))

    @classmethod
    def from_settings(cls, settings: Settings, spec: PlatformSpec | None = None,
                      **overrides: Any) -> ServiceArgs:
        """Args for the settings' registry and key, running `spec` (default the platform's)."""
        base: dict[str, Any] = {"verify_key_pem": public_pem(load_verify_key(settings.verify_key_path)).decode()}
        if spec is not None:
            base.update(spec_fingerprint=spec.fingerprint(), feature_names=list(spec.feature_names))
        return options_from_settings(cls, settings, **{**base, **overrides})

    def __post_init__(self) -> None:
        if bool(self.verify_key_pem) == bool(self.verify_key_file):
            raise ValueError("the model service needs exactly one of verify_key_pem (the "
                             "public key) and verify_key_file (a path to it)")
        if not self.spec_fingerprint or not self.feature_names:
            raise ValueError("the model service needs the spec_fingerprint and feature_names of "
                             "the spec it runs (leave both out for the platform's)")
        object.__setattr__(self, "feature_names", [str(n) for n in self.feature_names])

    def public_key_pem(self) -> bytes:
        """The verify key's PEM bytes, from the args or from the file they name."""
        if self.verify_key_pem:
            return self.verify_key_pem.encode()
        try:
            return Path(self.verify_key_file).read_bytes()
        except OSError as error:
            raise SpeedError(f"cannot read the model verify key {self.verify_key_file}: "
                             f"{error.strerror}") from error


class BadRequest(ValidationError):
    """A scoring request that cannot be served as sent; the message says why."""

    def __init__(self, reason: str) -> None:
        super().__init__([reason])


def open_bundle(directory: Path, args: ServiceArgs) -> tuple[Any, dict[str, Any]]:
    """(model, manifest) of a downloaded bundle that is signed by the service's key, unchanged,
    and made for the spec the service runs; ModelSignatureError or ModelSpecError otherwise."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(args.public_key_pem())
    model, manifest = load_bundle(directory, key)  # type: ignore[arg-type]
    check_bundle_spec(manifest, spec_fingerprint=args.spec_fingerprint, feature_names=args.feature_names)
    return model, manifest


class LoadedModel:
    """A verified model version on its device."""

    def __init__(self, args: ServiceArgs, version: Any) -> None:
        import torch

        client = registry.client(args.tracking_uri)
        with tempfile.TemporaryDirectory(prefix="lambdalake-serve-") as scratch:
            bundle = registry.download_bundle(client, version, Path(scratch))
            try:
                model, manifest = open_bundle(bundle, args)
            except ModelSpecError as exc:
                raise ModelSpecError(f"{args.model_name} v{version.version}: {exc}") from None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.version = int(version.version)
        self.feature_names: list[str] = manifest["feature_names"]
        self.spec_fingerprint: str = spec_fingerprint_of(manifest) or ""

    def score(self, rows: list[list[float]]) -> list[float]:
        import torch

        with torch.no_grad():
            x = torch.as_tensor(rows, dtype=torch.float32, device=self.device)
            scores: list[float] = self.model.probability(x).cpu().tolist()
            return scores


def check_rows(rows: Any, width: int) -> list[list[float]]:
    """The feature rows of a request, or BadRequest saying what is wrong with them."""
    if not isinstance(rows, list) or not rows:
        raise BadRequest("'features' must be a non-empty list of feature vectors")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width:
            raise BadRequest(f"features[{i}] must be a list of {width} numbers")
        for value in row:
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value \
                    or value in (float("inf"), float("-inf")):
                raise BadRequest(f"features[{i}] holds {value!r}: every feature must be a finite number")
    return rows


async def _timed_score(model: LoadedModel, rows: list[list[float]]) -> tuple[list[float], float]:
    """`model`'s scores of `rows` and the milliseconds they took; a large batch off the
    replica's event loop (a thread), a small one on it."""
    started = time.perf_counter()
    scores = await asyncio.to_thread(model.score, rows) if len(rows) > 512 else model.score(rows)
    return scores, (time.perf_counter() - started) * 1000


def _scorer_class() -> type[Any]:
    """The deployment class (built lazily so that importing this module needs no Ray)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    class ModelScorer:
        def __init__(self, args: dict[str, Any]) -> None:
            self.args = ServiceArgs(**args)
            self.client = None
            loaded = self._load_current()
            if loaded is None:
                raise SpeedError(f"model {self.args.model_name!r} has no {self.args.alias!r} "
                                 "version to serve: train one first (`lambdalake batch train`)")
            self.loaded: LoadedModel = loaded
            self.swaps = 0
            self.last_error = ""
            # Ray's annotations of @serve.batch leave out the setters it adds to the method
            self._score_batched.set_max_batch_size(self.args.max_batch_size)  # type: ignore[attr-defined]
            self._score_batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)  # type: ignore[attr-defined]
            self._poller = asyncio.get_running_loop().create_task(self._follow_alias())
            log.info("serving %s v%s on %s", self.args.model_name, self.loaded.version,
                     self.loaded.device)

        def _load_current(self) -> LoadedModel | None:
            client = registry.client(self.args.tracking_uri)
            version = registry.version_by_alias(client, self.args.model_name, self.args.alias)
            return None if version is None else LoadedModel(self.args, version)

        async def _follow_alias(self) -> None:
            """Swap in a newly promoted version; keep the current one if it fails to verify."""
            while True:
                await asyncio.sleep(self.args.poll_s)
                try:
                    client = registry.client(self.args.tracking_uri)
                    version = await asyncio.to_thread(
                        registry.version_by_alias, client, self.args.model_name, self.args.alias)
                    if version is None or int(version.version) == self.loaded.version:
                        self.last_error = ""  # what the alias names is what is served
                        continue
                    fresh = await asyncio.to_thread(LoadedModel, self.args, version)
                    self.loaded, self.swaps = fresh, self.swaps + 1  # atomic between batches
                    log.info("now serving %s v%s", self.args.model_name, fresh.version)
                except Exception as exc:  # noqa: BLE001 - keep serving what was verified
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.error("keeping v%s: %s", self.loaded.version, self.last_error)

        @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005)
        async def _score_batched(self, requests: list[list[list[float]]]) -> list[dict[str, Any]]:
            model = self.loaded  # one version for the whole batch
            flat = [row for rows in requests for row in rows]
            scores, elapsed_ms = await _timed_score(model, flat)
            out, at = [], 0
            for rows in requests:
                out.append({"scores": scores[at:at + len(rows)], "model_version": model.version,
                            "model_ms": elapsed_ms, "batch_rows": len(flat)})
                at += len(rows)
            return out

        async def score(self, rows: list[list[float]]) -> dict[str, Any]:
            """Probabilities for raw model input vectors, and the version that scored them;
            batched with other callers' requests (waits up to `batch_wait_timeout_s` for them)."""
            return await self._score_batched(check_rows(rows, len(self.loaded.feature_names)))

        async def score_batch(self, rows: list[list[float]]) -> dict[str, Any]:
            """`score` for a caller whose rows are a batch already (a speed layer's
            micro-batch): scored at once, without waiting for other requests to join them."""
            model = self.loaded
            scores, elapsed_ms = await _timed_score(model, check_rows(rows, len(model.feature_names)))
            return {"scores": scores, "model_version": model.version, "model_ms": elapsed_ms,
                    "batch_rows": len(rows)}

        async def info(self) -> dict[str, Any]:
            return {"model_name": self.args.model_name, "version": self.loaded.version,
                    "feature_names": self.loaded.feature_names, "device": str(self.loaded.device),
                    "spec_fingerprint": self.loaded.spec_fingerprint, "swaps": self.swaps,
                    "last_error": self.last_error}

        async def __call__(self, request: Request) -> JSONResponse:
            if request.method == "GET":
                return JSONResponse(await self.info())
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"error": "the body must be JSON: {\"features\": [[...], ...]}"},
                                    status_code=400)
            if not isinstance(body, dict) or "features" not in body:
                return JSONResponse({"error": "expected a JSON object with 'features'"}, status_code=400)
            try:
                return JSONResponse(await self.score(body["features"]))
            except BadRequest as exc:
                return JSONResponse({"error": str(exc), "feature_names": self.loaded.feature_names},
                                    status_code=422)

        async def check_health(self) -> None:
            if self._poller.done() and self._poller.exception() is not None:
                raise RuntimeError(f"the registry poller died: {self._poller.exception()}")

    return ModelScorer


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application (the `import_path` of a Serve config file)."""
    from ray import serve

    service = ServiceArgs(**args)
    deployment = serve.deployment(
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": service.num_cpus, "num_gpus": service.num_gpus},
        autoscaling_config={"min_replicas": service.min_replicas,
                            "max_replicas": service.max_replicas,
                            "target_ongoing_requests": service.target_ongoing_requests},
        max_ongoing_requests=max(64, service.max_batch_size),
        health_check_period_s=10,
        max_constructor_retry_count=3,  # a model that fails verification will not pass later
    )(_scorer_class())
    return deployment.bind(asdict(service))


def serve_on_ray(address: str, service: ServiceArgs, *, timeout_s: float = 180.0) -> dict[str, Any]:
    """Deploy the application on a running Ray cluster (Serve already started), wait until
    it is healthy, and return what it serves."""
    from ray import serve

    connect(address=address)
    name = app_name(service.alias)
    handle = serve.run(build_app(asdict(service)), name=name, route_prefix=f"/{name}", blocking=False)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info: dict[str, Any] = handle.info.remote().result(timeout_s=max(1.0, deadline - time.monotonic()))
            return info
        except Exception as exc:
            if time.monotonic() > deadline:
                why = (str(exc).splitlines() or [""])[0]
                raise ServiceError(
                    f"the model service {name!r} on Ray at {address} was not healthy within "
                    f"{timeout_s:.0f}s ({type(exc).__name__}: {why}); check `serve status` and "
                    "the replica logs, then run `lambdalake model serve` again") from exc
            time.sleep(1.0)


def serve_config(service: ServiceArgs) -> str:
    """A Serve config file (YAML) deploying this application with these arguments."""
    import yaml

    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1"},
        "applications": [{
            "name": app_name(service.alias),
            "route_prefix": f"/{app_name(service.alias)}",
            "import_path": "speed.model_service:build_app",
            "args": asdict(service),
        }],
    }
    text: str = yaml.safe_dump(config, sort_keys=False)
    return text
