"""Where a checkpoint's tracks lose video-level IoU: every annotated (object, frame) pair, seen
through the object's best track.

The tracker runs online over each video of a split (the checkpoint's thresholds, or
``--tracker KEY=VALUE`` overrides); each ground-truth object is paired with the predicted track
of highest video-level mask IoU (any class). Each frame in which the object is visible then
falls in one bucket:

- ``covered``: the track's mask there has IoU >= 0.5 with the object;
- ``low IoU``: it has a mask of lower IoU; ``on another object`` counts those where that mask
  has IoU >= 0.5 with another annotated object (the track follows someone else there), and
  ``object tracked elsewhere`` those where some other track covers the object at IoU >= 0.5;
- ``before start`` / ``after end``: the track has no mask yet / any more;
- ``gap``: no mask in a frame between two of the track's frames;
- ``no track``: no track overlaps the object at all.

    python scripts/track_errors.py CKPT [--split valid] [--videos N] [--tracker KEY=VALUE ...]

prints the fraction of pairs in each bucket.
"""

from __future__ import annotations

import argparse


def _decode(seg, shape):
    """A results or :func:`visstg.eval.load_gt` segmentation (RLE or None) -> boolean mask."""
    import numpy as np

    from visstg.viz import decode_rle

    return np.zeros(shape, dtype=bool) if seg is None else decode_rle(seg)


def _iou(a, b) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="a visstg training checkpoint")
    parser.add_argument("--split", default="valid", help="split of the checkpoint's dataset")
    parser.add_argument("--videos", type=int, default=None, help="first N videos only")
    parser.add_argument("--tracker", nargs="*", default=[], metavar="KEY=VALUE",
                        help="tracker overrides, e.g. score_threshold=0.3")  # fmt: skip
    args = parser.parse_args(argv)

    from collections import Counter

    from visstg.eval import load_gt
    from visstg.inference import infer_split, load_checkpoint

    overrides = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.tracker)}
    model = load_checkpoint(args.ckpt)
    split, results = infer_split(
        model, model.config["data"], args.split, overrides, max_videos=args.videos
    )
    gt = load_gt(split.path)
    videos = {v["id"]: v for v in gt["videos"]}
    kept = [v["id"] for v in split.videos][: args.videos]  # infer_split's videos
    tracks_of: dict[int, list] = {}
    for r in results:
        tracks_of.setdefault(r["video_id"], []).append(r)
    counts: Counter = Counter()
    for video_id in kept:
        shape = (videos[video_id]["height"], videos[video_id]["width"])
        objects = [a for a in gt["annotations"] if a["video_id"] == video_id]
        masks = {a["id"]: [_decode(s, shape) if s else None for s in a["segmentations"]]
                 for a in objects}  # fmt: skip
        tracks = [[_decode(s, shape) for s in r["segmentations"]]
                  for r in tracks_of.get(video_id, [])]  # fmt: skip
        present_in = [[t for t, s in enumerate(r["segmentations"]) if s is not None]
                      for r in tracks_of.get(video_id, [])]  # fmt: skip
        for a in objects:
            frames = masks[a["id"]]
            best, best_iou, present = None, 0.0, []
            for track, frames_of_track in zip(tracks, present_in):
                inter = sum((g & m).sum() for g, m in zip(frames, track) if g is not None)
                union = sum(
                    (g | m).sum() if g is not None else m.sum() for g, m in zip(frames, track)
                )
                if union and inter / union > best_iou:
                    best, best_iou, present = track, inter / union, frames_of_track
            for t, g in enumerate(frames):
                if g is None:
                    continue
                counts["pairs"] += 1
                if best is None:
                    counts["no track"] += 1
                elif t in present:
                    if _iou(g, best[t]) >= 0.5:
                        counts["covered"] += 1
                        continue
                    counts["low IoU"] += 1
                    others = [masks[o["id"]][t] for o in objects if o is not a]
                    if any(_iou(o, best[t]) >= 0.5 for o in others if o is not None):
                        counts["  on another object"] += 1
                    if any(_iou(g, tr[t]) >= 0.5 for tr in tracks if tr is not best):
                        counts["  object tracked elsewhere"] += 1
                elif t < present[0]:
                    counts["before start"] += 1
                elif t > present[-1]:
                    counts["after end"] += 1
                else:
                    counts["gap"] += 1
    n = counts.pop("pairs", 0)
    print(f"{args.ckpt}: {args.split}, {len(kept)} videos, {len(results)} tracks, {n} pairs")
    for key in ("covered", "low IoU", "  on another object", "  object tracked elsewhere",
                "before start", "after end", "gap", "no track"):  # fmt: skip
        print(f"{key:28s} {counts[key] / max(n, 1):.3f}")


if __name__ == "__main__":
    main()
