"""HOTA, DetA and AssA through the ``trackeval`` package's YouTube-VIS dataset class.

trackeval does the work (its ``YouTubeVIS`` dataset, ``HOTA`` metric and per-sequence
``eval_sequence``); this module only hands it our already-loaded data. Two things are patched
around here, without touching trackeval:

* its ground-truth preparation runs ``pycocotools.mask.frPyObjects`` on every segmentation,
  which rejects compressed RLE with string counts (``ValueError: invalid literal for int()``),
  the form YouTube-VIS ground truth often takes once converted. So the dataset object is built
  from a stub ground-truth file and then given our prepared annotations (compressed RLE, the
  ``area`` field it reads) directly, with no second JSON round trip of a large results file.
* trackeval's dataset needs ``height``/``width`` on every annotation and a ``file_names`` list
  per video (the folder name is the sequence name); both are filled from the video entries.

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

from visstg.eval.results import PathLike, load_gt, load_results


def hota(gt: PathLike | Mapping, results: PathLike | Sequence) -> dict[str, float]:
    """HOTA, DetA, AssA (fractions) of a results file (or list) against ground truth."""
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
        per_class = {
            c: metric.combine_sequences({s: r[c]["HOTA"] for s, r in per_seq.items()})
            for c in classes
        }
        empty = all(
            not (r["HOTA_TP"] + r["HOTA_FN"] + r["HOTA_FP"]).any() for r in per_class.values()
        )
        if empty:
            return {"HOTA": 0.0, "DetA": 0.0, "AssA": 0.0}
        comb = metric.combine_classes_class_averaged(per_class, ignore_empty_classes=True)
    return {k: float(np.mean(comb[k])) for k in ("HOTA", "DetA", "AssA")}
