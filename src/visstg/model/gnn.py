"""Spatial-temporal feature fusion (paper 3.2): edge-then-node message passing on the cross-frame
graph built by ``visstg.model.graph``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import degree

from visstg.model.graph import pixels_to_maps


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Two-layer MLP with LayerNorm after the hidden layer (keeps L = 1..4 iterations stable:
    the residual node stream can grow with the number of summed messages, the normalisation
    stops that growth from compounding through N_e / N_v)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


def _endpoint_terms(x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """``x[index] @ weight.T`` (``[E, out]``), projecting the nodes before gathering them when
    there are no more nodes than edges."""
    if x.shape[0] <= index.numel():
        return F.linear(x, weight)[index]
    return F.linear(x[index], weight)


def _rest(net: nn.Sequential, pre: Tensor) -> Tensor:
    """An :func:`mlp` from its first layer's output on."""
    for layer in list(net)[1:]:
        pre = layer(pre)
    return pre


class EdgeNodeConv(MessagePassing):
    r"""One graph-update iteration of VisSTG (paper Eq. 1-2).

    Edges are undirected and stored once, as ``edge_index[0] = i`` (source, e.g. a reference
    node) and ``edge_index[1] = j`` (destination, e.g. a pixel node). First every edge is updated
    from both endpoints, then every node adds the messages of all its edges:

    .. math::
        h^{e(l)}_{ij} = N_e\big([h^{e(l-1)}_{ij},\, h^{v(l-1)}_i,\, h^{v(l-1)}_j]\big)

        h^{v(l)}_u = h^{v(l-1)}_u + \sum_{e_{ij} \ni u} N_v\big([h^{e(l)}_{ij},\, h^{v(l-1)}_u]\big)

    i.e. the message of an edge to each of its endpoints is computed with that endpoint's own
    feature, and both endpoints receive it (sum aggregation). (The paper writes
    :math:`h^{v(l)}` on the right of Eq. 2; it is the previous iteration's feature.)

    Args:
        dim: node and edge feature size D.
        hidden: hidden size of the two MLPs :math:`N_e`, :math:`N_v` (default: ``dim``).

    Shapes:
        - input: node features :math:`(|\mathcal{V}|, D)` or a bipartite pair
          :math:`((|\mathcal{V}_s|, D), (|\mathcal{V}_t|, D))`, edge indices
          :math:`(2, |\mathcal{E}|)`, edge features :math:`(|\mathcal{E}|, D)`
        - output: ``(x, edge_attr)``: node features of the same form as the input (a tensor or a
          ``(x_src, x_dst)`` pair), edge features :math:`(|\mathcal{E}|, D)`
    """

    def __init__(self, dim: int = 256, hidden: int | None = None) -> None:
        super().__init__(aggr="sum", flow="source_to_target")
        hidden = hidden or dim
        self.dim = dim
        self.edge_mlp = mlp(3 * dim, hidden, dim)  # N_e
        self.node_mlp = mlp(2 * dim, hidden, dim)  # N_v

    def forward(
        self,
        x: Tensor | tuple[Tensor, Tensor],
        edge_index: Tensor,
        edge_attr: Tensor,
        update_src: bool = True,
        sum_first: bool = False,
    ) -> tuple[Tensor | tuple[Tensor, Tensor], Tensor]:
        """``update_src=False`` (bipartite pair only) skips the messages to the source nodes,
        which come back unchanged: for a last layer whose source features nobody reads.

        The first linear layer of ``N_e`` and ``N_v`` is applied block by block of its
        concatenated input (the same sums): each endpoint's block once per node rather than
        once per edge where a node set is smaller than the edge set (a reference has ~170
        edges), and ``N_v``'s edge block once for both messages of an edge.

        ``sum_first=True`` applies ``N_v``'s last linear layer after the sum over a node's
        edges, ``W sum_e h_e + deg b`` for ``sum_e (W h_e + b)``: the same messages, the layer
        run once per node instead of once per edge (inference; another float summation order,
        so training keeps the per-edge form and its runs repeat).
        """
        pair = not isinstance(x, Tensor)
        x_src, x_dst = x if pair else (x, x)
        d = self.dim
        w_edge, w_src, w_dst = self.edge_mlp[0].weight.split(d, dim=1)  # [H, D] each
        w_msg, w_node = self.node_mlp[0].weight.split(d, dim=1)
        hidden = w_edge.shape[0]
        src, dst = edge_index
        # Per edge: [N_e block, N_v block] of each endpoint's feature, [E, 2H].
        at_src = _endpoint_terms(x_src, src, torch.cat([w_src, w_node]))
        at_dst = _endpoint_terms(x_dst, dst, torch.cat([w_dst, w_node]))
        # Eq. 1.
        edge_attr = self.edge_updater(
            edge_index, edge_attr=edge_attr, at_src=at_src[:, :hidden], at_dst=at_dst[:, :hidden]
        )  # [E, D]
        # Eq. 2: every edge messages both of its endpoints.
        from_edge = F.linear(edge_attr, w_msg, self.node_mlp[0].bias)  # [E, H]
        sizes = (x_src.shape[0], x_dst.shape[0])
        to_dst = self._send(edge_index, from_edge + at_dst[:, hidden:], sizes, sum_first)
        if pair and not update_src:
            return (x_src, x_dst + to_dst), edge_attr
        to_src = self._send(
            edge_index.flip(0), from_edge + at_src[:, hidden:], sizes[::-1], sum_first
        )  # [N_s, D]
        if pair:
            return (x_src + to_src, x_dst + to_dst), edge_attr
        return x + to_src + to_dst, edge_attr

    def edge_update(self, edge_attr: Tensor, at_src: Tensor, at_dst: Tensor) -> Tensor:
        # N_e([h_e, x_src, x_dst]): its first layer as the sum of its three blocks.
        first = self.edge_mlp[0]
        pre = F.linear(edge_attr, first.weight[:, : self.dim], first.bias) + at_src + at_dst
        return _rest(self.edge_mlp, pre)  # [E, D]

    def _send(
        self, edge_index: Tensor, pre: Tensor, size: tuple[int, int], sum_first: bool
    ) -> Tensor:
        """Sum of the messages ``N_v`` of ``pre`` (its first layer's output) at each target of
        ``edge_index``, ``[size[1], D]``."""
        if not sum_first:
            return self.propagate(edge_index, pre=pre, size=size, hidden=False)
        summed = self.propagate(edge_index, pre=pre, size=size, hidden=True)  # [N, H]
        last = self.node_mlp[-1]
        deg = degree(edge_index[1], size[1], dtype=summed.dtype)  # [N]
        return torch.addmm(deg[:, None] * last.bias, summed, last.weight.t())

    def message(self, pre: Tensor, hidden: bool) -> Tensor:
        # N_v([h_e, x_receiver]) from its first layer's output (edge block + receiver block);
        # ``hidden``: up to its last linear layer.
        if hidden:
            for layer in list(self.node_mlp)[1:-1]:
                pre = layer(pre)
            return pre  # [E, H]
        return _rest(self.node_mlp, pre)  # [E, D]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.dim})"


class SpatialTemporalGNN(nn.Module):
    """``iterations`` independent ``EdgeNodeConv`` layers on the cross-frame graph.

    With no edges (first frame, no reference instances) every layer leaves the pixel features
    unchanged, so the fused maps equal the input maps: the paper's plain branch.

    Args:
        dim: node / edge feature size D (= FPN channels).
        iterations: number of graph updates L (paper table 1: 1-4, default 3); 0 disables fusion.
        hidden: hidden size of the MLPs.

    Returns (``forward(graph)``): dict with
        - ``maps``: L_fpn fused target maps ``[B, D, H_l, W_l]`` (F^_t)
        - ``x_pix [P, D]``, ``x_ref [R, D]``: updated node features
        - ``edge_attr [E, D]``: final edge features h^{e(L)}
    """

    def __init__(self, dim: int = 256, iterations: int = 3, hidden: int | None = None) -> None:
        super().__init__()
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        self.iterations = iterations
        self.layers = nn.ModuleList(EdgeNodeConv(dim, hidden) for _ in range(iterations))

    def forward(
        self, graph: Data, ref_features: bool = True, compact: bool = False
    ) -> dict[str, Tensor | list[Tensor]]:
        """``ref_features=False``: the last layer does not update the reference nodes (nothing
        downstream of the fused maps and edge features reads them; inference skips that work),
        so ``x_ref`` is then the previous layer's.

        ``compact=True`` (inference): the layers run on the pixel nodes that have an edge only,
        and their results are written back into a copy of ``x_pix``; a pixel without an edge
        receives no message and keeps its feature either way, so the outputs are the same (up
        to float summation order) with one pass over the ``[P, D]`` pixel features instead of
        several per layer (P3-P7 of a 360x640 frame hold 5,115 pixels, 10 references reach
        ~1,300 of them). The layers also sum their messages before ``N_v``'s last linear layer
        (``EdgeNodeConv(sum_first=True)``)."""
        x_ref, x_pix, edge_attr = graph.x_ref, graph.x_pix, graph.edge_attr
        edge_index = graph.edge_index
        if compact:
            touched, dst = edge_index[1].unique(return_inverse=True)  # [U], [E] into [0, U)
            edge_index = torch.stack([edge_index[0], dst])
            x_all, x_pix = x_pix, x_pix[touched]  # [P, D], [U, D]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            (x_ref, x_pix), edge_attr = layer(
                (x_ref, x_pix),
                edge_index,
                edge_attr,
                update_src=ref_features or i < last,
                sum_first=compact,
            )
        if compact:
            x_pix = x_all.index_copy(0, touched, x_pix)
        return {
            "maps": pixels_to_maps(x_pix, graph),
            "x_pix": x_pix,
            "x_ref": x_ref,
            "edge_attr": edge_attr,
        }
