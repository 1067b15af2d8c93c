"""Scoring shared among forked processes: the same numbers as one process, no zombies."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from test_eval import box, det, hota_case, random_case
from visstg.eval import EvalInputError, evaluate
from visstg.eval import parallel as par
from visstg.eval.parallel import map_forked


def children_of_this_process() -> list[int]:
    """Pids whose parent is this process (zombies included), from /proc."""
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                out.append(int(d.name))
    return out


@pytest.fixture(autouse=True)
def no_children_left():
    before = set(children_of_this_process())
    yield
    assert set(children_of_this_process()) <= before, "a worker process was left behind"


def square_and_pid(x):
    time.sleep(0.005)  # long enough for the child to take some of the items
    return x * x, os.getpid()


@pytest.mark.parametrize(("workers", "chunk"), [(1, 4), (2, 1), (3, 2), (2, 100), (None, 3)])
def test_results_in_item_order_for_any_workers_and_chunk(workers, chunk):
    out = map_forked(square_and_pid, range(40), workers, chunk)
    assert [r for r, _ in out] == [x * x for x in range(40)]
    pids = {pid for _, pid in out}
    if workers == 1 or chunk >= 40:
        assert pids == {os.getpid()}  # serial: nothing forked
    elif workers and workers > 1:
        assert len(pids) > 1  # the parallel path really ran


def test_a_child_that_dies_has_its_items_redone_here():
    parent = os.getpid()

    def fn(x):
        if os.getpid() != parent:
            os._exit(3)  # every child dies on its first item
        return x + 1

    assert map_forked(fn, range(20), workers=3, chunk=1) == list(range(1, 21))


def test_an_error_in_an_item_surfaces_here():
    def fn(x):
        if x == 7:
            raise EvalInputError("item 7 is bad")
        time.sleep(0.002)
        return x

    with pytest.raises(EvalInputError, match="item 7 is bad"):
        map_forked(fn, range(30), workers=2, chunk=1)


def test_serial_without_fork_or_with_other_threads(monkeypatch):
    calls = []

    def fn(x):
        calls.append(x)  # only visible when run in this process
        return -x

    monkeypatch.setattr(par.mp, "get_all_start_methods", lambda: ["spawn"])
    assert map_forked(fn, range(10), workers=4, chunk=1) == [-x for x in range(10)]
    assert calls == list(range(10))
    monkeypatch.undo()

    calls.clear()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert map_forked(fn, range(10), workers=None, chunk=1) == [-x for x in range(10)]
    finally:
        stop.set()
        t.join()
    assert calls == list(range(10))
    with pytest.raises(ValueError, match="workers must be at least 1"):
        map_forked(fn, range(10), workers=0)


@pytest.mark.parametrize("seed", range(6))
def test_parallel_evaluation_equals_serial_exactly(seed):
    gt, res = hota_case(seed) if seed % 2 else random_case(seed, n_videos=12, n_frames=6)
    serial = evaluate(gt, res, with_hota=True, workers=1)
    for workers in (2, 3):
        assert evaluate(gt, res, with_hota=True, workers=workers) == serial  # bit for bit


def test_a_mask_size_error_in_a_worker_surfaces_here():
    # Videos without height/width: the loader cannot check sizes, pycocotools meets them.
    gt, res = random_case(1, n_videos=8)
    for v in gt["videos"]:
        del v["height"], v["width"]
    a = next(a for a in gt["annotations"] if a["video_id"] == 6 and any(a["areas"]))
    big = box(12, 20, 0, 0, 12, 20)  # overlaps every mask, but 12 x 20, not 12 x 16
    res.append(det([big] * len(a["segmentations"]), 0.5, 6, a["category_id"]))
    with pytest.raises(EvalInputError, match="mask sizes differ"):
        evaluate(gt, res, with_hota=True, workers=2)
