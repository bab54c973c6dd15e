"""What a training loop needs from where it runs, the same whether that is a Ray Train worker, a Ray Tune trial or
this process: its rank and the number of workers, its device and torch threads, mixed precision, the checkpoint to
resume from, the model wrapped for data parallelism, and where its metrics (and checkpoints) are reported.

A job's loop takes a `Worker` and otherwise reads like a plain PyTorch loop: the Ray calls are all here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn

from gpt2.device import cpu_has_fast_bf16
from gpt2.train import autocast_context, autocast_dtype

Session = Literal["train", "tune", "local"]


def worker_threads(threads_per_worker: int, cpus_per_worker: float) -> int:
    """torch threads for a worker: as configured, else its whole CPUs. Ray sets OMP_NUM_THREADS from a worker's CPUs
    (1 when fractional), which torch does not follow on its own."""
    return threads_per_worker or max(1, int(cpus_per_worker))


@dataclass(frozen=True)
class Worker:
    session: Session
    rank: int
    world: int
    device: torch.device

    @classmethod
    def ray_train(cls, threads: int) -> Worker:
        """A Ray Train worker of the current run (call it first in train_loop_per_worker)."""
        import ray.train
        import ray.train.torch

        from cluster.runtime.ray_env import quiet_train_reports

        quiet_train_reports()
        torch.set_num_threads(threads)
        ctx = ray.train.get_context()
        return cls("train", ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())

    @classmethod
    def tune_trial(cls, threads: int) -> Worker:
        """A Ray Tune function trainable: one process, rank 0 of 1."""
        torch.set_num_threads(threads)
        return cls("tune", 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def in_process(cls, device: torch.device) -> Worker:
        """This process as the only worker: nothing to resume from, and nobody to report to but MLflow."""
        return cls("local", 0, 1, torch.device(device))

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that logs, prints and writes the run's files."""
        return self.rank == 0

    @property
    def keeps_checkpoints(self) -> bool:
        return self.session != "local"

    def checkpoint(self):
        """The checkpoint to resume from (a restarted worker group or trial), or None."""
        if self.session == "train":
            import ray.train

            return ray.train.get_checkpoint()
        if self.session == "tune":
            import ray.tune

            return ray.tune.get_checkpoint()
        return None

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module as it is trained: under DDP when there are several workers (gradients averaged across them)."""
        if self.world == 1:
            return module
        import ray.train.torch

        return ray.train.torch.prepare_model(module)

    def autocast(self, setting: str) -> tuple[torch.dtype | None, Callable[[], contextlib.AbstractContextManager]]:
        """(dtype, factory of autocast contexts) for a train.autocast setting on this worker's device: "auto" is bf16
        where the hardware runs it natively (CUDA, CPUs with AVX-512 bf16 or AMX)."""
        dtype = autocast_dtype(setting, self.device.type, self.device.type == "cuda" or cpu_has_fast_bf16())
        return dtype, autocast_context(dtype, self.device.type)

    def report(self, metrics: dict, checkpoint_dir: str | Path | None = None) -> None:
        """Metrics for Ray (a Ray Train report is a barrier: every rank calls it), with this rank's files of a
        checkpoint when one is due. In this process there is nobody to report to.

        A loop reports when it has a checkpoint or an epoch's figures, not at every step: Ray Train's controller takes
        one report per worker each time it polls them (every 2 s), and a worker whose last report still waits blocks
        in the next one, so reports every step would hold a run to one step per 2 s however fast its steps are (one
        H100's GPT-2 124M step of 524,288 tokens takes 1.45 s; the tests' tiny steps 0.1 s). Step metrics go to
        MLflow."""
        if self.session == "train":
            import ray.train

            directory = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=directory)
        elif self.session == "tune":
            import ray.tune

            directory = ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            ray.tune.report(metrics, checkpoint=directory)
