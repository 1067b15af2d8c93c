"""Shared fixtures: small YouTube-VIS-format datasets written by hand (not by our generator)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

# One intra-op thread: on the shared 2-core CI machine two torch threads contending with another
# process run many times slower than one. Set before torch is imported by any test module, and
# exported so the command-line tests' subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

H, W = 48, 64
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}


def rle(mask: np.ndarray) -> dict:
    """Compressed RLE with str counts, as the YouTube-VIS files store it."""
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major uncompressed RLE ({"size", "counts": [ints]}), starting with zeros."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def box_mask(x0: int, y0: int, x1: int, y1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 1
    return m


def polygon(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_video_frames(root: Path, split: str, name: str, frames: list[np.ndarray]) -> list[str]:
    folder = root / split / "JPEGImages" / name
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.png")  # lossless, so colours test exactly
        names.append(f"{name}/{i:05d}.png")
    return names


def make_dataset(root: Path, split: str = "train") -> dict:
    """Two videos, three categories; tracks move right one step per frame.

    Video 1 (4 frames): track 1 (cat 1, compressed RLE), track 2 (cat 2, polygons, absent (null)
    in frame 2). Video 2 (3 frames): track 3 (cat 1, uncompressed RLE), no instance in frame 0.
    Each object is painted in its category colour over a grey background.
    """
    videos, anns = [], []
    # video id -> (length, [(track id, category, format, box at frame f, frames absent)])
    specs = {
        1: (
            4,
            [
                (1, 1, "rle", lambda f: (4 + 4 * f, 6, 20 + 4 * f, 22), ()),
                (2, 2, "poly", lambda f: (36, 26 + f, 56, 44 + f), (2,)),
            ],
        ),
        2: (3, [(3, 1, "urle", lambda f: (30 + 2 * f, 20, 44 + 2 * f, 40), (0,))]),
    }
    for vid, (length, tracks) in specs.items():
        frames = [np.full((H, W, 3), 128, np.uint8) for _ in range(length)]
        for tid, cat, fmt, box_at, absent in tracks:
            segs, boxes, areas = [], [], []
            for f in range(length):
                if f in absent:
                    segs.append(None)
                    boxes.append(None)
                    areas.append(None)
                    continue
                x0, y0, x1, y1 = box_at(f)
                m = box_mask(x0, y0, x1, y1)
                frames[f][m.astype(bool)] = COLOURS[cat]
                if fmt == "rle":
                    segs.append(rle(m))
                elif fmt == "urle":
                    segs.append(uncompressed_rle(m))
                else:
                    segs.append(polygon(x0, y0, x1, y1))
                boxes.append([x0, y0, x1 - x0, y1 - y0])
                areas.append(int(m.sum()))
            anns.append(
                {
                    "id": tid,
                    "video_id": vid,
                    "category_id": cat,
                    "iscrowd": 0,
                    "height": H,
                    "width": W,
                    "segmentations": segs,
                    "bboxes": boxes,
                    "areas": areas,
                }
            )
        names = write_video_frames(root, split, f"video{vid}", frames)
        videos.append({"id": vid, "width": W, "height": H, "length": length, "file_names": names})
    data = {
        "info": {},
        "licenses": [],
        "videos": videos,
        "annotations": anns,
        "categories": [
            {"id": 1, "name": "red", "supercategory": "object"},
            {"id": 2, "name": "green", "supercategory": "object"},
            {"id": 3, "name": "blue", "supercategory": "object"},
        ],
    }
    (root / f"{split}.json").write_text(json.dumps(data))
    return data


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A hand-written dataset with a train and a valid split."""
    make_dataset(tmp_path, "train")
    make_dataset(tmp_path, "valid")
    return tmp_path


@pytest.fixture(scope="session")
def load_script():
    """``load_script(name)``: a module of scripts/ (not a package), loaded from its file."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
