"""How much AP a results file would gain from perfect masks or perfect classes.

Each predicted track is paired with the ground-truth object of its video with which it has the
highest video-level mask IoU (any class). The results are then scored four ways:

- ``as is``;
- ``GT masks``: in every frame where the track's mask has IoU >= ``--iou`` with its object's,
  the mask is replaced by the object's (a perfect mask head behind the same detections and
  tracks; frames below the threshold, and tracks on no object, stay as they are);
- ``GT classes``: each paired track takes its object's category (a perfect classifier);
- ``both``;
- ``IoU scores``: each track's score replaced by its video-level IoU with its object (0 where
  its class is wrong or it is on no object), the best ranking its masks and classes allow.

The gap between ``both`` and 1.0 is what detection coverage and tracking (missed frames, late
starts, identity switches, duplicate tracks) cost.

    python scripts/result_oracle.py GT.json RESULTS.json [--iou 0.5]

RESULTS.json is the official results format, e.g. from ``python -m visstg.evaluate
ckpt_path=CKPT output=M.json`` (which writes ``valid_results.json`` beside M.json).
"""

from __future__ import annotations

import argparse
import sys

ROWS = ("as is", "GT masks", "GT classes", "both", "IoU scores")
STATS = ("AP", "AP50", "AP75", "AR1", "AR10")


def _area(seg) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(seg)) if seg else 0


def _intersection(a, b) -> int:
    from pycocotools import mask as mask_utils

    if not a or not b:
        return 0
    return int(mask_utils.area(mask_utils.merge([a, b], intersect=True)))


def pair_tracks(gt: dict, results: list[dict]) -> list[tuple[dict | None, float]]:
    """For each result, the annotation of its video it overlaps most (video-level mask IoU,
    any class) and that IoU, or ``(None, 0.0)`` where it overlaps none."""
    objects: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        objects.setdefault(a["video_id"], []).append(a)
    pairs = []
    for r in results:
        best, best_iou = None, 0.0
        area = sum(map(_area, r["segmentations"]))
        for a in objects.get(r["video_id"], []):
            inter = sum(map(_intersection, r["segmentations"], a["segmentations"]))
            union = area + sum(map(_area, a["segmentations"])) - inter
            if union and inter / union > best_iou:
                best, best_iou = a, inter / union
        pairs.append((best, best_iou))
    return pairs


def oracle(
    results: list[dict], objects: list[dict | None], masks: bool, classes: bool, iou: float = 0.5
) -> list[dict]:
    """New results with the paired objects' masks (frames of IoU >= ``iou``) and/or classes."""
    out = []
    for r, a in zip(results, objects):
        r = dict(r)
        if a is not None and classes:
            r["category_id"] = a["category_id"]
        if a is not None and masks:
            segs = list(r["segmentations"])
            for t, (p, g) in enumerate(zip(segs, a["segmentations"])):
                inter = _intersection(p, g)
                union = _area(p) + _area(g) - inter
                if union and inter / union >= iou:
                    segs[t] = g
            r["segmentations"] = segs
        out.append(r)
    return out


def iou_scores(results: list[dict], pairs: list[tuple[dict | None, float]]) -> list[dict]:
    """The results scored by their video IoU with their object (0 where the class is wrong)."""
    return [
        {**r, "score": v if a is not None and a["category_id"] == r["category_id"] else 0.0}
        for r, (a, v) in zip(results, pairs)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gt", help="ground-truth JSON (YouTube-VIS / OVIS format)")
    parser.add_argument("results", help="results JSON (the official results format)")
    parser.add_argument("--iou", type=float, default=0.5,
                        help="a frame's mask is replaced when its IoU reaches this")  # fmt: skip
    args = parser.parse_args(argv)

    from visstg.eval.results import EvalInputError, load_gt, load_results
    from visstg.eval.ytvis_eval import evaluate

    try:
        gt = load_gt(args.gt)
        results = load_results(args.results, gt)
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pairs = pair_tracks(gt, results)
    objects = [a for a, _ in pairs]
    paired = sum(a is not None for a in objects)
    print(f"{args.results}: {len(results)} tracks, {paired} on an object, "
          f"{len(gt['annotations'])} objects")  # fmt: skip
    print(f"{'':12s}" + "".join(f"{s:>7s}" for s in STATS))
    flags = ((False, False), (True, False), (False, True), (True, True))  # masks, classes
    variants = [oracle(results, objects, m, c, args.iou) for m, c in flags]
    variants.append(iou_scores(results, pairs))
    for row, variant in zip(ROWS, variants):
        metrics = evaluate(gt, variant)
        print(f"{row:12s}" + "".join(f"{metrics[s]:7.3f}" for s in STATS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
