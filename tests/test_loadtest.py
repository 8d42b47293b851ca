"""`fastonnx loadtest` against a tiny in-process HTTP server: counts, percentiles, errors by
kind, bounds, and the refusal of anything that is not loopback."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from fastonnx.cli import main
from fastonnx.serving.loadtest import (
    LoadTestError,
    Sample,
    loopback_target,
    percentile,
    run_level,
    timeline,
)


class Server:
    """Answers POSTs with JSON; every ``fail_every``-th request (1-based) gets a 500, and when
    ``garbage`` a 200 whose body is not JSON. Counts what it received."""

    def __init__(self, fail_every: int = 0, garbage: bool = False) -> None:
        self.received = 0
        self.bodies: list[bytes] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the load test's clients expect
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def do_POST(self):  # noqa: N802 - the http.server naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    outer.received += 1
                    n = outer.received
                    outer.bodies.append(body)
                if outer.fail_every and n % outer.fail_every == 0:
                    status, payload = 500, b'{"error": "injected"}'
                elif outer.garbage:
                    status, payload = 200, b"<html>not json"
                else:
                    status, payload = 200, b'{"embeddings": [[1.0]]}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.fail_every, self.garbage = fail_every, garbage
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/encode"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_counts_and_errors_by_kind():
    with Server(fail_every=5) as server:
        target = loopback_target(server.url)
        result = run_level(target, b'{"texts": ["a"]}', 4, max_requests=60, max_seconds=60)
    s = result.summary()
    assert s["requests"] == 60 == server.received
    assert s["errors"] == {"http 500": 12}
    assert s["error_examples"] == {"http 500": '{"error": "injected"}'}
    assert s["ok"] == 48 and len(result.ok_latencies_ms) == 48
    assert s["throughput_rps"] > 0
    assert server.bodies[0] == b'{"texts": ["a"]}'
    np.testing.assert_allclose(s["p50_ms"], np.percentile(result.ok_latencies_ms, 50))
    np.testing.assert_allclose(s["p99_ms"], np.percentile(result.ok_latencies_ms, 99))


def test_a_200_without_json_is_an_error():
    with Server(garbage=True) as server:
        result = run_level(loopback_target(server.url), b"{}", 2, max_requests=10, max_seconds=60)
    assert result.summary()["errors"] == {"bad response body": 10}
    assert result.summary()["ok"] == 0


def test_connection_refused_is_counted():
    with socket.socket() as sock:  # a port nothing listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = loopback_target(f"http://127.0.0.1:{port}/")
    result = run_level(target, b"{}", 2, max_requests=6, max_seconds=60, timeout_s=5)
    assert result.summary()["errors"] == {"connection refused": 6}


def test_duration_bounds_the_level():
    with Server() as server:
        result = run_level(
            loopback_target(server.url), b"{}", 2, max_requests=100_000, max_seconds=0.3
        )
    assert 0 < len(result.samples) < 100_000
    assert result.wall_s < 10  # the bound ended it, not the request count


@pytest.mark.parametrize(
    ("values", "q"),
    [([5.0], 50), ([1.0, 2.0], 50), ([3.0, 1.0, 2.0, 10.0], 99), (list(range(101)), 99.9)],
)
def test_percentile_matches_numpy(values, q):
    np.testing.assert_allclose(percentile(values, q), np.percentile(values, q))


def test_percentile_of_nothing_is_nan():
    assert np.isnan(percentile([], 50))


def test_timeline_buckets():
    samples = [Sample(0.1, 0.01, None), Sample(0.5, 0.03, "http 500"), Sample(1.2, 0.02, None)]
    rows = timeline(samples, 1.0)
    assert [(r["t_s"], r["requests"], r["errors"]) for r in rows] == [(0.0, 2, 1), (1.0, 1, 0)]
    np.testing.assert_allclose(rows[0]["p50_ms"], 10.0)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8000/",
        "http://8.8.8.8/",
        "http://[2001:db8::1]:8000/",
        "http://0.0.0.0:8000/",
        "https://127.0.0.1/",
        "ftp://127.0.0.1/",
        "127.0.0.1:8000",
    ],
)
def test_refuses_anything_but_loopback_http(url):
    with pytest.raises(LoadTestError):
        loopback_target(url)


def test_loopback_names_are_accepted():
    assert loopback_target("http://localhost:9/x?y=1").path == "/x?y=1"
    assert loopback_target("http://127.0.0.2:9").path == "/"
    assert loopback_target("http://[::1]:9/").port == 9


def test_bounds_are_enforced():
    target = loopback_target("http://127.0.0.1:9/")
    with pytest.raises(LoadTestError, match="concurrency"):
        run_level(target, b"{}", 0, max_requests=1, max_seconds=1)
    with pytest.raises(LoadTestError, match="requests"):
        run_level(target, b"{}", 1, max_requests=10**9, max_seconds=1)
    with pytest.raises(LoadTestError, match="seconds"):
        run_level(target, b"{}", 1, max_requests=1, max_seconds=10**6)


def test_command_reports_levels(tmp_path, capsys):
    out = tmp_path / "result.json"
    with Server(fail_every=4) as server:
        code = main(
            ["loadtest", server.url, "--concurrency", "1", "3", "--requests", "20"]
            + ["--texts-per-request", "3", "--json", str(out)]
        )
    assert code == 1  # some requests failed
    result = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3]
    assert [lv["requests"] for lv in result["levels"]] == [20, 20]
    assert sum(lv["errors"].get("http 500", 0) for lv in result["levels"]) == 10
    sent = [json.loads(b)["texts"] for b in server.bodies[:2]]
    assert [len(t) for t in sent] == [3, 3] and sent[0] != sent[1]  # sentences in turn
    assert "http 500" in capsys.readouterr().out


def test_command_refuses_non_loopback(capsys):
    assert main(["loadtest", "http://192.0.2.1:8000/"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
