"""Tracker logic with a scripted stand-in for the model's inference step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from visstg.tracker import OnlineTracker, TrackerConfig, encode_masks, maskness

H, W = 32, 48  # input == original size in these tests; masks at stride 4 -> 8 x 12


class ScriptedModel:
    """Returns scripted detections; a detection's node feature is the one-hot of its true object,
    and an edge scores 0.9 exactly when the reference's feature matches (a perfect edge classifier
    for the objects it knows) and the classes agree."""

    def __init__(self, script: list[list[tuple[int, int, float, tuple]]], n_objects: int = 8):
        self.script, self.n = script, n_objects
        self.t = 0
        self.seen_refs: list[int] = []
        self.seen_lost_kernels: list[int] = []
        self.class_agnostic = False  # edges across classes too (edge_class_agnostic)
        self.class_scores: list[list[list[float]]] | None = None  # per frame, per detection

    def inference_step(self, image, state=None, references=None, image_size=None, min_score=0):
        dets = self.script[self.t]
        self.t += 1
        refs = references or {}
        ref_feats = refs.get("memory_nodes", torch.zeros((0, 1, self.n)))
        ref_labels = refs.get("memory_labels", torch.zeros((0,), dtype=torch.long))
        self.seen_refs.append(len(ref_labels))
        self.seen_lost_kernels.append(len(refs.get("memory_kernels", [])))
        d = len(dets)
        boxes = torch.tensor([b for _, _, _, b in dets], dtype=torch.float).reshape(d, 4)
        feats = torch.zeros((d, 1, self.n))
        for j, (obj, _, _, _) in enumerate(dets):
            feats[j, 0, obj] = 1.0
        logits = torch.full((d, H // 4, W // 4), -10.0)
        for j, (x0, y0, x1, y1) in enumerate(boxes.div(4).long().tolist()):
            logits[j, y0:y1, x0:x1] = 10.0
        labels = torch.tensor([lab for _, lab, _, _ in dets], dtype=torch.long)
        same_obj = ref_feats[:, 0] @ feats[:, 0].T  # [R, D]
        same_cls = ref_labels[:, None] == labels[None]
        if self.class_agnostic:
            same_cls = torch.ones_like(same_cls)
        out = {
            "boxes": boxes,
            "scores": torch.tensor([s for _, _, s, _ in dets]),
            "labels": labels,
            "levels": torch.zeros(d, dtype=torch.long),
            "cells": boxes[:, :2].flip(1).div(8).long(),
            "masks": logits,
            "node_features": feats,
            "kernels": torch.zeros((d, 169)),
            "edge_scores": 0.9 * same_obj * same_cls,
        }
        if self.class_scores is not None:
            out["class_scores"] = torch.tensor(self.class_scores[self.t - 1]).reshape(d, -1)
        return out, state


def run(script, **cfg) -> tuple[OnlineTracker, list]:
    tracker = OnlineTracker(ScriptedModel(script), TrackerConfig(**cfg))
    per_frame = [tracker.step(torch.zeros(3, H, W), (H, W), (H, W)) for _ in script]
    return tracker, per_frame


BOX_A, BOX_B = (4, 4, 16, 16), (24, 8, 40, 24)


def test_id_survives_occlusion_shorter_than_max_age() -> None:
    # object 0 visible, hidden for 3 frames, visible again; object 1 always visible
    script = [[(0, 1, 0.9, BOX_A), (1, 1, 0.8, BOX_B)]] * 2 + [[(1, 1, 0.8, BOX_B)]] * 3
    script += [[(0, 1, 0.9, BOX_A), (1, 1, 0.8, BOX_B)]]
    tracker, frames = run(script, max_age=7)
    ids_a = {tid for f in frames for tid, _, s, _ in f if s == pytest.approx(0.9)}
    assert ids_a == {1}  # re-identified from memory
    assert tracker.model.seen_refs == [0, 2, 2, 2, 2, 2]  # the lost track stays a reference
    assert tracker.model.seen_lost_kernels == [0, 0, 0, 1, 1, 1]  # and re-injects its kernel


def test_new_id_after_max_age() -> None:
    script = [[(0, 1, 0.9, BOX_A)]] + [[]] * 3 + [[(0, 1, 0.9, BOX_A)]]
    tracker, frames = run(script, max_age=2)
    assert frames[0][0][0] == 1 and frames[-1][0][0] == 2  # memory expired: a new track
    # unmatched in frames 1-3: a reference in frames 1, 2 and 3 (age <= 2 before each), gone in 4
    assert tracker.model.seen_refs == [0, 1, 1, 1, 0]
    assert len(tracker.video_results(len(script))) == 2


@pytest.mark.parametrize(("hidden", "same_id"), [(3, True), (4, False)])
def test_max_age_boundary(hidden: int, same_id: bool) -> None:
    script = [[(0, 1, 0.9, BOX_A)]] + [[]] * hidden + [[(0, 1, 0.9, BOX_A)]]
    _, frames = run(script, max_age=3)
    assert (frames[-1][0][0] == 1) is same_id


def test_never_two_detections_on_one_track() -> None:
    # two detections of the same object in frame 1 (a duplicate): only the higher one continues
    script = [[(0, 1, 0.9, BOX_A)], [(0, 1, 0.6, BOX_B), (0, 1, 0.7, BOX_A)]]
    _, frames = run(script)
    ids = [tid for tid, _, _, _ in frames[1]]
    assert len(ids) == len(set(ids)) == 2
    by_score = {round(s, 3): tid for tid, _, s, _ in frames[1]}
    assert by_score[0.7] == 1 and by_score[0.6] == 2


def test_model_declared_track_state_is_carried() -> None:
    class WithEmbeddings(ScriptedModel):
        track_state_keys = ("embeddings",)

        def inference_step(self, image, state=None, references=None, image_size=None, min_score=0):
            self.got = (references or {}).get("memory_embeddings")
            self.got_boxes = (references or {}).get("memory_boxes")
            out, state = super().inference_step(image, state, references, image_size)
            out["embeddings"] = out["boxes"][:, :2] * 10  # any per-detection tensor
            return out, state

    model = WithEmbeddings([[(0, 1, 0.9, BOX_A)], [(0, 1, 0.9, BOX_B)], []])
    tracker = OnlineTracker(model, TrackerConfig())
    for _ in range(3):
        tracker.step(torch.zeros(3, H, W), (H, W), (H, W))
    # frame 2 received the state of frame 1's detection (BOX_B), the track's latest
    assert model.got.tolist() == [[240.0, 80.0]] and model.got_boxes.tolist() == [list(BOX_B)]


def test_class_change_is_not_associated_and_low_scores_are_dropped() -> None:
    script = [[(0, 1, 0.9, BOX_A)], [(0, 2, 0.9, BOX_A), (2, 1, 0.05, BOX_B)]]
    _, frames = run(script, score_threshold=0.1)
    assert [tid for tid, _, _, _ in frames[1]] == [2]


def test_video_results_vote_category_and_average_score() -> None:
    script = [[(0, 1, 0.9, BOX_A)], [(0, 1, 0.5, BOX_A)], [], [(0, 1, 0.7, BOX_A)]]
    tracker, _ = run(script)
    (res,) = tracker.video_results(len(script))
    assert res["label"] == 1 and res["score"] == pytest.approx((0.9 + 0.5 + 0.7) / 3)
    segs = res["segmentations"]
    assert segs[2] is None and all(s is not None for i, s in enumerate(segs) if i != 2)
    m = mask_utils.decode({"size": segs[0]["size"], "counts": segs[0]["counts"].encode()})
    np.testing.assert_array_equal(np.argwhere(m).min(0), [4, 4])
    np.testing.assert_array_equal(np.argwhere(m).max(0), [15, 15])
    # bilinear upsampling of the logits trims the four box corners: 144 - 4 pixels
    assert m.sum() == 12 * 12 - 4


def test_soft_class_votes_spread_each_frame_score_over_its_class_probabilities() -> None:
    """One object detected as class 1 twice by a hair (0.40 against 0.39 for class 2) and once
    clearly as class 2 (0.60 against 0.10): the hard vote gives class 1 (0.8 against 0.6), the
    soft vote class 2, each frame's score split in proportion to its class probabilities."""
    frames = [(1, 0.40, [0.0, 0.40, 0.39]), (1, 0.40, [0.0, 0.40, 0.39]), (2, 0.6, [0, 0.1, 0.6])]
    script = [[(0, label, score, BOX_A)] for label, score, _ in frames]
    labels = {}
    for votes in ("hard", "soft"):
        model = ScriptedModel(script)
        model.class_agnostic = True
        model.class_scores = [[probs] for _, _, probs in frames]
        tracker = OnlineTracker(model, TrackerConfig(class_votes=votes))
        for _ in script:
            tracker.step(torch.zeros(3, H, W), (H, W), (H, W))
        (res,) = tracker.video_results(len(script))
        labels[votes] = res["label"]
        if votes == "soft":
            one = 0.40 / 0.79 * 0.40
            want = [0.0, 2 * one + 0.1 / 0.7 * 0.6, 2 * (0.40 - one) + 0.6 / 0.7 * 0.6]
            np.testing.assert_allclose(tracker.live[0].soft_votes, want)
    assert labels == {"hard": 1, "soft": 2}
    # A model without class_scores: the soft vote is the hard one.
    tracker, _ = run(script, class_votes="soft")
    assert [r["label"] for r in tracker.video_results(len(script))] == [1, 2]
    with pytest.raises(ValueError, match="class_votes"):
        TrackerConfig(class_votes="majority")


def test_video_score_weighted_by_coverage() -> None:
    """coverage_power ranks a short track below a whole one of the same frame scores."""
    script = [
        [(0, 1, 0.9, BOX_A)],
        [(0, 1, 0.5, BOX_A), (2, 3, 0.7, BOX_B)],
        [],
        [(0, 1, 0.7, BOX_A)],
    ]
    tracker, _ = run(script, coverage_power=0.5)
    long, short = tracker.video_results(len(script))
    assert long["score"] == pytest.approx((0.9 + 0.5 + 0.7) / 3 * (3 / 4) ** 0.5)
    assert short["score"] == pytest.approx(0.7 * (1 / 4) ** 0.5)
    tracker, _ = run(script)  # coverage_power 0: the plain means, the short track first
    assert [r["score"] for r in tracker.video_results(len(script))] == pytest.approx([0.7, 0.7])


def test_maskness_is_the_mean_probability_of_the_mask_pixels() -> None:
    logits = torch.full((3, 8, 12), -10.0)
    logits[0, 1:3, 1:3] = torch.logit(torch.tensor(0.8))  # four cells at 0.8
    logits[0, 4, 4] = torch.logit(torch.tensor(0.6))  # and one at 0.6
    logits[1, :, 10:] = 10.0  # only in the padding: outside the 32 x 36 valid region
    logits[2, 0, 0] = torch.logit(torch.tensor(0.3))  # under the threshold: no mask at all
    got = maskness(logits, valid_size=(32, 36), mask_stride=4, threshold=0.5)
    assert got.tolist() == pytest.approx([(4 * 0.8 + 0.6) / 5, 0.0, 0.0])


def test_video_score_weighted_by_maskness() -> None:
    """maskness_power ranks a track whose masks the model is unsure of below one of the same
    detection scores with confident masks; the detections' own scores are unchanged."""

    class UnsureOfB(ScriptedModel):
        def inference_step(self, image, state=None, references=None, image_size=None, min_score=0):
            out, state = super().inference_step(image, state, references, image_size)
            unsure = out["node_features"][:, 0, 1] > 0  # object 1's masks: probability 0.6
            out["masks"][unsure] = out["masks"][unsure].clamp(
                max=float(torch.logit(torch.tensor(0.6)))
            )
            return out, state  # fmt: skip

    script = [[(0, 1, 0.8, BOX_A), (1, 2, 0.8, BOX_B)]] * 3
    tracker = OnlineTracker(UnsureOfB(script), TrackerConfig(maskness_power=3.0))
    frames = [tracker.step(torch.zeros(3, H, W), (H, W), (H, W)) for _ in script]
    assert [s for f in frames for _, _, s, _ in f] == pytest.approx([0.8] * 6)
    sure, unsure = tracker.video_results(len(script))
    assert sure["score"] == pytest.approx(0.8 * torch.sigmoid(torch.tensor(10.0)).item() ** 3)
    assert unsure["score"] == pytest.approx(0.8 * 0.6**3)
    tracker, _ = run(script)  # maskness_power 0: the detection scores alone
    assert [r["score"] for r in tracker.video_results(len(script))] == pytest.approx([0.8, 0.8])
    with pytest.raises(ValueError, match="maskness_power"):
        TrackerConfig(maskness_power=-1.0)


def test_encode_masks_maps_back_to_original_resolution() -> None:
    logits = torch.full((1, 8, 12), -10.0)
    logits[0, 2:4, 3:6] = 10.0  # stride 4 -> rows 8..16, cols 12..24 of a 32x48 input
    (r,) = encode_masks(logits, valid_size=(32, 48), orig_size=(64, 96))
    m = mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()})
    assert m.shape == (64, 96)
    ys, xs = np.nonzero(m)
    assert abs(ys.min() - 16) <= 3 and abs(ys.max() - 31) <= 3
    assert abs(xs.min() - 24) <= 3 and abs(xs.max() - 47) <= 3


def test_results_reproducing_the_ground_truth_score_ap_one() -> None:
    """Scripted detections equal to the ground truth (with an occlusion gap shorter than dt)
    go through the tracker, the results writer and the evaluator: AP = AR = 1."""
    from conftest import box_mask, rle
    from visstg.eval import evaluate
    from visstg.inference import results_for_video

    class FullResolution(ScriptedModel):
        mask_stride = 1  # masks at input resolution: no resampling in encode_masks

        def inference_step(self, image, state=None, references=None, image_size=None, min_score=0):
            out, state = super().inference_step(image, state, references, image_size)
            out["masks"] = torch.stack(
                [torch.from_numpy(box_mask(*map(int, b), h=H, w=W)).float() * 20 - 10 for b in out["boxes"]]
            ) if len(out["boxes"]) else torch.zeros((0, H, W))  # fmt: skip
            return out, state

    length = 6
    boxes = {0: lambda t: (2 + 2 * t, 4, 12 + 2 * t, 14), 1: lambda t: (30, 2 + t, 44, 16 + t)}
    visible = {0: [t for t in range(length) if t not in (2, 3)], 1: list(range(length))}
    labels = {0: 0, 1: 1}  # contiguous labels; category ids 1 and 2
    script = [
        [(o, labels[o], 0.9 - 0.1 * o, boxes[o](t)) for o in (0, 1) if t in visible[o]]
        for t in range(length)
    ]
    gt = {
        "videos": [{"id": 7, "height": H, "width": W, "length": length, "file_names": [""] * length}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {
                "id": o + 1, "video_id": 7, "category_id": labels[o] + 1, "iscrowd": 0,
                "segmentations": [rle(box_mask(*boxes[o](t), h=H, w=W)) if t in visible[o] else None
                                  for t in range(length)],
                "areas": [int(box_mask(*boxes[o](t), h=H, w=W).sum()) if t in visible[o] else None
                          for t in range(length)],
            }
            for o in (0, 1)
        ],
    }  # fmt: skip
    tracker = OnlineTracker(FullResolution(script), TrackerConfig(max_age=3))
    for _ in range(length):
        tracker.step(torch.zeros(3, H, W), (H, W), (H, W))
    tracks = tracker.video_results(length)
    assert len(tracks) == 2  # the occluded object kept its id
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    metrics = evaluate(gt, results_for_video(tracks, 7, categories))
    for key in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert metrics[key] == pytest.approx(1.0), key


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_encoded_masks_threshold_the_mask_probability(threshold):
    """``encode_masks`` compares the logits with logit(threshold): the masks of
    ``sigmoid(logits) > threshold``, also at the thresholds 0 and 1."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 8) * 4
    logits[0, 0, :3] = torch.tensor([-200.0, 200.0, 0.0])  # saturated sigmoids and p = 0.5
    rles = encode_masks(logits, (24, 32), (24, 32), mask_stride=4, threshold=threshold)
    up = F.interpolate(logits[None], size=(24, 32), mode="bilinear")[0]
    want = (up.sigmoid() > threshold).numpy().astype(np.uint8)
    got = np.stack([mask_utils.decode(r) for r in rles])
    assert np.array_equal(got, want)


def _weak_then_confident():
    """Object 0 detected at 0.3 (under new_track_threshold) in frames 0-2, moving 4 px a frame,
    then at 0.9; a weak detection of object 1 elsewhere in frames 0-2 that never gets confident."""
    boxes = [(4 + 4 * t, 4, 16 + 4 * t, 16) for t in range(5)]
    script = [[(0, 1, 0.3, boxes[t]), (1, 1, 0.3, (32, 16, 44, 28))] for t in range(3)]
    script += [[(0, 1, 0.9, boxes[t])] for t in range(3, 5)]
    return script


def test_backfill_takes_back_the_weak_frames_before_a_track_starts() -> None:
    script = _weak_then_confident()
    cfg = dict(score_threshold=0.2, new_track_threshold=0.4)
    tracker, frames = run(script, **cfg)
    (only,) = tracker.video_results(len(script))
    assert [s is not None for s in only["segmentations"]] == [False] * 3 + [True] * 2
    assert only["score"] == pytest.approx(0.9)
    tracker, frames_bf = run(script, backfill_frames=5, **cfg)
    (only,) = tracker.video_results(len(script))
    # The object's weak frames join its track (not object 1's, whose mask is elsewhere).
    assert all(s is not None for s in only["segmentations"])
    assert only["score"] == pytest.approx((3 * 0.3 + 2 * 0.9) / 5)
    for t in range(3):
        m = mask_utils.decode(only["segmentations"][t]).astype(bool)
        assert m[6:14, 6 + 4 * t : 14 + 4 * t].all() and not m[:, 32:].any()
    # What step() returned frame by frame is the same online output.
    assert frames_bf == frames


def test_backfill_stops_at_its_frame_count_and_at_the_first_frame_without_overlap() -> None:
    script = _weak_then_confident()
    cfg = dict(score_threshold=0.2, new_track_threshold=0.4)
    tracker, _ = run(script, backfill_frames=2, **cfg)
    (only,) = tracker.video_results(len(script))
    assert [s is not None for s in only["segmentations"]] == [False] + [True] * 4
    # Frame 1's detection jumps away: the chain ends there, frame 0 is not reached either.
    script[1][0] = (0, 1, 0.3, (32, 0, 44, 12))
    tracker, _ = run(script, backfill_frames=5, **cfg)
    (only,) = tracker.video_results(len(script))
    assert [s is not None for s in only["segmentations"]] == [False] * 2 + [True] * 3
    # A detection a track took is not taken back: object 1 confident from frame 0 on.
    script = _weak_then_confident()
    for t in range(3):
        script[t][0] = (0, 1, 0.9, script[t][0][3])
    tracker, _ = run(script, backfill_frames=5, **cfg)
    assert len(tracker.video_results(len(script))) == 1


def test_backfill_options_are_checked() -> None:
    with pytest.raises(ValueError, match="backfill_frames"):
        TrackerConfig(backfill_frames=-1)
    with pytest.raises(ValueError, match="backfill_iou"):
        TrackerConfig(backfill_iou=0.0)


def _frames_with_squares(script) -> list[torch.Tensor]:
    """Normalised frames showing each scripted detection's object as a white square one pixel
    inside its box on black: the model's stride-4 masks (whole cells) overshoot it."""
    from visstg.data.transforms import normalize

    frames = []
    for dets in script:
        image = torch.zeros(3, H, W)
        for *_, (x0, y0, x1, y1) in dets:
            image[:, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = 1.0
        frames.append(normalize(image))
    return frames


def test_refined_masks_follow_the_frame_edges_also_in_backfilled_frames() -> None:
    script = _weak_then_confident()
    cfg = dict(score_threshold=0.2, new_track_threshold=0.4, backfill_frames=5)
    frames = _frames_with_squares(script)

    def track(**extra) -> dict:
        tracker = OnlineTracker(ScriptedModel(script), TrackerConfig(**cfg, **extra))
        for image in frames:
            tracker.step(image, (H, W), (H, W))
        return tracker.video_results(len(script))[0]

    plain, refined = track(), track(refine_radius=2, refine_eps=1e-3)
    for t in range(len(script)):
        x0, y0, x1, y1 = script[t][0][3]
        square = np.zeros((H, W), dtype=bool)
        square[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = True
        # Frames 0-2 are backfilled: refined with their own frame, not the one that started it.
        assert np.array_equal(mask_utils.decode(refined["segmentations"][t]).astype(bool), square)
        assert not np.array_equal(mask_utils.decode(plain["segmentations"][t]).astype(bool), square)


def test_refine_options_are_checked() -> None:
    with pytest.raises(ValueError, match="refine_radius"):
        TrackerConfig(refine_radius=-1)
    with pytest.raises(ValueError, match="refine_radius"):
        TrackerConfig(refine_radius=2.5)
    with pytest.raises(ValueError, match="refine_eps"):
        TrackerConfig(refine_eps=0.0)
