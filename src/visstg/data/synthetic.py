"""The built-in synthetic video instance segmentation dataset (YouTube-VIS 2019 format).

Each video shows 1 to ``max_objects`` filled, textured shapes (disc, square, triangle, ring, cross)
moving over a textured, slowly panning background. Several instances of one category in a video
are common, so tracking cannot rely on the class alone. Objects move linearly with noise and
change scale mildly; some enter late from an edge, some leave the frame (and may come back), and
some are put on a collision course with an earlier object. Later objects are drawn on top, and the
stored mask of an object is its *visible* part only (``null`` in frames where nothing is visible).

Generation is deterministic: video ``i`` of a split comes from its own random stream,
``SeedSequence(seed, spawn_key=(split, i))``, so train and valid never share a video and a video
does not depend on how many others are generated.

    python -m visstg.data.synthetic --out data/synthetic [--train-videos 64 --val-videos 16 ...]

writes ``train.json``, ``valid.json``, ``train/JPEGImages/<video>/<frame:05d>.jpg`` and
``valid/JPEGImages/...`` (the official layout) plus ``synthetic_config.json``, the arguments used.
This module does not import torch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "disc", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "ring", "supercategory": "shape"},
    {"id": 5, "name": "cross", "supercategory": "shape"},
]
SPLITS = {"train": 0, "valid": 1}  # the spawn key of each split's random streams
CONFIG_FILE = "synthetic_config.json"
FORMAT_VERSION = 1  # bump when the same arguments would produce different data


@dataclass(frozen=True)
class SyntheticOptions:
    """What a video looks like (everything but the number of videos and the seed).

    Sizes are in pixels; ``min_size``/``max_size`` of ``None`` scale with the frame
    (20 to 90 px at the default 192x320). ``speed`` scales all motion (object velocities,
    camera pan). ``occlusion_prob`` is the chance that an object (after the first) is put on a
    collision course with an earlier one, and ``occlusion_frames`` the most frames it then stays
    on top of it (longer occlusions). ``late_entry_prob`` is the chance that an object enters from
    an edge after the first frame, ``return_prob`` the chance that it leaves the frame and comes
    back after 1 to 4 frames.
    """

    height: int = 192
    width: int = 320
    min_frames: int = 10
    max_frames: int = 20
    max_objects: int = 5
    same_class_prob: float = 0.5
    speed: float = 1.0
    occlusion_prob: float = 0.5
    occlusion_frames: int = 3
    late_entry_prob: float = 0.25
    return_prob: float = 0.1
    min_size: float | None = None
    max_size: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if min(self.height, self.width) < 16:
            problems.append(f"height and width must be >= 16 (got {self.height}x{self.width})")
        if not 1 <= self.min_frames <= self.max_frames:
            problems.append(
                f"need 1 <= min_frames <= max_frames (got {self.min_frames}, {self.max_frames})"
            )
        if self.max_objects < 1:
            problems.append(f"max_objects must be >= 1 (got {self.max_objects})")
        for name in ("same_class_prob", "occlusion_prob", "late_entry_prob", "return_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1] (got {getattr(self, name)})")
        if self.late_entry_prob + self.return_prob > 1.0:
            problems.append("late_entry_prob + return_prob must be <= 1")
        if self.speed < 0:
            problems.append(f"speed must be >= 0 (got {self.speed})")
        if self.occlusion_frames < 0:
            problems.append(f"occlusion_frames must be >= 0 (got {self.occlusion_frames})")
        lo, hi = self.size_range
        if not 3 <= lo <= hi:
            problems.append(f"need 3 <= min_size <= max_size (got {lo}, {hi})")
        if problems:
            raise ValueError("invalid synthetic dataset options: " + "; ".join(problems))

    @property
    def size_range(self) -> tuple[float, float]:
        """(smallest, largest) initial object size in pixels."""
        short = min(self.height, self.width)
        lo = self.min_size if self.min_size is not None else 20 / 192 * short
        hi = self.max_size if self.max_size is not None else 90 / 192 * short
        return float(lo), float(hi)


@dataclass
class SyntheticVideo:
    """One rendered video.

    name: folder name, ``"<index+1:05d>_<6 hex>"``.
    frames: uint8 [T, H, W, 3] RGB.
    category_ids: the K objects' category ids (1..5), in draw order (later on top).
    full_masks: bool [K, T, H, W] the whole shape of each object (inside the frame).
    masks: bool [K, T, H, W] the visible part (what the annotation stores).
    """

    name: str
    frames: np.ndarray
    category_ids: list[int]
    full_masks: np.ndarray
    masks: np.ndarray


@dataclass
class _Object:
    category: int
    centres: np.ndarray  # [T, 2] (x, y) in pixels
    sizes: np.ndarray  # [T] outer extent in pixels
    texture: np.ndarray  # [P, P, 3] float32, in object coordinates (centre at P // 2)
    inner: float  # ring: inner / outer radius


# --- drawing --------------------------------------------------------------------------------


def draw_shape(
    category_id: int, cx: float, cy: float, size: float, height: int, width: int, inner: float = 0.5
) -> np.ndarray:
    """Boolean [height, width] mask of a shape centred at (cx, cy) with outer extent ``size``.

    disc: diameter ``size``; square: axis-aligned, side 0.9 * size; triangle: apex up, base
    ``size``; ring: annulus, inner radius ``inner`` times the outer; cross: a plus sign with arms
    ``size`` long and 0.34 * size thick. Parts outside the frame are cut off.
    """
    mask = np.zeros((height, width), dtype=bool)
    x0, y0 = max(0, math.floor(cx - size / 2) - 2), max(0, math.floor(cy - size / 2) - 2)
    x1 = min(width, math.ceil(cx + size / 2) + 3)
    y1 = min(height, math.ceil(cy + size / 2) + 3)
    if x1 > x0 and y1 > y0:
        mask[y0:y1, x0:x1] = _shape_crop(
            category_id, cx - x0, cy - y0, size, x1 - x0, y1 - y0, inner
        )
    return mask


def _shape_crop(
    category: int, cx: float, cy: float, s: float, w: int, h: int, inner: float
) -> np.ndarray:
    """The shape rasterised by PIL into a w x h crop; (cx, cy) relative to the crop."""
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    r = s / 2
    if category == 1:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif category == 2:
        a = 0.45 * s
        draw.rectangle([cx - a, cy - a, cx + a, cy + a], fill=255)
    elif category == 3:
        draw.polygon(
            [(cx, cy - 0.45 * s), (cx - r, cy + 0.42 * s), (cx + r, cy + 0.42 * s)], fill=255
        )
    elif category == 4:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = inner * r
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif category == 5:
        t = 0.17 * s
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
    else:
        raise ValueError(f"unknown synthetic category id {category} (expected 1..5)")
    return np.asarray(im) > 0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Low-frequency noise [h, w] float32 with about unit std: a coarse grid upsampled bicubically."""
    grid = rng.standard_normal((max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)))
    z = np.asarray(Image.fromarray(grid.astype(np.float32)).resize((w, h), Image.BICUBIC))
    return (z - z.mean()) / (z.std() + 1e-6)


def _wave(h: int, w: int, angle: float, period: float, phase: float) -> np.ndarray:
    """A sinusoid [h, w] in [-1, 1] along ``angle``."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    return np.sin(2 * np.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured background [h, w, 3] float32: colour noise, a gradient, maybe stripes and grain."""
    unit = min(h, w) / 64
    bg = np.empty((h, w, 3), np.float32)
    bg[:] = rng.uniform(40, 215, 3)
    cell = rng.uniform(8, 24) * unit
    for c in range(3):
        bg[..., c] += rng.uniform(12, 40) * _smooth_noise(rng, h, w, cell)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    ramp = (xx * math.cos(angle) + yy * math.sin(angle)) / max(h, w)  # [h, w] spans about 1
    bg += ramp[..., None] * rng.uniform(-60, 60, 3).astype(np.float32)
    if rng.random() < 0.5:
        stripes = _wave(h, w, rng.uniform(0, np.pi), rng.uniform(2, 8) * unit, rng.uniform(0, 6))
        bg += stripes[..., None] * rng.uniform(-20, 20, 3).astype(np.float32)
    if rng.random() < 0.5:
        bg += (rng.uniform(4, 12) * _smooth_noise(rng, h, w, rng.uniform(1.5, 4)))[..., None]
    return bg


def _object_texture(rng: np.random.Generator, size: int, avoid: np.ndarray) -> np.ndarray:
    """A texture [size, size, 3] float32: solid, stripes, checker, gradient or blotches.

    The main colour is drawn away from ``avoid`` (the background's mean colour) so that every
    annotated pixel is actually distinguishable.
    """
    for _ in range(20):
        c1 = rng.uniform(0, 255, 3)
        if np.linalg.norm(c1 - avoid) > 90:
            break
    c2 = np.clip(c1 + rng.choice([-1, 1], 3) * rng.uniform(40, 120, 3), 0, 255)
    kind = int(rng.integers(5))
    if kind == 0:  # solid
        weight = np.zeros((size, size), np.float32)
    elif kind == 1:  # stripes
        wave = _wave(size, size, rng.uniform(0, np.pi), rng.uniform(3, 10), rng.uniform(0, 6))
        weight = (wave > 0).astype(np.float32)
    elif kind == 2:  # checker
        p = rng.uniform(3, 9)
        yy, xx = np.mgrid[:size, :size]
        weight = ((np.floor(xx / p) + np.floor(yy / p)) % 2).astype(np.float32)
    elif kind == 3:  # linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[:size, :size].astype(np.float32) - size / 2
        ramp = (xx * math.cos(angle) + yy * math.sin(angle)) / size + 0.5
        weight = np.clip(ramp, 0, 1)
    else:  # blotches
        weight = (_smooth_noise(rng, size, size, rng.uniform(3, 8)) > 0).astype(np.float32)
    tex = c1 * (1 - weight[..., None]) + c2 * weight[..., None]  # [P, P, 3]
    tex += 6 * _smooth_noise(rng, size, size, 3)[..., None]
    return tex.astype(np.float32)


# --- motion ---------------------------------------------------------------------------------

_NORMALS = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # left right top bottom


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _edge_point(edge: int, along: float, offset: float, h: int, w: int) -> np.ndarray:
    """A point ``offset`` pixels outside edge ``edge`` (negative: inside), ``along`` in [0, 1]."""
    x = along * w if edge >= 2 else (-offset if edge == 0 else w + offset)
    y = along * h if edge < 2 else (-offset if edge == 2 else h + offset)
    return np.array([x, y])


def _free_path(
    rng: np.random.Generator, sizes: np.ndarray, opts: SyntheticOptions, step: float
) -> np.ndarray:
    """Centres [T, 2] of an object moving on its own: linear motion with noise.

    ``step`` is the typical speed in pixels per frame. The object starts inside the frame, enters
    late from an edge (``late_entry_prob``), or heads out of the frame and comes back
    (``return_prob``).
    """
    h, w, n = opts.height, opts.width, len(sizes)
    s0 = sizes[0]
    u = rng.random()
    return_after = None
    if step > 0 and n >= 4 and u < opts.late_entry_prob:
        edge, t0 = int(rng.integers(4)), int(rng.integers(1, n // 2 + 1))
        entry = _edge_point(edge, rng.uniform(0.15, 0.85), s0 / 2 + 1, h, w)
        v = _rotate(-_NORMALS[edge], rng.uniform(-0.8, 0.8)) * step * rng.uniform(0.6, 1.6)
        p = entry - v * t0  # outside the frame until about t0
    elif step > 0 and n >= 4 and u < opts.late_entry_prob + opts.return_prob:
        edge = int(rng.integers(4))
        p = _edge_point(edge, rng.uniform(0.2, 0.8), -rng.uniform(0.5, 1.2) * s0, h, w)
        v = _rotate(_NORMALS[edge], rng.uniform(-0.6, 0.6)) * step * rng.uniform(1.0, 1.8)
        return_after = int(rng.integers(1, 5))  # frames fully outside before turning back
    else:
        p = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])
        v = _rotate(np.array([1.0, 0.0]), rng.uniform(0, 2 * np.pi)) * step * rng.uniform(0.3, 1.6)
    centres = np.empty((n, 2))
    frames_out = 0
    for t in range(n):
        centres[t] = p
        if return_after is not None:
            r = sizes[t] / 2
            if p[0] + r < 0 or p[0] - r > w or p[1] + r < 0 or p[1] - r > h:
                frames_out += 1
            if frames_out >= return_after:
                v = np.where(p < 0, np.abs(v), np.where(p > (w, h), -np.abs(v), v))
                return_after = None
        p = p + v + rng.normal(0, 0.25, 2)
        v = v + rng.normal(0, 0.06 * step, 2)
    return centres


def _occluder_path(
    rng: np.random.Generator, target: _Object, opts: SyntheticOptions, step: float
) -> np.ndarray | None:
    """Centres [T, 2] of an object that passes over ``target`` around a random frame.

    It follows the target's path plus a constant relative velocity, and stays on top of it
    (relative velocity zero) for 0 to ``occlusion_frames`` frames. None when the target's centre
    is never inside the frame.
    """
    c = target.centres
    inside = np.flatnonzero(
        (c[:, 0] >= 0) & (c[:, 0] < opts.width) & (c[:, 1] >= 0) & (c[:, 1] < opts.height)
    )
    if len(inside) == 0:
        return None
    tm = int(rng.choice(inside))
    glue = int(rng.integers(0, opts.occlusion_frames + 1))
    offset = rng.normal(0, 0.2 * target.sizes[tm], 2)
    rel = _rotate(np.array([1.0, 0.0]), rng.uniform(0, 2 * np.pi)) * step * rng.uniform(0.6, 1.6)
    t = np.arange(len(c))
    lag = np.where(t < tm, t - tm, np.maximum(t - tm - glue, 0)).astype(float)  # [T]
    jitter = np.cumsum(rng.normal(0, 0.25, (len(c), 2)), axis=0)  # [T, 2]
    return c + offset + lag[:, None] * rel + (jitter - jitter[tm])


# --- videos ---------------------------------------------------------------------------------


def _video_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {sorted(SPLITS)})")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS[split], index)))


def render_video(index: int, split: str = "train", seed: int = 0, **options: Any) -> SyntheticVideo:
    """Render video ``index`` (0-based) of ``split``, exactly as :func:`generate` writes it.

    ``options`` are the fields of :class:`SyntheticOptions` (height, width, speed, ...).
    """
    opts = SyntheticOptions(**options)
    rng = _video_rng(seed, split, index)
    name = f"{index + 1:05d}_{int(rng.integers(16**6)):06x}"
    while True:  # redraw in the (rare) case that no object is ever visible
        video = _render(rng, opts, name)
        if video is not None:
            return video


def _render(rng: np.random.Generator, opts: SyntheticOptions, name: str) -> SyntheticVideo | None:
    h, w = opts.height, opts.width
    n = int(rng.integers(opts.min_frames, opts.max_frames + 1))
    k = int(rng.integers(1, opts.max_objects + 1))
    step = opts.speed * min(h, w) / 64  # typical object speed, px per frame

    # A background larger than the frame, cropped along a slow linear camera pan.
    pan = rng.uniform(-0.4, 0.4, 2) * step  # (x, y) px per frame
    pad = np.ceil(np.abs(pan) * (n - 1)).astype(int) + 1  # [2]
    bg = _background(rng, h + pad[1], w + pad[0])
    start = np.where(pan >= 0, 0, pad - 1)
    bg_mean = bg.mean(axis=(0, 1))

    lo, hi = opts.size_range
    objects: list[_Object] = []
    for _ in range(k):
        cats = [o.category for o in objects]
        if cats and rng.random() < opts.same_class_prob:
            category = cats[int(rng.integers(len(cats)))]
        else:
            category = int(rng.integers(1, 6))
        s0 = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        sizes = s0 * np.exp(rng.uniform(-0.012, 0.012) * np.arange(n))  # [T] mild scale change
        centres = None
        if objects and rng.random() < opts.occlusion_prob:
            target = objects[int(rng.integers(len(objects)))]
            centres = _occluder_path(rng, target, opts, step)
        if centres is None:
            centres = _free_path(rng, sizes, opts, step)
        texture = _object_texture(rng, math.ceil(sizes.max()) + 10, bg_mean)
        objects.append(_Object(category, centres, sizes, texture, rng.uniform(0.45, 0.55)))

    frames = np.empty((n, h, w, 3), np.uint8)
    full = np.zeros((k, n, h, w), dtype=bool)
    for t in range(n):
        ox, oy = np.rint(start + pan * t).astype(int)
        img = bg[oy : oy + h, ox : ox + w].copy()  # [H, W, 3]
        for i, obj in enumerate(objects):  # draw order: later objects on top
            _paint(img, full[i, t], obj, t)
        img *= 1 + rng.normal(0, 0.03)  # flicker
        # Sensor noise, std ~3; uniform because it is 5x faster to draw than Gaussian.
        img += 10 * (rng.random(img.shape, np.float32) - 0.5)
        frames[t] = np.clip(np.rint(img), 0, 255)

    visible = np.empty_like(full)
    covered = np.zeros((n, h, w), dtype=bool)
    for i in reversed(range(k)):
        visible[i] = full[i] & ~covered
        covered |= full[i]
    keep = visible.any(axis=(1, 2, 3))
    if not keep.any():
        return None
    # An object never visible is outside the frame or under later kept objects throughout, so
    # dropping it leaves every other visible mask and the frames unchanged.
    return SyntheticVideo(
        name=name,
        frames=frames,
        category_ids=[o.category for o, kept in zip(objects, keep) if kept],
        full_masks=full[keep],
        masks=visible[keep],
    )


def _paint(img: np.ndarray, full: np.ndarray, obj: _Object, t: int) -> None:
    """Draw ``obj`` at frame ``t`` into ``img`` [H, W, 3] and its whole shape into ``full`` [H, W]."""
    h, w = full.shape
    (cx, cy), s = obj.centres[t], obj.sizes[t]
    x0, y0 = max(0, math.floor(cx - s / 2) - 2), max(0, math.floor(cy - s / 2) - 2)
    x1, y1 = min(w, math.ceil(cx + s / 2) + 3), min(h, math.ceil(cy + s / 2) + 3)
    if x1 <= x0 or y1 <= y0:
        return
    crop = _shape_crop(obj.category, cx - x0, cy - y0, s, x1 - x0, y1 - y0, obj.inner)  # [h', w']
    # The texture moves with the object: pixel (x, y) reads texture cell (x - cx, y - cy) + P // 2.
    half = obj.texture.shape[0] // 2
    tx, ty = x0 - round(cx) + half, y0 - round(cy) + half
    tex = obj.texture[ty : ty + (y1 - y0), tx : tx + (x1 - x0)]  # [h', w', 3]
    img[y0:y1, x0:x1][crop] = tex[crop]
    full[y0:y1, x0:x1] = crop


def _annotations(video: SyntheticVideo, video_id: int, first_id: int) -> list[dict[str, Any]]:
    """YouTube-VIS 2019 annotations (ids from ``first_id``) of one video's visible masks."""
    h, w = video.masks.shape[2:]
    out = []
    for i, category in enumerate(video.category_ids):
        rles = mask_utils.encode(np.asfortranarray(video.masks[i].transpose(1, 2, 0), np.uint8))
        areas, boxes = mask_utils.area(rles), mask_utils.toBbox(rles)
        segs, bboxes, area_list = [], [], []
        for rle, area, box in zip(rles, areas, boxes):
            if area == 0:
                segs.append(None), bboxes.append(None), area_list.append(None)
            else:
                segs.append({"size": [h, w], "counts": rle["counts"].decode("ascii")})
                bboxes.append([float(v) for v in box])
                area_list.append(int(area))
        out.append(
            {
                "id": first_id + i,
                "video_id": video_id,
                "category_id": category,
                "iscrowd": 0,
                "width": w,
                "height": h,
                "length": 1,
                "segmentations": segs,
                "bboxes": bboxes,
                "areas": area_list,
            }
        )
    return out


def _write_split(
    out: Path,
    split: str,
    count: int,
    seed: int,
    opts: SyntheticOptions,
    jpeg_quality: int,
    args: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Render and write the frames of one split; returns its annotation dict."""
    image_root = out / split / "JPEGImages"
    videos, annotations = [], []
    indices: Any = range(count)
    if progress:
        from rich.progress import track

        indices = track(indices, description=f"{split:5s}", total=count)
    for index in indices:
        video = render_video(index, split, seed, **asdict(opts))
        folder = image_root / video.name
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for t, frame in enumerate(video.frames):
            Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=jpeg_quality)
            names.append(f"{video.name}/{t:05d}.jpg")
        videos.append(
            {
                "id": index + 1,
                "width": opts.width,
                "height": opts.height,
                "length": len(names),
                "file_names": names,
                "license": 1,
                "coco_url": "",
                "flickr_url": "",
                "date_captured": "",
            }
        )
        annotations += _annotations(video, index + 1, len(annotations) + 1)
    info = {
        "description": f"visstg synthetic shapes, {split} split (YouTube-VIS 2019 format)",
        "url": "",
        "version": str(FORMAT_VERSION),
        "contributor": "visstg.data.synthetic",
        "date_created": "",
        "generator_args": args,
    }
    return {
        "info": info,
        "licenses": [{"id": 1, "name": "generated data, no restrictions", "url": ""}],
        "videos": videos,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


# --- files ----------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def _prepare_output(out: Path) -> None:
    """Refuse to write into a dataset this module did not make; clear frames of one it did."""
    if (out / CONFIG_FILE).is_file():
        for split in SPLITS:  # stale videos of an earlier, larger run would otherwise remain
            shutil.rmtree(out / split / "JPEGImages", ignore_errors=True)
        return
    foreign = [
        p.name
        for p in (out / "train.json", out / "valid.json", out / "train", out / "valid")
        if p.exists()
    ]
    if foreign:
        raise FileExistsError(
            f"{out}: already holds {', '.join(foreign)} but no {CONFIG_FILE}, so it was not "
            "written by visstg.data.synthetic; refusing to overwrite it (choose another --out)"
        )


def generate(
    out_dir: str | os.PathLike,
    train_videos: int = 64,
    val_videos: int = 16,
    seed: int = 0,
    height: int = 192,
    width: int = 320,
    *,
    min_frames: int = 10,
    max_frames: int = 20,
    max_objects: int = 5,
    same_class_prob: float = 0.5,
    speed: float = 1.0,
    occlusion_prob: float = 0.5,
    occlusion_frames: int = 3,
    late_entry_prob: float = 0.25,
    return_prob: float = 0.1,
    min_size: float | None = None,
    max_size: float | None = None,
    jpeg_quality: int = 90,
    progress: bool = False,
) -> Path:
    """Write the synthetic dataset to ``out_dir`` and return it as a Path.

    Layout: ``train.json``, ``valid.json``, ``<split>/JPEGImages/<video>/<frame:05d>.jpg`` and
    ``synthetic_config.json`` (these arguments). ``train.json`` is written last, so its presence
    means a complete dataset. Regenerating into a directory this function wrote replaces it;
    any other non-empty dataset directory raises FileExistsError. See :class:`SyntheticOptions`
    for the generator options.
    """
    opts = SyntheticOptions(
        height=height,
        width=width,
        min_frames=min_frames,
        max_frames=max_frames,
        max_objects=max_objects,
        same_class_prob=same_class_prob,
        speed=speed,
        occlusion_prob=occlusion_prob,
        occlusion_frames=occlusion_frames,
        late_entry_prob=late_entry_prob,
        return_prob=return_prob,
        min_size=min_size,
        max_size=max_size,
    )
    if train_videos < 0 or val_videos < 0 or train_videos + val_videos == 0:
        raise ValueError(
            f"need >= 0 videos per split and some in all ({train_videos=}, {val_videos=})"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (got {seed})")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100 (got {jpeg_quality})")
    args = dict(
        train_videos=train_videos,
        val_videos=val_videos,
        seed=seed,
        jpeg_quality=jpeg_quality,
        **asdict(opts),
    )
    args = _normalise(args)

    out = Path(out_dir)
    _prepare_output(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").unlink(missing_ok=True)
    config = {"generator": "visstg.data.synthetic", "format_version": FORMAT_VERSION, "args": args}
    _write_json(out / CONFIG_FILE, config)
    train = _write_split(out, "train", train_videos, seed, opts, jpeg_quality, args, progress)
    valid = _write_split(out, "valid", val_videos, seed, opts, jpeg_quality, args, progress)
    _write_json(out / "valid.json", valid)
    _write_json(out / "train.json", train)
    return out


def _normalise(args: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip, so recorded and requested arguments compare equal."""
    return json.loads(json.dumps(args, sort_keys=True))


def _recorded_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments :func:`generate` records for ``kwargs``, defaults filled in."""
    params = inspect.signature(generate).parameters
    names = [p for p in params if p not in ("out_dir", "progress")]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TypeError(f"unknown synthetic dataset argument(s) {unknown}; valid: {names}")
    args = {p: kwargs.get(p, params[p].default) for p in names}
    SyntheticOptions(
        **{k: v for k, v in args.items() if k in SyntheticOptions.__dataclass_fields__}
    )
    return _normalise(args)


def ensure_synthetic(root: str | os.PathLike, progress: bool = False, **kwargs: Any) -> Path:
    """Generate the synthetic dataset into ``root`` unless ``root/train.json`` exists.

    ``kwargs`` are :func:`generate`'s arguments. Raises ValueError when ``root`` holds a synthetic
    dataset (complete or partial) generated with different arguments, instead of overwriting it.
    """
    root = Path(root)
    args = _recorded_args(kwargs)
    config_path = root / CONFIG_FILE
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
            recorded = config["args"]
            version = config["format_version"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{config_path}: unreadable synthetic dataset config ({err})") from err
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: generated by synthetic format version {version}, this is "
                f"{FORMAT_VERSION}; delete {root} to regenerate it"
            )
        if recorded != args:
            diff = ", ".join(
                f"{k}: {recorded.get(k)!r} on disk vs {args.get(k)!r} requested"
                for k in sorted(set(recorded) | set(args))
                if recorded.get(k) != args.get(k)
            )
            raise ValueError(
                f"{root}: holds a synthetic dataset generated with different arguments ({diff}); "
                "delete it or choose another root"
            )
    if (root / "train.json").is_file():
        if not config_path.is_file():
            warnings.warn(
                f"{root}: has train.json but no {CONFIG_FILE}; using it as is, although it "
                "may not be the synthetic dataset requested",
                stacklevel=2,
            )
        return root
    return generate(root, progress=progress, **args)


# --- command line ---------------------------------------------------------------------------


def _summary(split: str, data: dict[str, Any]) -> str:
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_cat = Counter(names[a["category_id"]] for a in data["annotations"])
    frames = sum(v["length"] for v in data["videos"])
    cats = ", ".join(f"{names[c]} {per_cat[names[c]]}" for c in sorted(names))
    return (
        f"{split:5s}: {len(data['videos'])} videos, {frames} frames, "
        f"{len(data['annotations'])} tracks ({cats})"
    )


_HELP = {
    "train_videos": "videos in train.json",
    "val_videos": "videos in valid.json",
    "seed": "random seed (same seed: byte-identical annotation files)",
    "height": "frame height",
    "width": "frame width",
    "min_frames": "fewest frames per video",
    "max_frames": "most frames per video",
    "max_objects": "most objects per video (at least 1)",
    "same_class_prob": "chance that a further object repeats a category of its video",
    "speed": "motion scale (objects and camera pan); 0 freezes them",
    "occlusion_prob": "chance that an object is sent over an earlier one",
    "occlusion_frames": "most frames an occluder stays on top of its target",
    "late_entry_prob": "chance that an object enters from an edge after the first frame",
    "return_prob": "chance that an object leaves the frame and comes back",
    "min_size": "smallest object size in px (default: 20/192 of the shorter side)",
    "max_size": "largest object size in px (default: 90/192 of the shorter side)",
    "jpeg_quality": "JPEG quality of the frames",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visstg.data.synthetic",
        description="Write the synthetic shapes dataset in the YouTube-VIS 2019 layout.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    # One flag per argument of generate(), so the two never drift apart.
    for name, param in inspect.signature(generate).parameters.items():
        if name in ("out_dir", "progress"):
            continue
        kind = float if param.default is None else type(param.default)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=param.default,
            help=f"{_HELP[name]} (default: {param.default})",
        )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    ns = parser.parse_args(argv)
    kwargs = {k: v for k, v in vars(ns).items() if k not in ("out", "quiet")}
    start = time.perf_counter()
    try:
        out = generate(ns.out, progress=not ns.quiet, **kwargs)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not ns.quiet:
        print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
        for split in SPLITS:
            print(_summary(split, json.loads((out / f"{split}.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
