"""The model service on the platform's Ray Serve: it serves the verified champion over HTTP
and through a handle, answers bad requests with 4xx, follows a promotion without failing a
request, and refuses a tampered model."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lakehouse.config import Settings
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.model import predict
from tests.integration.models import WIDTH, publish, random_model

pytestmark = pytest.mark.integration

ROWS = np.random.default_rng(5).normal(0.0, 2.0, size=(6, WIDTH))


@pytest.fixture(scope="module")
def service(ray_cluster: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ray import serve

    from lakehouse.serve import APP_NAME
    from speed.model_service import ServiceArgs, serve_on_ray

    settings = ray_cluster.model_copy(update={"model_name": f"serve-it-{uuid.uuid4().hex[:6]}"})
    root = tmp_path_factory.mktemp("bundles")
    first = random_model(1)
    v1 = publish(settings, first, root)
    args = ServiceArgs.from_settings(settings, poll_s=1.0, max_replicas=1)
    info = serve_on_ray(settings.ray_address, args)
    yield {"settings": settings, "root": root, "args": args, "info": info, "v1": v1, "first": first,
           "url": f"http://127.0.0.1:{settings.serve_http_port}/model"}
    serve.delete(APP_NAME)


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_serves_the_verified_champion_over_http(service: dict[str, Any]) -> None:
    assert service["info"]["version"] == service["v1"]
    assert service["info"]["feature_names"] == list(FRAUD_SPEC.feature_names)
    status, answer = _post(service["url"], json.dumps({"features": ROWS.tolist()}).encode())
    assert status == 200 and answer["model_version"] == service["v1"]
    assert np.allclose(answer["scores"], predict(service["first"], ROWS), atol=1e-6)


@pytest.mark.parametrize(("body", "status"), [
    (b"{not json", 400),
    (b'{"rows": []}', 400),
    (json.dumps({"features": []}).encode(), 422),
    (json.dumps({"features": [[1.0, 2.0]]}).encode(), 422),
    (json.dumps({"features": [["x"] * WIDTH]}).encode(), 422),
])
def test_bad_requests_get_a_4xx_with_the_reason(service: dict[str, Any], body: bytes, status: int) -> None:
    got, answer = _post(service["url"], body)
    assert got == status and answer["error"]


def test_a_promotion_is_followed_without_failing_a_request(service: dict[str, Any]) -> None:
    from ray import serve

    from lakehouse.serve import APP_NAME

    handle = serve.get_app_handle(APP_NAME)
    seen: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def keep_scoring() -> None:
        while not stop.is_set():
            try:
                seen.append(handle.score.remote(ROWS.tolist()).result(timeout_s=30)["model_version"])
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and fails the test
                failures.append(repr(exc))

    worker = threading.Thread(target=keep_scoring)
    worker.start()
    try:
        time.sleep(1.0)
        second = random_model(2)
        v2 = publish(service["settings"], second, service["root"])
        deadline = time.monotonic() + 60
        while (not seen or seen[-1] != v2) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join()
    assert not failures
    assert seen[0] == service["v1"] and seen[-1] == v2
    assert seen == sorted(seen)  # one switch, never back
    answer = handle.score.remote(ROWS.tolist()).result(timeout_s=30)
    assert np.allclose(answer["scores"], predict(second, ROWS), atol=1e-6)
    # the speed layer's path: its micro-batch scored at once, by the same model, same answer
    at_once = handle.score_batch.remote(ROWS.tolist()).result(timeout_s=30)
    assert at_once["scores"] == answer["scores"] and at_once["model_version"] == v2
    assert at_once["batch_rows"] == len(ROWS)
    service["v2"] = v2


def test_a_tampered_model_is_refused(service: dict[str, Any]) -> None:
    from ray import serve

    from lakehouse.serve import APP_NAME
    from speed.model_service import build_app

    current = serve.get_app_handle(APP_NAME).info.remote().result(timeout_s=30)["version"]
    tampered = publish(service["settings"], random_model(3), service["root"], tamper=True)
    deadline = time.monotonic() + 30
    info = {}
    while time.monotonic() < deadline:
        info = serve.get_app_handle(APP_NAME).info.remote().result(timeout_s=30)
        if "changed after signing" in info["last_error"]:
            break
        time.sleep(0.5)
    assert "changed after signing" in info["last_error"]
    assert info["version"] == current != tampered  # it keeps serving the verified model
    # a fresh deployment whose champion is the tampered version does not start
    with pytest.raises(RuntimeError, match="Deploying application model-tampered failed"):
        serve.run(build_app(dataclasses.asdict(service["args"])), name="model-tampered",
                  route_prefix="/model-tampered")
    try:
        why = serve.status().applications["model-tampered"].deployments["ModelScorer"].message
        assert "changed after signing" in why, why
    finally:
        serve.delete("model-tampered")


@pytest.mark.parametrize("made_for", ["another spec", "other features"])
def test_a_model_of_another_spec_is_refused(service: dict[str, Any], made_for: str) -> None:
    """A validly signed version whose manifest names another spec fingerprint, or other
    feature names of the same width, is not served: the service keeps the current version
    and its last error names both values; a fresh deployment on it does not start."""
    from ray import serve

    from lakehouse.serve import APP_NAME
    from speed.model_service import build_app

    names = list(FRAUD_SPEC.feature_names)
    if made_for == "another spec":
        overrides: dict[str, Any] = {"spec_fingerprint": "0123456789abcdef"}
        expected = ("0123456789abcdef", FRAUD_SPEC.fingerprint())
    else:
        overrides = {"feature_names": [names[1], names[0], *names[2:]]}  # same width, swapped
        expected = (str(overrides["feature_names"]), str(names))
    current = serve.get_app_handle(APP_NAME).info.remote().result(timeout_s=30)["version"]
    other = publish(service["settings"], random_model(4), service["root"], **overrides)
    deadline = time.monotonic() + 30
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = serve.get_app_handle(APP_NAME).info.remote().result(timeout_s=30)
        if f" v{other}: " in info["last_error"]:  # the poller tried this version
            break
        time.sleep(0.5)
    assert info["last_error"].startswith("ModelSpecError: ") and f" v{other}: " in info["last_error"], info
    assert all(value in info["last_error"] for value in expected), info["last_error"]
    assert info["version"] == current != other
    assert info["spec_fingerprint"] == FRAUD_SPEC.fingerprint()
    name = f"model-{made_for.replace(' ', '-')}"
    with pytest.raises(RuntimeError, match=f"Deploying application {name} failed"):
        serve.run(build_app(dataclasses.asdict(service["args"])), name=name, route_prefix=f"/{name}")
    try:
        why = serve.status().applications[name].deployments["ModelScorer"].message
        assert expected[0] in why and expected[1] in why, why
    finally:
        serve.delete(name)


def test_the_serve_config_file_deploys_the_same_application(service: dict[str, Any], tmp_path: Path) -> None:
    """`lambdalake model config` → `serve run --non-blocking FILE`: a standard Serve
    deployment of the same application (here over the fixture's, on the good version)."""
    import subprocess
    import sys

    from lakehouse import registry
    from tests.conftest import lambdalake

    settings = service["settings"]
    client = registry.client(settings.mlflow_uri)
    registry.move_alias(client, settings.model_name, "champion", service["v2"],
                        why="test: back to the last verified version")
    config = lambdalake("model", "config", env={"LAMBDALAKE_MODEL_NAME": settings.model_name}).stdout
    (tmp_path / "serve.yaml").write_text(config)
    assert "import_path: speed.model_service:build_app" in config
    deployed = subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "run", "--non-blocking",
         f"--address={settings.ray_address}", str(tmp_path / "serve.yaml")],
        capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    with urllib.request.urlopen(service["url"], timeout=30) as response:
        info = json.load(response)
    assert info["version"] == service["v2"] and info["last_error"] == ""
    status, answer = _post(service["url"], json.dumps({"features": ROWS.tolist()}).encode())
    assert status == 200 and answer["model_version"] == service["v2"]
