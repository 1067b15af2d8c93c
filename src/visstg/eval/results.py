"""YouTube-VIS ground truth and results files: loading, validation, writing, submission zip.

The results format (one entry per predicted track, the official servers' format)::

    [{"video_id": 3, "category_id": 7, "score": 0.92,
      "segmentations": [{"size": [H, W], "counts": "<compressed RLE>"}, null, ...]}, ...]

``segmentations`` has one entry per frame of the video, ``null`` where the track is absent;
``category_id`` is the dataset's original (1-based) id. Everything here is numpy, pycocotools
and orjson (the JSON parser: a 264 MB results file in under a second) only: scoring a results
file never needs torch.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from pycocotools import mask as mask_utils

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


class EvalInputError(ValueError):
    """A ground-truth or results file that cannot be evaluated; the message names the file."""


# --------------------------------------------------------------------------- reading


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector (restored on exit, nesting is fine).

    Parsing a results file creates millions of dicts and lists; each time the collector runs it
    walks all of them again (with it on, parsing the 264 MB benchmark file takes 2.5 s instead
    of 0.8 s). JSON data holds no reference cycles, so nothing is lost by pausing it.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read_json(path: PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{what} file {path} does not exist")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 byte order mark (orjson rejects it)
        raw = raw[3:]
    try:
        with paused_gc():
            return orjson.loads(raw)
    except orjson.JSONDecodeError as e:  # also invalid UTF-8
        raise EvalInputError(
            f"{what} file {path} is not valid JSON: {e.msg} at line {e.lineno}, "
            f"column {e.colno} (byte {e.pos})"
        ) from None


def _to_compressed(seg: Any, h: int, w: int, where: str) -> dict | None:
    """Any ground-truth segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE."""
    if not seg:
        return None
    if isinstance(seg, list):  # polygons; one object may have several parts
        try:
            return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        except Exception as e:  # pycocotools raises bare Exceptions on bad polygons
            raise EvalInputError(f"{where}: invalid polygon segmentation ({e})") from None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if isinstance(seg["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(seg, *seg["size"])
        return seg
    raise EvalInputError(f"{where}: segmentation is neither RLE nor polygons: {str(seg)[:80]}")


def load_gt(gt: PathLike | Mapping) -> dict:
    """Load and check YouTube-VIS/OVIS ground truth (a JSON path or an already-loaded dict).

    Returns a new dict with ``videos``, ``categories`` and ``annotations``; each annotation's
    ``segmentations`` are compressed RLE or None, ``iscrowd`` defaults to 0, and a missing
    ``areas`` field is computed from the masks. The input dict is not modified.
    """
    name = "<ground-truth dict>" if isinstance(gt, Mapping) else str(gt)
    data = _read_json(gt, "ground-truth") if not isinstance(gt, Mapping) else gt
    if not isinstance(data, Mapping):
        raise EvalInputError(f"ground-truth file {name} must hold a JSON object")
    for key in ("videos", "categories"):
        if not isinstance(data.get(key), list):
            raise EvalInputError(f"ground-truth file {name} has no '{key}' list")
    videos = {}
    for v in data["videos"]:
        if not isinstance(v, Mapping) or "id" not in v:
            raise EvalInputError(f"ground-truth file {name}: a video entry has no 'id'")
        videos[v["id"]] = v
    anns = []
    for i, a in enumerate(data.get("annotations") or []):
        where = f"ground-truth file {name}, annotation {i}"
        for key in ("video_id", "category_id", "segmentations"):
            if key not in a:
                raise EvalInputError(f"{where} has no '{key}'")
        video = videos.get(a["video_id"], {})
        h, w = video.get("height"), video.get("width")
        segs = [_to_compressed(s, h, w, where) for s in a["segmentations"]]
        areas = a.get("areas")
        if areas is None:
            areas = [int(mask_utils.area(s)) if s else None for s in segs]
        ann = dict(a)
        ann.update(segmentations=segs, areas=areas, iscrowd=int(a.get("iscrowd", 0) or 0))
        ann.setdefault("id", i + 1)
        anns.append(ann)
    out = dict(data)
    out["annotations"] = anns
    return out


def _video_length(video: Mapping) -> int | None:
    if "length" in video:
        return int(video["length"])
    if "file_names" in video:
        return len(video["file_names"])
    return None


def load_results(results: PathLike | Sequence, gt: Mapping) -> list[dict]:
    """Load and check a results file (a JSON path or a list) against loaded ground truth.

    Errors name the file: results for a video id that is not in the ground truth, polygon
    segmentations, a mask whose size is not the video's. Uncompressed RLE is compressed and
    bytes counts become str. Entries of categories absent from the ground truth are kept here
    (the evaluator drops them, as the official code does). Returns new dicts.
    """
    is_path = isinstance(results, str | os.PathLike)
    name = str(results) if is_path else "<results list>"
    data = _read_json(results, "results") if is_path else results
    if not isinstance(data, list):
        raise EvalInputError(
            f"results file {name} must hold a JSON list of tracks, got {type(data).__name__}"
        )
    videos = {v["id"]: v for v in gt["videos"]}
    out = []
    for i, r in enumerate(data):
        where = f"results file {name}, entry {i}"
        if not isinstance(r, Mapping):
            raise EvalInputError(f"{where} is not an object")
        for key in ("video_id", "category_id", "score", "segmentations"):
            if key not in r:
                raise EvalInputError(f"{where} has no '{key}'")
        if r["video_id"] not in videos:
            raise EvalInputError(
                f"{where}: video_id {r['video_id']!r} is not a video of the ground truth"
            )
        score = r["score"]
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise EvalInputError(f"{where}: score must be a number, got {score!r}")
        if not isinstance(r["segmentations"], list):
            raise EvalInputError(f"{where}: 'segmentations' must be a list (one entry a frame)")
        video = videos[r["video_id"]]
        size = [video.get("height"), video.get("width")]
        if None in size:
            size = None
        segs = list(r["segmentations"])
        for f, s in enumerate(segs):
            # Fast path first: a compressed RLE dict with str counts of the right size.
            if type(s) is dict and type(s.get("counts")) is str and s.get("size") == size:
                continue
            segs[f] = _result_rle(s, size, f"{where}, frame {f}")
        entry = dict(r)
        entry["segmentations"] = segs
        out.append(entry)
    return out


def _result_rle(s: Any, size: list | None, where: str) -> dict | None:
    if not s:
        return None
    if isinstance(s, list):
        raise EvalInputError(
            f"{where}: polygons are not accepted in results; "
            "encode masks as compressed RLE (pycocotools.mask.encode)"
        )
    if not isinstance(s, Mapping) or "counts" not in s or "size" not in s:
        raise EvalInputError(f"{where}: segmentation is not an RLE dict")
    if size is not None and list(s["size"]) != size:
        raise EvalInputError(f"{where}: mask size {list(s['size'])} is not the video's {size}")
    counts = s["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        counts = mask_utils.frPyObjects(dict(s), *s["size"])["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if not isinstance(counts, str):
        raise EvalInputError(f"{where}: RLE counts must be a string")
    return {"size": [int(x) for x in s["size"]], "counts": counts}


# --------------------------------------------------------------------------- writing


def _rle_json(seg: Any) -> dict | None:
    if seg is None:
        return None
    counts = seg["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(x) for x in seg["size"]], "counts": counts}


def tracks_to_results(
    tracks: Iterable[Mapping], video_lengths: Mapping[int, int] | None = None
) -> list[dict]:
    """Per-track dicts -> official results entries (JSON-ready).

    Args:
        tracks: dicts with ``video_id``, ``category_id`` (the dataset's original id),
            ``score`` and ``segmentations``: one RLE dict (counts str or bytes) or None
            per frame of the video.
        video_lengths: optional {video_id: number of frames}; a track's list is padded with
            None (or rejected when longer) so that it has one entry per frame of its video.
    """
    out = []
    for i, t in enumerate(tracks):
        segs = [_rle_json(s) for s in t["segmentations"]]
        if video_lengths is not None and t["video_id"] in video_lengths:
            n = int(video_lengths[t["video_id"]])
            if len(segs) > n:
                raise ValueError(
                    f"track {i} of video {t['video_id']} has {len(segs)} frames, the video {n}"
                )
            segs += [None] * (n - len(segs))
        out.append(
            {
                "video_id": int(t["video_id"]),
                "category_id": int(t["category_id"]),
                "score": float(t["score"]),
                "segmentations": segs,
            }
        )
    return out


def write_results(
    tracks: Iterable[Mapping], path: PathLike, video_lengths: Mapping[int, int] | None = None
) -> Path:
    """Write tracks (see :func:`tracks_to_results`) as a results JSON file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = tracks_to_results(tracks, video_lengths)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, separators=(",", ":"))
    return path


def make_submission_zip(results: PathLike | Sequence[Mapping], zip_path: PathLike) -> Path:
    """Pack a results file (or results list / tracks) as ``results.json`` inside a zip.

    This is the archive the YouTube-VIS and OVIS evaluation servers accept.
    """
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        if isinstance(results, str | os.PathLike):
            zf.write(results, arcname="results.json")
        else:
            zf.writestr(
                "results.json", json.dumps(tracks_to_results(results), separators=(",", ":"))
            )
    return zip_path
