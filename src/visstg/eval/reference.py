"""A straightforward YouTube-VIS evaluator that follows the official algorithm step by step.

It exists as a test oracle for :mod:`visstg.eval.ytvis_eval` and as the speed baseline of
``scripts/bench_eval.py``: per (detection, ground truth) pair and per frame it merges the two
RLE masks twice (intersection, union) exactly as the official ``ytvoseval.py`` does, matches with
plain nested loops and accumulates with the per-element precision envelope loop. It shares only
the file loaders and the parameter constants with the fast evaluator. Not for everyday use.

    python -m visstg.eval.reference GT.json RESULTS.json   # prints the 12 statistics as JSON
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np
from pycocotools import mask as mask_utils

from visstg.eval.results import load_gt, load_results
from visstg.eval.ytvis_eval import AREA_RNG, IOU_THRS, MAX_DETS, REC_THRS, STAT_KEYS


def _track_area(areas):
    kept = [a for a in areas if a]
    return np.array(kept).mean() if kept else 0


def _pair_iou(d_seq, g_seq):
    inter, union = 0.0, 0.0
    for d, g in zip(d_seq, g_seq):  # zip: frames beyond the shorter list do not count
        if d and g:
            inter += mask_utils.area(mask_utils.merge([d, g], intersect=True))
            union += mask_utils.area(mask_utils.merge([d, g], intersect=False))
        elif g:
            union += mask_utils.area(g)
        elif d:
            union += mask_utils.area(d)
    return inter / union if union > 0.0 else 0.0


def _evaluate_video(gt, dt, ious, a_rng, max_det):
    if not gt and not dt:
        return None
    for g in gt:
        g["_ignore"] = int(g["iscrowd"] or g["avg_area"] < a_rng[0] or g["avg_area"] > a_rng[1])
    gtind = np.argsort([g["_ignore"] for g in gt], kind="mergesort")
    gt = [gt[i] for i in gtind]
    dtind = np.argsort([-d["score"] for d in dt], kind="mergesort")
    dt = [dt[i] for i in dtind[:max_det]]
    crowd = [int(g["iscrowd"]) for g in gt]
    if len(ious) > 0:
        ious = ious[:, gtind]
    T, G, D = len(IOU_THRS), len(gt), len(dt)
    gtm, dtm = np.zeros((T, G)), np.zeros((T, D))
    gt_ig = np.array([g["_ignore"] for g in gt])
    dt_ig = np.zeros((T, D))
    if len(ious) != 0:
        for ti, t in enumerate(IOU_THRS):
            for di, d in enumerate(dt):
                best, m = min([t, 1 - 1e-10]), -1
                for gi in range(G):
                    if gtm[ti, gi] > 0 and not crowd[gi]:
                        continue
                    if m > -1 and gt_ig[m] == 0 and gt_ig[gi] == 1:
                        break
                    if ious[di, gi] < best:
                        continue
                    best, m = ious[di, gi], gi
                if m == -1:
                    continue
                dt_ig[ti, di] = gt_ig[m]
                dtm[ti, di] = gt[m]["id"]
                gtm[ti, m] = d["id"]
    out_rng = np.array([d["avg_area"] < a_rng[0] or d["avg_area"] > a_rng[1] for d in dt])
    dt_ig = np.logical_or(dt_ig, np.logical_and(dtm == 0, np.repeat(out_rng.reshape(1, D), T, 0)))
    return {
        "dtScores": [d["score"] for d in dt],
        "dtMatches": dtm,
        "dtIgnore": dt_ig,
        "gtIgnore": gt_ig,
    }


def evaluate_reference(gt, results) -> dict:
    """The 12 statistics (dict keyed by ``STAT_KEYS``) computed the official way, slowly."""
    gt = load_gt(gt)
    dts = load_results(results, gt)
    vid_ids = sorted({v["id"] for v in gt["videos"]})
    cat_ids = sorted({c["id"] for c in gt["categories"]})
    gts_by, dts_by = defaultdict(list), defaultdict(list)
    for ann in gt["annotations"]:
        if ann["video_id"] in vid_ids and ann["category_id"] in cat_ids:
            g = dict(ann, avg_area=_track_area(ann["areas"]))
            gts_by[g["video_id"], g["category_id"]].append(g)
    for i, r in enumerate(dts):
        if r["category_id"] not in cat_ids:
            continue
        areas = [mask_utils.area(s) if s else None for s in r["segmentations"]]
        dts_by[r["video_id"], r["category_id"]].append(
            dict(r, id=i + 1, iscrowd=0, avg_area=_track_area(areas))
        )

    ious = {}
    for vid in vid_ids:
        for cat in cat_ids:
            g, d = gts_by[vid, cat], dts_by[vid, cat]
            if not g and not d:
                ious[vid, cat] = []
                continue
            d = [d[i] for i in np.argsort([-x["score"] for x in d], kind="mergesort")][
                : MAX_DETS[-1]
            ]
            mat = np.zeros((len(d), len(g)))
            for i, j in np.ndindex(mat.shape):
                mat[i, j] = _pair_iou(d[i]["segmentations"], g[j]["segmentations"])
            ious[vid, cat] = mat

    evals = [
        _evaluate_video(gts_by[v, c], dts_by[v, c], ious[v, c], a, MAX_DETS[-1])
        for c in cat_ids
        for a in AREA_RNG
        for v in vid_ids
    ]

    T, R, K, A, M = len(IOU_THRS), len(REC_THRS), len(cat_ids), len(AREA_RNG), len(MAX_DETS)
    precision, recall = -np.ones((T, R, K, A, M)), -np.ones((T, K, A, M))
    I0 = len(vid_ids)
    for k in range(K):
        for a in range(A):
            for m, max_det in enumerate(MAX_DETS):
                E = [e for e in evals[k * A * I0 + a * I0 : k * A * I0 + (a + 1) * I0] if e]
                if not E:
                    continue
                scores = np.concatenate([e["dtScores"][:max_det] for e in E])
                inds = np.argsort(-scores, kind="mergesort")
                dtm = np.concatenate([e["dtMatches"][:, :max_det] for e in E], axis=1)[:, inds]
                dt_ig = np.concatenate([e["dtIgnore"][:, :max_det] for e in E], axis=1)[:, inds]
                gt_ig = np.concatenate([e["gtIgnore"] for e in E])
                npig = np.count_nonzero(gt_ig == 0)
                if npig == 0:
                    continue
                tps = np.logical_and(dtm, np.logical_not(dt_ig))
                fps = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig))
                tp_sum = np.cumsum(tps, axis=1).astype(np.float64)
                fp_sum = np.cumsum(fps, axis=1).astype(np.float64)
                for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum)):
                    nd = len(tp)
                    rc = tp / npig
                    pr = (tp / (fp + tp + np.spacing(1))).tolist()
                    recall[t, k, a, m] = rc[-1] if nd else 0
                    for i in range(nd - 1, 0, -1):
                        if pr[i] > pr[i - 1]:
                            pr[i - 1] = pr[i]
                    q = [0.0] * len(REC_THRS)
                    for ri, pi in enumerate(np.searchsorted(rc, REC_THRS, side="left")):
                        if pi >= nd:
                            break
                        q[ri] = pr[pi]
                    precision[t, :, k, a, m] = q

    def summ(ap=True, iou=None, a=0, m=2):
        s = precision if ap else recall
        if iou is not None:
            s = s[np.where(iou == IOU_THRS)[0]]
        s = s[:, :, :, a, m] if ap else s[:, :, a, m]
        return float(np.mean(s[s > -1])) if len(s[s > -1]) else -1.0

    values = [
        summ(),
        summ(iou=0.5),
        summ(iou=0.75),
        summ(a=1),
        summ(a=2),
        summ(a=3),
        summ(False, m=0),
        summ(False, m=1),
        summ(False, m=2),
        summ(False, a=1),
        summ(False, a=2),
        summ(False, a=3),
    ]
    return dict(zip(STAT_KEYS, values))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m visstg.eval.reference GT.json RESULTS.json")
    print(json.dumps(evaluate_reference(sys.argv[1], sys.argv[2])))
