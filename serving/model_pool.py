"""The variants one Serve replica has loaded, each with its continuous-batching engine, all decoding on one thread.

Variants load lazily, on the first request that names one, through Serve model multiplexing: a replica keeps at most
`max_models_per_replica` (LRU; an evicted variant's engine stops) and tells Serve which it holds, so a client that
sends the `serve_multiplexed_model_id` header is routed to a replica that already has its variant. A variant that
fails to load answers 503 with the reason instead of taking the replica down (see `ModelPool.variant`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ray import serve

from serving.completions import run_completion
from serving.protocol import CompletionRequest
from serving.settings import ServerSettings
from serving.variants import parse_variants

log = logging.getLogger("ray.serve")


class ModelPool:
    def __init__(self, settings: ServerSettings) -> None:
        import torch

        from gpt2.device import pick_device
        from serving.engine import DecodingThread

        self.settings = settings
        self.variants = parse_variants(settings.variants)
        torch.set_num_threads(settings.torch_threads)
        self.device = pick_device(settings.device)
        self.engines: dict = {}  # name -> DecodeEngine, for statistics and health checks
        # Every variant's engine decodes on this one thread (serving/engine.py says why: OpenMP teams per thread).
        self.decoding = DecodingThread(settings.torch_threads, name="decode")
        self.load_failures: dict[str, tuple[float, str]] = {}  # name -> (when, why) of its last failed load

        # Wired here rather than as a decorator so the number of cached variants comes from the config. Serve keeps
        # its LRU state on the decorated object, so it must be a plain function (a bound method takes no attributes).
        async def load(name: str) -> _LoadedVariant:
            return await self._load(name)

        self._get = serve.multiplexed(
            max_num_models_per_replica=settings.max_models_per_replica or len(self.variants)
        )(load)
        log.info("model replica on %s with %d torch threads", self.device, torch.get_num_threads())

    async def _load(self, name: str) -> _LoadedVariant:
        from serving.engine import DecodeEngine
        from serving.variants import load_variant

        s = self.settings
        model = await in_new_thread(load_variant, self.variants[name], self.device, max_batch=s.max_batch)
        engine = DecodeEngine(model, max_batch=s.max_batch, max_pending=s.max_pending, prefill_tokens=s.prefill_tokens,
                              prefix_cache_bytes=int(s.prefix_cache_mb * 2**20), name=name, thread=self.decoding)
        self.engines[name] = engine
        return _LoadedVariant(engine)

    async def complete(self, req: CompletionRequest):
        """Async generator of event batches (lists): [start] (or [error]), then 'text'/'finish' events per choice,
        then 'end' last (serving/completions.py)."""
        try:
            loaded = await self.variant(req.model)
        except LoadFailed as e:  # the client gets the reason; the replica stays up for the other variants
            yield [{"event": "error", "status": 503, "code": "unavailable", "message": str(e)}]
            return
        batches = run_completion(loaded.engine, req, self.settings.limits, self.settings.stream_batch_ms / 1000)
        try:
            async for batch in batches:
                yield batch
        finally:  # the consumer went away: the request's cleanup (freeing its decoding rows) runs now
            await batches.aclose()

    async def variant(self, name: str) -> _LoadedVariant:
        """The loaded variant; raises LoadFailed, with the reason, when loading it fails.

        Serve's multiplexed loader caches successes only, so a failed variant would be loaded again by every request
        for it, each waiting for the one before (Serve loads one model at a time): with a slow failure (a
        store that times out) those requests would fill the replica and starve the healthy variants. The failure is
        remembered for load_retry_s instead; the first request after that tries again, so fixed files are picked up.
        """
        failed = self.load_failures.get(name)
        if failed is not None and time.monotonic() - failed[0] < self.settings.load_retry_s:
            raise LoadFailed(failed[1])
        try:
            loaded = await self._get(name)
        except Exception as e:
            log.exception("loading variant %s failed", name)
            why = f"model {name!r} could not be loaded: {e}"
            self.load_failures[name] = (time.monotonic(), why)
            raise LoadFailed(why) from e
        self.load_failures.pop(name, None)
        return loaded

    def drill_crash_decoding_thread(self, name: str) -> None:
        """Fault drills only (settings.fault_drills): make the decoding of a loaded variant die."""
        if not self.settings.fault_drills:
            raise PermissionError("fault drills are off on this server (ServerSettings.fault_drills)")
        engine = self.engines.get(name)
        if engine is None or engine.closed:
            raise ValueError(f"variant {name!r} is not loaded on this replica")
        log.warning("fault drill: crashing the decoding of variant %s", name)
        engine.crash_for_drill(f"fault drill on variant {name!r}")

    def stats(self) -> dict:
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


class _LoadedVariant:
    """What the multiplexed loader caches. Serve calls __del__ when it evicts the variant (LRU): the engine stops
    and requests still decoding on it finish as cancelled."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __del__(self) -> None:
        self.engine.close()


class LoadFailed(Exception):
    """A variant could not be loaded (its message says why); requests for it get 503."""
