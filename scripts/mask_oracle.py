"""How well can a mask at a given stride represent the ground truth? (an upper bound, no model)

Every ground-truth mask of a YouTube-VIS-format split is resized so the frame's shorter side is
``--input-size`` (as the data pipeline does), averaged over ``stride x stride`` cells (what a
perfect prediction on that grid could hold), resized back bilinearly to the original frame,
thresholded at 0.5 and compared with the original mask:

    python scripts/mask_oracle.py --root data/synthetic --split valid --input-size 128 \\
        --strides 4 8

prints, per stride, the mean IoU and the fraction of masks at IoU >= 0.75 and >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils


def oracle_iou(mask: np.ndarray, input_size: int, stride: int) -> float:
    """IoU of ``mask`` [H, W] (bool) with itself seen through a ``stride`` grid of the input."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]  # [1, 1, H, W]
    h, w = mask.shape
    scale = input_size / min(h, w)
    size = (round(h * scale), round(w * scale))
    x = F.interpolate(m, size=size, mode="bilinear", align_corners=False) if size != (h, w) else m
    cells = F.avg_pool2d(x, stride, stride, ceil_mode=True) if stride > 1 else x
    up = F.interpolate(cells, scale_factor=stride, mode="bilinear", align_corners=False)
    up = up[..., : size[0], : size[1]]
    back = (
        F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
        if size != (h, w)
        else up
    )
    pred, gt = back[0, 0] > 0.5, m[0, 0] > 0.5
    union = int((pred | gt).sum())
    return int((pred & gt).sum()) / union if union else 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("data/synthetic"))
    ap.add_argument("--split", default="valid")
    ap.add_argument("--input-size", type=int, default=128, help="shorter side of the input")
    ap.add_argument("--strides", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--max-masks", type=int, default=None, help="the first N masks only")
    args = ap.parse_args(argv)
    path = args.root / f"{args.split}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"{path}: cannot read the annotations ({exc})", file=sys.stderr)
        return 2
    sizes = {v["id"]: (v["height"], v["width"]) for v in data.get("videos", [])}
    masks = []
    for ann in data.get("annotations", []):
        for seg in ann.get("segmentations") or []:
            if not seg:
                continue
            if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
                seg = mask_utils.frPyObjects(seg, *seg["size"])
            elif isinstance(seg, list):  # polygons
                h, w = sizes[ann["video_id"]]
                seg = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            masks.append(mask_utils.decode(seg).astype(bool))
            if args.max_masks is not None and len(masks) >= args.max_masks:
                break
        if args.max_masks is not None and len(masks) >= args.max_masks:
            break
    if not masks:
        print(f"{path}: no mask in the annotations", file=sys.stderr)
        return 2
    print(f"{path}: {len(masks)} masks, input shorter side {args.input_size}")
    for stride in args.strides:
        ious = np.array([oracle_iou(m, args.input_size, stride) for m in masks])
        print(
            f"stride {stride}: mean IoU {ious.mean():.3f}, "
            f"IoU >= 0.75 {np.mean(ious >= 0.75):.2f}, >= 0.9 {np.mean(ious >= 0.9):.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
