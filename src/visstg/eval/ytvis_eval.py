"""YouTube-VIS video AP/AR, numerically identical to the official evaluator, and fast.

The official evaluator (youtubevos/cocoapi ``ytvoseval.py``) scores a (detection track,
ground-truth track) pair by *video IoU*: the sum over frames of mask intersections divided by
the sum over frames of unions, over the frames both tracks' lists cover (a frame where only one
side has a mask adds its area to the union). It computes that with two RLE merges per frame per
pair. Here the per-frame intersections of a (video, category) come from
:mod:`visstg.eval.overlap` (one ``pycocotools.mask.iou`` call per frame for all pairs); they are
exact integers, so the sums and the final division are the same float64 numbers as the official
code's. The same intersections feed HOTA (:mod:`visstg.eval.trackeval_hota`) when it is asked
for. The greedy matching, accumulation and summary follow the official conventions (stable sorts,
``np.linspace`` thresholds, closed area ranges, maxDets per (video, category), -1 for nothing
valid).

Public entry point: :func:`evaluate`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from visstg.eval.overlap import Overlaps, frame_intersections
from visstg.eval.parallel import map_forked
from visstg.eval.results import EvalInputError, PathLike, load_gt, load_results, paused_gc

log = logging.getLogger(__name__)

# The official parameters, built exactly as the official code builds them (np.linspace, not
# np.arange, so that 0.75 is exactly representable and thresholds compare as they do there).
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_RNG = ((0.0, 1e5**2), (0.0, 128.0**2), (128.0**2, 256.0**2), (256.0**2, 1e5**2))
AREA_LBL = ("all", "small", "medium", "large")
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# OVIS occlusion levels on the mean bounding-box overlap rate (MBOR), closed ends like areas.
OCC_RNG = ((0.0, 0.25), (0.25, 0.5), (0.5, 1.0))
OCC_LBL = ("light", "medium", "heavy")
_OCC_NAMES = {
    "light": 0.125,
    "slight": 0.125,
    "medium": 0.375,
    "moderate": 0.375,
    "heavy": 0.75,
    "severe": 0.75,
}


@dataclass
class Track:
    """One prepared track (ground truth or detection) of one (video, category)."""

    id: int
    score: float
    segs: list  # one compressed RLE dict or None per frame
    mask_areas: np.ndarray  # [len(segs)] int64 pixel areas, 0 where absent
    avg_area: float
    iscrowd: int = 0
    occlusion: float | None = None
    present: np.ndarray | None = None  # [len(segs)] bool: a mask (maybe empty) in that frame
    is_det: bool = False


@dataclass
class Prepared:
    """Ground truth and results grouped by (video_id, category_id), as the official code does.

    Tracks keep file order within a group; ``by_video`` lists every track of a video. With
    ``share_overlaps`` all of a group's detections are scored (not only the 100 best) and
    ``overlaps`` keeps their per-frame intersections (:func:`group_overlaps`) for HOTA.
    """

    vid_ids: list
    cat_ids: list
    cat_names: dict
    videos: list = field(default_factory=list)  # the ground truth's video entries
    categories: list = field(default_factory=list)  # and its category entries
    gts: dict = field(default_factory=lambda: defaultdict(list))
    dts: dict = field(default_factory=lambda: defaultdict(list))
    has_occlusion: bool = False
    share_overlaps: bool = False
    overlaps: dict = field(default_factory=dict)
    by_video: dict = field(default_factory=lambda: defaultdict(list))


def _nonzero_mean(values) -> float:
    """Mean of the truthy entries (the official track area), 0 when there are none."""
    kept = [a for a in values if a]
    return np.array(kept).mean() if kept else 0


def _occlusion_value(ann: Mapping) -> float | None:
    occ = ann.get("occlusion")
    if occ is None:
        return None
    if isinstance(occ, str):
        if occ.lower() not in _OCC_NAMES:
            raise EvalInputError(f"annotation {ann.get('id')}: unknown occlusion level {occ!r}")
        return _OCC_NAMES[occ.lower()]
    if isinstance(occ, list):  # per-frame values: the track's level is their mean
        vals = [
            float(_OCC_NAMES.get(v, v) if isinstance(v, str) else v) for v in occ if v is not None
        ]
        return float(np.mean(vals)) if vals else None
    return float(occ)


AGNOSTIC_CATEGORY = {"id": 1, "name": "object"}


def prepare(
    gt: PathLike | Mapping, results: PathLike | Sequence, class_agnostic: bool = False
) -> Prepared:
    """Load, check and group ground truth and results (see :mod:`visstg.eval.results`).

    Mask areas are filled later, per video (:func:`score_video`). ``class_agnostic``: every
    ground-truth and result track is given the one category ``object`` (a diagnostic, not the
    benchmark: what AP the masks and tracks would reach with every class right).
    """
    gt = load_gt(gt)
    dts = load_results(results, gt)
    if class_agnostic:
        gt["categories"] = [dict(AGNOSTIC_CATEGORY)]
        one = AGNOSTIC_CATEGORY["id"]
        gt["annotations"] = [{**a, "category_id": one} for a in gt["annotations"]]
        dts = [{**d, "category_id": one} for d in dts]
    cats = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
    p = Prepared(
        vid_ids=sorted({v["id"] for v in gt["videos"]}),
        cat_ids=sorted(cats),
        cat_names=cats,
        videos=gt["videos"],
        categories=gt["categories"],
    )
    vids, catset = set(p.vid_ids), set(p.cat_ids)
    for ann in gt["annotations"]:
        if ann["video_id"] not in vids or ann["category_id"] not in catset:
            continue
        occ = _occlusion_value(ann)
        p.has_occlusion |= occ is not None
        p.gts[ann["video_id"], ann["category_id"]].append(
            Track(
                id=ann["id"],
                score=0.0,
                segs=ann["segmentations"],
                mask_areas=None,  # filled per video by _fill_areas
                avg_area=_nonzero_mean(ann["areas"]),
                iscrowd=int(ann["iscrowd"]),
                occlusion=occ,
            )
        )
    dropped = 0
    for i, r in enumerate(dts):
        if r["category_id"] not in catset:
            dropped += 1
            continue
        # Result ids are 1-based positions in the file, as the official loader assigns them.
        p.dts[r["video_id"], r["category_id"]].append(
            Track(
                id=i + 1,
                score=r["score"],
                segs=r["segmentations"],
                mask_areas=None,
                avg_area=0,
                is_det=True,
            )
        )
    if dropped:
        log.warning(
            "%d result(s) have a category_id absent from the ground truth: ignored", dropped
        )
    for key, tracks in list(p.gts.items()) + list(p.dts.items()):
        p.by_video[key[0]].extend(tracks)
    return p


def mask_areas(rles: Sequence[dict]) -> np.ndarray:
    """Pixel areas of RLE masks as uint32, in blocks: pycocotools 2.0.11's ``area`` overflows
    (``OverflowError: ... out of bounds for uint8``) on lists of 256 masks or more."""
    blocks = [mask_utils.area(list(rles[i : i + 255])) for i in range(0, len(rles), 255)]
    return np.concatenate(blocks).astype(np.uint32) if blocks else np.zeros(0, np.uint32)


def _fill_areas(p: Prepared, vid) -> None:
    """Pixel areas of every mask of a video (pycocotools calls of 255 masks); track areas."""
    tracks = p.by_video.get(vid, [])
    flat = [s for t in tracks for s in t.segs]
    present = np.array([s is not None for s in flat], bool)  # [N]
    rles = [s for s in flat if s is not None]
    areas = np.zeros(len(flat), np.int64)
    areas[present] = mask_areas(rles)  # uint32 values, as pycocotools returns them
    lens = np.array([len(t.segs) for t in tracks], np.int64)
    ends = np.cumsum(lens).tolist()
    for t, e, n in zip(tracks, ends, lens.tolist()):
        t.mask_areas, t.present = areas[e - n : e], present[e - n : e]  # views
    # A detection's track area: the mean of its nonzero mask areas, as the official
    # np.array(areas).mean() of uint32 values; integer sums are exact, so the same float.
    owner = np.repeat(np.arange(len(tracks)), lens)
    nz = areas != 0
    total = np.bincount(owner[nz], areas[nz], minlength=len(tracks)).tolist()
    count = np.bincount(owner[nz], minlength=len(tracks)).tolist()
    for t, s_, c in zip(tracks, total, count):
        if t.is_det:  # ground truth keeps the mean of its ``areas`` field
            t.avg_area = s_ / c if c else 0


def group_overlaps(p: Prepared, vid, cat) -> Overlaps:
    """Per-frame intersections of all detections (file order) and ground truth of a group."""
    key = (vid, cat)
    if key not in p.overlaps:
        p.overlaps[key] = frame_intersections(p.dts.get(key, []), p.gts.get(key, []))
    return p.overlaps[key]


def video_ious(
    dts: Sequence[Track],
    gts: Sequence[Track],
    overlaps: Overlaps | None = None,
    det_rank: np.ndarray | None = None,
) -> np.ndarray:
    """Video IoU of every (detection, ground truth) pair: [D, G] float64.

    Frames beyond the shorter of the two lists are not counted (the official code zips the
    two lists). I and U are integer sums, so I / U is bit-identical to the official value.

    Args:
        dts, gts: the tracks to score (rows, columns).
        overlaps: their per-frame intersections (computed here when None), or those of a
            larger detection list that ``det_rank`` maps onto ``dts``.
        det_rank: [len(larger list)] row of each detection of ``overlaps`` in ``dts``, -1 for
            detections left out.
    """
    D, G = len(dts), len(gts)
    if D == 0 or G == 0:
        return np.zeros((D, G))
    if overlaps is None:
        overlaps = frame_intersections(dts, gts)
    len_d = np.array([len(t.segs) for t in dts])
    len_g = np.array([len(t.segs) for t in gts])
    L = np.minimum(len_d[:, None], len_g[None, :])  # [D, G] frames counted per pair
    F = int(L.max())

    def cum_areas(tracks):  # [N, F + 1]: areas summed over the first f frames
        a = np.zeros((len(tracks), F + 1), np.int64)
        for i, t in enumerate(tracks):
            n = min(len(t.segs), F)
            a[i, 1 : n + 1] = t.mask_areas[:n]
        return np.cumsum(a, axis=1)

    union = (
        np.take_along_axis(cum_areas(dts), L, axis=1)
        + np.take_along_axis(cum_areas(gts), L.T, axis=1).T
    )  # [D, G] sum of both areas over the counted frames
    d = overlaps.det if det_rank is None else det_rank[overlaps.det]
    keep = d >= 0
    d, g, f, i = d[keep], overlaps.gt[keep], overlaps.frame[keep], overlaps.inter[keep]
    keep = f < L[d, g]
    inter = np.zeros((D, G), np.int64)
    np.add.at(inter, (d[keep], g[keep]), i[keep])
    union -= inter
    i_f, u_f = inter.astype(np.float64), union.astype(np.float64)
    return np.divide(i_f, u_f, out=np.zeros((D, G)), where=u_f > 0)


@dataclass
class VideoEval:
    """Matching of one (video, category, range): the official ``evaluateVid`` record."""

    dt_scores: np.ndarray  # [D] sorted descending
    dt_matches: np.ndarray  # [T, D] matched ground-truth id, 0 = unmatched
    dt_ignore: np.ndarray  # [T, D] bool
    gt_ignore: np.ndarray  # [G] bool


def match(
    ious: np.ndarray,
    gt_ids: Sequence[int],
    gt_ignore: np.ndarray,
    gt_crowd: np.ndarray,
    dt_out_of_range: np.ndarray,
    dt_scores: np.ndarray,
) -> VideoEval:
    """Greedy matching at every IoU threshold, the official rules.

    Detections (rows of ``ious``, already sorted by score) take, in order, the best available
    ground truth with IoU >= threshold; the last of equal-IoU candidates wins; a detection
    matched to a regular ground truth never moves on to ignored ones; crowd ground truth can
    absorb any number of detections. Unmatched detections out of range are ignored.
    """
    T, D, G = len(IOU_THRS), ious.shape[0], len(gt_ids)
    order = np.argsort(gt_ignore, kind="mergesort")  # ignored ground truth last, stable
    ig = gt_ignore[order].tolist()
    crowd = gt_crowd[order].tolist()
    ids = [gt_ids[j] for j in order]
    dtm = np.zeros((T, D))
    dt_ig = np.zeros((T, D), bool)
    if D and G:
        iou_sorted = ious[:, order]
        best = iou_sorted.max(axis=1)
        rows = iou_sorted.tolist()
        for ti, t in enumerate(IOU_THRS.tolist()):
            thr = min(t, 1 - 1e-10)
            taken = [False] * G
            # A detection whose best IoU is below the threshold cannot match anything.
            for d in np.flatnonzero(best >= thr).tolist():
                row, cur, m = rows[d], thr, -1
                for g in range(G):
                    if taken[g] and not crowd[g]:
                        continue
                    if m > -1 and not ig[m] and ig[g]:
                        break
                    if row[g] < cur:
                        continue
                    cur, m = row[g], g
                if m == -1:
                    continue
                dt_ig[ti, d] = ig[m]
                dtm[ti, d] = ids[m]
                taken[m] = True
    dt_ig |= (dtm == 0) & dt_out_of_range[None, :]
    return VideoEval(dt_scores, dtm, dt_ig, gt_ignore[order])


def accumulate(evals: Sequence[VideoEval | None], max_det: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision [T, R] and recall [T] over the videos of one (category, range); -1 if no gt."""
    T, R = len(IOU_THRS), len(REC_THRS)
    evals = [e for e in evals if e is not None]
    precision, recall = -np.ones((T, R)), -np.ones(T)
    if not evals:
        return precision, recall
    gt_ig = np.concatenate([e.gt_ignore for e in evals])
    npig = np.count_nonzero(gt_ig == 0)
    if npig == 0:
        return precision, recall
    scores = np.concatenate([e.dt_scores[:max_det] for e in evals])
    inds = np.argsort(-scores, kind="mergesort")  # stable: ties keep video order
    dtm = np.concatenate([e.dt_matches[:, :max_det] for e in evals], axis=1)[:, inds]
    dt_ig = np.concatenate([e.dt_ignore[:, :max_det] for e in evals], axis=1)[:, inds]
    tps = np.logical_and(dtm, np.logical_not(dt_ig))
    fps = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig))
    tp = np.cumsum(tps, axis=1).astype(np.float64)  # [T, N]
    fp = np.cumsum(fps, axis=1).astype(np.float64)
    nd = tp.shape[1]
    rc = tp / npig
    pr = tp / (fp + tp + np.spacing(1))
    recall = rc[:, -1].copy() if nd else np.zeros(T)
    # Precision envelope (max over higher recall), then sampled at the recall thresholds.
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    precision = np.zeros((T, R))
    for t in range(T):
        ri = np.searchsorted(rc[t], REC_THRS, side="left")
        ok = ri < nd
        precision[t, ok] = pr[t, ri[ok]]
    return precision, recall


def _summarize(precision, recall, iou=None, a=0, m=2, ap=True) -> float:
    s = precision if ap else recall  # [T, R, K, A, M] / [T, K, A, M]
    if iou is not None:
        s = s[np.where(iou == IOU_THRS)[0]]
    s = s[..., a, m]
    valid = s[s > -1]
    return float(np.mean(valid)) if len(valid) else -1.0


def summarize(precision: np.ndarray, recall: np.ndarray) -> dict[str, float]:
    """The 12 official statistics from precision [T,R,K,A,M] and recall [T,K,A,M]."""
    return {
        "AP": _summarize(precision, recall),
        "AP50": _summarize(precision, recall, iou=0.5),
        "AP75": _summarize(precision, recall, iou=0.75),
        "APs": _summarize(precision, recall, a=1),
        "APm": _summarize(precision, recall, a=2),
        "APl": _summarize(precision, recall, a=3),
        "AR1": _summarize(precision, recall, m=0, ap=False),
        "AR10": _summarize(precision, recall, m=1, ap=False),
        "AR100": _summarize(precision, recall, m=2, ap=False),
        "ARs": _summarize(precision, recall, a=1, ap=False),
        "ARm": _summarize(precision, recall, a=2, ap=False),
        "ARl": _summarize(precision, recall, a=3, ap=False),
    }


def _ranges(p: Prepared) -> list[tuple[str, float, float]]:
    ranges = [("area", lo, hi) for lo, hi in AREA_RNG]
    if p.has_occlusion:
        ranges += [("occ", lo, hi) for lo, hi in OCC_RNG]
    return ranges


def score_video(p: Prepared, vid, hota_seq: tuple[str, int] | None = None):
    """All the per-video work: mask geometry, the matchings of every (category, range), and
    with ``hota_seq`` (sequence name, timesteps) trackeval's HOTA per class.

    Returns:
        ({category id: [VideoEval per range]} for the categories with tracks in the video,
        {class name: trackeval HOTA result} or None).
    """
    _fill_areas(p, vid)
    ranges, max_det = _ranges(p), MAX_DETS[-1]
    evals = {}
    for cat in p.cat_ids:
        gts, dts = p.gts.get((vid, cat), []), p.dts.get((vid, cat), [])
        if not gts and not dts:
            continue
        order = np.argsort([-t.score for t in dts], kind="mergesort")[:max_det]
        dts_all, dts = dts, [dts[i] for i in order]
        if p.share_overlaps:  # score all detections once, for HOTA too
            rank = np.full(len(dts_all), -1)
            rank[order] = np.arange(len(order))
            ious = video_ious(dts, gts, group_overlaps(p, vid, cat), rank)
        else:
            ious = video_ious(dts, gts)
        crowd = np.array([t.iscrowd for t in gts], bool)
        g_area = np.array([t.avg_area for t in gts], np.float64)
        d_area = np.array([t.avg_area for t in dts], np.float64)
        scores = np.array([t.score for t in dts], np.float64)
        g_occ = np.array([np.nan if t.occlusion is None else t.occlusion for t in gts], np.float64)
        gt_ids = [t.id for t in gts]
        evals[cat] = []
        for kind, lo, hi in ranges:
            if kind == "area":
                g_out = (g_area < lo) | (g_area > hi)
                d_out = (d_area < lo) | (d_area > hi)
            else:  # detections carry no occlusion level: none is ignored by range
                g_out = ~((g_occ >= lo) & (g_occ <= hi))
                d_out = np.zeros(len(dts), bool)
            evals[cat].append(match(ious, gt_ids, crowd | g_out, crowd, d_out, scores))
    hota_res = None
    if hota_seq is not None:
        from visstg.eval.trackeval_hota import hota_video  # lazily: trackeval pulls in scipy

        hota_res = hota_video(p, vid, *hota_seq)
    for cat in p.cat_ids:  # the video is done: free its geometry
        p.overlaps.pop((vid, cat), None)
    return evals, hota_res


def evaluate_prepared(p: Prepared, with_hota: bool = False, workers: int | None = 1) -> dict:
    """Score prepared data; see :func:`evaluate` for the arguments and the returned keys."""
    T, R, K, M = len(IOU_THRS), len(REC_THRS), len(p.cat_ids), len(MAX_DETS)
    A = len(_ranges(p))
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    p.share_overlaps = with_hota
    hota_seqs = {}
    if with_hota:
        from visstg.eval.trackeval_hota import hota_metric, sequences

        hota_seqs = {v["id"]: (seq, n) for seq, (v, n) in sequences(p.videos).items()}
        hota_metric()  # imports trackeval once, before any fork
    scored = map_forked(lambda v: score_video(p, v, hota_seqs.get(v)), p.vid_ids, workers)
    for k, cat in enumerate(p.cat_ids):
        for r in range(A):
            per_video = [ev[cat][r] if cat in ev else None for ev, _ in scored]
            for m, md in enumerate(MAX_DETS):
                precision[:, :, k, r, m], recall[:, k, r, m] = accumulate(per_video, md)
    out = summarize(precision[..., :4, :], recall[..., :4, :])
    per_cat = {}
    for k, cat in enumerate(p.cat_ids):
        s = precision[:, :, k, 0, -1]
        per_cat[p.cat_names[cat]] = float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
    out["per_category_AP"] = per_cat
    if p.has_occlusion:
        occ = {}
        for j, lbl in enumerate(OCC_LBL):
            occ[f"AP_{lbl}"] = _summarize(precision, recall, a=4 + j)
            occ[f"AR_{lbl}"] = _summarize(precision, recall, a=4 + j, ap=False)
        out["occlusion"] = occ
    if with_hota:
        from visstg.eval.trackeval_hota import combine_videos

        out.update(combine_videos(p, {v: h for v, (_, h) in zip(p.vid_ids, scored)}))
    out["_precision"], out["_recall"] = precision, recall
    return out


def evaluate(
    gt: PathLike | Mapping,
    results: PathLike | Sequence,
    with_hota: bool = False,
    workers: int | None = 1,
    class_agnostic: bool = False,
) -> dict:
    """YouTube-VIS video AP/AR of a results file (or list) against ground truth.

    Args:
        gt: ground-truth JSON path or loaded dict (YouTube-VIS 2019/2021 or OVIS layout).
        results: results JSON path or list in the official results format.
        with_hota: also compute HOTA/DetA/AssA (trackeval's metric fed with the same per-frame
            intersections; see :mod:`visstg.eval.trackeval_hota`).
        workers: processes that share the per-video work (:func:`visstg.eval.parallel.map_forked`:
            forked copies of this one; the numbers are the same for any count). ``None``: one
            per available core; the default 1 never forks (safe inside a training process).
        class_agnostic: score every track as one category (:func:`prepare`), a diagnostic.

    Returns:
        dict with the 12 official statistics as floats (``STAT_KEYS``: AP ... ARl; fractions,
        -1 where the official code gives -1), ``per_category_AP`` {category name: AP or -1},
        when the ground truth has OVIS ``occlusion`` labels ``occlusion`` with
        ``AP_light/AP_medium/AP_heavy`` and ``AR_*``, and with ``with_hota`` ``HOTA``,
        ``DetA`` and ``AssA``.
    """
    # Millions of small dicts and arrays: the cyclic garbage collector would walk them again
    # and again for nothing (they hold no cycles); they are freed before it resumes.
    with paused_gc():
        return _evaluate(gt, results, with_hota, workers, class_agnostic)


def _evaluate(gt, results, with_hota: bool, workers: int | None, class_agnostic: bool) -> dict:
    p = prepare(gt, results, class_agnostic)
    if not any(p.dts.values()):
        log.warning(
            "the results hold no track: every statistic that has ground truth is 0 "
            "(the official code stops with an IndexError on an empty list)"
        )
    out = evaluate_prepared(p, with_hota, workers)
    out.pop("_precision"), out.pop("_recall")
    return out
