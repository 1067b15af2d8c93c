"""CenterNet encode/decode, heatmap targets and losses (visstg.model.detection)."""

import math

import pytest
import torch
import torch.nn.functional as F

from visstg.model.detection import (
    Assignment,
    CenterNetHead,
    assign_targets,
    centernet_loss,
    decode_detections,
    gather_at_cells,
    gaussian_radius,
    heatmap_targets,
    neighbour_cells,
)
from visstg.model.losses import centernet_focal_loss

# A 128x128 frame with four levels and small size ranges so boxes of every level fit.
H = W = 128
STRIDES = (8, 16, 32, 64)
RANGES = ((0, 16), (16, 32), (32, 64), (64, math.inf))
SHAPES = [(H // s, W // s) for s in STRIDES]
C = 3


def _target(boxes, labels, track_ids=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = boxes.shape[0]
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels, dtype=torch.long).reshape(n),
        "track_ids": torch.tensor(track_ids or list(range(100, 100 + n))).reshape(n),
        "masks": torch.zeros(n, H, W, dtype=torch.bool),
    }


FRAME = _target(
    [
        [10.0, 12.0, 20.0, 21.0],  # 10 px -> P3
        [60.0, 8.0, 84.5, 30.0],  # 24.5 px -> P4
        [4.0, 60.0, 50.0, 100.0],  # 46 px -> P5
        [40.0, 40.0, 127.0, 120.0],  # 87 px -> P6
        [100.0, 100.0, 112.0, 110.0],  # 12 px -> P3, other class
    ],
    [0, 1, 2, 0, 2],
)


def _perfect_prediction(assignment: Assignment, batch_size: int):
    """Head output whose decoding must reproduce the encoded targets."""
    heat = heatmap_targets(assignment, SHAPES, batch_size, C, STRIDES)
    pred = {"heatmap": [], "size": [], "offset": []}
    for lvl, (h, w) in enumerate(SHAPES):
        pred["heatmap"].append(20 * heat[lvl] - 10)  # peaks -> sigmoid(10), background -> ~0
        size = torch.zeros(batch_size, 2, h, w)
        offset = torch.zeros(batch_size, 2, h, w)
        sel = assignment.level == lvl
        b, y, x = assignment.batch[sel], assignment.cell[sel, 0], assignment.cell[sel, 1]
        size[b, :, y, x] = assignment.size[sel]
        offset[b, :, y, x] = assignment.offset[sel]
        pred["size"].append(size)
        pred["offset"].append(offset)
    return pred, heat


def test_assign_targets_levels_cells_and_units():
    a = assign_targets([FRAME], SHAPES, STRIDES, RANGES)
    assert len(a) == 5
    assert a.level.tolist() == [0, 1, 2, 3, 0]
    assert a.instance.tolist() == [0, 1, 2, 3, 4]
    # box 1: centre (72.25, 19), stride 16 -> cell (y=1, x=4), offset (0.515625, 0.1875)
    assert a.cell[1].tolist() == [1, 4]
    torch.testing.assert_close(a.offset[1], torch.tensor([72.25 / 16 - 4, 19 / 16 - 1]))
    torch.testing.assert_close(a.size[1], torch.tensor([math.log(24.5 / 16), math.log(22 / 16)]))
    torch.testing.assert_close(a.centers[3], torch.tensor([83.5, 80.0]))


def test_encode_then_decode_recovers_boxes_and_classes():
    empty = _target([], [])
    a = assign_targets([FRAME, empty], SHAPES, STRIDES, RANGES)
    pred, _ = _perfect_prediction(a, 2)
    dets = decode_detections(pred, STRIDES, torch.tensor([[H, W], [H, W]]))
    assert len(dets) == 2
    got, empty_dets = dets
    assert empty_dets["boxes"].shape == (0, 4)
    assert got["boxes"].shape == (5, 4)
    # match by class and box: order of decoding is by score (all equal), so sort both
    exp_boxes = FRAME["boxes"]
    for i in range(5):
        j = torch.cdist(got["boxes"], exp_boxes[i : i + 1]).argmin()
        torch.testing.assert_close(got["boxes"][j], exp_boxes[i], atol=1e-3, rtol=0)
        assert int(got["labels"][j]) == int(FRAME["labels"][i])
        assert int(got["levels"][j]) == int(a.level[i])
        assert got["cells"][j].tolist() == a.cell[i].tolist()
    assert (got["scores"] > 0.99).all()


def _one_object_of_two_classes(p0: float, p1: float):
    """One object whose centre cell has heatmap p0 for class 0 and p1 for class 1; returns the
    prediction, its level and (y, x) cell."""
    a = assign_targets([_target([[10.0, 10.0, 30.0, 30.0]], [0])], SHAPES, STRIDES, RANGES)
    pred, _ = _perfect_prediction(a, 1)
    lvl, (y, x) = int(a.level[0]), a.cell[0].tolist()
    heat = pred["heatmap"][lvl]
    heat[0, 0, y, x], heat[0, 1, y, x] = math.log(p0 / (1 - p0)), math.log(p1 / (1 - p1))
    return pred, lvl, (y, x)


def test_class_agnostic_nms_keeps_one_class_per_object():
    # one object, heatmap peaks for classes 0 (0.9) and 1 (0.6) at the same cell
    pred, *_ = _one_object_of_two_classes(0.9, 0.6)
    size = torch.tensor([[64, 100]])
    aware = decode_detections(pred, STRIDES, size)[0]
    assert aware["labels"].tolist() == [0, 1]  # per-class NMS: both classes stay
    agnostic = decode_detections(pred, STRIDES, size, class_agnostic=True)[0]
    assert agnostic["labels"].tolist() == [0]
    assert agnostic["scores"].tolist() == pytest.approx([0.9])
    # Every class's probability at the peak's cell (the tracker's soft class votes).
    n_classes = pred["heatmap"][0].shape[1]
    want = [0.9, 0.6] + [pytest.approx(0, abs=1e-3)] * (n_classes - 2)
    assert agnostic["class_scores"].tolist() == [pytest.approx(want)]
    assert aware["class_scores"].tolist() == [pytest.approx(want)] * 2
    # boxes that do not overlap are kept whatever their classes
    b = assign_targets([_target([[10.0, 10.0, 30.0, 30.0], [60, 30, 80, 50]], [0, 1])],
                       SHAPES, STRIDES, RANGES)  # fmt: skip
    pred, _ = _perfect_prediction(b, 1)
    agnostic = decode_detections(pred, STRIDES, size, class_agnostic=True)[0]
    assert sorted(agnostic["labels"].tolist()) == [0, 1]


def test_objectness_head_splits_its_heatmap_branch():
    head = CenterNetHead(5, in_channels=16, feat_channels=8, objectness=True)
    feats = [torch.randn(2, 16, 8, 6), torch.randn(2, 16, 4, 3)]
    out = head(feats)
    assert [t.shape for t in out["heatmap"]] == [(2, 5, 8, 6), (2, 5, 4, 3)]
    assert [t.shape for t in out["objectness"]] == [(2, 1, 8, 6), (2, 1, 4, 3)]
    raw = head.heatmap(feats[0])  # one conv output: classes first, the objectness channel last
    torch.testing.assert_close(out["objectness"][0], raw[:, 5:])
    torch.testing.assert_close(head.heatmap[-1].bias, torch.full((6,), -2.19))
    # inference runs the heatmap branch alone: the objectness comes with it
    assert sorted(head(feats, branches=("heatmap",))) == ["heatmap", "objectness"]
    assert "objectness" not in CenterNetHead(5, in_channels=16, feat_channels=8)(feats)


def test_objectness_loss_is_focal_loss_on_the_max_over_classes():
    a = assign_targets([FRAME], SHAPES, STRIDES, RANGES)
    pred, heat = _perfect_prediction(a, 1)
    assert "loss_objectness" not in centernet_loss(pred, a, heat)
    pred["objectness"] = [torch.zeros(1, 1, h, w) for h, w in SHAPES]  # p = 0.5 everywhere
    losses = centernet_loss(pred, a, heat)
    agnostic = [h.amax(1, keepdim=True) for h in heat]
    expected = sum(centernet_focal_loss(o, t) for o, t in zip(pred["objectness"], agnostic)) / 5
    assert float(losses["loss_objectness"]) == pytest.approx(float(expected))
    # every object is a positive of the class-agnostic map: as many 1s as objects
    assert sum(int(t.eq(1).sum()) for t in agnostic) == 5
    # an objectness map equal to its targets scores lower than a flat one
    pred["objectness"] = [20 * t - 10 for t in agnostic]
    assert float(centernet_loss(pred, a, heat)["loss_objectness"]) < float(expected)


def test_objectness_decoding_scores_objects_and_labels_them_by_class():
    # one object whose class the class maps split (0.30 / 0.35) while the objectness is 0.8
    pred, lvl, (y, x) = _one_object_of_two_classes(0.30, 0.35)
    pred["objectness"] = [torch.full((1, 1, h, w), -10.0) for h, w in SHAPES]
    pred["objectness"][lvl][0, 0, y, x] = math.log(0.8 / 0.2)
    size = torch.tensor([[64, 100]])
    dets = decode_detections(pred, STRIDES, size, score_thresh=0.05)[0]
    assert dets["labels"].tolist() == [1]  # the class of highest heatmap at the peak
    assert dets["scores"].tolist() == pytest.approx([0.8])  # the objectness, not 0.35
    assert dets["cells"].tolist() == [[y, x]]
    # without the objectness map the same class maps give two weak detections of one object
    del pred["objectness"]
    plain = decode_detections(pred, STRIDES, size, score_thresh=0.05)[0]
    assert plain["scores"].tolist() == pytest.approx([0.35, 0.30])


def test_neighbour_cells_keep_window_cells_on_the_map_and_in_the_box():
    a = assign_targets([FRAME], SHAPES, STRIDES, RANGES)
    rows, cells = neighbour_cells(a, SHAPES, STRIDES, radius=0)
    assert rows.tolist() == [0, 1, 2, 3, 4] and torch.equal(cells, a.cell)

    rows, cells = neighbour_cells(a, SHAPES, STRIDES, radius=1)
    # box 0 [10, 12, 20, 21] on P3: centre cell (y=2, x=1); cell centres 4/12/20 px in x and
    # 12/20/28 px in y, so the window keeps y, x in {1, 2}.
    got0 = sorted(map(tuple, cells[rows == 0].tolist()))
    assert a.cell[0].tolist() == [2, 1] and got0 == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for i in range(len(a)):  # every instance against the rule, cell by cell
        stride, (h, w) = STRIDES[int(a.level[i])], SHAPES[int(a.level[i])]
        x0, y0, x1, y1 = a.boxes[i].tolist()
        cy, cx = a.cell[i].tolist()
        want = {
            (y, x)
            for y in range(cy - 1, cy + 2)
            for x in range(cx - 1, cx + 2)
            if (y, x) == (cy, cx)
            or (
                0 <= y < h and 0 <= x < w
                and x0 <= (x + 0.5) * stride <= x1 and y0 <= (y + 0.5) * stride <= y1
            )
        }  # fmt: skip
        assert set(map(tuple, cells[rows == i].tolist())) == want
    assert rows.tolist() == sorted(rows.tolist())  # grouped by instance, in order


def test_decode_clips_to_valid_region_and_drops_padding_peaks():
    a = assign_targets([_target([[90.0, 10.0, 110.0, 20.0], [10, 10, 20, 20]], [0, 1])],
                       SHAPES, STRIDES, RANGES)  # fmt: skip
    pred, _ = _perfect_prediction(a, 1)
    # valid region 100 wide: the first box's centre (100, 15) falls in the padding -> dropped
    dets = decode_detections(pred, STRIDES, torch.tensor([[64, 100]]))[0]
    assert dets["labels"].tolist() == [1]
    dets = decode_detections(pred, STRIDES, torch.tensor([[64, 105]]))[0]
    assert sorted(dets["labels"].tolist()) == [0, 1]
    assert float(dets["boxes"][:, 2].max()) == pytest.approx(105.0)


def test_decode_min_score_keeps_equal_scores_and_score_thresh_drops_them():
    """``min_score`` is a tracker's threshold (``score >= t`` keeps a detection), so a peak
    scoring exactly ``min_score`` is decoded; ``score_thresh`` stays strict."""
    a = assign_targets([_target([[10.0, 10.0, 20.0, 20.0]], [1])], SHAPES, STRIDES, RANGES)
    pred, heat = _perfect_prediction(a, 1)
    # Logit 0 at the peak: score sigmoid(0) = 0.5 exactly; background sigmoid(-10).
    pred["heatmap"] = [10 * h - 10 for h in heat]
    sizes = torch.tensor([[H, W]])
    kept = decode_detections(pred, STRIDES, sizes, score_thresh=0.0, min_score=0.5)[0]
    assert kept["scores"].tolist() == [0.5] and kept["labels"].tolist() == [1]
    above = decode_detections(pred, STRIDES, sizes, score_thresh=0.0, min_score=0.5001)[0]
    assert above["scores"].numel() == 0
    strict = decode_detections(pred, STRIDES, sizes, score_thresh=0.5)[0]
    assert strict["scores"].numel() == 0


def test_heatmap_peak_is_one_and_radius_matches_hand_value():
    # 32x32 px box on P3 -> 4x4 cells. CenterNet's radius: the third case gives
    # (-11.2 + sqrt(11.2^2 + 4*2.8*4.8)) / 2 = 1.0934 -> r = 1, sigma = 3/6 = 0.5.
    r = gaussian_radius(torch.tensor(4.0), torch.tensor(4.0), 0.7)
    assert float(r) == pytest.approx((-11.2 + math.sqrt(11.2**2 + 4 * 2.8 * 4.8)) / 2, rel=1e-5)
    t = _target([[32.0, 32.0, 64.0, 64.0]], [1])
    a = assign_targets([t], SHAPES, STRIDES, ((0, 64), (64, 128), (128, 256), (256, math.inf)))
    heat = heatmap_targets(a, SHAPES, 1, C, STRIDES)[0]
    y, x = a.cell[0].tolist()
    assert (y, x) == (6, 6)
    assert float(heat[0, 1, y, x]) == 1.0
    assert float(heat.max()) == 1.0
    # radius 1: the 3x3 window is non-zero, beyond it zero; neighbour = exp(-1 / (2 * 0.25))
    torch.testing.assert_close(heat[0, 1, y, x + 1], torch.tensor(math.exp(-2.0)))
    torch.testing.assert_close(heat[0, 1, y + 1, x + 1], torch.tensor(math.exp(-4.0)))
    assert int((heat > 0).sum()) == 9
    assert float(heat[0, 0].abs().sum()) == 0.0 and float(heat[0, 2].abs().sum()) == 0.0


def test_focal_loss_hand_computed_1x1x2x2():
    logits = torch.tensor([[[[0.0, 1.0], [-1.0, 2.0]]]])
    heat = torch.tensor([[[[1.0, 0.5], [0.0, 0.8]]]])
    p = torch.sigmoid(logits)[0, 0]
    expected = (
        -((1 - p[0, 0]) ** 2) * torch.log(p[0, 0])
        - (0.5**4) * p[0, 1] ** 2 * torch.log(1 - p[0, 1])
        - 1.0 * p[1, 0] ** 2 * torch.log(1 - p[1, 0])
        - (0.2**4) * p[1, 1] ** 2 * torch.log(1 - p[1, 1])
    )
    # p[0,0] = 0.5: 0.25 * ln 2 = 0.1733; the rest hand-evaluated above
    torch.testing.assert_close(centernet_focal_loss(logits, heat), expected)
    assert float(expected) == pytest.approx(
        0.25 * math.log(2)
        + 0.0625 * 0.731059**2 * 1.313262
        + 0.268941**2 * 0.313262
        + 0.0016 * 0.880797**2 * 2.126928,
        rel=1e-4,
    )


def test_centernet_loss_normalisation_and_regression():
    a = assign_targets([FRAME], SHAPES, STRIDES, RANGES)
    pred, heat = _perfect_prediction(a, 1)
    losses = centernet_loss(pred, a, heat)
    assert float(losses["loss_size"]) == 0.0 and float(losses["loss_offset"]) == 0.0
    pred["size"] = [s + 1.0 for s in pred["size"]]
    pred["offset"] = [o - 0.5 for o in pred["offset"]]
    losses = centernet_loss(pred, a, heat, size_weight=0.1, offset_weight=2.0)
    assert float(losses["loss_size"]) == pytest.approx(0.1)
    assert float(losses["loss_offset"]) == pytest.approx(1.0)
    # doubling the number of objects with the same focal sum halves loss_center
    sums = sum(centernet_focal_loss(p, h) for p, h in zip(pred["heatmap"], heat))
    assert float(losses["loss_center"]) == pytest.approx(float(sums) / 5)


def test_losses_graph_connected_without_instances():
    head = CenterNetHead(C, in_channels=8, feat_channels=8)
    feats = [torch.randn(2, 8, h, w) for h, w in SHAPES]
    pred = head(feats)
    a = assign_targets([_target([], []), _target([], [])], SHAPES, STRIDES, RANGES)
    assert len(a) == 0
    heat = heatmap_targets(a, SHAPES, 2, C, STRIDES)
    assert all(float(h.sum()) == 0 for h in heat)
    losses = centernet_loss(pred, a, heat)
    total = sum(losses.values())
    assert torch.isfinite(total)
    assert losses["loss_size"].item() == 0.0 and losses["loss_offset"].item() == 0.0
    total.backward()
    for branch in (head.size, head.offset):
        assert all(
            p.grad is not None and float(p.grad.abs().sum()) == 0 for p in branch.parameters()
        )
    assert head.heatmap[-1].bias.grad is not None


def test_head_shapes_and_prior():
    head = CenterNetHead(5, in_channels=16, feat_channels=8, num_convs=3, norm=False)
    out = head([torch.randn(2, 16, 8, 6), torch.randn(2, 16, 4, 3)])
    assert [t.shape for t in out["heatmap"]] == [(2, 5, 8, 6), (2, 5, 4, 3)]
    assert [t.shape for t in out["size"]] == [(2, 2, 8, 6), (2, 2, 4, 3)]
    assert [t.shape for t in out["offset"]] == [(2, 2, 8, 6), (2, 2, 4, 3)]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head.heatmap) == 3
    torch.testing.assert_close(head.heatmap[-1].bias, torch.full((5,), -2.19))
    with pytest.raises(ValueError, match="num_convs"):
        CenterNetHead(5, num_convs=0)


def test_gather_at_cells_matches_indexing():
    maps = [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 2, 3)]
    batch = torch.tensor([1, 0, 1])
    level = torch.tensor([0, 1, 1])
    cell = torch.tensor([[3, 4], [1, 2], [0, 0]])
    out = gather_at_cells(maps, batch, level, cell)
    torch.testing.assert_close(out[0], maps[0][1, :, 3, 4])
    torch.testing.assert_close(out[1], maps[1][0, :, 1, 2])
    torch.testing.assert_close(out[2], maps[1][1, :, 0, 0])


def test_assign_targets_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="strides"):
        assign_targets([FRAME], SHAPES, STRIDES[:3], RANGES)


def test_decode_untrained_head_is_finite():
    head = CenterNetHead(C, in_channels=8, feat_channels=8)
    pred = head([torch.randn(1, 8, h, w) for h, w in SHAPES])
    pred["size"] = [s + 100 for s in pred["size"]]  # absurd sizes are clamped
    dets = decode_detections(pred, STRIDES, torch.tensor([[H, W]]), topk=7, score_thresh=0.0)
    assert dets[0]["boxes"].shape[0] <= 7
    assert torch.isfinite(dets[0]["boxes"]).all()
    assert F.relu(-dets[0]["boxes"]).sum() == 0


def test_min_radius_widens_small_objects_only():
    """``min_radius`` raises the radius of small boxes (CenterNet's rule gives a 16-px box on a
    stride-8 level radius 0: one non-zero cell) and leaves larger radii as they are."""
    t = _target([[8.0, 8.0, 24.0, 24.0], [56.0, 56.0, 120.0, 120.0]], [0, 1])
    a = assign_targets([t], SHAPES, STRIDES, ((0, math.inf),) + ((math.inf, math.inf),) * 3)
    plain = heatmap_targets(a, SHAPES, 1, C, STRIDES)[0][0]
    wide = heatmap_targets(a, SHAPES, 1, C, STRIDES, min_radius=1)[0][0]
    assert int((plain[0] > 0).sum()) == 1  # 2x2 cells: radius 0
    assert int((wide[0] > 0).sum()) == 9  # radius 1: the 3x3 window, sigma 0.5
    y, x = a.cell[0].tolist()
    assert float(wide[0, y, x]) == 1.0
    torch.testing.assert_close(wide[0, y, x + 1], torch.tensor(math.exp(-2.0)))
    torch.testing.assert_close(plain[1], wide[1])  # 8x8 cells: radius 2 either way
    assert int((plain[1] > 0).sum()) == 25
