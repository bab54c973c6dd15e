"""The Ray Serve application: an OpenAI-compatible HTTP API and a comparison web page over the model variants.

Two deployments:
- `Gateway` (FastAPI ingress, light): parses and validates requests, answers errors, turns model events into
  OpenAI responses or server-sent events, serves the web page.
- `ModelServer` (the compute): every variant is loaded lazily into the replica that first gets a request for it,
  through Serve model multiplexing — requests carry the variant name as multiplexed model id, Serve routes them to a
  replica that already holds that variant, and a replica keeps at most `max_models_per_replica` (LRU eviction).
  One multiplexed deployment rather than one deployment per variant because replicas reserve CPUs: on a 2-core
  machine three 1-CPU deployments do not fit, while one replica holding every variant does. Each loaded variant has
  a continuous-batching engine (serving/engine.py) that decodes all its concurrent requests together.

Besides the OpenAI API the gateway answers vLLM's tokenizer endpoints (serving/tokenization.py), Prometheus metrics at
/metrics (serving/metrics.py), and, when an API key is set, refuses every route but the page and /healthz to callers
without it (serving/auth.py).

Start it with `serve run serving/config.yaml`, `python jobs/serve.py`, or the pipeline job.
"""

import asyncio
import json
import logging
import threading
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from serving import tokenization
from serving.auth import OPEN_PATHS, api_key_from_env, check_authorization
from serving.completions import collect_response, held_until_finish, run_completion, sse_stream
from serving.metrics import GatewayMetrics
from serving.protocol import APIError, CompletionRequest, Limits, check_request, completion_id, validation_message
from serving.tokenization import DetokenizeRequest, TokenizeRequest, context_length
from serving.variants import parse_variants

log = logging.getLogger("ray.serve")
PAGE = Path(__file__).with_name("static") / "index.html"


class ServerSettings(BaseModel):
    """The application's arguments (the `args:` of serving/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    variants: dict
    limits: Limits = Limits()
    max_batch: int = 16  # requests decoded together per variant (cache rows; one pass over the weights for all)
    prefill_tokens: int = 512  # token slots of one prefill pass: longer prompts go in by chunks between decode steps
    max_pending: int = 16  # requests waiting for a decoding row, per variant; beyond that: 503
    # A streamed token may wait this long for the next ones, to cross from the model replica to the HTTP proxy
    # together: each message between Serve's processes costs ~1 ms of CPU, more than a 16-row decoding step spends
    # on a token on 2 cores. The first token is never held; clients still get one chunk per token. 0: each batch
    # as soon as it is out. docs/serving.md has the figures (Ray Serve LLM batches its streams the same way).
    stream_batch_ms: float = 100.0
    torch_threads: int = 2  # Ray sets OMP threads from num_cpus; decoding wants every core the replica owns
    device: str | None = None  # None: CUDA, then MPS, then CPU
    max_models_per_replica: int | None = None  # default: every variant fits
    max_queued_requests: int = 64  # per caller, in front of the model replicas; beyond that: 503
    model_replica_cpus: float = 1.0
    max_model_replicas: int = 1  # autoscaling upper bound; raise it on machines with cores to spare
    use_gpu: str = "auto"  # auto | true | false: GPU model replicas when the cluster has GPUs
    api_key: SecretStr | None = None  # clients then send `Authorization: Bearer <key>`; default: GPT2_API_KEY
    load_retry_s: float = 10.0  # a variant that failed to load answers 503 at once for this long, then is retried
    health_check_period_s: float = 10.0  # Serve replaces a model replica after 3 failed checks in a row
    # Fault drills only, never in production: lets whoever holds a Serve handle to ModelServer (not HTTP clients)
    # make a variant's decoding die with ModelServer.drill_crash_decoding_thread (tests/test_serve_faults.py).
    fault_drills: bool = False


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
class ModelServer:
    def __init__(self, settings: dict) -> None:
        import torch

        from gpt2.device import pick_device

        self.settings = ServerSettings(**settings)
        self.variants = parse_variants(self.settings.variants)
        from serving.engine import DecodingThread

        torch.set_num_threads(self.settings.torch_threads)
        self.device = pick_device(self.settings.device)
        self.engines: dict = {}  # name -> DecodeEngine, for statistics and health checks
        # Every variant's engine decodes on this one thread (serving/engine.py says why: OpenMP teams per thread).
        self.decoding = DecodingThread(self.settings.torch_threads, name="decode")
        self.load_failures: dict[str, tuple[float, str]] = {}  # name -> (when, why) of its last failed load
        # Wired here rather than as a decorator so the number of cached variants comes from the config. Serve keeps
        # its LRU state on the decorated object, so it must be a plain function (a bound method takes no attributes).
        async def load(name: str) -> "_LoadedVariant":
            return await self._load_variant(name)

        self.get_variant = serve.multiplexed(
            max_num_models_per_replica=self.settings.max_models_per_replica or len(self.variants)
        )(load)
        log.info("model replica on %s with %d torch threads", self.device, torch.get_num_threads())

    async def _load_variant(self, name: str) -> "_LoadedVariant":
        from serving.engine import DecodeEngine
        from serving.variants import load_variant

        s = self.settings
        model = await in_new_thread(load_variant, self.variants[name], self.device, max_batch=s.max_batch)
        engine = DecodeEngine(model, max_batch=s.max_batch, max_pending=s.max_pending, prefill_tokens=s.prefill_tokens,
                              name=name, thread=self.decoding)
        self.engines[name] = engine
        return _LoadedVariant(engine)

    async def complete(self, body: dict):
        """Async generator of event batches (lists): [start] (or [error]), then 'text'/'finish' events per choice,
        then 'end' last (serving/completions.py)."""
        name = serve.get_multiplexed_model_id()
        try:
            loaded = await self._variant(name)
        except _LoadFailed as e:  # the client gets the reason; the replica stays up for the other variants
            yield [{"event": "error", "status": 503, "code": "unavailable", "message": str(e)}]
            return
        req = CompletionRequest(**body)
        batches = run_completion(loaded.engine, req, self.settings.limits, self.settings.stream_batch_ms / 1000)
        async for batch in (batches if req.stream else held_until_finish(batches)):
            yield batch

    async def _variant(self, name: str) -> "_LoadedVariant":
        """The loaded variant; raises _LoadFailed, with the reason, when loading it fails.

        Serve's multiplexed loader caches successes only, so a failed variant would be loaded again by every request
        for it, each waiting for the one before (Serve loads one model at a time): with a slow failure (a
        store that times out) those requests would fill the replica and starve the healthy variants. The failure is
        remembered for load_retry_s instead; the first request after that tries again, so fixed files are picked up.
        """
        failed = self.load_failures.get(name)
        if failed is not None and time.monotonic() - failed[0] < self.settings.load_retry_s:
            raise _LoadFailed(failed[1])
        try:
            loaded = await self.get_variant(name)
        except Exception as e:
            log.exception("loading variant %s failed", name)
            why = f"model {name!r} could not be loaded: {e}"
            self.load_failures[name] = (time.monotonic(), why)
            raise _LoadFailed(why) from e
        self.load_failures.pop(name, None)
        return loaded

    def drill_crash_decoding_thread(self, name: str) -> None:
        """Fault drills only (settings.fault_drills): make the decoding of a loaded variant die, so that a drill
        can watch requests fail cleanly, the health check fail, and Serve replace this replica. Reachable through
        a Serve handle only (it has no HTTP route)."""
        if not self.settings.fault_drills:
            raise PermissionError("fault drills are off on this server (ServerSettings.fault_drills)")
        engine = self.engines.get(name)
        if engine is None or engine.closed:
            raise ValueError(f"variant {name!r} is not loaded on this replica")
        log.warning("fault drill: crashing the decoding of variant %s", name)
        engine.crash_for_drill(f"fault drill on variant {name!r}")

    async def stats(self) -> dict:
        return {name: engine.stats() for name, engine in self.engines.items() if not engine.closed}

    def check_health(self) -> None:
        failed = [name for name, engine in self.engines.items() if engine.failed]
        if failed:
            raise RuntimeError(f"the decoding of variant(s) {failed} died")


async def in_new_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a thread of its own that ends with it, awaited.

    For loading a model: its parallel work leaves an OpenMP team on the thread that ran it, and a team left on a
    long-lived thread (asyncio.to_thread's pool) would slow the decoding thread for as long as the replica lives
    (serving/engine.py, DecodingThread)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(outcome: tuple) -> None:
        if not done.cancelled():
            error, value = outcome
            done.set_exception(error) if error is not None else done.set_result(value)

    def target() -> None:
        try:
            outcome = (None, fn(*args, **kwargs))
        except BaseException as e:  # handed to the awaiting coroutine, which raises it
            outcome = (e, None)
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the event loop closed meanwhile (the replica is shutting down): nobody waits
            pass

    threading.Thread(target=target, name=f"run-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await done


class _LoadFailed(Exception):
    """A variant could not be loaded (its message says why); requests for it get 503."""


class _LoadedVariant:
    """What the multiplexed loader caches. Serve calls __del__ when it evicts the variant (LRU): the engine stops
    and requests still decoding on it finish as cancelled."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __del__(self) -> None:
        self.engine.close()


async def _authorized(request: Request) -> None:
    """A dependency of every route (so a route added later is covered too): the API key, where one is set."""
    serve.get_replica_context().servable_object.authorize(request)


app = FastAPI(title="GPT-2 on Ray Serve", docs_url="/docs", dependencies=[Depends(_authorized)])


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes: a chunked body declares no length, and
    reading it whole before checking would let one request make the gateway hold any amount of memory."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


@serve.deployment(
    max_ongoing_requests=256,  # the gateway mostly waits on model replicas; backpressure happens in front of those
    max_queued_requests=512,
    ray_actor_options={"num_cpus": 0.1},
)
@serve.ingress(app)
class Gateway:
    def __init__(self, model_server: DeploymentHandle, settings: dict) -> None:
        self.settings = ServerSettings(**settings)
        self.variants = parse_variants(self.settings.variants)
        self.limits = self.settings.limits
        self.models = model_server
        self.page = PAGE.read_text(encoding="utf-8")
        self.started = int(time.time())
        self.context = {name: context_length(spec.resolved_source()) for name, spec in self.variants.items()}
        self.metrics = GatewayMetrics(self.variants)

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
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": self.started, "owned_by": "gpt2-ray",
                 "max_model_len": self.context[name], "dtype": spec.dtype, "quantize": spec.quantize,
                 "description": spec.description}
                for name, spec in self.variants.items()
            ],
        }

    @app.get("/v1/stats")
    async def stats(self) -> dict:
        """Decoding statistics of one model replica (active/pending requests, mean batch, tokens generated)."""
        return await self.models.stats.remote()

    @app.get("/metrics")
    async def prometheus_metrics(self) -> Response:
        try:
            stats = await asyncio.wait_for(self.models.stats.remote(), timeout=5)
        except Exception as e:  # a model replica starting or gone: the gateway's own metrics still answer
            log.warning("/metrics: no statistics from the model replica (%s: %s)", type(e).__name__, e)
            stats = None
        return Response(self.metrics.render(stats), media_type=self.metrics.content_type)

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
            events = self.models.options(multiplexed_model_id=req.model, stream=True).complete.remote(req.model_dump())
            try:
                [first] = await events.__anext__()  # [start] or [error]
            except BackPressureError as e:
                raise APIError(503, f"the server is busy ({e}); retry shortly", code="overloaded") from e
            except DeploymentUnavailableError as e:
                raise APIError(503, f"the model deployment is unavailable: {e}", code="unavailable") from e
            except (RayActorError, RequestCancelledError) as e:  # the replica died; Serve is replacing it
                raise APIError(503, f"the model replica went away ({type(e).__name__}); retry shortly",
                               code="unavailable") from e
            except Exception as e:  # a failure of the model replica's code: still an answer in the API's format
                log.exception("completion request: the model replica failed before answering")
                raise APIError(500, f"the model replica failed ({type(e).__name__})", code="internal_error") from e
            if first["event"] == "error":
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
    settings = ServerSettings(**args)
    parse_variants(settings.variants)  # fail at deploy time, with the variant named, not at the first request
    settings.api_key = api_key_from_env(settings.api_key)
    model_server = ModelServer.options(
        ray_actor_options=_model_actor_options(settings),
        health_check_period_s=settings.health_check_period_s,
        # Requests decoding plus requests waiting for a row; the engine answers 503 beyond that, and the callers
        # queue at most max_queued_requests more before Serve answers 503 itself.
        max_ongoing_requests=settings.max_batch + settings.max_pending,
        max_queued_requests=settings.max_queued_requests,
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": settings.max_model_replicas,
            "target_ongoing_requests": settings.max_batch,
        },
    )
    # Only the gateway checks the key; the model replicas never see it.
    return Gateway.bind(model_server.bind(settings.model_dump(exclude={"api_key"})), settings.model_dump())


def _model_actor_options(settings: ServerSettings) -> dict:
    options = {"num_cpus": settings.model_replica_cpus}
    use_gpu = settings.use_gpu.lower()
    if use_gpu == "true" or (use_gpu == "auto" and _cluster_has_gpus()):
        options["num_gpus"] = 1
    return options


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
