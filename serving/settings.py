"""The Serve application's settings: the `args:` of serving/config.yaml, checked once when the application is built."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from serving.protocol import Limits, validation_message


class ServerSettings(BaseModel):
    """The application's arguments (the `args:` of serving/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    variants: dict
    limits: Limits = Limits()
    # Requests decoded together per variant (cache rows; one pass over the weights for all).
    max_batch: int = Field(16, ge=1)
    # Token slots of one prefill pass: longer prompts go in by chunks between decode steps.
    prefill_tokens: int = Field(512, ge=1)
    # Memory per variant for copies of computed prompts, lent to later requests that begin the same way
    # (serving/prefix_cache.py); 0: none are kept.
    prefix_cache_mb: float = Field(256.0, ge=0)
    max_pending: int = Field(16, ge=0)  # requests waiting for a decoding row, per variant; beyond that: 503
    # A streamed token may wait this long for the next ones, to cross from the replica to Serve's HTTP proxy
    # together: each message between the two processes costs ~1 ms of CPU, more than a 16-row decoding step spends
    # on a token on 2 cores. The first token is never held; clients still get one chunk per token. 0: each batch
    # as soon as it is out. docs/serving.md has the figures (Ray Serve LLM batches its streams the same way).
    stream_batch_ms: float = Field(100.0, ge=0)
    torch_threads: int = Field(2, ge=1)  # Ray sets OMP threads from num_cpus; decoding wants every core it owns
    device: str | None = None  # None: CUDA, then MPS, then CPU
    max_models_per_replica: int | None = Field(None, ge=1)  # default: every variant fits
    # Requests Serve's proxy holds while it assigns them to replicas, and once each replica has as many in flight as
    # it takes. Beyond that Serve answers 503 itself, in plain text: overload is meant to be answered by the engines
    # (max_pending, a 503 in the API's format), so this is a last line against floods of any request.
    max_queued_requests: int = 256
    model_replica_cpus: float = Field(1.0, ge=0)
    max_model_replicas: int = Field(1, ge=1)  # autoscaling upper bound; raise it on machines with cores to spare
    use_gpu: str = "auto"  # auto | true | false: GPU replicas when the cluster has GPUs
    api_key: SecretStr | None = None  # clients then send `Authorization: Bearer <key>`; default: GPT2_API_KEY
    load_retry_s: float = Field(10.0, ge=0)  # a variant that failed to load answers 503 at once this long, then retries
    health_check_period_s: float = Field(10.0, gt=0)  # Serve replaces a replica after 3 failed checks in a row
    # Fault drills only, never in production: lets whoever holds a Serve handle to ModelServer (not HTTP clients)
    # make a variant's decoding die with ModelServer.drill_crash_decoding_thread (tests/test_serve_faults.py).
    fault_drills: bool = False


def check_settings(args: dict) -> ServerSettings:
    """The application's settings (the `args:` of serving/config.yaml), checked before anything is deployed (by
    jobs/serve.py and the pipeline before Ray starts, and by the application builder): a ValueError names the wrong
    fields or variant in one line, where a bad variant used to fail at its first request."""
    from serving.variants import parse_variants  # torch and the model loaders: only when settings are checked

    try:
        settings = ServerSettings(**args)
    except ValidationError as e:
        raise ValueError(validation_message(e.errors(), "serve config")[0]) from e
    parse_variants(settings.variants)
    return settings
