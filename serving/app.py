"""The Ray Serve application: an OpenAI-compatible HTTP API and a comparison web page over the model variants.

One deployment, `ModelServer`: each replica is the FastAPI ingress and holds the models (serving/model_pool.py), so a
request and its tokens make one hop between processes, Serve's HTTP proxy <-> the replica. It parses and validates
requests, answers errors, runs completions on the variants' continuous-batching engines (serving/engine.py) and turns
their events into OpenAI responses or server-sent events. (A separate gateway deployment in front of the model
replicas cost a second hop per request and per streamed batch: on 2 cores, 16-40% of the throughput at 8-16
concurrent streams and 14-35% more time to first token; docs/serving.md has the figures.) One deployment holding every
variant rather than one per variant because replicas reserve CPUs: on a 2-core machine three 1-CPU deployments do
not fit, while one replica holding every variant does.

Besides the OpenAI API it answers vLLM's tokenizer endpoints (serving/tokenization.py), Prometheus metrics at
/metrics (serving/metrics.py), and, when an API key is set, refuses every route but the page and /healthz to callers
without it (serving/auth.py).

Start it with `serve run serving/config.yaml`, `python jobs/serve.py`, or the pipeline job.
"""

import json
import logging
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from serving import tokenization
from serving.auth import OPEN_PATHS, api_key_from_env, check_authorization
from serving.completions import collect_response, sse_stream
from serving.metrics import ServerMetrics
from serving.model_pool import ModelPool
from serving.protocol import APIError, CompletionRequest, check_request, completion_id, validation_message
from serving.settings import ServerSettings, check_settings
from serving.tokenization import DetokenizeRequest, TokenizeRequest, context_length

log = logging.getLogger("ray.serve")
LIGHT_REQUEST_SLACK = 32  # requests in flight per replica beyond the completions its engines take (build_app)
PAGE = Path(__file__).with_name("static") / "index.html"


async def _authorized(request: Request) -> None:
    """A dependency of every route (so a route added later is covered too): the API key, where one is set."""
    serve.get_replica_context().servable_object.authorize(request)


app = FastAPI(title="GPT-2 on Ray Serve", docs_url="/docs", dependencies=[Depends(_authorized)])


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@app.exception_handler(HTTPException)
async def _no_such_route(request: Request, e: HTTPException) -> JSONResponse:
    """FastAPI's own answers (404 for a path no route has, 405 for a method a route does not take) in the API's error
    shape, so that an OpenAI client shows what went wrong rather than "Not Found"."""
    where = f"{request.method} {request.url.path}"
    if e.status_code == 404 and request.url.path.endswith("/chat/completions"):
        message = (f"{where}: GPT-2 models are not chat models and have no chat template; send the text as a prompt"
                   " to /v1/completions")
    elif e.status_code == 404:
        prefix = request.scope.get("root_path", "")  # the application's route prefix, e.g. /gpt2
        routes = ", ".join(prefix + path for path in sorted(request.app.openapi()["paths"]))
        message = f"{where}: no such route; this server answers {routes}"
    else:
        message = f"{where}: {e.detail}"
    return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes: a chunked body declares no length, and
    reading it whole before checking would let one request make the server hold any amount of memory."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(app)
class ModelServer:
    def __init__(self, settings: dict) -> None:
        self.settings = ServerSettings(**settings)
        self.limits = self.settings.limits
        self.models = ModelPool(self.settings)
        self.variants = self.models.variants
        self.page = PAGE.read_text(encoding="utf-8")
        self.started = int(time.time())
        self.context = {name: context_length(spec.resolved_source()) for name, spec in self.variants.items()}
        self.metrics = ServerMetrics(self.variants)

    def authorize(self, request: Request) -> None:
        """Raises 401 unless the request carries the API key; without a key set, and for the page and /healthz,
        everyone passes."""
        route = request.scope["route"].path
        if self.settings.api_key is None or route in OPEN_PATHS:
            return
        try:
            check_authorization(request.headers.get("authorization"), self.settings.api_key)
        except APIError as e:
            if route == "/v1/completions":
                self.metrics.answered(None, e.status)
            raise

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return self.page

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "variants": sorted(self.variants)}

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        """The variants, with what a client may know of them: never their source (a local path or MLflow URI)."""
        return {"object": "list", "data": [self._model_card(name) for name in self.variants]}

    def _model_card(self, name: str) -> dict:
        spec = self.variants[name]
        return {"id": name, "object": "model", "created": self.started, "owned_by": "gpt2-ray",
                "max_model_len": self.context[name], "dtype": spec.dtype, "quantize": spec.quantize,
                "description": spec.description}

    @app.get("/v1/models/{model}")
    async def retrieve_model(self, model: str) -> dict:
        self._check_model(model)
        return self._model_card(model)

    @app.get("/v1/stats")
    async def stats(self) -> dict:
        """Decoding statistics of the replica that answers (active/pending requests, mean batch, tokens generated)."""
        return self.models.stats()

    @app.get("/metrics")
    async def prometheus_metrics(self) -> Response:
        return Response(self.metrics.render(self.models.stats()), media_type=self.metrics.content_type)

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> dict:
        req = await self._read(request, TokenizeRequest)
        return tokenization.tokenize(req, self._max_model_len(req.model))

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> dict:
        req = await self._read(request, DetokenizeRequest)
        if req.model is not None:
            self._check_model(req.model)
        return tokenization.detokenize(req)

    @app.get("/tokenizer_info")
    async def tokenizer_info(self) -> dict:
        return tokenization.tokenizer_info(self._max_model_len(None))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        started = time.perf_counter()
        req = None
        try:
            req = await self._parse(request)
            events = self.models.complete(req)
            try:
                [first] = await events.__anext__()  # [start] or [error]
            except Exception as e:  # a failure of the serving code: still an answer in the API's format
                log.exception("completion request failed before its first event")
                raise APIError(500, f"the server failed ({type(e).__name__})", code="internal_error") from e
            if first["event"] == "error":
                await events.aclose()
                raise APIError(first["status"], first["message"], param=first.get("param"), code=first.get("code"))
        except APIError as e:
            self.metrics.answered(req.model if req else None, e.status)
            return JSONResponse(e.body(), status_code=e.status)
        events = self.metrics.timed(events, req.model, started, streamed=req.stream)
        cid = completion_id()
        headers = {}
        ignored = req.ignored_fields()
        if ignored:  # as vLLM does: accepted, ignored, and said so
            log.warning("completion request: ignoring unknown field(s) %s", ", ".join(ignored))
            headers["X-Ignored-Fields"] = ", ".join(ignored)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            self.metrics.answered(req.model, 200)
            return StreamingResponse(
                sse_stream(events, cid, req.model, include_usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
            )
        response = await collect_response(events, cid, req.model, first["choices"], logprobs=req.logprobs is not None)
        response.headers.update(headers)
        self.metrics.answered(req.model, response.status_code)
        return response

    def check_health(self) -> None:
        """Serve's health check: fails once a variant's decoding died, so Serve replaces this replica."""
        self.models.check_health()

    def drill_crash_decoding_thread(self, name: str) -> None:
        """Fault drills only (settings.fault_drills): make the decoding of a loaded variant die, so that a drill
        can watch requests fail cleanly, the health check fail, and Serve replace this replica. Reachable through
        a Serve handle only (it has no HTTP route)."""
        self.models.drill_crash_decoding_thread(name)

    async def _parse(self, request: Request) -> CompletionRequest:
        req = await self._read(request, CompletionRequest)
        self._check_model(req.model)
        check_request(req, self.limits)
        return req

    async def _read(self, request: Request, schema: type[BaseModel]):
        """The JSON body as `schema`, read within the size limit (413), valid JSON (400) and valid fields (422)."""
        raw = await read_body(request, self.limits.max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from e
        except RecursionError as e:  # the parser recurses per nesting level: [[[[...]]]] within the size limit
            raise APIError(400, "the body's JSON is nested too deeply") from e
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return schema.model_validate(body)
        except ValidationError as e:
            message, param = validation_message(e.errors())
            raise APIError(422, message, param=param) from e

    def _check_model(self, name: str) -> None:
        if name not in self.variants:
            raise APIError(
                404, f"model {name!r} does not exist; available: {sorted(self.variants)}", param="model",
                code="model_not_found",
            )

    def _max_model_len(self, model: str | None) -> int:
        """The context of `model`; with none named (lm-eval's tokenizer calls name none), the smallest of the
        variants' contexts: the length every variant accepts."""
        if model is None:
            return min(self.context.values())
        self._check_model(model)
        return self.context[model]


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run serving/config.yaml` (import_path: serving.app:build_app)."""
    settings = check_settings(args)
    settings.api_key = api_key_from_env(settings.api_key)
    # Completions beyond a variant's decoding rows and waiting room get 503 from its engine at once; the slack is for
    # the light routes (/healthz, /v1/models, the page, /metrics), which must answer while every row is busy.
    completions = len(settings.variants) * (settings.max_batch + settings.max_pending)
    return ModelServer.options(
        ray_actor_options=_model_actor_options(settings),
        health_check_period_s=settings.health_check_period_s,
        max_ongoing_requests=completions + LIGHT_REQUEST_SLACK,
        max_queued_requests=settings.max_queued_requests,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": settings.max_model_replicas,
            "target_ongoing_requests": settings.max_batch,
        },
    ).bind(settings.model_dump())


def _model_actor_options(settings: ServerSettings) -> dict:
    options = {"num_cpus": settings.model_replica_cpus}
    use_gpu = settings.use_gpu.lower()
    if use_gpu == "true" or (use_gpu == "auto" and _cluster_has_gpus()):
        options["num_gpus"] = 1
    return options


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
