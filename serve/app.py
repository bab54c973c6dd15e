"""The Ray Serve application: an OpenAI-compatible HTTP API and a comparison web page over the model variants.

Two deployments:
- `Gateway` (FastAPI ingress, light): parses and validates requests, answers errors, turns model events into
  OpenAI responses or server-sent events, serves the web page.
- `ModelServer` (the compute): every variant is loaded lazily into the replica that first gets a request for it,
  through Serve model multiplexing — requests carry the variant name as multiplexed model id, Serve routes them to a
  replica that already holds that variant, and a replica keeps at most `max_models_per_replica` (LRU eviction).
  One multiplexed deployment rather than one deployment per variant because replicas reserve CPUs: on a 2-core
  machine three 1-CPU deployments do not fit, while one replica holding every variant does. Each loaded variant has
  a continuous-batching engine (serve/engine.py) that decodes all its concurrent requests together.

Start it with `serve run serve/config.yaml`, `python jobs/serve.py`, or the pipeline job.
"""

import asyncio
import json
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from serve.completions import collect_response, held_until_finish, run_completion, sse_stream
from serve.protocol import APIError, CompletionRequest, Limits, check_request, completion_id, validation_message
from serve.variants import parse_variants

log = logging.getLogger("ray.serve")
PAGE = Path(__file__).with_name("static") / "index.html"


class ServerSettings(BaseModel):
    """The application's arguments (the `args:` of serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    variants: dict
    limits: Limits = Limits()
    max_batch: int = 8  # requests decoded together per variant
    max_pending: int = 16  # requests waiting for a decoding row, per variant; beyond that: 503
    torch_threads: int = 2  # Ray sets OMP threads from num_cpus; decoding wants every core the replica owns
    device: str | None = None  # None: CUDA, then MPS, then CPU
    max_models_per_replica: int | None = None  # default: every variant fits
    max_queued_requests: int = 64  # per caller, in front of the model replicas; beyond that: 503
    model_replica_cpus: float = 1.0
    max_model_replicas: int = 1  # autoscaling upper bound; raise it on machines with cores to spare
    use_gpu: str = "auto"  # auto | true | false: GPU model replicas when the cluster has GPUs


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
class ModelServer:
    def __init__(self, settings: dict) -> None:
        import torch

        from gpt2.device import pick_device

        self.settings = ServerSettings(**settings)
        self.variants = parse_variants(self.settings.variants)
        torch.set_num_threads(self.settings.torch_threads)
        self.device = pick_device(self.settings.device)
        self.engines: dict = {}  # name -> DecodeEngine, for statistics and health checks
        # Wired here rather than as a decorator so the number of cached variants comes from the config. Serve keeps
        # its LRU state on the decorated object, so it must be a plain function (a bound method takes no attributes).
        async def load(name: str) -> "_LoadedVariant":
            return await self._load_variant(name)

        self.get_variant = serve.multiplexed(
            max_num_models_per_replica=self.settings.max_models_per_replica or len(self.variants)
        )(load)
        log.info("model replica on %s with %d torch threads", self.device, torch.get_num_threads())

    async def _load_variant(self, name: str) -> "_LoadedVariant":
        from serve.engine import DecodeEngine
        from serve.variants import load_variant

        model = await asyncio.to_thread(load_variant, self.variants[name], self.device)
        s = self.settings
        engine = DecodeEngine(model, max_batch=s.max_batch, max_pending=s.max_pending, name=name)
        self.engines[name] = engine
        return _LoadedVariant(engine)

    async def complete(self, body: dict):
        """Async generator of events: one 'start' (or one 'error'), then 'text'/'finish' per choice, then 'end'."""
        name = serve.get_multiplexed_model_id()
        try:
            loaded = await self.get_variant(name)
        except Exception as e:  # the client gets the reason; the replica stays up for the other variants
            log.exception("loading variant %s failed", name)
            yield {"event": "error", "status": 500, "message": f"model {name!r} could not be loaded: {e}"}
            return
        req = CompletionRequest(**body)
        events = run_completion(loaded.engine, req)
        async for event in (events if req.stream else held_until_finish(events)):
            yield event

    async def stats(self) -> dict:
        return {name: engine.stats() for name, engine in self.engines.items() if not engine.closed}

    def check_health(self) -> None:
        failed = [name for name, engine in self.engines.items() if engine.failed]
        if failed:
            raise RuntimeError(f"the decoding thread of variant(s) {failed} died")


class _LoadedVariant:
    """What the multiplexed loader caches. Serve calls __del__ when it evicts the variant (LRU): the engine stops
    and requests still decoding on it finish as cancelled."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __del__(self) -> None:
        self.engine.close()


app = FastAPI(title="GPT-2 on Ray Serve", docs_url="/docs")


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

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return self.page

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "variants": sorted(self.variants)}

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "gpt2-ray", **spec.public()}
                for name, spec in self.variants.items()
            ],
        }

    @app.get("/v1/stats")
    async def stats(self) -> dict:
        """Decoding statistics of one model replica (active/pending requests, mean batch, tokens generated)."""
        return await self.models.stats.remote()

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            req = await self._parse(request)
            events = self.models.options(multiplexed_model_id=req.model, stream=True).complete.remote(req.model_dump())
            try:
                first = await events.__anext__()
            except BackPressureError as e:
                raise APIError(503, f"the server is busy ({e}); retry shortly", code="overloaded") from e
            except DeploymentUnavailableError as e:
                raise APIError(503, f"the model deployment is unavailable: {e}", code="unavailable") from e
            except (RayActorError, RequestCancelledError) as e:  # the replica died; Serve is replacing it
                raise APIError(503, f"the model replica went away ({type(e).__name__}); retry shortly",
                               code="unavailable") from e
            if first["event"] == "error":
                raise APIError(first["status"], first["message"], param=first.get("param"))
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        cid = completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                sse_stream(events, cid, req.model, include_usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await collect_response(events, cid, req.model, first["choices"])

    async def _parse(self, request: Request) -> CompletionRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {self.limits.max_body_bytes}")
        raw = await request.body()
        if len(raw) > self.limits.max_body_bytes:
            raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit of {self.limits.max_body_bytes}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as e:
            message, param = validation_message(e.errors())
            raise APIError(422, message, param=param) from e
        if req.model not in self.variants:
            raise APIError(
                404, f"model {req.model!r} does not exist; available: {sorted(self.variants)}", param="model",
                code="model_not_found",
            )
        check_request(req, self.limits)
        return req


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run serve/config.yaml` (import_path: serve.app:build_app)."""
    settings = ServerSettings(**args)
    parse_variants(settings.variants)  # fail at deploy time, with the variant named, not at the first request
    model_server = ModelServer.options(
        ray_actor_options=_model_actor_options(settings),
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
    return Gateway.bind(model_server.bind(settings.model_dump()), settings.model_dump())


def _model_actor_options(settings: ServerSettings) -> dict:
    options = {"num_cpus": settings.model_replica_cpus}
    use_gpu = settings.use_gpu.lower()
    if use_gpu == "true" or (use_gpu == "auto" and _cluster_has_gpus()):
        options["num_gpus"] = 1
    return options


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
