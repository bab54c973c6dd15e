"""The Serve application's settings: the `args:` of serving/config.yaml, checked once when the application is built."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, SecretStr

from serving.protocol import Limits


class ServerSettings(BaseModel):
    """The application's arguments (the `args:` of serving/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    variants: dict
    limits: Limits = Limits()
    max_batch: int = 16  # requests decoded together per variant (cache rows; one pass over the weights for all)
    prefill_tokens: int = 512  # token slots of one prefill pass: longer prompts go in by chunks between decode steps
    max_pending: int = 16  # requests waiting for a decoding row, per variant; beyond that: 503
    # A streamed token may wait this long for the next ones, to cross from the replica to Serve's HTTP proxy
    # together: each message between the two processes costs ~1 ms of CPU, more than a 16-row decoding step spends
    # on a token on 2 cores. The first token is never held; clients still get one chunk per token. 0: each batch
    # as soon as it is out. docs/serving.md has the figures (Ray Serve LLM batches its streams the same way).
    stream_batch_ms: float = 100.0
    torch_threads: int = 2  # Ray sets OMP threads from num_cpus; decoding wants every core the replica owns
    device: str | None = None  # None: CUDA, then MPS, then CPU
    max_models_per_replica: int | None = None  # default: every variant fits
    # Requests Serve's proxy holds while it assigns them to replicas, and once each replica has as many in flight as
    # it takes. Beyond that Serve answers 503 itself, in plain text: overload is meant to be answered by the engines
    # (max_pending, a 503 in the API's format), so this is a last line against floods of any request.
    max_queued_requests: int = 256
    model_replica_cpus: float = 1.0
    max_model_replicas: int = 1  # autoscaling upper bound; raise it on machines with cores to spare
    use_gpu: str = "auto"  # auto | true | false: GPU replicas when the cluster has GPUs
    api_key: SecretStr | None = None  # clients then send `Authorization: Bearer <key>`; default: GPT2_API_KEY
    load_retry_s: float = 10.0  # a variant that failed to load answers 503 at once for this long, then is retried
    health_check_period_s: float = 10.0  # Serve replaces a replica after 3 failed checks in a row
    # Fault drills only, never in production: lets whoever holds a Serve handle to ModelServer (not HTTP clients)
    # make a variant's decoding die with ModelServer.drill_crash_decoding_thread (tests/test_serve_faults.py).
    fault_drills: bool = False
