"""Validate a YouTube-VIS-format dataset: ``python -m visstg.data.check ROOT [--split NAME]``.

Checks ``ROOT/<split>.json`` (every ``*.json`` split in ROOT by default) and its frames under
``ROOT/<split>/JPEGImages/``: the schema, every frame file readable and of the video's size, every
mask decodable and of the video's size, ids consistent. Prints a summary (videos, frames,
annotated tracks, per-category counts) and exits with status 1 listing every problem found.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from visstg.data.ytvis import YTVIS, DatasetError, decode_segmentation, load_ytvis

__all__ = ["check_split", "main"]


def _check_frame(ds: YTVIS, video: dict, frame: int) -> str | None:
    from PIL import Image, UnidentifiedImageError

    path = ds.frame_path(video, frame)
    where = f"{ds.path}: video {video['id']} frame {frame}"
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size  # (w, h)
    except FileNotFoundError:
        return f"{where}: file {path} does not exist"
    except (UnidentifiedImageError, OSError) as err:
        return f"{where}: cannot decode {path}: {err}"
    if size != (video["width"], video["height"]):
        return (
            f"{where}: image {path} is {size[1]}x{size[0]} but the video is "
            f"{video['height']}x{video['width']}"
        )
    return None


def _check_masks(ds: YTVIS, video: dict) -> list[str]:
    problems = []
    h, w = video["height"], video["width"]
    for track in ds.tracks.get(video["id"], []):
        for frame, seg in enumerate(track.segmentations):
            if seg is None:
                continue
            try:
                mask = decode_segmentation(seg, h, w)
            except Exception as err:  # pycocotools raises several types on bad RLE
                problems.append(
                    f"{ds.path}: annotation {track.id} frame {frame}: cannot decode the mask: {err}"
                )
                continue
            if mask.shape != (h, w):
                problems.append(
                    f"{ds.path}: annotation {track.id} frame {frame}: mask is "
                    f"{mask.shape[0]}x{mask.shape[1]} but video {video['id']} is {h}x{w}"
                )
    return problems


def check_split(
    root: Path, split: str, progress: bool = True, workers: int = 8
) -> tuple[YTVIS | None, list[str]]:
    """Check one split; returns the loaded file (None if unloadable) and all problems found."""
    problems: list[str] = []
    try:
        ds = load_ytvis(root / f"{split}.json", root / split / "JPEGImages", problems=problems)
    except DatasetError as err:
        return None, [str(err)]
    jobs = [(v, f) for v in ds.videos for f in range(v["length"])]
    from rich.progress import track

    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda job: _check_frame(ds, *job), jobs)
        if progress:
            results = track(results, total=len(jobs), description=f"checking {split} frames")
        problems += [p for p in results if p]
    for video in ds.videos:
        problems += _check_masks(ds, video)
    return ds, problems


def _print_summary(split: str, ds: YTVIS) -> None:
    from rich.console import Console
    from rich.table import Table

    s = ds.summary()
    table = Table(title=f"{ds.path} ({split})")
    table.add_column("category")
    table.add_column("tracks", justify="right")
    for name, count in s["per_category"].items():
        table.add_row(name, str(count))
    console = Console()
    console.print(table)
    console.print(
        f"videos: {s['videos']}  frames: {s['frames']}  annotated tracks: {s['tracks']}"
        + ("" if ds.has_annotations else "  (no annotations: inference-only split)")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visstg.data.check", description=__doc__)
    parser.add_argument("root", type=Path, help="dataset folder holding <split>.json")
    parser.add_argument("--split", action="append", help="split name (repeatable; default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if not args.root.is_dir():
        print(f"error: {args.root}: no such folder", file=sys.stderr)
        return 2
    splits = args.split or sorted(p.stem for p in args.root.glob("*.json"))
    if not splits:
        print(f"error: {args.root}: no <split>.json annotation file here", file=sys.stderr)
        return 2
    all_problems: list[str] = []
    for split in splits:
        ds, problems = check_split(args.root, split, progress=not args.no_progress)
        if ds is not None:
            _print_summary(split, ds)
        all_problems += problems
    if all_problems:
        print(f"\n{len(all_problems)} problem(s) found:", file=sys.stderr)
        for p in all_problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("OK: no problems found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
