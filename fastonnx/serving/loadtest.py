"""A loopback HTTP load test (standard library only): concurrency levels, latency percentiles,
throughput and errors by kind, optionally with a timeline of what clients saw around an event
(a replica killed mid-run).

Bounded by construction: only loopback hosts, at most ``MAX_REQUESTS`` requests and
``MAX_SECONDS`` seconds per level, ``MAX_CONCURRENCY`` client threads. Each client thread keeps
one persistent connection (HTTP/1.1 keep-alive) and opens a new one after an error.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_CONCURRENCY = 256
MAX_REQUESTS = 100_000
MAX_SECONDS = 600.0

DEFAULT_TEXTS = [
    "the movie was very good, and the actors were great",
    "a long, dull plot that goes nowhere",
    "it is a film about a family and a house by the sea",
    "not bad at all",
]


class LoadTestError(ValueError):
    """Bad load-test input (a non-loopback URL, a bound out of range); the message says why."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str


def loopback_target(url: str) -> Target:
    """The URL's host, port and path; refuses anything that is not plain http on loopback."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise LoadTestError(f"{url}: only http:// URLs (got scheme {parts.scheme or 'none'!r})")
    host = parts.hostname
    if not host:
        raise LoadTestError(f"{url}: no host")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise LoadTestError(f"{url}: {exc}") from None
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError as exc:
        raise LoadTestError(f"{url}: cannot resolve {host}: {exc}") from None
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if outside or not addresses:
        raise LoadTestError(
            f"{url}: {host} is not a loopback address ({', '.join(outside)}); the load test "
            "only targets this machine (127.0.0.0/8, ::1, localhost)"
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(host, port, path)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (NumPy's
    default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Sample:
    start_s: float  # since the run's start
    latency_s: float
    error: str | None  # None: a 200 with a JSON body


@dataclass
class LevelResult:
    concurrency: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)  # error kind -> its first detail

    @property
    def ok_latencies_ms(self) -> list[float]:
        return [s.latency_s * 1e3 for s in self.samples if s.error is None]

    @property
    def errors(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.samples:
            if s.error is not None:
                counts[s.error] = counts.get(s.error, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict:
        ok = self.ok_latencies_ms
        return {
            "concurrency": self.concurrency,
            "requests": len(self.samples),
            "ok": len(ok),
            "errors": self.errors,
            "error_examples": dict(sorted(self.examples.items())),
            "p50_ms": percentile(ok, 50),
            "p99_ms": percentile(ok, 99),
            "max_ms": max(ok) if ok else math.nan,
            "throughput_rps": len(ok) / self.wall_s if self.wall_s > 0 else math.nan,
            "wall_s": self.wall_s,
        }


def _classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | http.client.RemoteDisconnected):
        return "connection reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


def _connect(target: Target, timeout_s: float) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)
    conn.connect()
    # No Nagle delay: small request/response pairs would otherwise wait on delayed ACKs.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _one_request(
    conn: http.client.HTTPConnection, target: Target, body: bytes
) -> tuple[str | None, str]:
    """(error kind or None, the start of the response body)."""
    conn.request("POST", target.path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    detail = data[:300].decode("utf-8", "replace")
    if response.status != 200:
        return f"http {response.status}", detail
    try:
        json.loads(data)
    except ValueError:
        return "bad response body", detail
    return None, ""


def run_level(
    target: Target,
    body: bytes | list[bytes],
    concurrency: int,
    *,
    max_requests: int,
    max_seconds: float,
    timeout_s: float = 30.0,
    clock_zero: float | None = None,
) -> LevelResult:
    """``concurrency`` client threads send ``body`` (or the bodies in turn) until
    ``max_requests`` were sent or ``max_seconds`` passed (requests in flight then finish, each
    within ``timeout_s``)."""
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise LoadTestError(f"concurrency must be in 1..{MAX_CONCURRENCY}, got {concurrency}")
    if not 1 <= max_requests <= MAX_REQUESTS:
        raise LoadTestError(f"requests must be in 1..{MAX_REQUESTS}, got {max_requests}")
    if not 0 < max_seconds <= MAX_SECONDS:
        raise LoadTestError(f"seconds must be in (0, {MAX_SECONDS}], got {max_seconds}")
    bodies = [body] if isinstance(body, bytes) else list(body)
    if not bodies:
        raise LoadTestError("no request bodies")
    lock = threading.Lock()
    issued = 0
    samples: list[Sample] = []
    examples: dict[str, str] = {}
    start = time.perf_counter()
    zero = start if clock_zero is None else clock_zero
    deadline = start + max_seconds

    def client() -> None:
        nonlocal issued
        conn = None
        while True:
            with lock:
                if issued >= max_requests or time.perf_counter() >= deadline:
                    break
                payload = bodies[issued % len(bodies)]
                issued += 1
            t0 = time.perf_counter()
            try:
                if conn is None:  # connecting counts in the latency: a client would wait for it
                    conn = _connect(target, timeout_s)
                error, detail = _one_request(conn, target, payload)
            except (OSError, http.client.HTTPException) as exc:
                error, detail = _classify(exc), str(exc)
            t1 = time.perf_counter()
            if error is not None and conn is not None:  # a fresh connection after a failure
                conn.close()
                conn = None
            with lock:
                samples.append(Sample(t0 - zero, t1 - t0, error))
                if error is not None:
                    examples.setdefault(error, detail)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LevelResult(concurrency, time.perf_counter() - start, samples, examples)


def timeline(samples: list[Sample], bucket_s: float) -> list[dict]:
    """Per ``bucket_s`` of request start time: requests, errors, p50/p99 of the successes."""
    if bucket_s <= 0:
        raise LoadTestError(f"bucket must be > 0 seconds, got {bucket_s}")
    buckets: dict[int, list[Sample]] = {}
    for s in samples:
        buckets.setdefault(int(s.start_s // bucket_s), []).append(s)
    rows = []
    for index in sorted(buckets):
        group = buckets[index]
        ok = [s.latency_s * 1e3 for s in group if s.error is None]
        rows.append(
            {
                "t_s": index * bucket_s,
                "requests": len(group),
                "errors": len(group) - len(ok),
                "p50_ms": percentile(ok, 50),
                "p99_ms": percentile(ok, 99),
            }
        )
    return rows


def request_bodies(texts: list[str], texts_per_request: int, limit: int = 1000) -> list[bytes]:
    """Request bodies cycling through ``texts`` (at most ``limit`` distinct ones), so requests
    carry different sentences as real traffic does."""
    if texts_per_request < 1:
        raise LoadTestError(f"texts per request must be >= 1, got {texts_per_request}")
    if not texts:
        raise LoadTestError("no texts to send")
    count = min(limit, len(texts))
    return [
        json.dumps(
            {
                "texts": [
                    texts[(b * texts_per_request + j) % len(texts)]
                    for j in range(texts_per_request)
                ]
            }
        ).encode()
        for b in range(count)
    ]
