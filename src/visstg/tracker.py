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

With ``backfill_frames`` > 0 a track that starts also takes back, frame by frame, the
detections of the frames just before that no track took (scored between ``score_threshold`` and
``new_track_threshold``) whose mask overlaps its mask of the next frame: an object that was
detected weakly for a few frames before its first confident detection is not counted missed there.
Those frames appear in the video-level results (:meth:`OnlineTracker.video_results`), not in what
:meth:`OnlineTracker.step` returned for them at the time.

With ``refine_radius`` > 0 each mask's probabilities are first refined by a guided filter with
the frame as the guide (:mod:`visstg.refine`), so that mask boundaries follow the frame's edges.

Masks are mapped back to the original resolution and RLE-encoded as they are produced, and the
state carried between frames (the model's own state plus one node-feature block per live track)
does not grow with the video's length.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from visstg.data.transforms import denormalize
from visstg.refine import refine_masks
from visstg.timing import NULL_TIMER

__all__ = [
    "InferenceModel",
    "TrackerConfig",
    "OnlineTracker",
    "Track",
    "encode_masks",
]


class InferenceModel(Protocol):
    """What the tracker needs of a model (:meth:`visstg.model.VisSTG.inference_step`).

    ``references`` (R live tracks): ``memory_nodes [R, L, D]`` node features of each track when
    last seen, ``memory_centers [R, 2]`` (x, y input px of its last box centre),
    ``memory_labels [R]``, ``memory_boxes [R, 4]`` (last box, xyxy input px), and for tracks
    lost in the previous frame their stored kernels ``memory_kernels [K, P]`` at
    ``memory_levels [K]`` / ``memory_cells [K, 2]`` (y, x). A model may list more per-detection
    outputs in ``track_state_keys`` (e.g. ``("embeddings",)`` for embedding association): the
    tracker keeps each track's latest value and passes them back as ``memory_<key> [R, ...]``.
    The outputs (Dn detections) used here: ``boxes [Dn, 4]`` xyxy input px, ``scores [Dn]``,
    ``labels [Dn]``, ``levels [Dn]``, ``cells [Dn, 2]``, ``masks [Dn, H/4, W/4]`` logits,
    ``edge_scores [R, Dn]`` (0 where no edge), ``node_features [Dn, L, D]``, ``kernels [Dn, P]``,
    and for ``class_votes="soft"`` ``class_scores [Dn, C]`` (without it a soft vote is the hard one).
    ``min_score``: detections scoring below it may be left out (the tracker discards them).
    """

    def inference_step(
        self,
        image: torch.Tensor,
        state: Any = None,
        references: dict[str, torch.Tensor] | None = None,
        image_size: tuple[int, int] | None = None,
        min_score: float = 0.0,
    ) -> tuple[dict[str, torch.Tensor], Any]: ...


@dataclass
class TrackerConfig:
    """Thresholds of the online association (all in the config: ``model.tracker.*``).

    score_threshold: detections below this are dropped before association.
    match_threshold: minimum edge probability to continue a track.
    new_track_threshold: minimum detection score to start a track.
    max_age: frames a lost track stays in memory (the paper's dt).
    mask_threshold: probability threshold of the binary masks.
    coverage_power: a track's video-level score is its mean frame score times (frames it covers
        / frames of the video) ** coverage_power; 0 gives the plain mean (MaskTrack R-CNN's).
        The score only ranks tracks for AP: a short track of a few confident frames (a false
        positive, or a fragment of an object another track covers) ranks below a whole one.
    class_votes: a track's category is the class of most votes, each frame voting with its
        detection score: ``"hard"`` for the detection's label only (DESIGN.md), ``"soft"``
        spread over the classes in proportion to their heatmap probabilities at the peak
        (``class_scores``). A frame whose peak is a ring at 0.35 and a disc at 0.30 then counts
        for both, so a track that flickers between two close classes gets the one that is high
        in most frames, not the one that wins most frames by a hair.
    maskness_power: each frame's score in that mean is multiplied by its mask's maskness **
        maskness_power, the maskness being the mean probability of the pixels above
        ``mask_threshold`` (SOLOv2's): a track whose masks the model is unsure of ranks lower.
        0 (the default) leaves the detection scores alone; only the video-level score changes.
    backfill_frames: when a track starts, it takes back up to this many earlier frames, one at
        a time from the latest: in each, the detection no track took (score >= score_threshold)
        whose binary mask has the highest IoU with the track's mask of the frame after, if that
        IoU is at least ``backfill_iou``; the first frame without one ends it. 0 (the default)
        takes none: purely online results.
    backfill_iou: the mask IoU (at the mask logits' stride) that backfilling asks for.
    refine_radius: > 0 refines each mask's probabilities at the input resolution with a guided
        filter of this radius (pixels), the frame as the guide (:mod:`visstg.refine`), before
        thresholding: the boundary moves onto the frame's colour edges instead of following the
        bilinear upsampling of the stride-4 logits. 0 (the default) thresholds the upsampled
        logits themselves. The maskness (``maskness_power``) still reads the model's logits.
    refine_eps: the guided filter's regulariser, in squared [0, 1] colour units: edges of
        contrast well above sqrt(refine_eps) are followed.
    """

    score_threshold: float = 0.1
    match_threshold: float = 0.5
    new_track_threshold: float = 0.2
    max_age: int = 7
    mask_threshold: float = 0.5
    coverage_power: float = 0.0
    class_votes: str = "hard"
    maskness_power: float = 0.0
    backfill_frames: int = 0
    backfill_iou: float = 0.5
    refine_radius: int = 0
    refine_eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.refine_radius < 0 or self.refine_radius != int(self.refine_radius):
            raise ValueError(
                f"tracker.refine_radius must be an integer >= 0, got {self.refine_radius}"
            )
        if self.refine_eps <= 0:
            raise ValueError(f"tracker.refine_eps must be > 0, got {self.refine_eps}")
        if self.backfill_frames < 0:
            raise ValueError(f"tracker.backfill_frames must be >= 0, got {self.backfill_frames}")
        if not 0.0 < self.backfill_iou <= 1.0:
            raise ValueError(f"tracker.backfill_iou must be in (0, 1], got {self.backfill_iou}")
        if self.maskness_power < 0:
            raise ValueError(f"tracker.maskness_power must be >= 0, got {self.maskness_power}")
        if self.class_votes not in CLASS_VOTES:
            raise ValueError(
                f"tracker.class_votes must be one of {CLASS_VOTES}, got {self.class_votes!r}"
            )


CLASS_VOTES = ("hard", "soft")


@dataclass
class Track:
    """A track's summary (small) and its per-frame results (RLE, kept for the results file)."""

    id: int
    label: int
    node_feats: torch.Tensor  # [L, D]
    center: torch.Tensor  # [2]
    box: torch.Tensor  # [4]
    kernel: torch.Tensor | None = None  # [P] dynamic mask parameters when last seen
    level: int = 0  # FPN level and (y, x) cell of its last detection
    cell: torch.Tensor | None = None  # [2]
    age: int = 0  # frames since last matched
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # model's track_state_keys
    frames: dict[int, tuple[dict, float, int]] = field(
        default_factory=dict
    )  # t -> rle, score, label
    # Soft class votes summed over the frames ([C], float64; class_votes="soft" only).
    soft_votes: torch.Tensor | None = None
    # Mask confidence of each frame's mask (mean probability of its pixels; maskness_power > 0).
    maskness: dict[int, float] = field(default_factory=dict)

    def video_result(
        self, length: int, coverage_power: float = 0.0, maskness_power: float = 0.0
    ) -> dict[str, Any]:
        """Video-level result: category by score-weighted vote (soft when the track has
        ``soft_votes``, :class:`TrackerConfig` ``class_votes``), score = mean over the covered
        frames of (frame score x maskness ** ``maskness_power``) times (covered frames /
        ``length``) ** ``coverage_power``."""
        if self.soft_votes is not None:
            label = int(self.soft_votes.argmax())  # the first of equal votes, as below
        else:
            votes: dict[int, float] = defaultdict(float)
            for _, score, label in self.frames.values():
                votes[label] += score
            label = max(votes, key=lambda k: (votes[k], -k))
        mean = float(
            np.mean(
                [
                    s * self.maskness.get(t, 1.0) ** maskness_power
                    for t, (_, s, _) in self.frames.items()
                ]
            )
        )
        coverage = len(self.frames) / max(length, 1)
        return {
            "track_id": self.id,
            "label": label,
            "score": mean * coverage**coverage_power,
            "segmentations": [
                self.frames[t][0] if t in self.frames else None for t in range(length)
            ],
        }


def maskness(
    mask_logits: torch.Tensor, valid_size: tuple[int, int], mask_stride: int, threshold: float
) -> torch.Tensor:
    """[D] mean probability of each mask's cells above ``threshold`` (SOLOv2's maskness; 0
    for a mask with none), read on the logits' own grid inside the valid region."""
    p = _valid_cells(mask_logits, valid_size, mask_stride).sigmoid()
    fg = p > threshold
    return (p * fg).sum((1, 2)) / fg.sum((1, 2)).clamp(min=1)


def encode_masks(
    mask_logits: torch.Tensor,
    valid_size: tuple[int, int],
    orig_size: tuple[int, int],
    mask_stride: int = 4,
    threshold: float = 0.5,
    guide: torch.Tensor | None = None,
    refine_radius: int = 0,
    refine_eps: float = 1e-3,
) -> list[dict]:
    """Binary masks at the original resolution, RLE-encoded (str counts).

    Args:
        mask_logits: [D, h, w] at ``mask_stride`` of the padded input.
        valid_size: (h, w) of the resized, unpadded input.
        orig_size: (H, W) of the original frame.
        guide: [3, >= h, >= w] the input frame in [0, 1] (padded or not); with
            ``refine_radius`` > 0 the probabilities are refined by a guided filter of it at
            the input resolution (:class:`TrackerConfig` ``refine_radius``, ``refine_eps``).
    """
    if mask_logits.shape[0] == 0:
        return []
    h, w = valid_size
    logits = _valid_cells(mask_logits, valid_size, mask_stride)  # [D, hs, ws]
    hs, ws = logits.shape[-2:]
    logits = F.interpolate(logits[None], size=(hs * mask_stride, ws * mask_stride), mode="bilinear")
    logits = logits[0, :, :h, :w]  # [D, h, w]
    if guide is not None and refine_radius > 0:
        probs = refine_masks(guide[:, :h, :w], logits.sigmoid(), refine_radius, refine_eps)
        # Back to logits (clamped: the filter can leave [0, 1]) for the resize and threshold.
        logits = torch.logit(probs.clamp(_PROB_CLAMP, 1.0 - _PROB_CLAMP))
    if tuple(orig_size) != (h, w):  # a same-size bilinear resize is the identity: skip it
        logits = F.interpolate(logits[None], size=orig_size, mode="bilinear")[0]  # [D, H, W]
    # [D, W, H] C-contiguous is [H, W, D] Fortran-contiguous, the layout pycocotools wants, so
    # the transpose happens on the (small, binary) device tensor and the host copy is the last.
    masks = _above(logits, threshold).to(torch.uint8).transpose(1, 2).contiguous()
    rles = mask_utils.encode(masks.cpu().numpy().transpose(2, 1, 0))
    return [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]


_PROB_CLAMP = 1e-4  # refined probabilities -> logits: at most |logit(1e-4)| = 9.2


def _valid_cells(
    mask_logits: torch.Tensor, valid_size: tuple[int, int], mask_stride: int
) -> torch.Tensor:
    """``[D, hs, ws]`` float32: the cells of ``[D, h, w]`` logits (at ``mask_stride`` of the
    padded input) that cover the valid region ``valid_size`` (any part of it)."""
    h, w = valid_size
    hs, ws = (h + mask_stride - 1) // mask_stride, (w + mask_stride - 1) // mask_stride
    return mask_logits[:, :hs, :ws].float()


def _above(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """``sigmoid(logits) > threshold`` as ``logits > log(t / (1 - t))`` for ``0 < t < 1``: the
    same test (the sigmoid is increasing) without a pass of exponentials over every pixel."""
    if 0.0 < threshold < 1.0:
        return logits > math.log(threshold / (1.0 - threshold))
    return logits.sigmoid() > threshold


class OnlineTracker:
    """Runs a model over one video, frame by frame, and collects video-level tracks."""

    def __init__(self, model: InferenceModel, config: TrackerConfig | None = None) -> None:
        self.model = model
        self.cfg = config or TrackerConfig()
        self.track_state_keys: tuple[str, ...] = tuple(getattr(model, "track_state_keys", ()))
        self.reset()

    def reset(self) -> None:
        self.live: list[Track] = []  # matched last frame or in memory (age <= max_age)
        self.finished: list[Track] = []
        self.state: Any = None
        self.next_id = 1
        self.frame_index = 0
        # backfill_frames > 0: the detections no track took in each of the last frames.
        self.untaken: list[dict[str, Any]] = []

    def references(self) -> dict[str, torch.Tensor] | None:
        """Every live track as a reference node (stored node features at its last centre).

        A matched track's stored features are ROIAlign of frame t-1 over its box, i.e. what
        the model would compute for an active track; tracks lost earlier keep older features
        and re-inject their kernels into theta_{t-1} (the paper's memory, 3.6).
        """
        if not self.live:
            return None
        lost = [t for t in self.live if t.age > 0 and t.kernel is not None]
        refs = {
            "memory_nodes": torch.stack([t.node_feats for t in self.live]),  # [R, L, D]
            "memory_centers": torch.stack([t.center for t in self.live]),  # [R, 2]
            "memory_boxes": torch.stack([t.box for t in self.live]),  # [R, 4]
            "memory_labels": torch.tensor([t.label for t in self.live], dtype=torch.long),
        }
        for key in self.track_state_keys:
            refs[f"memory_{key}"] = torch.stack([t.extra[key] for t in self.live])
        if lost:
            refs["memory_kernels"] = torch.stack([t.kernel for t in lost])  # [K, P]
            refs["memory_levels"] = torch.tensor([t.level for t in lost], dtype=torch.long)
            refs["memory_cells"] = torch.stack([t.cell for t in lost])  # [K, 2]
        return refs

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
        # The frame in [0, 1], the guide of the masks' refinement (refine_radius > 0).
        guide = denormalize(image[0].float()) if self.cfg.refine_radius > 0 else None
        refs = self.references()
        if refs is not None:
            refs = {k: v.to(image.device) for k, v in refs.items()}
        # Detections under score_threshold are discarded below: the model skips their masks.
        out, self.state = self.model.inference_step(
            image, self.state, refs, image_size=valid_size, min_score=self.cfg.score_threshold
        )
        timer = getattr(self.model, "timer", NULL_TIMER)
        with timer.stage("association"):
            scores = out["scores"]
            # Detections, highest score first (stable); those >= score_threshold are a prefix.
            order = torch.argsort(scores, descending=True, stable=True)
            n_refs = len(self.live)
            # One device -> host transfer per frame: scores, labels, levels, edge scores and,
            # for soft class votes, the class probabilities.
            rows = [scores[order], out["labels"][order], out["levels"][order]]
            if n_refs:
                rows += list(out["edge_scores"][:n_refs, order])
            soft = self.cfg.class_votes == "soft" and "class_scores" in out
            if soft:
                rows += list(out["class_scores"][order].T)
            host = torch.stack([r.to(torch.float64) for r in rows]).cpu()  # [3 + R (+ C), Dn]
            host_scores, host_labels, host_levels = host[0], host[1].long(), host[2].long()
            k = int((host_scores >= self.cfg.score_threshold).sum())
            idx = order[:k]  # kept detections (device), highest score first
            # kept detection -> live track or None
            assigned = self._associate(host[3 : 3 + n_refs, :k])
            if soft:  # each kept detection's vote: its class probabilities, normalised
                probs = host[3 + n_refs :, :k].T  # [k, C]
                votes = probs / probs.sum(1, keepdim=True).clamp(min=1e-12)
        stride = getattr(self.model, "mask_stride", 4)
        kernels = out.get("kernels")
        boxes, cells = out["boxes"][idx], out["cells"][idx]
        node_features = out["node_features"][idx]
        t = self.frame_index
        matched: set[int] = set()
        used: list[tuple[int, Track, float, int]] = []  # (kept position, track, score, label)
        born: list[tuple[int, Track]] = []  # (kept position, track) of the tracks started here
        for j in range(k):
            score, label = float(host_scores[j]), int(host_labels[j])
            box = boxes[j]
            ref = assigned[j]
            if ref is not None:
                track = self.live[ref]
                matched.add(ref)
            elif score >= self.cfg.new_track_threshold:
                track = Track(self.next_id, label, node_features[j], box, box)
                self.next_id += 1
                self.live.append(track)
                matched.add(len(self.live) - 1)
                born.append((j, track))
            else:
                continue
            # The track's summary becomes this detection's (its reference node next frame).
            det = idx[j]
            track.node_feats, track.box, track.age = node_features[j], box, 0
            track.center = (box[:2] + box[2:]) / 2
            track.level, track.cell = int(host_levels[j]), cells[j]
            track.kernel = kernels[det] if kernels is not None else None
            track.extra = {key: out[key][det] for key in self.track_state_keys}
            used.append((j, track, score, label))
            if soft:
                vote = votes[j] * score
                track.soft_votes = vote if track.soft_votes is None else track.soft_votes + vote
        with timer.stage("rle"):
            # Only the masks that end up in a track are upsampled and encoded.
            sel = idx[torch.tensor([j for j, *_ in used], dtype=torch.long, device=idx.device)]
            masks = out["masks"][sel]
            rles, quality = self._encode(masks, valid_size, orig_size, stride, guide)
        results = []
        for (_, track, score, label), rle, q in zip(used, rles, quality):
            track.frames[t] = (rle, score, label)
            track.maskness[t] = q
            results.append((track.id, label, score, rle))
        if self.cfg.backfill_frames:
            # Binary masks of the kept detections (on the logits' grid), for the overlaps.
            kept_logits = out["masks"][idx]
            kept_fg = _above(_valid_cells(kept_logits, valid_size, stride), self.cfg.mask_threshold)
            self._backfill(kept_fg, born, valid_size, orig_size, stride)
            untaken = sorted(set(range(k)) - {j for j, *_ in used})
            self.untaken.append(
                {
                    "logits": kept_logits[untaken],
                    "fg": kept_fg[untaken],
                    "scores": [float(host_scores[j]) for j in untaken],
                    "labels": [int(host_labels[j]) for j in untaken],
                    "votes": votes[untaken] if soft else None,
                    "guide": guide,
                    "free": [True] * len(untaken),
                }
            )
            del self.untaken[: -self.cfg.backfill_frames]

        still_live = []
        for i, track in enumerate(self.live):
            if i not in matched:
                track.age += 1
            (still_live if track.age <= self.cfg.max_age else self.finished).append(track)
        self.live = still_live
        self.frame_index += 1
        return results

    def _backfill(
        self,
        kept_fg: torch.Tensor,
        born: list[tuple[int, Track]],
        valid_size: tuple[int, int],
        orig_size: tuple[int, int],
        stride: int,
    ) -> None:
        """Extend the tracks started this frame (``born``: kept position, track) back through
        the remembered untaken detections of the frames before, the latest first
        (:class:`TrackerConfig` ``backfill_frames``, ``backfill_iou``); ``kept_fg`` holds the
        binary masks of this frame's kept detections."""
        for j, track in born:
            fg = kept_fg[j]
            # self.untaken holds one entry per frame, the last for the frame before this one.
            for back, frame in enumerate(reversed(self.untaken), start=1):
                if not any(frame["free"]):
                    break
                inter = (frame["fg"] & fg).sum((1, 2)).float()
                union = (frame["fg"] | fg).sum((1, 2)).float().clamp(min=1)
                iou = torch.where(
                    torch.tensor(frame["free"], device=inter.device), inter / union, -1.0
                )
                best = int(torch.argmax(iou))
                if float(iou[best]) < self.cfg.backfill_iou:
                    break
                frame["free"][best] = False
                t = self.frame_index - back
                logits = frame["logits"][best][None]
                (rle,), (q,) = self._encode(logits, valid_size, orig_size, stride, frame["guide"])
                score, label = frame["scores"][best], frame["labels"][best]
                track.frames[t] = (rle, score, label)
                track.maskness[t] = q
                if frame["votes"] is not None:
                    track.soft_votes = track.soft_votes + frame["votes"][best] * score
                fg = frame["fg"][best]

    def _encode(
        self,
        mask_logits: torch.Tensor,
        valid_size: tuple[int, int],
        orig_size: tuple[int, int],
        stride: int,
        guide: torch.Tensor | None,
    ) -> tuple[list[dict], list[float]]:
        """The masks' RLEs (:func:`encode_masks` with this tracker's threshold and refinement)
        and their maskness (1.0 each with ``maskness_power`` 0, which does not read it)."""
        cfg = self.cfg
        rles = encode_masks(
            mask_logits, valid_size, orig_size, stride, cfg.mask_threshold,
            guide, cfg.refine_radius, cfg.refine_eps,
        )  # fmt: skip
        if cfg.maskness_power > 0:
            quality = maskness(mask_logits, valid_size, stride, cfg.mask_threshold).tolist()
        else:
            quality = [1.0] * len(rles)
        return rles, quality

    def _associate(self, edge_scores: torch.Tensor) -> list[int | None]:
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
        powers = self.cfg.coverage_power, self.cfg.maskness_power
        return [tr.video_result(length, *powers) for tr in tracks if tr.frames]

    def run(self, video) -> list[dict[str, Any]]:
        """Track a whole :class:`~visstg.data.datamodule.VideoSample`; returns video results."""
        self.reset()
        params = getattr(self.model, "parameters", None)
        first = next(iter(params()), None) if params else None
        device = first.device if first is not None else torch.device("cpu")
        for _, image, size, _ in video.frames():
            self.step(image.to(device), size, video.orig_size)
        return self.video_results(video.length)
