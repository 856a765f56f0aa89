"""Ray Serve on the platform's Ray head: deploy a small deployment and call it over HTTP."""

from __future__ import annotations

import json
import os
import sys
import urllib.request

import pytest

from lakehouse.config import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_client(ray_cluster: Settings) -> Settings:
    from ray import cloudpickle

    # the deployment below is defined in this test module, which Ray's workers cannot import
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray_cluster


def test_deployment_answers_over_http(ray_client: Settings) -> None:
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    class Summer:
        async def __call__(self, request: Request) -> dict[str, float]:
            body = await request.json()
            return {"sum": float(sum(body["values"])), "pid": os.getpid()}

    serve.run(Summer.bind(), name="test-summer", route_prefix="/test-summer")
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{ray_client.serve_http_port}/test-summer",
            data=json.dumps({"values": [1, 2, 3.5]}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        assert answer["sum"] == 6.5
        assert answer["pid"] != os.getpid()  # answered by a Serve replica, not by this process
        handle = serve.get_app_handle("test-summer")
        assert handle is not None
    finally:
        serve.delete("test-summer")
