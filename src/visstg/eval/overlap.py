"""Per-frame mask intersections of every (detection, ground truth) pair of a (video, category).

Both metrics need the same geometry: the video AP sums each pair's intersections over frames,
HOTA scores each frame's IoU matrix. This module computes it once per (video, category), with
one ``pycocotools.mask.iou`` call per frame for all the pairs of that frame.

Exact integers: with ``iscrowd=1`` pycocotools returns I / area(det) as a double; I and the area
are integers below 2^32, so ``rint(ioa * area)`` recovers I exactly. Sums of these are the same
float64 numbers the official code adds up (it sums integer areas in a float).

No bounding-box prefilter of our own: ``pycocotools.mask.iou`` already skips the merge of every
pair whose ``toBbox`` boxes do not overlap, and computing those boxes beforehand costs the same
RLE parse again (on the ``scripts/bench_eval.py`` data: 5.9 s with a prefilter, 4.2 s without).

Public: :class:`Overlaps`, :func:`frame_intersections`, :func:`stack_frames`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from visstg.eval.results import EvalInputError


@dataclass
class Overlaps:
    """The nonzero per-frame intersections of one (video, category), as parallel [N] arrays.

    ``frame[n]``, ``det[n]`` and ``gt[n]`` index the frame and the detection / ground-truth
    track (positions in the lists given to :func:`frame_intersections`); ``inter[n]`` is the
    intersection in pixels (int64, > 0). Pairs and frames not listed intersect in 0 pixels.
    """

    frame: np.ndarray
    det: np.ndarray
    gt: np.ndarray
    inter: np.ndarray

    @classmethod
    def empty(cls) -> Overlaps:
        z = np.zeros(0, np.int64)
        return cls(z, z, z, z)


def stack_frames(tracks: Sequence, n_frames: int, field: str) -> np.ndarray:
    """[N, n_frames, ...] stack of a per-frame field of each track, zero past its list."""
    first = getattr(tracks[0], field)
    out = np.zeros((len(tracks), n_frames, *first.shape[1:]), first.dtype)
    for i, t in enumerate(tracks):
        v = getattr(t, field)[:n_frames]
        out[i, : len(v)] = v
    return out


def frame_intersections(dts: Sequence, gts: Sequence) -> Overlaps:
    """Exact nonzero mask intersections of every (detection, ground truth, frame).

    Args:
        dts, gts: tracks with ``segs`` (one compressed RLE dict or None per frame),
            ``present`` [len(segs)] bool (``segs[f] is not None``) and ``mask_areas``
            [len(segs)] int64.

    Returns:
        :class:`Overlaps` sorted by frame. Frames past either track's list are not scored.

    Raises:
        EvalInputError: two masks of one frame whose boxes overlap have different sizes (the
            case where pycocotools answers -1).
    """
    if not dts or not gts:
        return Overlaps.empty()
    F = min(max(len(t.segs) for t in dts), max(len(t.segs) for t in gts))
    if F == 0:
        return Overlaps.empty()
    pd = stack_frames(dts, F, "present")  # [D, F]
    pg = stack_frames(gts, F, "present")  # [G, F]
    d_area = stack_frames(dts, F, "mask_areas")  # [D, F]
    out_f, out_d, out_g, out_i = [], [], [], []
    for f in np.flatnonzero(pd.any(0) & pg.any(0)).tolist():
        di, gi = np.flatnonzero(pd[:, f]), np.flatnonzero(pg[:, f])
        d_rles = [dts[i].segs[f] for i in di.tolist()]
        g_rles = [gts[j].segs[f] for j in gi.tolist()]
        ioa = np.asarray(mask_utils.iou(d_rles, g_rles, [1] * len(g_rles)))  # [d, g]
        if (ioa < 0).any():
            raise EvalInputError(f"frame {f}: detection and ground-truth mask sizes differ")
        inter = np.rint(ioa * d_area[di, f][:, None]).astype(np.int64)  # [d, g]
        a, b = np.nonzero(inter)
        out_f.append(np.full(len(a), f, np.int64))
        out_d.append(di[a])
        out_g.append(gi[b])
        out_i.append(inter[a, b])
    if not out_f:
        return Overlaps.empty()
    return Overlaps(*(np.concatenate(x).astype(np.int64) for x in (out_f, out_d, out_g, out_i)))
