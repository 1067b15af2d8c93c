"""Edge classification labels and scores on a hand-built two-frame graph."""

import pytest
import torch
from torch_geometric.data import Data

from visstg.model.detection import Assignment
from visstg.model.losses import edge_loss
from visstg.model.tracking import (
    EdgeClassifier,
    edge_scores_for_detections,
    edge_training_targets,
    pixel_index,
)

SHAPES = [(4, 4), (2, 2)]
B = 2
OFFSETS = torch.tensor([0, B * 16, B * 16 + B * 4])
# Reference instances: m0 class 0 track 10, m1 class 0 track 11, m2 class 1 track 12 (image 0);
# m3 class 0 track 20 (image 1). One node per instance and level: node = 2 * m + level.
REF_LABELS = torch.tensor([0, 0, 1, 0])
REF_TRACKS = torch.tensor([10, 11, 12, 20])


def _pix(level, b, y, x):
    h, w = SHAPES[level]
    return int(OFFSETS[level]) + (b * h + y) * w + x


def _graph():
    # (reference node, pixel) for each edge, with the intended outcome for edge_training_targets
    edges = [
        (0, _pix(0, 0, 1, 1)),  # e0: m0 -> centre of t0 (class 0, track 10): label 1
        (2, _pix(0, 0, 1, 1)),  # e1: m1 -> centre of t0, same class, other track: label 0
        (4, _pix(0, 0, 1, 1)),  # e2: m2 -> centre of t0, other class: pruned
        (0, _pix(0, 0, 0, 0)),  # e3: m0 -> not a centre: pruned
        (1, _pix(1, 0, 0, 0)),  # e4: m0's P4 node -> a pixel of the wrong level: pruned
        (4, _pix(0, 0, 2, 2)),  # e5: m2 -> centre of t1 (class 1, new track 99): label 0
        (6, _pix(0, 1, 1, 1)),  # e6: m3 -> centre of t2 in image 1 (track 20): label 1
    ]
    edge_index = torch.tensor(edges).t().contiguous()
    num_pix = int(OFFSETS[-1])
    return Data(
        x_ref=torch.zeros(8, 4),
        x_pix=torch.zeros(num_pix, 4),
        edge_index=edge_index,
        edge_attr=torch.randn(edge_index.shape[1], 4),
        ref_instance=torch.arange(4).repeat_interleave(2),
        ref_level=torch.tensor([0, 1]).repeat(4),
        ref_batch=torch.tensor([0, 0, 0, 0, 0, 0, 1, 1]),
        level_offsets=OFFSETS,
        level_shapes=SHAPES,
        num_images=B,
    )


def _assignment(batch, level, cell, labels, track_ids):
    n = len(batch)
    a = Assignment.empty()
    a.batch = torch.tensor(batch)
    a.level = torch.tensor(level)
    a.cell = torch.tensor(cell).reshape(n, 2)
    a.labels = torch.tensor(labels)
    a.track_ids = torch.tensor(track_ids)
    a.instance = torch.arange(n)
    a.offset, a.size, a.centers = torch.zeros(n, 2), torch.zeros(n, 2), torch.zeros(n, 2)
    a.boxes = torch.zeros(n, 4)
    return a


TARGETS = _assignment(
    batch=[0, 0, 1], level=[0, 0, 0], cell=[[1, 1], [2, 2], [1, 1]],
    labels=[0, 1, 0], track_ids=[10, 99, 20],
)  # fmt: skip


def test_pixel_index_matches_layout():
    g = _graph()
    idx = pixel_index(g, None, torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]),
                      torch.tensor([[3, 2], [1, 0], [1, 1]]))  # fmt: skip
    assert idx.tolist() == [_pix(0, 1, 3, 2), _pix(1, 0, 1, 0), _pix(1, 1, 1, 1)]
    assert idx.tolist() == [16 + 14, 32 + 2, 32 + 4 + 3]
    same = pixel_index(
        OFFSETS, SHAPES, torch.tensor([1]), torch.tensor([1]), torch.tensor([[1, 1]])
    )
    assert same.tolist() == [39]
    with pytest.raises(ValueError, match="level_shapes"):
        pixel_index(OFFSETS, None, torch.tensor([0]), torch.tensor([0]), torch.tensor([[0, 0]]))


def test_edge_training_targets_hand_built():
    edge_ids, labels = edge_training_targets(_graph(), TARGETS, REF_LABELS, REF_TRACKS)
    assert edge_ids.tolist() == [0, 1, 5, 6]
    assert labels.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert labels.dtype == torch.float32


def test_edge_training_targets_class_agnostic_keeps_other_classes_as_negatives():
    edge_ids, labels = edge_training_targets(
        _graph(), TARGETS, REF_LABELS, REF_TRACKS, class_agnostic=True
    )
    assert edge_ids.tolist() == [0, 1, 2, 5, 6]  # e2 (m2, class 1 -> t0, class 0) now kept
    assert labels.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_edge_training_targets_shared_centre_last_instance_wins():
    tgt = _assignment([0, 0], [0, 0], [[1, 1], [1, 1]], [0, 0], [11, 10])
    edge_ids, labels = edge_training_targets(_graph(), tgt, REF_LABELS, REF_TRACKS)
    assert edge_ids.tolist() == [0, 1]
    assert labels.tolist() == [1.0, 0.0]  # the pixel belongs to the track-10 instance


def test_edge_training_targets_empty_and_loss_connected():
    g = _graph()
    edge_ids, labels = edge_training_targets(g, Assignment.empty(), REF_LABELS, REF_TRACKS)
    assert edge_ids.numel() == 0 and labels.numel() == 0
    clf = EdgeClassifier(dim=4, hidden=8)
    logits = clf(g.edge_attr)
    assert logits.shape == (7,)
    loss = edge_loss(logits[edge_ids], labels, all_logits=logits)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in clf.parameters())


def test_edge_loss_is_mean_bce():
    logits = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    expected = -(torch.log(p[0]) + torch.log(1 - p[1]) + torch.log(1 - p[2])) / 3
    torch.testing.assert_close(edge_loss(logits, labels), expected)


EDGE_LOGITS = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
# d0, d1 share the peak of t0 (classes 0 and 1); d2 at t1's peak; d3 on P4 at (0, 0);
# d4 in image 1; d5 at a pixel without edges.
DETECTIONS = dict(
    det_level=torch.tensor([0, 0, 0, 1, 0, 0]),
    det_batch=torch.tensor([0, 0, 0, 0, 1, 0]),
    det_cells=torch.tensor([[1, 1], [1, 1], [2, 2], [0, 0], [1, 1], [3, 3]]),
    det_labels=torch.tensor([0, 1, 1, 0, 0, 0]),
)


def test_edge_scores_for_detections_hand_built():
    g = _graph()
    logits = EDGE_LOGITS
    scores = edge_scores_for_detections(g, logits, **DETECTIONS, ref_labels=REF_LABELS, num_refs=4)
    s = torch.sigmoid(logits)
    expected = torch.zeros(4, 6)
    expected[0, 0] = s[0]  # e0
    expected[0, 3] = s[4]  # e4: m0's P4 node to d3's peak
    expected[1, 0] = s[1]  # e1
    expected[2, 1] = s[2]  # e2: class 1 matches d1, not d0
    expected[2, 2] = s[5]  # e5
    expected[3, 4] = s[6]  # e6
    torch.testing.assert_close(scores, expected)


def test_edge_scores_for_detections_class_agnostic():
    scores = edge_scores_for_detections(
        _graph(), EDGE_LOGITS, **DETECTIONS, ref_labels=REF_LABELS, num_refs=4,
        class_agnostic=True,
    )  # fmt: skip
    s = torch.sigmoid(EDGE_LOGITS)
    expected = torch.zeros(4, 6)
    expected[0, :2] = s[0]  # e0 reaches both detections at t0's peak, whatever their class
    expected[1, :2] = s[1]  # e1
    expected[2, :2] = s[2]  # e2: m2 (class 1) now scores d0 (class 0) too
    expected[0, 3] = s[4]  # e4
    expected[2, 2] = s[5]  # e5
    expected[3, 4] = s[6]  # e6
    torch.testing.assert_close(scores, expected)


def test_edge_scores_without_detections_or_refs():
    g = _graph()
    empty = torch.zeros(0, dtype=torch.long)
    scores = edge_scores_for_detections(g, torch.zeros(7), empty, empty, torch.zeros(0, 2).long(),
                                        empty, REF_LABELS, 4)  # fmt: skip
    assert scores.shape == (4, 0)
