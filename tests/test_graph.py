import math

import pytest
import torch

from visstg.model.graph import (
    GraphBuilder,
    ReferenceEncoder,
    build_graph,
    edge_offsets,
    pixels_to_maps,
)

STRIDES = (8, 16, 32, 64, 128)
WINDOWS = (9, 7, 5, 3, 3)
H, W, D = 64, 96, 8


def pyramid(num_images, dim=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(num_images, dim, math.ceil(H / s), math.ceil(W / s), generator=g)
        for s in STRIDES
    ]


# Image 0: corners and borders; image 1: no instance; image 2: two instances, one whose centre
# lies exactly on the right/bottom border (its centre cell is outside the map at fine levels).
BOXES = [
    torch.tensor([[0.0, 0.0, 10.0, 10.0], [80.0, 50.0, 96.0, 64.0], [0.0, 20.0, 30.0, 44.0]]),
    torch.zeros(0, 4),
    torch.tensor([[40.0, 10.0, 70.0, 40.0], [90.0, 58.0, 102.0, 70.0]]),
]


def brute_force_edges(boxes_per_image, feats):
    """Every (reference node, pixel node) pair, by plain loops over images, instances, levels and
    every pixel of the level."""
    num_levels = len(feats)
    offsets = [0]
    for f in feats:
        offsets.append(offsets[-1] + f.shape[0] * f.shape[2] * f.shape[3])
    edges = set()
    m = 0
    for b, boxes in enumerate(boxes_per_image):
        for box in boxes.tolist():
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            for lvl in range(num_levels):
                h, w = feats[lvl].shape[2:]
                r = WINDOWS[lvl] // 2
                ccx, ccy = math.floor(cx / STRIDES[lvl]), math.floor(cy / STRIDES[lvl])
                for y in range(h):
                    for x in range(w):
                        if abs(y - ccy) <= r and abs(x - ccx) <= r:
                            edges.add((m * num_levels + lvl, offsets[lvl] + (b * h + y) * w + x))
            m += 1
    return edges


def make_graph(boxes_per_image, feats, seed=1):
    m = sum(len(b) for b in boxes_per_image)
    ref_nodes = torch.randn(m, len(feats), D, generator=torch.Generator().manual_seed(seed))
    boxes = torch.cat(boxes_per_image)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    batch = torch.cat([torch.full((len(b),), i) for i, b in enumerate(boxes_per_image)])
    return build_graph(ref_nodes, centers, batch, feats, STRIDES, WINDOWS), ref_nodes


def test_edges_equal_brute_force():
    feats = pyramid(3)
    graph, _ = make_graph(BOXES, feats)
    edges = {tuple(e) for e in graph.edge_index.t().tolist()}
    assert graph.edge_index.shape[1] == len(edges), "duplicate edges"
    assert edges == brute_force_edges(BOXES, feats)


def test_attributes_are_consistent():
    feats = pyramid(3)
    graph, ref_nodes = make_graph(BOXES, feats)
    m, num_levels = ref_nodes.shape[:2]
    row, col = graph.edge_index
    assert graph.x_ref.shape == (m * num_levels, D)
    assert graph.x_pix.shape == (sum(f[0, 0].numel() * 3 for f in feats), D)
    assert graph.num_images == 3
    assert graph.level_shapes == [tuple(f.shape[2:]) for f in feats]
    assert torch.equal(graph.x_ref.view(m, num_levels, D), ref_nodes)
    assert torch.equal(graph.ref_instance, torch.arange(m).repeat_interleave(num_levels))
    assert torch.equal(graph.ref_batch, torch.tensor([0, 0, 0, 2, 2]).repeat_interleave(5))
    # Every edge joins nodes of the same level and image.
    assert torch.equal(graph.ref_level[row], graph.pix_level[col])
    assert torch.equal(graph.edge_level, graph.pix_level[col])
    assert torch.equal(graph.ref_batch[row], graph.pix_batch[col])
    # Edge features start as |h_i - h_j|.
    assert torch.allclose(graph.edge_attr, (graph.x_ref[row] - graph.x_pix[col]).abs())
    # No window wraps onto another row or column: the pixel is within r cells on both axes.
    boxes = torch.cat(BOXES)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2  # [M, 2] (x, y)
    strides = torch.tensor(STRIDES)[graph.edge_level]
    cell = torch.floor(centers[graph.ref_instance[row]] / strides[:, None]).long()  # (x, y)
    radius = torch.tensor(WINDOWS)[graph.edge_level] // 2
    yx = graph.pix_yx[col]
    assert ((yx[:, 0] - cell[:, 1]).abs() <= radius).all()
    assert ((yx[:, 1] - cell[:, 0]).abs() <= radius).all()
    # edge_offsets: the pixel's (dy, dx) from that cell over the window radius.
    rel = torch.stack([yx[:, 0] - cell[:, 1], yx[:, 1] - cell[:, 0]], dim=1) / radius[:, None]
    offsets = edge_offsets(graph, centers, STRIDES, WINDOWS)
    assert torch.allclose(offsets, rel.float())
    assert offsets.abs().max() == 1
    # Pixel indexing: level_offsets[l] + (b * H_l + y) * W_l + x.
    off = graph.level_offsets
    for lvl, (h, w) in enumerate(graph.level_shapes):
        idx = torch.arange(off[lvl], off[lvl + 1])
        expect = (
            off[lvl] + (graph.pix_batch[idx] * h + graph.pix_yx[idx, 0]) * w + graph.pix_yx[idx, 1]
        )
        assert torch.equal(expect, idx)
        b, y, x = 2, h - 1, w - 1
        assert torch.equal(graph.x_pix[off[lvl] + (b * h + y) * w + x], feats[lvl][b, :, y, x])
    # The image without instances has no edges.
    assert not (graph.pix_batch[col] == 1).any()


def test_no_instances_gives_empty_edge_set():
    feats = pyramid(2)
    graph = build_graph(
        torch.zeros(0, 5, D), torch.zeros(0, 2), torch.zeros(0), feats, STRIDES, WINDOWS
    )
    assert graph.edge_index.shape == (2, 0)
    assert graph.edge_attr.shape == (0, D)
    assert graph.x_ref.shape == (0, D)
    assert graph.x_pix.shape[0] == int(graph.level_offsets[-1])


def test_pixels_to_maps_inverts_flattening():
    feats = pyramid(3)
    graph, _ = make_graph(BOXES, feats)
    for a, b in zip(pixels_to_maps(graph.x_pix, graph), feats):
        assert torch.equal(a, b)


def test_even_window_rejected():
    with pytest.raises(ValueError, match="odd"):
        build_graph(
            torch.zeros(0, 5, D),
            torch.zeros(0, 2),
            torch.zeros(0),
            pyramid(1),
            STRIDES,
            (9, 7, 4, 3, 3),
        )


def test_reference_encoder_batched_equals_one_by_one():
    feats = pyramid(3, dim=16)
    enc = ReferenceEncoder(in_channels=16, dim=12, strides=STRIDES, hidden=8).eval()
    batched = enc(feats, BOXES)
    assert batched.shape == (5, 5, 12)
    singles = [enc([f[i : i + 1] for f in feats], [b]) for i, b in enumerate(BOXES)]
    assert torch.allclose(batched, torch.cat(singles), atol=1e-6)
    assert enc(feats, [torch.zeros(0, 4)] * 3).shape == (0, 5, 12)


def test_graph_builder_end_to_end():
    feats = pyramid(3)
    builder = GraphBuilder(in_channels=D, strides=STRIDES, windows=WINDOWS, hidden=4)
    graph = builder(feats, BOXES, feats)
    assert {tuple(e) for e in graph.edge_index.t().tolist()} == brute_force_edges(BOXES, feats)
    assert graph.x_ref.shape == (25, D)
    graph.edge_attr.sum().backward()
    assert builder.encoder.fc.weight.grad is not None


def test_edge_position_adds_the_window_offset_encoding():
    feats = pyramid(3)
    torch.manual_seed(0)
    plain = GraphBuilder(in_channels=D, strides=STRIDES, windows=WINDOWS, hidden=4)
    assert plain.position is None
    with_pos = GraphBuilder(
        in_channels=D, strides=STRIDES, windows=WINDOWS, hidden=4, edge_position=True
    )
    with_pos.encoder.load_state_dict(plain.encoder.state_dict())
    g0, g1 = plain(feats, BOXES, feats), with_pos(feats, BOXES, feats)
    assert torch.equal(g0.edge_index, g1.edge_index)
    boxes = torch.cat(BOXES)
    offsets = edge_offsets(g0, (boxes[:, :2] + boxes[:, 2:]) / 2, STRIDES, WINDOWS)
    torch.testing.assert_close(g1.edge_attr, g0.edge_attr + with_pos.position(offsets))
    # Two edges of one reference node with the same appearance difference but different
    # offsets now differ.
    assert not torch.allclose(g1.edge_attr - g0.edge_attr, (g1.edge_attr - g0.edge_attr)[:1])
    g1.edge_attr.sum().backward()
    assert all(p.grad is not None for p in with_pos.position.parameters())
