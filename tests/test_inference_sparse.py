"""Inference evaluates heads only where they are read (visstg.model.sparse): the same detections,
masks, kernels and edge scores as running every head densely, on random weights."""

import math

import pytest
import torch
from torch import nn

from test_visstg import H, W, _one_thread, tiny_net  # noqa: F401 (autouse fixture)
from visstg.model.gnn import SpatialTemporalGNN
from visstg.model.propagation import KernelWarp
from visstg.model.segmentation import Controller, LazyKernelMaps
from visstg.model.sparse import tower_at_cells, tower_at_levels
from visstg.tracker import OnlineTracker, TrackerConfig


def tower(norm=False):
    layers = [nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True)]
    if norm:
        layers.append(nn.GroupNorm(2, 6))
    layers += [nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()), nn.Conv2d(6, 5, 1)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dense_fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_tower_at_cells_equals_the_dense_tower(norm, dense_fraction, layout):
    torch.manual_seed(0)
    net = tower(norm)
    x = torch.randn(1, 4, 9, 13).contiguous(memory_format=layout)  # fused maps: channels-last
    # Corners and edges exercise the zero padding; a repeated cell is allowed.
    cells = torch.tensor([[0, 0], [8, 12], [0, 12], [8, 0], [4, 6], [4, 7], [4, 6], [1, 11]])
    dense = net(x)[0, :, cells[:, 0], cells[:, 1]].t()  # [N, 5]
    if norm:  # GroupNorm is not local: the dense fallback
        got = tower_at_cells(list(net), x, cells)
    else:
        from visstg.model.sparse import local_layers, tower_on_mask

        mask = torch.zeros(9, 13, dtype=torch.bool)
        mask[cells[:, 0], cells[:, 1]] = True
        full = tower_on_mask(local_layers(list(net)), x, mask, dense_fraction)
        got = full[0, :, cells[:, 0], cells[:, 1]].t()
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)
    assert tower_at_cells(list(net), x, cells[:0]).shape == (0, 5)


def test_tower_at_levels_and_controller_at_cells():
    torch.manual_seed(1)
    ctrl = Controller(8, 169, 8)
    for p in ctrl.parameters():
        nn.init.normal_(p, std=0.2)
    feats = [torch.randn(1, 8, 12, 16), torch.randn(1, 8, 6, 8), torch.randn(1, 8, 3, 4)]
    level = torch.tensor([0, 2, 1, 0, 2])
    cells = torch.tensor([[11, 15], [0, 3], [5, 0], [3, 4], [2, 2]])
    dense = ctrl(feats)
    want = torch.stack([dense[lv][0, :, y, x] for lv, (y, x) in zip(level, cells.tolist())])
    torch.testing.assert_close(ctrl.at_cells(feats, level, cells), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        tower_at_levels([*ctrl.tower, ctrl.out], feats, level, cells), want, rtol=1e-5, atol=1e-6
    )
    lazy = LazyKernelMaps(ctrl, feats)
    assert len(lazy) == 3 and [m.shape for m in lazy] == [m.shape for m in dense]
    torch.testing.assert_close(lazy[-1], dense[-1])


@torch.no_grad()
def test_warp_reads_theta_only_on_the_sampled_cells():
    """Zeroing theta_k outside ``sampled_cells`` changes no warped kernel at the cells."""
    torch.manual_seed(2)
    warp = KernelWarp(8, 169, 8)
    for p in warp.parameters():
        nn.init.normal_(p, std=0.3)
    f_t, f_k = torch.randn(1, 8, 10, 14), torch.randn(1, 8, 10, 14)
    theta = torch.randn(1, 169, 10, 14)
    cells = torch.tensor([[0, 0], [9, 13], [5, 6], [2, 11]])
    want = warp([theta], [f_t], [f_k])[0][0, :, cells[:, 0], cells[:, 1]].t()  # [4, 169]
    off = warp.offsets_at(f_t, f_k, cells)  # [4, 18]
    assert off.abs().max() > 0.5  # the taps move by fractions of cells and more
    mask = warp.sampled_cells(off, cells, (10, 14))
    assert 0 < mask.sum() < mask.numel()
    batch = torch.zeros(4, dtype=torch.long)
    got = warp.warp_cells(theta * mask, off, batch, cells)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def random_net(**kwargs):
    """test_visstg's tiny network with every head weight random (the zero / identity inits
    replaced), so the warp offsets are fractional and every branch matters."""
    net = tiny_net(**kwargs)
    for name, p in net.named_parameters():
        if not name.startswith("backbone"):
            nn.init.normal_(p, std=0.5 / math.sqrt(max(p[0].numel(), 1)))
    return net.eval()


def frames(n=4):
    torch.manual_seed(3)
    base = torch.randn(3, H, W) * 0.3
    out = []
    for t in range(n):
        img = base.clone()
        img[:, 10 + 3 * t : 40 + 3 * t, 20:50] += 1.0
        img[:, 30:60, 60 - 2 * t : 90 - 2 * t] -= 1.0
        out.append(img[None])
    return out


def run_steps(net, sparse):
    """Four frames; frame 2 passes a memory entry with a stored kernel (a lost track)."""
    net.sparse_heads = sparse
    outs, state, refs = [], None, None
    for t, image in enumerate(frames()):
        out, state = net.inference_step(image, state, refs, image_size=(H, W))
        outs.append(out)
        m = min(3, out["scores"].numel())
        refs = {
            "boxes": out["boxes"][:m],
            "labels": out["labels"][:m],
            "memory_nodes": out["node_features"][m : m + 2],
            "memory_centers": out["boxes"][m : m + 2, :2],
            "memory_labels": out["labels"][m : m + 2],
        }
        if t == 1:
            refs.update(
                memory_kernels=out["kernels"][m : m + 2],
                memory_levels=out["levels"][m : m + 2],
                memory_cells=out["cells"][m : m + 2],
            )
    return outs, state


def assert_same_outputs(dense, sparse):
    for t, (a, b) in enumerate(zip(dense, sparse)):
        assert a.keys() == b.keys(), t
        for key in ("labels", "levels", "cells"):
            assert torch.equal(a[key], b[key]), (t, key)
        for key in ("scores", "boxes", "masks", "kernels", "node_features", "edge_scores"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=f"{t} {key}")


@pytest.mark.parametrize("combine", ["mean", "warp"])
def test_sparse_inference_equals_dense_inference(combine):
    net = random_net(topk=12, score_thresh=0.0, mask_combine=combine)
    dense, state_d = run_steps(net, False)
    sparse, state_s = run_steps(net, True)
    assert all(o["scores"].numel() >= 5 for o in dense)
    assert any((o["edge_scores"] > 0).any() for o in dense[1:])
    assert_same_outputs(dense, sparse)
    # The carried kernels are the same maps, computed when read.
    for a, b in zip(state_d["kernels"], state_s["kernels"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_sparse_heads_default_to_cpu_and_tracking_is_unchanged():
    net = random_net(topk=10, score_thresh=0.0)
    assert net.sparse_heads is None  # auto: sparse on CPU
    cfg = TrackerConfig(score_threshold=0.0, new_track_threshold=0.0, match_threshold=0.3)
    results = {}
    for sparse in (False, None):
        net.sparse_heads = sparse
        tracker = OnlineTracker(net, cfg)
        results[sparse] = [tracker.step(f, (H, W), (H, W)) for f in frames()]
    assert [[r[:2] for r in f] for f in results[False]] == [
        [r[:2] for r in f] for f in results[None]
    ]
    assert [[r[3] for r in f] for f in results[False]] == [[r[3] for r in f] for f in results[None]]


def three_reference_graph(centers: list[list[float]]):
    """Two levels of 8 channels, three references at ``centers`` (x, y), windows 5 and 3."""
    from visstg.model.graph import build_graph

    feats = [torch.randn(1, 8, 10, 12), torch.randn(1, 8, 5, 6)]
    graph = build_graph(
        torch.randn(3, 2, 8), torch.tensor(centers), torch.zeros(3, dtype=torch.long), feats,
        (8, 16), (5, 3),
    )  # fmt: skip
    return feats, graph


@torch.no_grad()
def test_tracker_threshold_skips_detections_without_changing_the_tracks():
    """The tracker passes its score_threshold as ``min_score``: the model computes masks, edge
    scores and node features for fewer detections, and the tracks are the same as when it
    decodes everything above its own lower ``score_thresh``."""
    net = random_net(topk=12, score_thresh=0.0)
    step = net.inference_step
    # The random heads score every peak ~0.62: a threshold inside that band keeps some.
    cfg = TrackerConfig(score_threshold=0.622, new_track_threshold=0.622, match_threshold=0.3)
    results, decoded = {}, {}
    for passed in (True, False):
        counts = []

        def spy(*args, min_score=0.0, passed=passed, counts=counts, **kwargs):
            out, state = step(*args, min_score=min_score if passed else 0.0, **kwargs)
            counts.append(out["scores"].numel())
            return out, state

        net.inference_step = spy
        tracker = OnlineTracker(net, cfg)
        results[passed] = [tracker.step(f, (H, W), (H, W)) for f in frames()]
        decoded[passed] = counts
    assert results[True] == results[False] and any(results[True])
    assert sum(decoded[True]) < sum(decoded[False])


@torch.no_grad()
def test_gnn_without_the_last_reference_update_gives_the_same_maps_and_edges():
    torch.manual_seed(4)
    gnn = SpatialTemporalGNN(8, 3)
    feats, graph = three_reference_graph([[20.0, 30.0], [60, 10], [80, 70]])
    full, lean = gnn(graph), gnn(graph, ref_features=False)
    assert graph.edge_index.shape[1] > 0
    for a, b in zip(full["maps"], lean["maps"]):
        assert torch.equal(a, b)
    assert torch.equal(full["edge_attr"], lean["edge_attr"])
    assert not torch.equal(full["x_ref"], lean["x_ref"])  # the skipped (unread) update


def test_gnn_on_the_pixels_with_an_edge_gives_the_same_outputs():
    """``compact=True`` (inference) runs the layers on the pixels that have an edge and writes
    them back: the same maps, edge and reference features; edgeless pixels keep their input."""
    from visstg.model.graph import build_graph

    torch.manual_seed(5)
    gnn = SpatialTemporalGNN(8, 2)
    # Overlapping windows: some pixels have edges to two references.
    feats, graph = three_reference_graph([[20.0, 30.0], [36, 30], [80, 70]])
    dst = graph.edge_index[1]
    assert dst.unique().numel() < dst.numel() and dst.unique().numel() < graph.x_pix.shape[0]
    full, compact = gnn(graph), gnn(graph, compact=True)
    for key in ("x_pix", "x_ref", "edge_attr"):
        torch.testing.assert_close(compact[key], full[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(full["maps"], compact["maps"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(graph.x_pix.shape[0], dtype=torch.bool)
    untouched[dst] = False
    assert torch.equal(compact["x_pix"][untouched], graph.x_pix[untouched])
    assert not torch.allclose(compact["x_pix"][~untouched], graph.x_pix[~untouched])
    empty = build_graph(
        torch.zeros(0, 2, 8), torch.zeros(0, 2), torch.zeros(0), feats, (8, 16), (5, 3)
    )
    for a, b in zip(gnn(empty, compact=True)["maps"], feats):
        assert torch.equal(a, b)


def test_edge_scores_from_a_classifier_of_some_edges_equal_the_full_logits():
    from visstg.model.tracking import edge_scores_for_detections

    net = random_net(topk=12, score_thresh=0.0)
    # Drive one frame with references, then compare both ways of scoring on its graph.
    net.sparse_heads = True
    out0, state = net.inference_step(frames()[0], None, None, image_size=(H, W))
    refs = {"boxes": out0["boxes"][:4], "labels": out0["labels"][:4]}
    captured = {}
    real_gnn = net.gnn.forward

    def gnn_spy(graph, **kwargs):
        result = real_gnn(graph, **kwargs)
        captured.update(graph=graph, edge_attr=result["edge_attr"])
        return result

    net.gnn.forward = gnn_spy
    out1, _ = net.inference_step(frames()[1], state, refs, image_size=(H, W))
    graph, attr = captured["graph"], captured["edge_attr"]
    args = (out1["levels"], torch.zeros_like(out1["levels"]), out1["cells"], out1["labels"])
    ref_labels = refs["labels"]  # the graph's reference instances
    full = edge_scores_for_detections(graph, net.edge_classifier(attr), *args, ref_labels, 4)
    some = edge_scores_for_detections(
        graph, lambda e: net.edge_classifier(attr[e]), *args, ref_labels, 4
    )
    assert (full > 0).any()
    torch.testing.assert_close(some, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out1["edge_scores"], full, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("sparse", [False, True])
def test_edge_class_agnostic_scores_detections_of_other_classes(sparse):
    """``edge_class_agnostic``: a reference's edges score detections of every class; the
    class-aware scores are the same edges masked to the reference's class."""
    scores = {}
    for agnostic in (False, True):
        net = random_net(topk=12, score_thresh=0.0, edge_class_agnostic=agnostic)
        net.sparse_heads = sparse
        out0, state = net.inference_step(frames()[0], None, None, image_size=(H, W))
        # Two references keep their detection's class, two take another one.
        labels = out0["labels"][:4].clone()
        labels[2:] = (labels[2:] + 1) % net.num_classes
        refs = {"boxes": out0["boxes"][:4], "labels": labels}
        out1, _ = net.inference_step(frames()[1], state, refs, image_size=(H, W))
        scores[agnostic] = out1["edge_scores"]  # [4, Dn]
    same = refs["labels"][:, None] == out1["labels"][None, :]
    assert same.any() and (~same).any() and (scores[True][~same] > 0).any()
    assert (scores[False][~same] == 0).all()
    torch.testing.assert_close(scores[False], torch.where(same, scores[True], 0.0))


@torch.no_grad()
def test_the_permuted_conv_weight_follows_weight_updates():
    """The tap-major weight kept on a conv between frames is rebuilt when the weight changes
    (an in-place update, a new tensor): results always match the dense conv."""
    torch.manual_seed(6)
    net = tower(False)
    x, cells = torch.randn(1, 4, 9, 13), torch.tensor([[0, 0], [4, 6], [8, 12]])
    for update in (None, "in_place", "replace"):
        conv = net[0]
        if update == "in_place":
            conv.weight.mul_(-2.0)
        elif update == "replace":
            conv.weight = nn.Parameter(torch.randn_like(conv.weight))
        dense = net(x)[0, :, cells[:, 0], cells[:, 1]].t()
        torch.testing.assert_close(tower_at_cells(list(net), x, cells), dense, rtol=1e-5, atol=1e-6)
