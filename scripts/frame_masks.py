"""Frame-by-frame detection and mask quality of a checkpoint, per category (no tracking).

Every annotated (object, frame) pair of a split is compared with the detections of that frame
(one ``inference_step`` per frame with no reference frame, detections of score >= ``--score``,
masks at the tracker's mask threshold stored in the checkpoint): its best mask IoU decides
whether it is found (IoU >= 0.3) and, if so, how good its mask is.

    python scripts/frame_masks.py CKPT [--split valid] [--score 0.2] [--videos N]

prints, per category, the number of (object, frame) pairs, the fraction missed and the mean
best IoU of those found, then the same over all categories, and the same by the object's visible
area in that frame (original pixels; ``--areas`` sets the bucket edges).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="a visstg training checkpoint")
    parser.add_argument("--split", default="valid", help="split of the checkpoint's dataset")
    parser.add_argument("--score", type=float, default=0.2, help="lowest detection score kept")
    parser.add_argument("--videos", type=int, default=None, help="first N videos only")
    parser.add_argument(
        "--areas", type=int, nargs="+", default=[300, 800, 2000],
        help="edges of the visible-area buckets, in original pixels",
    )  # fmt: skip
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from pycocotools import mask as mask_utils

    from visstg.data.datamodule import VideoDataset, VISDataModule
    from visstg.eval import load_gt
    from visstg.inference import load_checkpoint, tracker_config
    from visstg.tracker import encode_masks

    model = load_checkpoint(args.ckpt)
    data = {k: v for k, v in model.config["data"].items() if not k.startswith("_")}
    datamodule = VISDataModule(**data)
    split = datamodule.split(args.split)
    videos = VideoDataset(split, datamodule.test_size, datamodule.max_size)
    threshold = tracker_config(model.config.get("tracker"), None).mask_threshold
    names = {c["id"]: c["name"] for c in split.categories}
    annotations = load_gt(split.path)["annotations"]  # segmentations: compressed RLE or None
    pairs: list[tuple[int, float, float]] = []  # (category, best IoU, visible area) per pair
    count = len(videos) if args.videos is None else min(args.videos, len(videos))
    for index in range(count):
        video = videos[index]
        objects = [a for a in annotations if a["video_id"] == video.video_id]
        for t, image, valid, _ in video.frames():
            with torch.no_grad():
                out, _ = model.net.inference_step(image[None], None, None, image_size=valid)
            keep = out["scores"] >= args.score
            dets = encode_masks(
                out["masks"][keep], valid, video.orig_size, model.net.mask_stride, threshold
            )
            gts = [(a["segmentations"][t], a["category_id"]) for a in objects]
            gts = [(seg, cid) for seg, cid in gts if seg]
            if not gts:
                continue
            rles = [seg for seg, _ in gts]
            if dets:
                ious = np.asarray(mask_utils.iou(dets, rles, [0] * len(rles))).max(0)
            else:
                ious = np.zeros(len(rles))
            for (_, cid), iou, area in zip(gts, ious, mask_utils.area(rles)):
                pairs.append((cid, float(iou), float(area)))

    print(f"{args.ckpt}: {args.split}, {count} videos, score >= {args.score}, mask {threshold}")
    if not pairs:
        print("no annotated object in these videos")
        return
    print(f"{'category':14s} {'pairs':>6s} {'missed':>7s} {'IoU found':>9s}")
    cats, ious, area = (np.asarray(column) for column in zip(*pairs))
    rows = [(names[cid], ious[cats == cid]) for cid in names if (cats == cid).any()]
    rows.append(("all", ious))
    edges = [0, *args.areas, np.inf]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (area >= lo) & (area < hi)
        if sel.any():
            label = f"{int(lo)}-{int(hi)}" if np.isfinite(hi) else f">={int(lo)}"
            rows.append((f"area_{label}", ious[sel]))
    for name, row in rows:
        found = row[row >= 0.3]
        mean = f"{found.mean():.3f}" if len(found) else "-"
        print(f"{name:14s} {len(row):6d} {(row < 0.3).mean():7.3f} {mean:>9s}")


if __name__ == "__main__":
    main()
