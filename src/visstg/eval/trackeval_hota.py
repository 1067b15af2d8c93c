"""HOTA, DetA and AssA with the ``trackeval`` package's HOTA metric on YouTube-VIS data.

trackeval does the metric (``trackeval.metrics.HOTA``: ``eval_sequence`` per video and class,
``combine_sequences``, ``combine_classes_class_averaged``). Two ways feed it the same data:

* :func:`hota` and ``evaluate(..., with_hota=True)`` (the default; :func:`hota_video` per
  video, :func:`combine_videos`): the per-sequence dicts that trackeval's
  ``YouTubeVIS.get_preprocessed_seq_data`` would produce are built here from the per-frame mask
  intersections the AP computation already has (:mod:`visstg.eval.overlap`), instead of
  trackeval recomputing every frame's IoU matrix with ``pycocotools.mask.iou``. The dicts
  reproduce trackeval's: per timestep the class's ground-truth dets in annotation order and
  tracker dets in results-file order (a det is a non-null segmentation, empty masks included),
  ids relabelled to 0..n-1 the way trackeval does (sorted annotation ids; tracker ids in file
  order), IoU matrices [gt, tracker] computed as pycocotools does (``I / U`` in float64, 0 when
  I is 0) in the same memory layout, and trackeval's sequence list (the first folder of each
  video's first file name) and class list (category names). ``tests/test_eval.py`` checks that
  both ways agree on random inputs.
* :func:`hota_reference`: trackeval's own ``YouTubeVIS`` dataset class end to end, kept as the
  oracle. Two things are patched around it, without touching trackeval: its ground-truth
  preparation runs ``pycocotools.mask.frPyObjects`` on every segmentation, which rejects
  compressed RLE with string counts, so the dataset object is built from a stub ground-truth
  file and then given our loaded annotations (the ``area`` field it reads); and it needs
  ``height``/``width`` on every annotation and a ``file_names`` list per video, filled from the
  video entries.

HOTA/DetA/AssA are averaged over the 19 localisation thresholds (trackeval's summary value),
then over the categories that have any ground truth or predicted detection (trackeval's
``combine_classes_class_averaged(..., ignore_empty_classes=True)``). Fractions in [0, 1].
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from visstg.eval.overlap import stack_frames
from visstg.eval.results import EvalInputError, PathLike, load_gt, load_results


def sequences(videos: Sequence[Mapping]) -> dict[str, tuple[Mapping, int]]:
    """trackeval's sequences: {name: (video entry, timesteps)}.

    The name is the folder of the video's first file (``video<id>`` without file names); a
    later video with the same name replaces an earlier one in its place, as in trackeval's
    dicts. Timesteps: the number of file names, else the ``length`` field.
    """
    out = {}
    for v in videos:
        names = v.get("file_names")
        seq = names[0].split("/")[0] if names else f"video{v['id']}"
        out[seq] = (v, len(names or []) or int(v.get("length", 0)))
    return out


def _combine(metric, per_class_seq: Mapping[str, Mapping[str, dict]]) -> dict[str, float]:
    """{class: {sequence: HOTA result}} -> mean HOTA/DetA/AssA, as trackeval combines them."""
    per_class = {c: metric.combine_sequences(seqs) for c, seqs in per_class_seq.items()}
    empty = all(not (r["HOTA_TP"] + r["HOTA_FN"] + r["HOTA_FP"]).any() for r in per_class.values())
    if empty:
        return {"HOTA": 0.0, "DetA": 0.0, "AssA": 0.0}
    comb = metric.combine_classes_class_averaged(per_class, ignore_empty_classes=True)
    return {k: float(np.mean(comb[k])) for k in ("HOTA", "DetA", "AssA")}


def _classes(categories: Sequence[Mapping]) -> dict[str, int]:
    """trackeval's classes: {category name: id}, the last id of a repeated name."""
    return {c.get("name", str(c["id"])): c["id"] for c in categories}


def hota(gt: PathLike | Mapping, results: PathLike | Sequence) -> dict[str, float]:
    """HOTA, DetA, AssA (fractions) of a results file (or list) against ground truth."""
    from visstg.eval.ytvis_eval import evaluate

    out = evaluate(gt, results, with_hota=True)
    return {k: out[k] for k in ("HOTA", "DetA", "AssA")}


def sequence_data(gts: Sequence, dts: Sequence, overlaps, n_frames: int, seq: str) -> dict:
    """The dict trackeval's ``YouTubeVIS.get_preprocessed_seq_data`` gives ``HOTA`` for one
    (sequence, class), from prepared tracks and their per-frame intersections.

    Args:
        gts, dts: the class's ground-truth tracks (annotation order) and detection tracks
            (results-file order) of the video; ``segs`` and ``mask_areas`` are read.
        overlaps: :class:`visstg.eval.overlap.Overlaps` of (all of) ``dts`` and ``gts``.
        n_frames: the video's number of timesteps; later list entries are not seen.
        seq: the sequence name.

    Returns:
        ``gt_ids``/``tracker_ids``: per timestep [n] int64 ids relabelled to 0..num-1;
        ``similarity_scores``: per timestep [n_gt, n_tracker] float64 IoU (Fortran order, as
        trackeval's come); ``num_gt_dets``, ``num_tracker_dets``, ``num_gt_ids``,
        ``num_tracker_ids``, ``num_timesteps``, ``seq``.
    """
    from trackeval.datasets import YouTubeVIS
    from trackeval.utils import TrackEvalException

    T, G, D = n_frames, len(gts), len(dts)
    pg = stack_frames(gts, T, "present") if G else np.zeros((0, T), bool)  # [G, T]
    pd = stack_frames(dts, T, "present") if D else np.zeros((0, T), bool)  # [D, T]
    gid = np.array([t.id for t in gts], np.int64)
    uniq = np.unique(gid[pg.any(1)])
    g_rel = np.searchsorted(uniq, gid)  # trackeval relabels sorted unique ids to 0..n-1
    d_any = pd.any(1)
    d_rel = np.cumsum(d_any) - 1  # its tracker ids grow in file order
    sim = np.zeros((T, G, D))  # [T, G, D]
    keep = overlaps.frame < T
    f, d, g, i = (x[keep] for x in (overlaps.frame, overlaps.det, overlaps.gt, overlaps.inter))
    if len(f):
        area_g, area_d = (
            stack_frames(gts, T, "mask_areas"),
            stack_frames(dts, T, "mask_areas"),
        )  # [G|D, T]
        # pycocotools: (double) I / (double) U with U = area_d + area_g - I, all integers.
        sim[f, g, d] = i / (area_g[g, f] + area_d[d, f] - i)
    data = {"gt_ids": [], "tracker_ids": [], "similarity_scores": []}
    for t in range(T):
        gi, di = np.flatnonzero(pg[:, t]), np.flatnonzero(pd[:, t])
        data["gt_ids"].append(g_rel[gi])
        data["tracker_ids"].append(d_rel[di])
        data["similarity_scores"].append(np.asfortranarray(sim[t][np.ix_(gi, di)]))
    data.update(
        num_gt_dets=int(pg.sum()),
        num_tracker_dets=int(pd.sum()),
        num_gt_ids=len(uniq),
        num_tracker_ids=int(d_any.sum()),
        num_timesteps=T,
        seq=seq,
    )
    if len(uniq) < len(gid):  # repeated annotation ids: trackeval's own check and message
        try:
            YouTubeVIS._check_unique_ids(data)
        except TrackEvalException as e:
            raise EvalInputError(f"ground truth: {e}") from None
    return data


_METRIC = None
_EMPTY_RESULT = None


def hota_metric():
    """trackeval's ``HOTA`` metric object, made (and trackeval imported) on the first call."""
    global _METRIC
    if _METRIC is None:
        import trackeval  # imported lazily: it pulls in scipy

        _METRIC = trackeval.metrics.HOTA({"PRINT_CONFIG": False})
    return _METRIC


def hota_video(p, vid, seq: str, n_frames: int) -> dict[str, dict]:
    """trackeval's HOTA ``eval_sequence`` result of every class for one video.

    Args:
        p: :class:`visstg.eval.ytvis_eval.Prepared` whose video has its areas filled
            (:func:`visstg.eval.ytvis_eval.score_video` calls this); the groups'
            intersections come from :func:`visstg.eval.ytvis_eval.group_overlaps`.
        vid, seq, n_frames: the video id, its sequence name and timesteps.
    """
    global _EMPTY_RESULT
    from visstg.eval.ytvis_eval import group_overlaps

    metric = hota_metric()
    out = {}
    for c, cid in _classes(p.categories).items():
        gts, dts = p.gts.get((vid, cid), []), p.dts.get((vid, cid), [])
        if not gts and not dts:  # the same answer for every empty (sequence, class)
            if _EMPTY_RESULT is None:
                _EMPTY_RESULT = metric.eval_sequence(_empty_data(seq))
            out[c] = _EMPTY_RESULT
            continue
        data = sequence_data(gts, dts, group_overlaps(p, vid, cid), n_frames, seq)
        out[c] = metric.eval_sequence(data)
    return out


def combine_videos(p, per_video: Mapping) -> dict[str, float]:
    """Mean HOTA/DetA/AssA from {video id: :func:`hota_video` result} (trackeval's order)."""
    classes = _classes(p.categories)
    per_class_seq = {c: {} for c in classes}
    for seq, (v, _) in sequences(p.videos).items():
        for c in classes:
            per_class_seq[c][seq] = per_video[v["id"]][c]
    return _combine(hota_metric(), per_class_seq)


def _empty_data(seq: str) -> dict:
    """What trackeval passes for a (sequence, class) without ground truth or detections."""
    return {
        "gt_ids": [],
        "tracker_ids": [],
        "similarity_scores": [],
        "num_gt_dets": 0,
        "num_tracker_dets": 0,
        "num_gt_ids": 0,
        "num_tracker_ids": 0,
        "num_timesteps": 0,
        "seq": seq,
    }


def hota_reference(gt: PathLike | Mapping, results: PathLike | Sequence) -> dict[str, float]:
    """HOTA, DetA, AssA through trackeval's ``YouTubeVIS`` dataset class (slow; the oracle)."""
    import trackeval  # imported lazily: it pulls in scipy
    from trackeval.datasets import YouTubeVIS
    from trackeval.eval import eval_sequence

    gt = load_gt(gt)
    dts = load_results(results, gt)
    videos = []
    for v in gt["videos"]:
        v = dict(v)
        n = len(v.get("file_names") or []) or int(v.get("length", 0))
        if not v.get("file_names"):
            v["file_names"] = [f"video{v['id']}/{i:05d}.jpg" for i in range(n)]
        videos.append(v)
    size = {v["id"]: (v.get("height"), v.get("width")) for v in videos}
    length = {v["id"]: len(v["file_names"]) for v in videos}
    cat_ids = {c["id"] for c in gt["categories"]}

    def fit(segs, n):  # trackeval indexes segmentations by frame up to the video length
        segs = list(segs[:n])
        return segs + [None] * (n - len(segs))

    anns = []
    for a in gt["annotations"]:
        if a["video_id"] not in length or a["category_id"] not in cat_ids:
            continue
        kept = [x for x in a["areas"] if x]
        h, w = size[a["video_id"]]
        anns.append(
            dict(
                a,
                segmentations=fit(a["segmentations"], length[a["video_id"]]),
                area=np.array(kept).mean() if kept else 0,
                height=a.get("height", h),
                width=a.get("width", w),
            )
        )
    tracks = [
        dict(r, segmentations=fit(r["segmentations"], length[r["video_id"]]))
        for r in dts
        if r["category_id"] in cat_ids
    ]

    stub = {"videos": videos, "categories": copy.deepcopy(gt["categories"]), "annotations": []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        gt_dir = os.path.join(tmp, "gt", "youtube_vis_val")
        tr_dir = os.path.join(tmp, "trackers", "youtube_vis_val", "visstg", "data")
        os.makedirs(gt_dir)
        os.makedirs(tr_dir)
        with open(os.path.join(gt_dir, "gt.json"), "w") as f:
            json.dump(stub, f)
        with open(os.path.join(tr_dir, "results.json"), "w") as f:
            json.dump([], f)
        dataset = YouTubeVIS(
            {
                "GT_FOLDER": os.path.join(tmp, "gt") + os.sep,
                "TRACKERS_FOLDER": os.path.join(tmp, "trackers") + os.sep,
                "SPLIT_TO_EVAL": "val",
                "TRACKERS_TO_EVAL": ["visstg"],
                "PRINT_CONFIG": False,
            }
        )
        dataset.gt_data["annotations"] = anns
        dataset.tracker_data["visstg"] = tracks
        metric = trackeval.metrics.HOTA({"PRINT_CONFIG": False})
        _, seqs, classes = dataset.get_eval_info()
        per_seq = {
            seq: eval_sequence(seq, dataset, "visstg", classes, [metric], ["HOTA"]) for seq in seqs
        }
        per_class_seq = {c: {s: r[c]["HOTA"] for s, r in per_seq.items()} for c in classes}
        return _combine(metric, per_class_seq)
