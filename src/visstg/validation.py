"""Validation by online tracking: every validation video through the tracker, then the metric.

Under DDP each rank tracks its share of the videos; the per-video results are gathered on every
rank (duplicates that the distributed sampler adds to even out the shares are dropped by video
id) and the YouTube-VIS metric is computed once on the union, so it equals a single-process
evaluation of the same predictions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visstg.inference import results_for_video
from visstg.tracker import OnlineTracker, TrackerConfig

log = logging.getLogger(__name__)

__all__ = ["VideoValidator", "gather_by_video", "restrict_gt", "LOGGED_KEYS"]

LOGGED_KEYS = ("AP", "AP50", "AP75", "AR1", "AR10", "HOTA", "DetA", "AssA")


def gather_by_video(local: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """Union of every rank's ``{video_id: results}`` (first copy of a video wins)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(local)
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, local)
    merged: dict[int, list[dict]] = {}
    for part in parts:
        for video_id, results in part.items():
            merged.setdefault(video_id, results)
    return merged


def restrict_gt(gt: Mapping, video_ids: set[int]) -> dict:
    """The ground truth of only the given videos (a quick validation on a subset)."""
    out = dict(gt)
    out["videos"] = [v for v in gt["videos"] if v["id"] in video_ids]
    out["annotations"] = [a for a in gt.get("annotations") or [] if a["video_id"] in video_ids]
    return out


class VideoValidator:
    """Accumulates tracked validation videos and scores them at the end of an epoch.

    Args:
        tracker: the tracker thresholds.
        hota: also compute HOTA/DetA/AssA (trackeval's metric).
        overlay_frames: number of overlay frames kept of the first video (for the logger).
    """

    def __init__(
        self, tracker: TrackerConfig | None = None, hota: bool = True, overlay_frames: int = 4
    ) -> None:
        self.tracker_config = tracker or TrackerConfig()
        self.hota = hota
        self.overlay_frames = overlay_frames
        self.reset()

    def reset(self) -> None:
        self.results: dict[int, list[dict]] = {}
        self.gt_path: Path | None = None
        self.overlays: list[np.ndarray] = []
        self.last_metrics: dict[str, Any] = {}

    def add_video(self, net: torch.nn.Module, video, with_overlay: bool = False) -> None:
        """Track one :class:`~visstg.data.datamodule.VideoSample` and keep its results."""
        tracks = OnlineTracker(net, self.tracker_config).run(video)
        self.results[video.video_id] = results_for_video(
            tracks, video.video_id, video.ds.categories
        )
        self.gt_path = video.ds.path
        if with_overlay and self.overlay_frames:
            self.overlays = self._overlays(video, tracks)

    def _overlays(self, video, tracks: list[dict]) -> list[np.ndarray]:
        from visstg.viz import draw_tracks

        names = video.ds.class_names
        picks = np.unique(np.linspace(0, video.length - 1, self.overlay_frames).round().astype(int))
        frames = []
        for i in picks.tolist():
            shown = [
                (t["track_id"], names[t["label"]], t["score"], t["segmentations"][i])
                for t in tracks
                if t["segmentations"][i] is not None
            ]
            frames.append(draw_tracks(video.raw_frame(i), shown))
        return frames

    def compute(self) -> dict[str, Any]:
        """Gather every rank's videos and compute the metric once; empty dict without GT."""
        from visstg.eval import evaluate

        merged = gather_by_video(self.results)
        if self.gt_path is None or not merged:
            return {}
        with open(self.gt_path) as f:
            gt = json.load(f)
        if not gt.get("annotations"):
            log.warning("%s has no annotations: validation metrics skipped", self.gt_path)
            return {}
        gt = restrict_gt(gt, set(merged))
        results = [r for video_id in sorted(merged) for r in merged[video_id]]
        metrics = evaluate(gt, results, with_hota=self.hota)
        metrics["num_videos"] = len(merged)
        self.last_metrics = metrics
        return metrics
