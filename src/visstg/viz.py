"""Overlays: each track drawn in its own colour with its class name and id."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

__all__ = ["track_colour", "draw_tracks", "decode_rle"]


def track_colour(track_id: int) -> tuple[int, int, int]:
    """A stable, well-separated colour per track id (golden-ratio hue steps)."""
    hue = (track_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def decode_rle(rle: dict) -> np.ndarray:
    counts = rle["counts"]
    return mask_utils.decode(
        {"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    ).astype(bool)


def draw_tracks(
    frame: np.ndarray,
    detections: list[tuple[int, str, float, dict]],
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw masks, outlines and ``class #id score`` labels on an RGB uint8 frame [H, W, 3].

    Args:
        detections: (track id, class name, score, RLE mask at the frame's size) per track.
    """
    out = frame.astype(np.float32)
    labels = []
    for track_id, name, score, rle in detections:
        mask = decode_rle(rle)
        if not mask.any():
            continue
        colour = np.array(track_colour(track_id), np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        # 1-pixel outline: mask pixels with a background 4-neighbour
        edge = mask & ~(
            np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
        )
        out[edge] = colour
        ys, xs = np.nonzero(mask)
        labels.append((int(xs.min()), int(ys.min()), f"{name} #{track_id} {score:.2f}", colour))
    image = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for x, y, text, colour in labels:
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        y = max(0, y - (bottom - top) - 2)
        draw.rectangle(
            (x, y, x + right - left + 2, y + bottom - top + 2), fill=tuple(colour.astype(int))
        )
        draw.text((x + 1, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(image)
