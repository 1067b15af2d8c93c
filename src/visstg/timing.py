"""Optional per-stage timing of the online inference path (``python -m visstg.benchmark``).

``VisSTG.inference_step`` and ``OnlineTracker.step`` wrap their stages in
``with timer.stage(name):``. By default the timer is :data:`NULL_TIMER`, whose ``stage`` returns
one shared no-op context manager: no clock read, no CUDA synchronisation, no allocation. The
benchmark swaps in a :class:`StageTimer`, which records wall-clock milliseconds per stage and,
on CUDA, synchronises the device before reading the clock so that asynchronous kernels are
charged to the stage that launched them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

__all__ = ["NULL_TIMER", "NullTimer", "StageFlops", "StageTimer"]

_NULL_CONTEXT = nullcontext()


class NullTimer:
    """The default: every stage is a no-op."""

    enabled = False

    def stage(self, name: str) -> AbstractContextManager:
        return _NULL_CONTEXT


NULL_TIMER = NullTimer()


class StageTimer:
    """Accumulates milliseconds per stage name for the current frame.

    Args:
        sync: synchronise CUDA around every stage (set it when the model runs on a GPU).

    ``times`` holds ``name -> ms`` since the last :meth:`reset`; a stage entered twice in one
    frame adds up. Nested stages are allowed (the outer one includes the inner one).
    """

    enabled = True

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.times: dict[str, float] = {}

    def reset(self) -> dict[str, float]:
        """Return the current frame's times and start a new frame."""
        times, self.times = self.times, {}
        return times

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            ms = (self._now() - start) * 1e3
            self.times[name] = self.times.get(name, 0.0) + ms


class StageFlops:
    """Counts floating-point operations per stage instead of time (same ``stage`` interface).

    Wrap the frame in ``with flops.counting():``; every stage then adds the operations that
    :class:`torch.utils.flop_counter.FlopCounterMode` saw inside it (convolutions, matmuls,
    ...; custom ops such as torchvision's ``deform_conv2d`` count as 0). ``flops`` holds
    ``name -> FLOPs`` (a multiply-add is 2); nested stages count in both.
    """

    enabled = True

    def __init__(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self.counter = FlopCounterMode(display=False)
        self.flops: dict[str, int] = {}

    def counting(self) -> AbstractContextManager:
        return self.counter

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self.counter.get_total_flops()
        try:
            yield
        finally:
            done = self.counter.get_total_flops() - start
            self.flops[name] = self.flops.get(name, 0) + done
