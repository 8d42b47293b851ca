"""`fastonnx loadtest`: a bounded loopback HTTP load test of a `fastonnx serve` endpoint."""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "loadtest",
        help="load-test a loopback HTTP endpoint: p50/p99 latency, throughput, errors",
        description='POST {"texts": [...]} to URL (loopback hosts only) from C client threads '
        "per --concurrency level, each level bounded by --requests and --duration; report "
        "p50/p99 latency of the answered requests, throughput and errors by kind. "
        "--kill-replica-at kills one Ray Serve replica of the `fastonnx serve` application "
        "mid-run and shows per-second what the clients saw.",
        epilog="example: fastonnx loadtest http://127.0.0.1:8000/ --concurrency 1 4 16 "
        "--requests 500 --duration 10",
    )
    p.add_argument("url", metavar="URL")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], metavar="C")
    p.add_argument(
        "--requests", type=int, default=500, metavar="N", help="at most N requests per level"
    )
    p.add_argument(
        "--duration", type=float, default=10.0, metavar="S", help="at most S seconds per level"
    )
    p.add_argument("--texts-per-request", type=int, default=1, metavar="K")
    p.add_argument(
        "--texts-file",
        type=Path,
        metavar="FILE",
        help="sentences to send, one per line (default: a few built-in ones)",
    )
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per request")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    g = p.add_argument_group("failure injection (Ray Serve)")
    g.add_argument(
        "--kill-replica-at",
        type=float,
        metavar="S",
        help="S seconds after the start, kill one replica actor of the Serve application",
    )
    g.add_argument("--ray-address", default="auto", help="the serving Ray cluster (default auto)")
    g.add_argument("--app", default=None, help="Serve application name (default fastonnx)")
    g.add_argument(
        "--bucket", type=float, default=1.0, metavar="S", help="timeline resolution (seconds)"
    )
    p.set_defaults(func=run)
    return p


def _finite(value):
    """NaN (no samples) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _print_levels(summaries: list[dict]) -> None:
    print(
        f"{'conc':>5} {'requests':>8} {'ok':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'req/s':>8}  errors"
    )
    for s in summaries:
        errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none"
        print(
            f"{s['concurrency']:>5} {s['requests']:>8} {s['ok']:>6} {_fmt(s['p50_ms']):>8} "
            f"{_fmt(s['p99_ms']):>8} {_fmt(s['max_ms']):>8} {_fmt(s['throughput_rps']):>8}  "
            f"{errors}"
        )
        for kind, detail in s["error_examples"].items():
            print(f"      first {kind}: {detail[:200]}")


class _Killer:
    """Connects to the Ray cluster up front (seconds), then kills one replica at ``at_s``."""

    def __init__(self, address: str, app: str, at_s: float) -> None:
        import ray

        from fastonnx.serving import ray_app

        self.ray, self.ray_app, self.app, self.at_s = ray, ray_app, app, at_s
        ray.init(address=address, log_to_driver=False)
        self.before = ray_app.replica_actor_names(app)
        if not self.before:
            raise RuntimeError(f"no live replica of the Serve application '{app}' at {address}")
        self.killed: str | None = None
        self.killed_at_s: float | None = None
        self.error: str | None = None

    def start(self, zero: float) -> threading.Thread:
        def kill() -> None:
            time.sleep(max(0.0, zero + self.at_s - time.perf_counter()))
            try:
                self.killed = self.ray_app.kill_one_replica(self.app)
            except Exception as exc:  # noqa: BLE001 - reported, the load test goes on
                self.error = f"{type(exc).__name__}: {exc}"
            self.killed_at_s = time.perf_counter() - zero

        thread = threading.Thread(target=kill, daemon=True)
        thread.start()
        return thread

    def after(self) -> list[str]:
        return self.ray_app.replica_actor_names(self.app)


def _kill_report(killer: _Killer, samples, bucket: float) -> dict:
    from fastonnx.serving.loadtest import percentile, timeline

    at = killer.killed_at_s if killer.killed_at_s is not None else math.inf
    before = [s.latency_s * 1e3 for s in samples if s.start_s < at and s.error is None]
    after = [s for s in samples if s.start_s + s.latency_s >= at]  # in flight at or after it
    after_ok = [s.latency_s * 1e3 for s in after if s.error is None]
    errors: dict[str, int] = {}
    for s in after:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    last_error = max((s.start_s + s.latency_s for s in after if s.error), default=None)
    return {
        "killed": killer.killed,
        "kill_error": killer.error,
        "killed_at_s": killer.killed_at_s,
        "replicas_before": len(killer.before),
        "replicas_after": len(killer.after()),
        "requests_after_kill": len(after),
        "answered_after_kill": len(after_ok),
        "errors_after_kill": errors,
        "last_error_s_after_kill": None if last_error is None else last_error - at,
        "p99_ms_before": percentile(before, 99),
        "p99_ms_after": percentile(after_ok, 99),
        "max_ms_after": max(after_ok) if after_ok else math.nan,
        "timeline": timeline(samples, bucket),
    }


def run(args: argparse.Namespace) -> int:
    from fastonnx.serving.loadtest import (
        DEFAULT_TEXTS,
        LoadTestError,
        loopback_target,
        request_bodies,
        run_level,
    )

    try:
        target = loopback_target(args.url)
        texts = DEFAULT_TEXTS
        if args.texts_file is not None:
            if not args.texts_file.is_file():
                raise LoadTestError(f"--texts-file {args.texts_file} does not exist")
            texts = [t for t in args.texts_file.read_text().splitlines() if t.strip()]
            if not texts:
                raise LoadTestError(f"--texts-file {args.texts_file} has no lines")
        body = request_bodies(texts, args.texts_per_request)
        if args.timeout <= 0 or args.bucket <= 0:
            raise LoadTestError("--timeout and --bucket must be > 0")
        if args.kill_replica_at is not None and args.kill_replica_at < 0:
            raise LoadTestError(f"--kill-replica-at must be >= 0, got {args.kill_replica_at}")
    except LoadTestError as exc:
        print(f"fastonnx loadtest: error: {exc}", file=sys.stderr)
        return 2

    killer = None
    if args.kill_replica_at is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            print(
                "fastonnx loadtest: error: --kill-replica-at needs Ray: pip install "
                "'fastonnx[serve]'",
                file=sys.stderr,
            )
            return 2
        from fastonnx.serving.ray_app import APP_NAME

        try:
            killer = _Killer(args.ray_address, args.app or APP_NAME, args.kill_replica_at)
        except (RuntimeError, ConnectionError) as exc:
            print(f"fastonnx loadtest: error: {exc}", file=sys.stderr)
            return 2

    zero = time.perf_counter()
    kill_thread = killer.start(zero) if killer else None
    levels = []
    try:
        for concurrency in args.concurrency:
            levels.append(
                run_level(
                    target,
                    body,
                    concurrency,
                    max_requests=args.requests,
                    max_seconds=args.duration,
                    timeout_s=args.timeout,
                    clock_zero=zero,
                )
            )
    except LoadTestError as exc:
        print(f"fastonnx loadtest: error: {exc}", file=sys.stderr)
        return 2
    summaries = [level.summary() for level in levels]
    print(f"{args.url}: {args.texts_per_request} text(s) per request")
    _print_levels(summaries)
    result: dict = {
        "url": args.url,
        "texts_per_request": args.texts_per_request,
        "levels": summaries,
    }
    if killer is not None:
        kill_thread.join(timeout=max(0.0, zero + args.kill_replica_at - time.perf_counter()) + 30)
        samples = [s for level in levels for s in level.samples]
        report = _kill_report(killer, samples, args.bucket)
        result["kill"] = report
        if report["killed"] is None:
            print(f"replica kill: did not happen ({report['kill_error'] or 'the run ended first'})")
        else:
            errors = ", ".join(f"{k}: {v}" for k, v in report["errors_after_kill"].items())
            print(
                f"replica kill at {report['killed_at_s']:.1f} s ({report['killed']}): "
                f"{report['answered_after_kill']} of {report['requests_after_kill']} requests "
                f"in flight or sent afterwards answered; errors: {errors or 'none'}; p99 "
                f"{_fmt(report['p99_ms_before'])} ms before, {_fmt(report['p99_ms_after'])} ms "
                f"after (max {_fmt(report['max_ms_after'])}); replicas {report['replicas_before']}"
                f" before, {report['replicas_after']} at the end"
            )
        print(f"{'t s':>6} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}")
        for row in report["timeline"]:
            print(
                f"{row['t_s']:>6.1f} {row['requests']:>8} {row['errors']:>6} "
                f"{_fmt(row['p50_ms']):>8} {_fmt(row['p99_ms']):>8}"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(_finite(result), indent=2, default=str) + "\n")
    failed = sum(s["requests"] - s["ok"] for s in summaries)
    return 1 if failed else 0
