"""The cross-frame graph of paper 3.2: reference-instance nodes, target-pixel nodes, window edges.

One ``torch_geometric.data.Data`` covers the whole batch and every FPN level. Node sets:

* reference nodes, one per (reference instance, level): ROIAlign of the reference frame's feature
  map at that level over the instance's box, encoded to a D-vector (``ReferenceEncoder``);
* pixel nodes, one per location of every level of the target frame: ``F_t^l(y, x)``.

Edges are bipartite and undirected (stored once, reference -> pixel): reference node
(instance i, level l) joins every pixel of level l of the same image whose cell lies in the
``w_l x w_l`` window centred on the instance's centre cell, where

    centre cell = (floor(cy / stride_l), floor(cx / stride_l)),  (cx, cy) = box centre in pixels

(the CenterNet target cell of ``visstg.model.detection`` is the same cell, except that it is clamped
into the map; the two differ only for a centre on the far border of the padded image, where this
window still reaches the clamped cell whenever w_l >= 3). Window cells outside the feature map are
dropped, never clamped, and cells are indexed in 2-D so a window never wraps onto the next row.
Edge features start as ``|h_ref - h_pix|``.

Reference-node encoding (``encode_reference``) is separate from graph building (``build_graph``)
so that inference can append memory entries (stored node features of recently lost tracks) as
extra reference nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch_geometric.data import Data
from torchvision.ops import roi_align


class ReferenceEncoder(nn.Module):
    """ROIAlign + small conv + flatten + Linear: one D-vector per (box, level).

    The encoder's weights are shared across pyramid levels: FPN levels share one feature space
    (the detection head is shared across them too), and sharing keeps the parameter count
    independent of the number of levels. Level identity is implicit in which map is pooled.

    Args:
        in_channels: channels of the pyramid maps.
        dim: output node dimension D.
        strides: stride of each level (``spatial_scale = 1 / stride``).
        roi_size: ROIAlign output size (7 -> 7x7).
        hidden: channels of the 3x3 conv applied to the pooled 7x7 crop before flattening.
        sampling_ratio: ROIAlign sampling points per bin per axis.

    Shapes:
        feats: L x ``[B, C, H_l, W_l]``; boxes: B tensors ``[N_b, 4]`` (xyxy, input pixels)
        -> ``[M, L, D]`` with ``M = sum_b N_b`` (images concatenated in order).
    """

    def __init__(
        self,
        in_channels: int = 256,
        dim: int = 256,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        roi_size: int = 7,
        hidden: int = 64,
        sampling_ratio: int = 2,
    ) -> None:
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.roi_size = roi_size
        self.sampling_ratio = sampling_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.GroupNorm(min(32, hidden), hidden),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(hidden * roi_size * roi_size, dim)

    def forward(self, feats: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        if len(feats) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels, got {len(feats)}")
        rois = boxes_to_rois(boxes, feats[0])  # [M, 5] (batch index, x1, y1, x2, y2)
        pooled = [
            roi_align(
                f,
                rois,
                output_size=self.roi_size,
                spatial_scale=1.0 / s,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )
            for f, s in zip(feats, self.strides)
        ]  # L x [M, C, r, r]
        x = torch.stack(pooled, dim=1)  # [M, L, C, r, r]
        m, num_levels = x.shape[:2]
        x = self.conv(x.flatten(0, 1))  # [M*L, hidden, r, r]
        x = self.fc(x.flatten(1))  # [M*L, D]
        return x.view(m, num_levels, self.fc.out_features)  # [M, L, D]


def boxes_to_rois(boxes: Sequence[Tensor], like: Tensor) -> Tensor:
    """B box tensors ``[N_b, 4]`` -> ROIAlign's ``[M, 5]`` (batch index first)."""
    rois = [
        torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)
    ]  # B x [N_b, 5]
    if not rois:
        return like.new_zeros((0, 5))
    return torch.cat(rois).to(like)  # [M, 5]


def box_centers(boxes: Tensor) -> Tensor:
    """xyxy ``[N, 4]`` -> centres ``[N, 2]`` as (x, y) in pixels."""
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def build_graph(
    ref_nodes: Tensor,
    ref_centers: Tensor,
    ref_batch: Tensor,
    tgt_feats: Sequence[Tensor],
    strides: Sequence[int],
    windows: Sequence[int],
) -> Data:
    """Assemble the cross-frame graph for a batch of target frames and all levels.

    Args:
        ref_nodes: ``[M, L, D]`` reference-node features (``encode_reference`` output, possibly
            with memory entries appended).
        ref_centers: ``[M, 2]`` reference-instance centres (x, y) in input pixels.
        ref_batch: ``[M]`` image index (in ``[0, B)``) of each reference instance.
        tgt_feats: L target maps ``[B, D, H_l, W_l]``.
        strides: stride of each level.
        windows: odd window size ``w_l`` of each level.

    Returns:
        ``Data`` with (R = M * L reference nodes, instance-major: node ``i * L + l`` is instance
        i at level l; P pixel nodes; E edges)

        - ``x_ref [R, D]``, ``x_pix [P, D]``
        - ``edge_index [2, E]``: row 0 a reference node in ``[0, R)``, row 1 a pixel node in
          ``[0, P)`` (bipartite: the two rows index different node sets)
        - ``edge_attr [E, D]`` = ``|x_ref[row0] - x_pix[row1]|``
        - ``ref_instance [R]`` (into the M reference instances), ``ref_level [R]``,
          ``ref_batch [R]``
        - ``pix_level [P]``, ``pix_batch [P]``, ``pix_yx [P, 2]`` (cell row, column),
          ``edge_level [E]``
        - ``level_offsets`` LongTensor ``[L + 1]``: level l's pixels are
          ``x_pix[level_offsets[l]:level_offsets[l + 1]]``, pixel (b, y, x) of level l is
          ``level_offsets[l] + (b * H_l + y) * W_l + x``
        - ``level_shapes`` list of ``(H_l, W_l)``, ``num_images`` B.

    This is one graph for the whole batch; it is not meant to be collated with
    ``Batch.from_data_list``. If it ever is, note PyG's rules: attributes whose name contains
    "index" are concatenated on the last dim and incremented by ``num_nodes`` (wrong for a
    bipartite ``edge_index``), and those containing "batch" are incremented by their max + 1.
    """
    num_levels = len(tgt_feats)
    if not (len(strides) == len(windows) == num_levels == ref_nodes.shape[1]):
        raise ValueError(
            f"levels disagree: {num_levels} maps, {len(strides)} strides, {len(windows)} "
            f"windows, reference nodes for {ref_nodes.shape[1]} levels"
        )
    if any(w % 2 == 0 or w < 1 for w in windows):
        raise ValueError(f"window sizes must be odd and positive, got {tuple(windows)}")
    device = tgt_feats[0].device
    num_images, dim = tgt_feats[0].shape[:2]
    m = ref_nodes.shape[0]
    ref_batch = ref_batch.to(device=device, dtype=torch.long)
    ref_centers = ref_centers.to(device=device, dtype=torch.float32)

    x_ref = ref_nodes.reshape(m * num_levels, dim)  # [R, D], node i*L + l
    ref_instance = torch.arange(m, device=device).repeat_interleave(num_levels)  # [R]
    ref_level = torch.arange(num_levels, device=device).repeat(m)  # [R]

    x_pix, pix_level, pix_batch, pix_yx = [], [], [], []
    rows, cols, edge_level = [], [], []
    level_shapes = []
    offsets = [0]
    for lvl, (feat, stride, window) in enumerate(zip(tgt_feats, strides, windows)):
        b, _, h, w = feat.shape
        level_shapes.append((h, w))
        x_pix.append(feat.permute(0, 2, 3, 1).reshape(b * h * w, dim))  # [B*H*W, D]
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        yx = torch.stack([ys, xs], dim=-1).view(1, h * w, 2).expand(b, -1, -1)  # [B, H*W, 2]
        pix_yx.append(yx.reshape(-1, 2))
        pix_batch.append(torch.arange(b, device=device).repeat_interleave(h * w))
        pix_level.append(torch.full((b * h * w,), lvl, device=device, dtype=torch.long))

        # Window cells around every instance's centre cell, all instances at once.
        r = window // 2
        d = torch.arange(-r, r + 1, device=device)
        dy, dx = torch.meshgrid(d, d, indexing="ij")  # [w, w]
        cell = torch.floor(ref_centers / stride).long()  # [M, 2] (cx, cy)
        cy = cell[:, 1:2] + dy.reshape(1, -1)  # [M, w*w]
        cx = cell[:, 0:1] + dx.reshape(1, -1)  # [M, w*w]
        inside = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)  # [M, w*w], no clamping
        pix = offsets[-1] + (ref_batch[:, None] * h + cy) * w + cx  # [M, w*w]
        ref = (torch.arange(m, device=device) * num_levels + lvl)[:, None].expand_as(pix)
        rows.append(ref[inside])
        cols.append(pix[inside])
        edge_level.append(torch.full_like(cols[-1], lvl))
        offsets.append(offsets[-1] + b * h * w)

    x_pix = torch.cat(x_pix)  # [P, D]
    edge_index = torch.stack([torch.cat(rows), torch.cat(cols)])  # [2, E]
    edge_attr = (x_ref[edge_index[0]] - x_pix[edge_index[1]]).abs()  # [E, D]
    return Data(
        x_ref=x_ref,
        x_pix=x_pix,
        edge_index=edge_index,
        edge_attr=edge_attr,
        ref_instance=ref_instance,
        ref_level=ref_level,
        ref_batch=ref_batch.repeat_interleave(num_levels),
        pix_level=torch.cat(pix_level),
        pix_batch=torch.cat(pix_batch),
        pix_yx=torch.cat(pix_yx),
        edge_level=torch.cat(edge_level),
        level_offsets=torch.tensor(offsets, device=device, dtype=torch.long),
        level_shapes=level_shapes,
        num_images=int(num_images),
        num_nodes=x_ref.shape[0] + x_pix.shape[0],
    )


def edge_offsets(
    graph: Data, ref_centers: Tensor, strides: Sequence[int], windows: Sequence[int]
) -> Tensor:
    """``[E, 2]``: each edge's pixel (dy, dx) from its reference centre's cell on the edge's
    level, divided by that level's window radius (so in ``[-1, 1]``).

    Args:
        graph: ``build_graph`` output; ref_centers: ``[M, 2]`` (x, y) in input pixels, as
            given to it; strides, windows: per level, as given to it.
    """
    row, col = graph.edge_index
    device = graph.pix_yx.device
    level = graph.edge_level
    stride = torch.tensor([float(v) for v in strides], device=device)[level]  # [E]
    radius = (torch.tensor(list(windows), device=device)[level] // 2).clamp(min=1)  # [E]
    center = ref_centers.to(device=device, dtype=torch.float32)[graph.ref_instance[row]]
    cell = torch.floor(center / stride[:, None]).long()  # [E, 2] (x, y)
    yx = graph.pix_yx[col]  # [E, 2] (y, x)
    rel = torch.stack([yx[:, 0] - cell[:, 1], yx[:, 1] - cell[:, 0]], dim=1)  # [E, 2] (dy, dx)
    return rel.to(graph.edge_attr.dtype) / radius[:, None]


def pixels_to_maps(x_pix: Tensor, graph: Data) -> list[Tensor]:
    """Pixel-node features ``[P, D]`` back to L maps ``[B, D, H_l, W_l]`` (inverse of the
    flattening in ``build_graph``)."""
    maps = []
    offsets = graph.level_offsets.tolist()
    for lvl, (h, w) in enumerate(graph.level_shapes):
        block = x_pix[offsets[lvl] : offsets[lvl + 1]]  # [B*H*W, D]
        maps.append(block.view(graph.num_images, h, w, -1).permute(0, 3, 1, 2))  # [B, D, H, W]
    return maps


class GraphBuilder(nn.Module):
    """Reference-node encoder plus the window-graph construction, with its level settings.

    Args:
        in_channels: channels of the pyramid maps (= node dimension D; pixel nodes are the
            target maps themselves).
        strides: stride of each level.
        windows: odd window size per level (paper 3.2's w; default 9, 7, 5, 3, 3 for P3-P7).
        roi_size, hidden: ``ReferenceEncoder`` settings.
        edge_position: add a learned encoding of each edge's window offset
            (:func:`edge_offsets`, a 2 -> D -> D MLP) to its initial feature
            ``|x_ref - x_pix|``. Off by default, as in the paper, whose edges see appearance
            only: inside a window (9 x 9 cells at P3) two objects that look alike are then told
            apart by nothing but the GNN's context.
    """

    def __init__(
        self,
        in_channels: int = 256,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        windows: Sequence[int] = (9, 7, 5, 3, 3),
        roi_size: int = 7,
        hidden: int = 64,
        edge_position: bool = False,
    ) -> None:
        super().__init__()
        if len(strides) != len(windows):
            raise ValueError(f"{len(strides)} strides but {len(windows)} windows")
        self.strides = tuple(int(s) for s in strides)
        self.windows = tuple(int(w) for w in windows)
        self.encoder = ReferenceEncoder(in_channels, in_channels, self.strides, roi_size, hidden)
        self.position = (
            nn.Sequential(
                nn.Linear(2, in_channels),
                nn.ReLU(inplace=True),
                nn.Linear(in_channels, in_channels),
            )
            if edge_position
            else None
        )

    def encode_reference(
        self, feats: Sequence[Tensor], boxes_per_image: Sequence[Tensor]
    ) -> Tensor:
        """L maps ``[B, D, H_l, W_l]`` + B box tensors ``[N_b, 4]`` -> ``[M, L, D]``."""
        return self.encoder(feats, boxes_per_image)

    def build_graph(
        self, ref_nodes: Tensor, ref_centers: Tensor, ref_batch: Tensor, tgt_feats: Sequence[Tensor]
    ) -> Data:
        """See the module-level ``build_graph``; strides and windows come from this builder
        (and with ``edge_position`` the window offset's encoding is added to ``edge_attr``)."""
        graph = build_graph(
            ref_nodes, ref_centers, ref_batch, tgt_feats, self.strides, self.windows
        )
        if self.position is not None:
            offsets = edge_offsets(graph, ref_centers, self.strides, self.windows)  # [E, 2]
            graph.edge_attr = graph.edge_attr + self.position(offsets)
        return graph

    def forward(
        self,
        ref_feats: Sequence[Tensor],
        boxes_per_image: Sequence[Tensor],
        tgt_feats: Sequence[Tensor],
    ) -> Data:
        """Training path: encode the reference boxes, then build the graph."""
        ref_nodes = self.encode_reference(ref_feats, boxes_per_image)  # [M, L, D]
        centers, batch = boxes_to_centers_and_batch(boxes_per_image, ref_nodes)
        return self.build_graph(ref_nodes, centers, batch, tgt_feats)


def boxes_to_centers_and_batch(
    boxes_per_image: Sequence[Tensor], like: Tensor
) -> tuple[Tensor, Tensor]:
    """B box tensors ``[N_b, 4]`` -> centres ``[M, 2]`` (x, y) and image indices ``[M]``."""
    rois = boxes_to_rois(boxes_per_image, like)  # [M, 5]
    return box_centers(rois[:, 1:]), rois[:, 0].long()
