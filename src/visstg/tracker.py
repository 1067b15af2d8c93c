"""Online tracker: drives the model's inference step frame by frame (paper 3.6, DESIGN.md 1-2).

For frame t the reference nodes are the tracks matched in frame t-1 plus the memory (tracks lost
for at most ``max_age`` frames, the paper's dt = 7), each carried as the node features it had when
last seen, its last box centre and class. The model returns detections with masks, each
detection's own node features, and an edge score for every (reference, detection) pair (0 where
no edge joins them, e.g. another class or outside the window). Association: detections in
descending score order each take their best edge above ``match_threshold`` among the tracks not
yet taken (one detection per track); unmatched detections above ``new_track_threshold`` start new
tracks; unmatched tracks wait in memory and can be re-identified until they are ``max_age``
frames old, then end.

Masks are mapped back to the original resolution and RLE-encoded as they are produced, and the
state carried between frames (the model's own state plus one node-feature block per live track)
does not grow with the video's length.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

__all__ = [
    "References",
    "FrameOutput",
    "InferenceModel",
    "TrackerConfig",
    "OnlineTracker",
    "Track",
    "encode_masks",
]


@dataclass
class References:
    """The reference nodes handed to the model for one frame (R = live tracks).

    node_feats: [R, L, D] per-level node features of each track when last seen.
    centers: [R, 2] (x, y) input pixels of each track's last box centre.
    labels: [R] class of each track (edges are only scored against detections of that class).
    """

    node_feats: torch.Tensor
    centers: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class FrameOutput:
    """What the model's inference step returns for one frame (D detections, R references).

    boxes: [D, 4] xyxy input pixels; scores: [D]; labels: [D] contiguous classes;
    mask_logits: [D, h, w] at ``mask_stride`` of the padded input; node_feats: [D, L, D']
    each detection's node features (become the track's reference node next frame);
    edge_scores: [R, D] association probability (0 where there is no edge).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    mask_logits: torch.Tensor
    node_feats: torch.Tensor
    edge_scores: torch.Tensor
    mask_stride: int = 4


class InferenceModel(Protocol):
    def inference_step(
        self, image: torch.Tensor, image_size: tuple[int, int], state: Any, refs: References
    ) -> tuple[FrameOutput, Any]: ...


@dataclass
class TrackerConfig:
    """Thresholds of the online association (all in the config: ``model.tracker.*``).

    score_threshold: detections below this are dropped before association.
    match_threshold: minimum edge probability to continue a track.
    new_track_threshold: minimum detection score to start a track.
    max_age: frames a lost track stays in memory (the paper's dt).
    mask_threshold: probability threshold of the binary masks.
    """

    score_threshold: float = 0.1
    match_threshold: float = 0.5
    new_track_threshold: float = 0.2
    max_age: int = 7
    mask_threshold: float = 0.5


@dataclass
class Track:
    """A track's summary (small) and its per-frame results (RLE, kept for the results file)."""

    id: int
    label: int
    node_feats: torch.Tensor  # [L, D]
    center: torch.Tensor  # [2]
    box: torch.Tensor  # [4]
    age: int = 0  # frames since last matched
    frames: dict[int, tuple[dict, float, int]] = field(
        default_factory=dict
    )  # t -> rle, score, label

    def video_result(self, length: int) -> dict[str, Any]:
        """Video-level result: category by score-weighted vote, score = mean frame score."""
        votes: dict[int, float] = defaultdict(float)
        for _, score, label in self.frames.values():
            votes[label] += score
        label = max(votes, key=lambda k: (votes[k], -k))
        return {
            "track_id": self.id,
            "label": label,
            "score": float(np.mean([s for _, s, _ in self.frames.values()])),
            "segmentations": [
                self.frames[t][0] if t in self.frames else None for t in range(length)
            ],
        }


def encode_masks(
    mask_logits: torch.Tensor,
    valid_size: tuple[int, int],
    orig_size: tuple[int, int],
    mask_stride: int = 4,
    threshold: float = 0.5,
) -> list[dict]:
    """Binary masks at the original resolution, RLE-encoded (str counts).

    Args:
        mask_logits: [D, h, w] at ``mask_stride`` of the padded input.
        valid_size: (h, w) of the resized, unpadded input.
        orig_size: (H, W) of the original frame.
    """
    if mask_logits.shape[0] == 0:
        return []
    h, w = valid_size
    hs, ws = (h + mask_stride - 1) // mask_stride, (w + mask_stride - 1) // mask_stride
    logits = mask_logits[:, :hs, :ws].float()  # [D, hs, ws] valid region only
    logits = F.interpolate(logits[None], size=(hs * mask_stride, ws * mask_stride), mode="bilinear")
    logits = F.interpolate(logits[:, :, :h, :w], size=orig_size, mode="bilinear")[0]  # [D, H, W]
    masks = (logits.sigmoid() > threshold).cpu().numpy().astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]


class OnlineTracker:
    """Runs a model over one video, frame by frame, and collects video-level tracks."""

    def __init__(self, model: InferenceModel, config: TrackerConfig | None = None) -> None:
        self.model = model
        self.cfg = config or TrackerConfig()
        self.reset()

    def reset(self) -> None:
        self.live: list[Track] = []  # matched last frame or in memory (age <= max_age)
        self.finished: list[Track] = []
        self.state: Any = None
        self.next_id = 1
        self.frame_index = 0

    def references(self, device: torch.device | str = "cpu") -> References:
        if not self.live:
            return References(
                torch.zeros((0, 0, 0), device=device),
                torch.zeros((0, 2), device=device),
                torch.zeros((0,), dtype=torch.long, device=device),
            )
        return References(
            torch.stack([t.node_feats for t in self.live]).to(device),
            torch.stack([t.center for t in self.live]).to(device),
            torch.tensor([t.label for t in self.live], dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def step(
        self,
        image: torch.Tensor,
        valid_size: tuple[int, int],
        orig_size: tuple[int, int],
        scale: float = 1.0,
    ) -> list[tuple[int, int, float, dict]]:
        """Process one frame; returns (track id, label, score, RLE) for its matched detections.

        Args:
            image: [3, H, W] or [1, 3, H, W] preprocessed frame.
            valid_size: (h, w) of the resized, unpadded input.
            orig_size: (H0, W0) of the original frame (masks are returned at this size).
            scale: resized / original (boxes are returned in original pixels).
        """
        if image.dim() == 3:
            image = image[None]
        refs = self.references(image.device)
        out, self.state = self.model.inference_step(image, valid_size, self.state, refs)
        keep = out.scores >= self.cfg.score_threshold
        order = torch.argsort(out.scores[keep], descending=True, stable=True)
        idx = torch.nonzero(keep).flatten()[order]  # detections, highest score first

        assigned = self._associate(out.edge_scores[:, idx], out.scores[idx])  # det -> live index
        rles = encode_masks(
            out.mask_logits[idx], valid_size, orig_size, out.mask_stride, self.cfg.mask_threshold
        )
        t = self.frame_index
        matched: set[int] = set()
        results = []
        for j, det in enumerate(idx.tolist()):
            score, label = float(out.scores[det]), int(out.labels[det])
            box = out.boxes[det]
            center = (box[:2] + box[2:]) / 2
            ref = assigned[j]
            if ref is not None:
                track = self.live[ref]
                track.node_feats, track.box, track.center, track.age = (
                    out.node_feats[det],
                    box,
                    center,
                    0,
                )
                matched.add(ref)
            elif score >= self.cfg.new_track_threshold:
                track = Track(self.next_id, label, out.node_feats[det], center, box)
                self.next_id += 1
                self.live.append(track)
                matched.add(len(self.live) - 1)
            else:
                continue
            track.frames[t] = (rles[j], score, label)
            results.append((track.id, label, score, rles[j]))

        still_live = []
        for i, track in enumerate(self.live):
            if i not in matched:
                track.age += 1
            (still_live if track.age <= self.cfg.max_age else self.finished).append(track)
        self.live = still_live
        self.frame_index += 1
        return results

    def _associate(self, edge_scores: torch.Tensor, det_scores: torch.Tensor) -> list[int | None]:
        """Greedy: detections (already in descending score order) take their best free edge.

        Args:
            edge_scores: [R, D'] edge probabilities of the kept detections.
        """
        n_ref, n_det = edge_scores.shape
        out: list[int | None] = [None] * n_det
        if n_ref == 0 or n_det == 0:
            return out
        scores = edge_scores.float().cpu().clone()  # [R, D'] one small transfer per frame
        scores[scores < self.cfg.match_threshold] = -1.0
        for j in range(n_det):
            best = int(torch.argmax(scores[:, j]))
            if scores[best, j] < 0:
                continue
            out[j] = best
            scores[best, :] = -1.0  # one detection per track
        return out

    def video_results(self, length: int) -> list[dict[str, Any]]:
        """Every track of the video (finished and live) as a video-level result."""
        tracks = sorted(self.finished + self.live, key=lambda tr: tr.id)
        return [tr.video_result(length) for tr in tracks if tr.frames]

    def run(self, video) -> list[dict[str, Any]]:
        """Track a whole :class:`~visstg.data.datamodule.VideoSample`; returns video results."""
        self.reset()
        params = getattr(self.model, "parameters", None)
        first = next(iter(params()), None) if params else None
        device = first.device if first is not None else torch.device("cpu")
        for _, image, size, _ in video.frames():
            self.step(image.to(device), size, video.orig_size)
        return self.video_results(video.length)
