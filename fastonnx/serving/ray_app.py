"""The Ray Serve deployment of ``fastonnx serve``: a thin wrapper over ``RequestHandler``.

Each replica is a Ray actor holding its own ORT session (fastonnx's custom-op library, and
onnxruntime-extensions' when the tokenizer is inside, registered by ``load_text_model``).
Requests are parsed and bounded on arrival, then grouped by ``serve.batch`` so one model call
serves several requests; the model runs in a worker thread so the replica keeps answering
health checks while it computes.

The same application runs on one machine or a multi-node cluster: ``serve run
fastonnx.serving.ray_app:app_builder model=/abs/model.onnx tokenizer=/abs/dir replicas=4``
(every node needs fastonnx installed and the model at the same path).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, fields

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from fastonnx.serving.backend import load_text_model
from fastonnx.serving.handler import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_TEXT_CHARS,
    DEFAULT_MAX_TEXTS,
    RequestError,
    RequestHandler,
    Response,
    internal_error,
)

APP_NAME = "fastonnx"
DEPLOYMENT_NAME = "FastonnxEncoder"
RAY_NAMESPACE = "serve"  # where Serve keeps its actors (replicas among them)


@dataclass
class ServeOptions:
    """Everything ``fastonnx serve`` passes to Ray Serve (also ``serve run`` builder args)."""

    model: str
    tokenizer: str | None = None
    threads: int = 1
    max_length: int | None = None  # tokens per text (default: the tokenizer's maximum)
    replicas: int = 1
    replica_cpus: float | None = None  # Ray CPUs reserved per replica (None: ``threads``)
    max_ongoing_requests: int = 16
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    min_replicas: int | None = None  # autoscaling when max_replicas is set
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    max_texts: int = DEFAULT_MAX_TEXTS
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @classmethod
    def from_args(cls, args: dict) -> ServeOptions:
        """From ``serve run`` key=value strings (or a config file's ``args``)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown fastonnx serve option(s) {unknown}; known: {list(known)}")
        values = {}
        for key, raw in args.items():
            kind = str(known[key].type)
            if raw is None or kind.startswith("str"):
                values[key] = raw
            elif "float" in kind:
                values[key] = float(raw)
            else:
                values[key] = int(raw)
        return cls(**values)

    def deployment_options(self) -> dict:
        options = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {
                "num_cpus": self.threads if self.replica_cpus is None else self.replica_cpus
            },
        }
        if self.max_replicas is not None:
            options["autoscaling_config"] = {
                "min_replicas": self.replicas if self.min_replicas is None else self.min_replicas,
                "initial_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes: never buffered whole."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "too_large", f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, "too_large", f"request body over {limit} bytes")
    return bytes(body)


def _json(response: Response) -> JSONResponse:
    return JSONResponse(response.body, status_code=response.status)


@serve.deployment(name=DEPLOYMENT_NAME)
class EncoderDeployment:
    def __init__(self, options: dict) -> None:
        o = ServeOptions(**options)
        model = load_text_model(o.model, o.tokenizer, threads=o.threads, max_length=o.max_length)
        self.handler = RequestHandler(
            model,
            max_texts=o.max_texts,
            max_text_chars=o.max_text_chars,
            max_body_bytes=o.max_body_bytes,
        )
        self._batched.set_max_batch_size(o.max_batch_size)
        self._batched.set_batch_wait_timeout_s(o.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, requests: list[list[str]]) -> list[dict]:
        # ORT releases the GIL: the event loop stays free for new requests and health checks.
        return await asyncio.to_thread(self.handler.answer_many, requests)

    async def __call__(self, request: Request) -> JSONResponse:
        route = self.handler.route(request.method, request.url.path)
        if isinstance(route, Response):
            return _json(route)
        if route == "health":
            return _json(self.handler.health())
        try:
            texts = self.handler.parse(await _read_body(request, self.handler.max_body_bytes))
        except RequestError as exc:
            return _json(exc.response())
        try:
            return JSONResponse(await self._batched(texts))
        except Exception as exc:  # noqa: BLE001 - the model failed: answer 500, keep serving
            return _json(internal_error(exc))

    def check_health(self) -> None:
        # Ray calls this periodically; raising marks the replica unhealthy and replaces it.
        if self.handler.model is None:
            raise RuntimeError("no model loaded")


def build_app(options: ServeOptions):
    """The bound application (``serve.run(build_app(...))``)."""
    return EncoderDeployment.options(**options.deployment_options()).bind(asdict(options))


def app_builder(args: dict):
    """For ``serve run fastonnx.serving.ray_app:app_builder model=... replicas=2``."""
    return build_app(ServeOptions.from_args(args))


# -- replica failure injection (the load test's --kill-replica-at) -----------------------------


def replica_actor_names(app: str = APP_NAME) -> list[str]:
    """Names of the live replica actors of ``app``'s encoder deployment (needs ray.init)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{DEPLOYMENT_NAME}#"
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == RAY_NAMESPACE and a["name"].startswith(prefix)
    )


def kill_one_replica(app: str = APP_NAME) -> str:
    """Kills one replica actor of ``app`` (Serve notices and starts a replacement); its name."""
    import ray

    names = replica_actor_names(app)
    if not names:
        raise RuntimeError(f"no live replica of the Serve application '{app}' found")
    ray.kill(ray.get_actor(names[0], namespace=RAY_NAMESPACE), no_restart=True)
    return names[0]
