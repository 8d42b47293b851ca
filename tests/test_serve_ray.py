"""A real Ray Serve deployment of `fastonnx serve`, started and stopped on loopback.

Slow to start (a local Ray cluster: about a minute on 2 shared cores), so behind the `serve`
marker: ``pytest -m serve tests/test_serve_ray.py`` (needs ``pip install 'fastonnx[serve]'``).
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

pytestmark = pytest.mark.serve

TEXTS = ["the movie was very good", "bad", "but the plot was long and dull"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def served(tiny_bert, tokenizer):
    ray = pytest.importorskip("ray")
    from ray import serve

    from fastonnx.serving.ray_app import ServeOptions, build_app, replica_actor_names

    _, folder = tokenizer
    port = free_port()
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ServeOptions(
            model=str(tiny_bert), tokenizer=str(folder), replicas=2, max_length=64
        )
        serve.run(build_app(options), name="fastonnx", route_prefix="/")
        yield f"http://127.0.0.1:{port}", replica_actor_names, folder
    finally:
        serve.shutdown()
        ray.shutdown()


def test_deployment_answers_real_requests(served, tiny_bert):
    import fastonnx

    url, replicas, folder = served
    assert len(replicas()) == 2
    status, body = call(f"{url}/", {"texts": TEXTS})
    assert status == 200
    want = fastonnx.Encoder(tiny_bert, folder, threads=1, max_length=64).encode(TEXTS)
    np.testing.assert_allclose(np.array(body["embeddings"]), want, atol=1e-5)
    status, body = call(f"{url}/health")
    assert status == 200 and body["status"] == "ok" and body["dim"] == 64


def test_deployment_refuses_bad_requests(served):
    url, _, _ = served
    status, body = call(f"{url}/encode", {"texts": []})
    assert status == 400 and body["error"]["kind"] == "bad_request"
    status, body = call(f"{url}/encode", {"texts": ["x"] * 1000})
    assert status == 413 and body["error"]["kind"] == "too_large"
    status, body = call(f"{url}/nowhere")
    assert status == 404


def test_killed_replica_is_replaced_and_requests_keep_being_answered(served):
    import time

    from fastonnx.serving.ray_app import kill_one_replica

    url, replicas, _ = served
    killed = kill_one_replica()
    answered = 0
    for _ in range(20):
        status, _ = call(f"{url}/", {"texts": ["good"]})
        answered += status == 200
    assert answered >= 19  # a request routed to the dying replica may fail, no more
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (killed in replicas() or len(replicas()) < 2):
        time.sleep(1)
    assert killed not in replicas() and len(replicas()) == 2
