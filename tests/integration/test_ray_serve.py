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
            return self.total(body["values"])

        def total(self, values: list[float]) -> dict[str, float]:
            return {"sum": float(sum(values)), "pid": os.getpid()}

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
        handle = serve.get_app_handle("test-summer")  # the same replicas, through a handle
        by_handle = handle.total.remote([1, 2, 3.5, 4]).result(timeout_s=60)
        assert by_handle == {"sum": 10.5, "pid": answer["pid"]}
    finally:
        serve.delete("test-summer")
