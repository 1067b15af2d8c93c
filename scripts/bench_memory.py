"""Streaming memory of ``python -m visstg.predict``: peak RSS on a long vs. a short video.

    python scripts/bench_memory.py [--short 200] [--long 2000] [--size 64x96] [--workdir DIR]

Writes a small random-weight checkpoint (the default training config, ResNet-18, D=64) and two
generated videos (moving discs) of ``--short`` and ``--long`` frames, runs ``visstg.predict``
on each as a separate subprocess and reads that child's peak resident set size with
``os.wait4`` (the per-child ``ru_maxrss``). The target: the long video peaks within 10% of the
short one. The model is held to ``--detections`` per frame (top-k, thresholds 0, every
detection continues a track) so a random model does not start a new track on every frame.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_checkpoint(path: Path, detections: int) -> None:
    """An untrained default-config checkpoint whose every detection continues a track."""
    from visstg.inference import save_untrained_checkpoint

    save_untrained_checkpoint(
        path,
        [
            "logger=none",
            f"model.topk={detections}",
            "model.score_thresh=0.0",
            "tracker.score_threshold=0.0",
            "tracker.new_track_threshold=0.0",
            "tracker.match_threshold=0.0",
        ],
    )


def write_video(path: Path, num_frames: int, height: int, width: int) -> None:
    from visstg.benchmark import synthetic_clip
    from visstg.data.video_io import VideoWriter

    frames = synthetic_clip(64, height, width)  # a loop of 64 frames, generated once
    with VideoWriter(path, 30) as writer:
        for i in range(num_frames):
            writer.write(frames[i % len(frames)])


def peak_rss_of_predict(video: Path, ckpt: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one predict run in a child process."""
    cmd = [
        sys.executable, "-m", "visstg.predict", f"input={video}", f"ckpt_path={ckpt}",
        f"output_dir={out}", "device=cpu", "overwrite=true",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"predict failed on {video}:\n{proc.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024, wall  # Linux: ru_maxrss in KiB


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=200)
    parser.add_argument("--long", type=int, default=2000)
    parser.add_argument("--size", default="64x96", help="HxW of the generated videos")
    parser.add_argument("--detections", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / "random.ckpt"
        write_checkpoint(ckpt, args.detections)
        report = {"size": [height, width], "detections": args.detections}
        for name, n in (("short", args.short), ("long", args.long)):
            video = work / f"{name}.mp4"
            write_video(video, n, height, width)
            rss, wall = peak_rss_of_predict(video, ckpt, work / f"out_{name}")
            tracks = len(json.loads((work / f"out_{name}" / "results.json").read_text()))
            report[name] = {"frames": n, "peak_rss_mib": round(rss, 1), "wall_s": round(wall, 1),
                            "tracks": tracks}  # fmt: skip
            print(f"{name}: {n} frames, peak RSS {rss:.1f} MiB, {wall:.1f} s, {tracks} tracks")
    growth = report["long"]["peak_rss_mib"] / report["short"]["peak_rss_mib"] - 1
    report["growth"] = round(growth, 4)
    print(f"peak RSS growth {args.short} -> {args.long} frames: {growth:+.1%} (target <= +10%)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
