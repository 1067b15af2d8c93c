"""Time ``python -m visstg.evaluate`` end to end against the straightforward reference evaluator.

Generates a YouTube-VIS-sized case (default 300 videos x 36 frames at 720x1280, 1-3 ground-truth
tracks and 100 result tracks per video in one category; ellipses and boxes that move, results
are jittered copies of the ground truth plus distractors, RLE-encoded), then runs, each as a
subprocess exactly as a user would:

    python -m visstg.evaluate gt=GT results=RES output=OUT             # AP + HOTA, the default
    python -m visstg.evaluate gt=GT results=RES output=OUT hota=false  # AP only
    python -m visstg.evaluate gt=GT results=RES output=OUT workers=1  # AP + HOTA, one process
    python -m visstg.eval.reference GT RES        # per-frame-pair RLE merges, official algorithm

checks that the 12 statistics agree to 1e-9 (and that one process gives exactly the default's
metrics, which uses one process per available core) and prints the times and the speed-ups. With
``--repeat N`` it runs N rounds of all commands back to back and reports medians (each speed-up
is taken within a round: on a shared machine the load drifts).

    python scripts/bench_eval.py [--videos 300 --frames 36 --height 720 --width 1280
                                  --results 100 --seed 0 --workdir DIR --skip-reference
                                  --check-hota --repeat N]

``--check-hota`` also runs trackeval's own YouTube-VIS dataset path (``hota_reference``) on the
same files and checks that HOTA/DetA/AssA agree to 1e-9.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def shape_rle(kind: str, cy: float, cx: float, ry: float, rx: float, h: int, w: int) -> dict:
    """Compressed RLE of an ellipse or box, built column by column without a dense mask.

    The counts are canonical, as ``pycocotools.mask.encode`` writes them: no zero-length run
    after the first count. (pycocotools' ``iou`` and ``merge`` stop early when two masks have
    zero-length runs at the same pixel; see docs/evaluation.md.)
    """
    x0, x1 = max(0, math.ceil(cx - rx)), min(w - 1, math.floor(cx + rx))
    counts, pos = [], 0  # pos: column-major index where the current run of zeros started
    for x in range(x0, x1 + 1):
        if kind == "ellipse":
            half = ry * math.sqrt(max(0.0, 1.0 - ((x - cx) / rx) ** 2))
        else:
            half = ry
        y0, y1 = max(0, math.ceil(cy - half)), min(h - 1, math.floor(cy + half))
        if y1 < y0:
            continue
        start = x * h + y0
        if counts and start == pos:  # continues the previous column's run
            counts[-1] += y1 - y0 + 1
        else:
            counts += [start - pos, y1 - y0 + 1]
        pos = start + y1 - y0 + 1
    if pos < h * w or not counts:
        counts.append(h * w - pos)
    rle = mask_utils.frPyObjects({"counts": counts, "size": [h, w]}, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def track_segs(rng, nf, h, w, size_range, base=None, jitter=0.0):
    """Per-frame RLEs of a moving shape; with ``base`` a jittered copy of that track."""
    if base is None:
        kind = "ellipse" if rng.random() < 0.6 else "box"
        ry, rx = rng.uniform(*size_range, 2) / 2
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        vy, vx = rng.normal(0, 3, 2)
    else:
        kind, cy, cx, ry, rx, vy, vx = base
        cy, cx = cy + rng.normal(0, jitter * ry), cx + rng.normal(0, jitter * rx)
        ry, rx = ry * rng.uniform(1 - jitter, 1 + jitter), rx * rng.uniform(1 - jitter, 1 + jitter)
    params = (kind, cy, cx, ry, rx, vy, vx)
    segs = [shape_rle(kind, cy + f * vy, cx + f * vx, ry, rx, h, w) for f in range(nf)]
    return params, segs


def generate(out: Path, videos: int, frames: int, h: int, w: int, per_video: int, seed: int):
    rng = np.random.default_rng(seed)
    gt = {
        "videos": [],
        "categories": [{"id": i + 1, "name": f"class{i + 1}"} for i in range(40)],
        "annotations": [],
    }
    results = []
    for v in range(1, videos + 1):
        gt["videos"].append(
            {
                "id": v,
                "height": h,
                "width": w,
                "length": frames,
                "file_names": [f"video{v:04d}/{f:05d}.jpg" for f in range(frames)],
            }
        )
        bases = []
        for _ in range(int(rng.integers(1, 4))):
            params, segs = track_segs(rng, frames, h, w, (40, 400))
            bases.append(params)
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "video_id": v,
                    "category_id": 1,
                    "iscrowd": 0,
                    "height": h,
                    "width": w,
                    "segmentations": segs,
                    "areas": [int(mask_utils.area(s)) for s in segs],
                }
            )
        for r in range(per_video):
            if r < 4 * len(bases):  # good and not-so-good copies of the ground truth
                base = bases[r % len(bases)]
                _, segs = track_segs(rng, frames, h, w, None, base, 0.03 * (1 + r))
                score = rng.uniform(0.3, 1.0)
            else:  # distractors
                _, segs = track_segs(rng, frames, h, w, (20, 160))
                score = rng.uniform(0.0, 0.7)
            results.append(
                {
                    "video_id": v,
                    "category_id": 1,
                    "score": round(float(score), 3),  # rounded: many ties
                    "segmentations": segs,
                }
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "gt.json").write_text(json.dumps(gt, separators=(",", ":")))
    (out / "results.json").write_text(json.dumps(results, separators=(",", ":")))


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return dt, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=300)
    ap.add_argument("--frames", type=int, default=36)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--results", type=int, default=100, help="result tracks per video")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the generated files here")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--check-hota", action="store_true", help="compare with hota_reference")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all commands")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    gt, res = work / "gt.json", work / "results.json"
    if not (gt.exists() and res.exists()):
        t0 = time.perf_counter()
        generate(work, args.videos, args.frames, args.height, args.width, args.results, args.seed)
        print(
            f"generated {args.videos} videos x {args.frames} frames in "
            f"{time.perf_counter() - t0:.0f} s; results file {res.stat().st_size / 1e6:.0f} MB"
        )

    py = sys.executable
    cli = [py, "-m", "visstg.evaluate", f"gt={gt}", f"results={res}"]
    runs = {  # name: command
        "visstg.evaluate (AP + HOTA, the default)": [*cli, f"output={work / 'metrics0.json'}"],
        "visstg.evaluate hota=false (AP only)": [
            *cli,
            f"output={work / 'metrics1.json'}",
            "hota=false",
        ],
        "visstg.evaluate workers=1 (one process)": [
            *cli,
            f"output={work / 'metrics2.json'}",
            "workers=1",
        ],
    }
    if not args.skip_reference:
        runs["reference (official algorithm)"] = [
            py,
            "-m",
            "visstg.eval.reference",
            str(gt),
            str(res),
        ]
    # Rounds of all commands back to back: on a shared machine the load drifts, so each
    # speed-up is taken within one round and the median over rounds is reported.
    times = {name: [] for name in runs}
    for r in range(args.repeat):
        for name, cmd in runs.items():
            t, out = timed(cmd)
            times[name].append(t)
            print(f"round {r + 1}: {name:<42} {t:7.1f} s", flush=True)
    fast = json.loads((work / "metrics0.json").read_text())
    ap_only = json.loads((work / "metrics1.json").read_text())
    if json.loads((work / "metrics2.json").read_text()) != fast:
        sys.exit("one process and the default (one process per core) give different metrics")
    print(f"AP={fast['AP']:.4f}  HOTA={fast['HOTA']:.6f}")
    for name, ts in times.items():
        print(f"median {name:<42} {statistics.median(ts):7.1f} s")
    if not args.skip_reference:
        ref = json.loads(out.strip().splitlines()[-1])
        worst = max(abs(m[k] - ref[k]) for m in (fast, ap_only) for k in STAT_KEYS)
        print(f"max |difference| over the 12 statistics: {worst:.3g}")
        t_ref = times["reference (official algorithm)"]
        for name in list(runs)[:3]:
            ratios = [tr / t for tr, t in zip(t_ref, times[name])]
            print(
                f"speed-up {name:<42} {statistics.median(ratios):5.1f}x "
                f"(rounds: {', '.join(f'{x:.1f}' for x in ratios)})"
            )
        if worst > 1e-9:
            sys.exit("the fast and reference statistics differ")
    if args.check_hota:
        code = (
            "import json, sys; from visstg.eval.trackeval_hota import hota_reference; "
            "print(json.dumps(hota_reference(sys.argv[1], sys.argv[2])))"
        )
        t_h, out = timed([py, "-c", code, str(gt), str(res)])
        href = json.loads(out.strip().splitlines()[-1])
        worst_h = max(abs(fast[k] - href[k]) for k in ("HOTA", "DetA", "AssA"))
        print(f"hota_reference (trackeval's dataset class): {t_h:7.1f} s")
        print(f"max |difference| HOTA/DetA/AssA: {worst_h:.3g}")
        if worst_h > 1e-9:
            sys.exit("the fast and trackeval HOTA differ")


if __name__ == "__main__":
    main()
