"""The benchmark command on a tiny input, and the stage timer's contract (no-op by default,
results unchanged when it is on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from visstg.benchmark import STAGES, synthetic_clip
from visstg.data.transforms import preprocess_frame
from visstg.model import VisSTG
from visstg.model.backbone import ResNetFPN
from visstg.timing import NULL_TIMER, StageTimer
from visstg.tracker import OnlineTracker, TrackerConfig

TINY = [
    "model.dim=32",
    "model.gnn.iterations=1",
    "size=[64,96]",
    "frames=2",
    "warmup=1",
    "detections=4",
    "graph_table=[1,4]",
    "graph_table_frames=1",
    "threads=1",
]


def test_bench_heads_script_reports_every_part_against_the_folded_backbone(tmp_path: Path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_heads.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--size", "128", "192", "--repeats", "1", "model.dim=16"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line[:42].strip(): line[42:].split() for line in proc.stdout.splitlines()}
    assert lines["backbone + FPN, norms folded"][-1] == "100.0%"
    for part in ("heatmap branch (dense at inference)", "mask branch (dense at inference)"):
        ms, gmac, _ = lines[part]
        assert float(ms) > 0 and float(gmac) > 0, part
    assert "dense heads (heatmap + mask branch) / folded backbone:" in proc.stdout


def test_benchmark_command_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "visstg.benchmark", *TINY, f"output={out}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["stages_ms"]) == set(STAGES)
    assert any("backbone" in k for k in report["stages_ms"])
    assert report["total_ms"] > 0 and report["fps"] > 0
    assert report["input_size"] == [64, 96] and report["device"].startswith("cpu")
    assert report["config"]["model"]["dim"] == 32
    assert report["config"]["fuse_norms"] is True  # the backbone as `predict` runs it
    assert [r["references"] for r in report["graph_table"]] == [1, 4]
    assert set(report["worst_case"]["stages_ms"]) == set(STAGES)
    # Operation counts of one tracked frame per stage, beside the times.
    gflops = report["stages_gflops"]
    assert set(gflops) == set(STAGES) and gflops["backbone+fpn"] > 0 and gflops["detection"] > 0
    ratio = (sum(gflops.values()) - gflops["backbone+fpn"]) / gflops["backbone+fpn"]
    assert abs(report["beyond_backbone_gflops_ratio"] - ratio) < 1e-3
    assert "FPS" in proc.stdout and "in FLOPs" in proc.stdout
    # Nothing but the report in the working directory (no outputs/, .hydra, logs).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_benchmark_times_the_same_random_model_every_run() -> None:
    """Random weights drawn after ``seed``: two builds agree, another seed differs (where the
    detections land sets the work of the mask and GNN stages)."""
    from visstg.benchmark import build_model
    from visstg.config import compose

    def weights(seed: int) -> list[torch.Tensor]:
        cfg = compose("benchmark", ["model.dim=16", "model.backbone.weights=null", f"seed={seed}"])
        return [p.detach() for p in build_model(cfg, "cpu")[0].parameters()]

    first, again, other = weights(42), weights(42), weights(7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def _tiny_model() -> VisSTG:
    torch.manual_seed(0)
    backbone = ResNetFPN(18, 32, weights=None)
    return VisSTG(num_classes=3, backbone=backbone, dim=32, topk=6, score_thresh=0.0).eval()


def _track(net: VisSTG, frames) -> list:
    cfg = TrackerConfig(score_threshold=0.0, match_threshold=0.0, new_track_threshold=0.0)
    tracker = OnlineTracker(net, cfg)
    out = []
    for frame in frames:
        image, size, _ = preprocess_frame(frame, 64, 96)
        out.append(tracker.step(image, size, frame.shape[:2]))
    return out


def test_timer_is_a_no_op_by_default() -> None:
    net = _tiny_model()
    assert net.timer is NULL_TIMER and not NULL_TIMER.enabled
    with NULL_TIMER.stage("a") as a, NULL_TIMER.stage("b") as b:
        assert a is None and b is None
    assert NULL_TIMER.stage("a") is NULL_TIMER.stage("b")  # one shared object, nothing allocated


def test_results_unchanged_with_the_timer_on() -> None:
    torch.set_num_threads(1)
    frames = synthetic_clip(3, 64, 96)
    net = _tiny_model()
    plain = _track(net, frames)
    timer = StageTimer()
    net.timer = timer
    timed = _track(net, frames)
    assert timed == plain and any(plain)
    assert {"backbone+fpn", "graph", "gnn", "detection", "mask", "association", "rle"} <= set(
        timer.times
    )
    assert all(ms >= 0 for ms in timer.times.values())
