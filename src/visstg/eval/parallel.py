"""Run a function over items in this process and in forked copies of it, results in order.

The evaluator's per-video work (mask areas, per-frame intersections, matching, HOTA) is
independent from video to video and pure: the same inputs give the same numbers wherever they
are computed. :func:`map_forked` shares the videos among ``workers`` processes: this one and
``workers - 1`` children forked from it, so the loaded ground truth and results reach them by
copy-on-write instead of being pickled. Every process takes the next ``chunk`` items from a
shared counter until none are left (a busy core does less, a free one more); each child sends
back the results of the items it took, and this process puts them in item order. Nothing is
combined across items, so the results are those of the serial loop to the bit.

Falls back to the serial loop where it cannot work: one worker, one chunk of items, no
``fork`` start method (Windows), macOS (fork-unsafe system frameworks), or a failure to start
a child. A child that fails or dies sends back what it finished and this process computes the
rest itself, so an error in an item surfaces here, as it would serially. Children are always
joined (terminated first when this process stops on an error): none is left as a zombie.

Public: :func:`map_forked`, :func:`available_cores`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

_MISSING = object()


def available_cores() -> int:
    """The number of CPU cores this process may run on (1 if unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _can_fork() -> bool:
    """Whether forking is available and safe for numpy: not on Windows (no fork), nor on macOS
    (system frameworks such as Accelerate are not fork-safe)."""
    return "fork" in mp.get_all_start_methods() and sys.platform != "darwin"


def _claim(counter, chunk: int, n: int):
    """Indices of the items this process takes, ``chunk`` at a time from the shared counter."""
    while True:
        with counter.get_lock():
            start = counter.value
            counter.value = start + chunk
        if start >= n:
            return
        yield from range(start, min(start + chunk, n))


def _child(fn: Callable, items: Sequence, counter, chunk: int, conn) -> None:
    """A forked worker: {index: fn(item)} of the items it takes, sent when there are none left.

    An item that raises ends the worker's loop; the items it took and did not finish are left
    to the parent, which meets the same error itself.
    """
    done = {}
    try:
        for i in _claim(counter, chunk, len(items)):
            done[i] = fn(items[i])
    except Exception:
        pass
    try:
        conn.send(done)
    finally:
        conn.close()


def map_forked(
    fn: Callable[[Any], Any], items: Sequence, workers: int | None = 1, chunk: int = 2
) -> list:
    """``[fn(x) for x in items]``, shared among ``workers`` processes (see the module doc).

    Args:
        fn: called once per item; its results must be picklable. It may read anything this
            process holds (the children are forked), and what it changes in a child stays there.
        items: the inputs.
        workers: processes in all, this one included; ``None``: one per available core, or 1
            while other Python threads run (forking a threaded process can deadlock them).
        chunk: items taken at a time.

    Returns:
        The results in item order.
    """
    items = list(items)
    n = len(items)
    if workers is None:
        workers = available_cores() if threading.active_count() == 1 else 1
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (or None), got {workers}")
    workers = min(workers, -(-n // chunk))  # no idle children
    if workers <= 1 or not _can_fork():
        return [fn(x) for x in items]

    ctx = mp.get_context("fork")
    children = []  # (process, receiving end)
    try:
        counter = ctx.Value("q", 0)
        for _ in range(workers - 1):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fn, items, counter, chunk, send), daemon=True)
            proc.start()
            send.close()
            children.append((proc, recv))
    except OSError as e:  # no shared memory, no processes left, ...: the serial loop
        log.warning("could not start worker processes (%s): evaluating in one process", e)
        _stop(children, terminate=True)
        return [fn(x) for x in items]

    results = [_MISSING] * n
    try:
        for i in _claim(counter, chunk, n):
            results[i] = fn(items[i])
        for _, recv in children:
            try:
                got = recv.recv()
            except (EOFError, OSError):  # the child died: its items are redone below
                got = {}
            for i, r in got.items():
                results[i] = r
    except BaseException:
        _stop(children, terminate=True)
        raise
    _stop(children, terminate=False)
    # Items a child took and did not send back (it failed or died): computed here.
    return [fn(items[i]) if r is _MISSING else r for i, r in enumerate(results)]


def _stop(children: list, terminate: bool) -> None:
    """Close the pipes and join (after terminating, with ``terminate``) every child."""
    for proc, recv in children:
        recv.close()
        if terminate and proc.is_alive():
            proc.terminate()
        proc.join()
