"""Reader for YouTube-VIS 2019 / 2021 / 2022 and OVIS annotation files.

All four datasets share one schema::

    {"videos": [{"id", "file_names": [...], "length", "width", "height", ...}],
     "annotations": [{"id", "video_id", "category_id", "iscrowd",
                      "segmentations": [RLE | polygons | null per frame],
                      "bboxes": [[x, y, w, h] | null per frame], "areas": [... | null]}],
     "categories": [{"id", "name", ...}]}

A validation or test file without ``annotations`` loads too (for inference). Problems are reported
as :class:`DatasetError` naming the file and the video or annotation id. Masks are decoded lazily
with pycocotools, one (track, frame) at a time. Categories are mapped to contiguous indices
(sorted by category id) internally; :meth:`YTVIS.category_id` maps them back for output.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["DatasetError", "YTVIS", "Track", "load_ytvis", "decode_segmentation"]


class DatasetError(ValueError):
    """A dataset file (annotation JSON or frame) is missing or malformed."""


@dataclass
class Track:
    """One annotated instance of a video (a YouTube-VIS "annotation")."""

    id: int
    video_id: int
    category_id: int
    label: int  # contiguous class index 0..C-1
    segmentations: list[Any]  # per frame: RLE dict, polygon list or None
    areas: list[float | None] | None
    iscrowd: int = 0
    occlusion: Any = None  # OVIS only

    def present(self, frame: int) -> bool:
        """Whether the track has a non-empty mask in ``frame``."""
        seg = self.segmentations[frame]
        if seg is None:
            return False
        if self.areas is not None and self.areas[frame] is not None:
            return self.areas[frame] > 0
        return True  # no area stored: decode to know; treat as present


@dataclass
class YTVIS:
    """An annotation file loaded and validated. See the module docstring for the schema."""

    path: Path
    image_root: Path
    videos: list[dict]  # sorted by id
    categories: list[dict]  # sorted by id
    tracks: dict[int, list[Track]] = field(default_factory=dict)  # video id -> tracks
    has_annotations: bool = True

    def __post_init__(self) -> None:
        self._label_of = {c["id"]: i for i, c in enumerate(self.categories)}
        self._video_by_id = {v["id"]: v for v in self.videos}

    # --- categories -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def label(self, category_id: int) -> int:
        """Contiguous index of an original category id."""
        return self._label_of[category_id]

    def category_id(self, label: int) -> int:
        """Original category id of a contiguous index."""
        return self.categories[label]["id"]

    # --- videos and frames ------------------------------------------------------------------
    def video(self, video_id: int) -> dict:
        return self._video_by_id[video_id]

    def frame_path(self, video: dict, frame: int) -> Path:
        return self.image_root / video["file_names"][frame]

    def load_frame(self, video: dict, frame: int) -> np.ndarray:
        """Decode one frame as an RGB uint8 array [H, W, 3]; a clear error if it cannot be read."""
        from PIL import Image, UnidentifiedImageError

        path = self.frame_path(video, frame)
        try:
            # One read of the whole file: PIL's own reads come in small chunks, which took
            # as long as the decoding itself for the synthetic frames (0.9 -> 0.5 ms a frame).
            with Image.open(io.BytesIO(path.read_bytes())) as im:
                return np.array(im.convert("RGB"))
        except FileNotFoundError:
            raise DatasetError(
                f"{self.path}: video {video['id']} frame {frame}: file {path} does not exist"
            ) from None
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetError(
                f"{self.path}: video {video['id']} frame {frame}: cannot decode {path}: {err}"
            ) from None

    def frame_masks(self, video: dict, frame: int) -> tuple[list[Track], np.ndarray]:
        """Tracks visible in ``frame`` and their masks ``[N, H, W]`` (uint8), decoded now."""
        h, w = video["height"], video["width"]
        present, masks = [], []
        for track in self.tracks.get(video["id"], []):
            if track.iscrowd or not track.present(frame):
                continue
            m = decode_segmentation(track.segmentations[frame], h, w)
            if m is None or not m.any():
                continue
            present.append(track)
            masks.append(m)
        stacked = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
        return present, stacked

    def annotated_frames(self, video: dict) -> list[int]:
        """Frames where at least one non-crowd track is visible (training targets)."""
        tracks = [t for t in self.tracks.get(video["id"], []) if not t.iscrowd]
        return [f for f in range(len(video["file_names"])) if any(t.present(f) for t in tracks)]

    def summary(self) -> dict[str, Any]:
        per_cat = Counter(t.category_id for ts in self.tracks.values() for t in ts)
        return {
            "videos": len(self.videos),
            "frames": sum(len(v["file_names"]) for v in self.videos),
            "tracks": sum(len(ts) for ts in self.tracks.values()),
            "per_category": {c["name"]: per_cat.get(c["id"], 0) for c in self.categories},
        }


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray | None:
    """Decode a compressed RLE, an uncompressed RLE or polygons to a uint8 mask [H, W].

    Returns None for a null segmentation.
    """
    if seg is None:
        return None
    if isinstance(seg, list):  # polygons
        if not seg:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, *seg["size"])
    else:
        counts = seg["counts"]
        rle = {
            "size": seg["size"],
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
    return mask_utils.decode(rle)


def _require(obj: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")


def _segmentation_size(seg: Any) -> tuple[int, int] | None:
    if isinstance(seg, dict) and "size" in seg:
        return int(seg["size"][0]), int(seg["size"][1])
    return None


def load_ytvis(
    path: str | Path,
    image_root: str | Path | None = None,
    require_annotations: bool = False,
    problems: list[str] | None = None,
) -> YTVIS:
    """Load and validate a YouTube-VIS / OVIS annotation file.

    Args:
        path: the JSON file (e.g. ``ROOT/train.json``).
        image_root: the folder ``file_names`` are relative to; by default
            ``<json dir>/<json stem>/JPEGImages`` (the official layout).
        require_annotations: raise if the file has no ``annotations`` (a training split).
        problems: when given, a problem with one video or annotation is appended here and that
            item skipped, so every problem of the file is reported at once
            (``python -m visstg.data.check``); problems with the file as a whole still raise.

    Raises:
        DatasetError: the file is missing, is not JSON, or breaks the schema (the message names
            the file and the video or annotation id).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file does not exist")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'videos' and 'categories'")
    _require(raw, ("videos", "categories"), str(path))
    if image_root is None:
        image_root = path.parent / path.stem / "JPEGImages"

    categories = _load_categories(raw["categories"], path)
    videos = _load_videos(raw["videos"], path, problems)
    has_annotations = "annotations" in raw and raw["annotations"] is not None
    if require_annotations and not has_annotations:
        raise DatasetError(f"{path}: has no 'annotations' (a training split needs ground truth)")

    ds = YTVIS(path, Path(image_root), videos, categories, {}, has_annotations)
    if has_annotations:
        ds.tracks = _load_tracks(raw["annotations"], ds, problems)
    return ds


def _collect(problems: list[str] | None, err: DatasetError) -> None:
    if problems is None:
        raise err
    problems.append(str(err))


def _load_categories(cats: list, path: Path) -> list[dict]:
    seen: set[int] = set()
    for c in cats:
        _require(c, ("id", "name"), f"{path}: category {c.get('id', c)}")
        if c["id"] in seen:
            raise DatasetError(f"{path}: duplicate category id {c['id']}")
        seen.add(c["id"])
    if not cats:
        raise DatasetError(f"{path}: 'categories' is empty")
    return sorted(cats, key=lambda c: c["id"])


def _load_videos(videos: list, path: Path, problems: list[str] | None) -> list[dict]:
    seen: set[int] = set()
    kept = []
    for v in videos:
        try:
            _check_video(v, path, seen)
        except DatasetError as err:
            _collect(problems, err)
            continue
        v.setdefault("length", len(v["file_names"]))
        kept.append(v)
    return sorted(kept, key=lambda v: v["id"])


def _check_video(v: dict, path: Path, seen: set[int]) -> None:
    where = f"{path}: video {v.get('id', '?')}"
    _require(v, ("id", "file_names", "width", "height"), where)
    if v["id"] in seen:
        raise DatasetError(f"{path}: duplicate video id {v['id']}")
    seen.add(v["id"])
    n = len(v["file_names"])
    if "length" in v and v["length"] != n:
        raise DatasetError(f"{where}: 'length' is {v['length']} but it lists {n} file_names")


def _load_tracks(anns: list, ds: YTVIS, problems: list[str] | None) -> dict[int, list[Track]]:
    tracks: dict[int, list[Track]] = {}
    seen: set[int] = set()
    for a in anns:
        try:
            track = _check_track(a, ds, seen)
        except DatasetError as err:
            _collect(problems, err)
            continue
        tracks.setdefault(a["video_id"], []).append(track)
    return tracks


def _check_track(a: dict, ds: YTVIS, seen: set[int]) -> Track:
    path = ds.path
    where = f"{path}: annotation {a.get('id', '?')}"
    _require(a, ("id", "video_id", "category_id", "segmentations"), where)
    if a["id"] in seen:
        raise DatasetError(f"{path}: duplicate annotation id {a['id']}")
    seen.add(a["id"])
    if a["video_id"] not in ds._video_by_id:
        raise DatasetError(f"{where}: video_id {a['video_id']} is not in 'videos'")
    if a["category_id"] not in ds._label_of:
        raise DatasetError(f"{where}: category_id {a['category_id']} is not in 'categories'")
    video = ds._video_by_id[a["video_id"]]
    segs = a["segmentations"]
    if len(segs) != video["length"]:
        raise DatasetError(
            f"{where}: 'segmentations' has {len(segs)} entries but video {video['id']} "
            f"has {video['length']} frames"
        )
    for key in ("bboxes", "areas"):
        if key in a and a[key] is not None and len(a[key]) != video["length"]:
            raise DatasetError(
                f"{where}: '{key}' has {len(a[key])} entries but video {video['id']} "
                f"has {video['length']} frames"
            )
    expected = (video["height"], video["width"])
    for frame, seg in enumerate(segs):
        size = _segmentation_size(seg)
        if size is not None and size != expected:
            raise DatasetError(
                f"{where}: frame {frame} mask size {size[0]}x{size[1]} differs from "
                f"video {video['id']} size {expected[0]}x{expected[1]}"
            )
    return Track(
        id=a["id"],
        video_id=a["video_id"],
        category_id=a["category_id"],
        label=ds._label_of[a["category_id"]],
        segmentations=segs,
        areas=a.get("areas"),
        iscrowd=int(a.get("iscrowd", 0)),
        occlusion=a.get("occlusion"),
    )
