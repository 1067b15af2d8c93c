"""Frame-by-frame detection and mask quality of a checkpoint, per category (no tracking).

Every annotated (object, frame) pair of a split is compared with the detections of that frame
(one ``inference_step`` per frame with no reference frame, detections of score >= ``--score``,
masks at the tracker's mask threshold stored in the checkpoint): its best mask IoU decides
whether it is found (IoU >= 0.3) and, if so, how good its mask is.

    python scripts/frame_masks.py CKPT [--split valid] [--score 0.2] [--videos N]

prints, per category, the number of (object, frame) pairs, the fraction missed and the mean
best IoU of those found, then the same over all categories.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="a visstg training checkpoint")
    parser.add_argument("--split", default="valid", help="split of the checkpoint's dataset")
    parser.add_argument("--score", type=float, default=0.2, help="lowest detection score kept")
    parser.add_argument("--videos", type=int, default=None, help="first N videos only")
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
    best_iou: dict[int, list[float]] = {cid: [] for cid in names}
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
            for (_, cid), iou in zip(gts, ious):
                best_iou[cid].append(float(iou))

    print(f"{args.ckpt}: {args.split}, {count} videos, score >= {args.score}, mask {threshold}")
    print(f"{'category':10s} {'pairs':>6s} {'missed':>7s} {'IoU found':>9s}")
    rows = [(names[cid], np.asarray(v)) for cid, v in best_iou.items() if v]
    rows.append(("all", np.concatenate([v for _, v in rows])))
    for name, ious in rows:
        found = ious[ious >= 0.3]
        mean = f"{found.mean():.3f}" if len(found) else "-"
        print(f"{name:10s} {len(ious):6d} {(ious < 0.3).mean():7.3f} {mean:>9s}")


if __name__ == "__main__":
    main()
