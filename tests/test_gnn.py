import pytest
import torch

from visstg.model.gnn import EdgeNodeConv, SpatialTemporalGNN
from visstg.model.graph import build_graph

D = 6


def naive_edge_node_conv(conv, x_src, x_dst, edge_index, edge_attr, same_set=False):
    """Eq. 1-2 edge by edge: update every edge from both endpoints, then add each edge's message
    (computed with the receiving endpoint's old feature) to both endpoints."""
    edges = edge_index.t().tolist()
    new_edges = [
        conv.edge_mlp(torch.cat([edge_attr[k], x_src[i], x_dst[j]]))
        for k, (i, j) in enumerate(edges)
    ]
    out_src, out_dst = x_src.clone(), x_dst.clone()
    if same_set:
        out_dst = out_src  # one node set: both endpoints update the same tensor
    for k, (i, j) in enumerate(edges):
        out_src[i] = out_src[i] + conv.node_mlp(torch.cat([new_edges[k], x_src[i]]))
        out_dst[j] = out_dst[j] + conv.node_mlp(torch.cat([new_edges[k], x_dst[j]]))
    edge_out = torch.stack(new_edges) if new_edges else edge_attr
    return out_src, out_dst, edge_out


def random_bipartite(num_src=4, num_dst=7, num_edges=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_src, x_dst = torch.randn(num_src, D, generator=g), torch.randn(num_dst, D, generator=g)
    pairs = torch.randperm(num_src * num_dst, generator=g)[:num_edges]
    edge_index = torch.stack([pairs // num_dst, pairs % num_dst])
    return x_src, x_dst, edge_index, torch.randn(num_edges, D, generator=g)


# Node sets smaller than the edge set (each endpoint's first-layer block is applied per node)
# and larger (per edge), and one of each.
# sum_first: N_v's last layer after the sum of a node's messages (inference), nodes without
# edges included (20 x 30 nodes, 12 edges).
@pytest.mark.parametrize("num_src, num_dst", [(4, 7), (20, 30), (4, 30)])
@pytest.mark.parametrize("sum_first", [False, True])
@torch.no_grad()
def test_matches_naive_per_edge_bipartite(num_src, num_dst, sum_first):
    torch.manual_seed(0)
    conv = EdgeNodeConv(D, hidden=10).eval()
    x_src, x_dst, edge_index, e = random_bipartite(num_src, num_dst)
    (out_src, out_dst), out_e = conv((x_src, x_dst), edge_index, e, sum_first=sum_first)
    ref_src, ref_dst, ref_e = naive_edge_node_conv(conv, x_src, x_dst, edge_index, e)
    assert torch.allclose(out_e, ref_e, atol=1e-5)
    assert torch.allclose(out_src, ref_src, atol=1e-5)
    assert torch.allclose(out_dst, ref_dst, atol=1e-5)


@pytest.mark.parametrize("sum_first", [False, True])
@torch.no_grad()
def test_matches_naive_per_edge_single_node_set(sum_first):
    torch.manual_seed(1)
    conv = EdgeNodeConv(D).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, D, generator=g)
    edge_index = torch.tensor([[0, 1, 2, 3, 0], [3, 4, 5, 1, 5]])
    e = torch.randn(5, D, generator=g)
    out, out_e = conv(x, edge_index, e, sum_first=sum_first)
    ref, _, ref_e = naive_edge_node_conv(conv, x, x, edge_index, e, same_set=True)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(out_e, ref_e, atol=1e-5)


@torch.no_grad()
def test_pair_input_equals_tensor_input():
    torch.manual_seed(2)
    conv = EdgeNodeConv(D).eval()
    x_src, x_dst, edge_index, e = random_bipartite(seed=4)
    (out_src, out_dst), out_e = conv((x_src, x_dst), edge_index, e)
    # The same bipartite graph as one node set: sources first, destinations shifted after them.
    x = torch.cat([x_src, x_dst])
    shifted = torch.stack([edge_index[0], edge_index[1] + len(x_src)])
    out, out_e2 = conv(x, shifted, e)
    assert torch.allclose(out, torch.cat([out_src, out_dst]), atol=1e-6)
    assert torch.allclose(out_e, out_e2, atol=1e-6)


@torch.no_grad()
def test_permuting_nodes_permutes_output():
    torch.manual_seed(3)
    conv = EdgeNodeConv(D).eval()
    x_src, x_dst, edge_index, e = random_bipartite(seed=5)
    (out_src, out_dst), out_e = conv((x_src, x_dst), edge_index, e)
    ps, pd, pe = torch.randperm(len(x_src)), torch.randperm(len(x_dst)), torch.randperm(e.shape[0])
    inv_s, inv_d = torch.argsort(ps), torch.argsort(pd)
    # Node k of the permuted set is old node p[k]; an edge's endpoints map through the inverse.
    new_index = torch.stack([inv_s[edge_index[0]], inv_d[edge_index[1]]])[:, pe]
    (p_src, p_dst), p_e = conv((x_src[ps], x_dst[pd]), new_index, e[pe])
    assert torch.allclose(p_src, out_src[ps], atol=1e-5)
    assert torch.allclose(p_dst, out_dst[pd], atol=1e-5)
    assert torch.allclose(p_e, out_e[pe], atol=1e-5)


def test_empty_edge_set_leaves_nodes_unchanged():
    conv = EdgeNodeConv(D)
    x_src, x_dst = torch.randn(0, D), torch.randn(5, D, requires_grad=True)
    (out_src, out_dst), out_e = conv(
        (x_src, x_dst), torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, D)
    )
    assert torch.equal(out_dst, x_dst)
    assert out_src.shape == (0, D) and out_e.shape == (0, D)
    out_dst.sum().backward()
    assert torch.equal(x_dst.grad, torch.ones_like(x_dst))


def one_instance_graph():
    strides, windows = (8, 16), (3, 3)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, D, 4, 4, generator=g), torch.randn(1, D, 2, 2, generator=g)]
    ref = torch.randn(1, 2, D, generator=g)
    # Centre (12, 12): cell (1, 1) at stride 8, so its P3 window covers cells (0..2, 0..2).
    return (
        ref,
        feats,
        lambda f: build_graph(
            ref, torch.tensor([[12.0, 12.0]]), torch.zeros(1), f, strides, windows
        ),
    )


@torch.no_grad()
@pytest.mark.parametrize("iterations, spreads", [(1, False), (2, True), (3, True)])
def test_intra_frame_information_needs_two_iterations(iterations, spreads):
    torch.manual_seed(0)
    gnn = SpatialTemporalGNN(D, iterations=iterations).eval()
    _, feats, make = one_instance_graph()
    out = gnn(make(feats))["maps"][0]
    bumped = [f.clone() for f in feats]
    bumped[0][0, :, 0, 0] += 5.0  # one pixel in the window
    out2 = gnn(make(bumped))["maps"][0]
    # Another pixel of the same window (same frame, no edge between the two pixels).
    changed = not torch.allclose(out[0, :, 2, 2], out2[0, :, 2, 2])
    assert changed == spreads
    # A pixel outside every window never changes, and equals its input feature.
    assert torch.equal(out[0, :, 3, 3], feats[0][0, :, 3, 3])


def test_gnn_outputs_and_no_reference_is_identity():
    gnn = SpatialTemporalGNN(D, iterations=3, hidden=8)
    ref, feats, make = one_instance_graph()
    out = gnn(make(feats))
    graph = make(feats)
    assert out["x_ref"].shape == graph.x_ref.shape
    assert out["edge_attr"].shape == graph.edge_attr.shape
    assert [m.shape for m in out["maps"]] == [f.shape for f in feats]
    empty = build_graph(
        torch.zeros(0, 2, D), torch.zeros(0, 2), torch.zeros(0), feats, (8, 16), (3, 3)
    )
    for a, b in zip(gnn(empty)["maps"], feats):
        assert torch.equal(a, b)
