"""Tracking by edge classification (paper 3.5, DESIGN.md "Tracking").

The graph (built by :mod:`visstg.model.graph`) joins reference nodes (one per reference instance
and level) to the target frame's pixel nodes within a window. After the GNN every edge feature
is classified: "the pixel is the same instance as the reference node". This module holds the
classifier, the training labels over the pruned edge set E_prune, and the dense
reference-by-detection score matrix the online tracker associates with.

Graph attributes used here: ``edge_index [2, E]`` (row 0 reference node, row 1 pixel node),
``ref_instance [R]``, ``level_offsets [L+1]``, ``level_shapes`` (list of ``(H_l, W_l)``).
Pixel nodes of level ``l`` are ordered batch, y, x:
``pixel = level_offsets[l] + (b * H_l + y) * W_l + x`` (see :func:`pixel_index`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from visstg.model.detection import Assignment

__all__ = [
    "EdgeClassifier",
    "edge_scores_for_detections",
    "edge_training_targets",
    "pixel_index",
]


class EdgeClassifier(nn.Module):
    """MLP on the final edge feature -> one association logit per edge.

    Args:
        dim: edge feature size D.
        hidden: hidden width.
        num_layers: linear layers (>= 1); ReLU between them.

    Shapes:
        edge_attr ``[E, D]`` -> logits ``[E]``.
    """

    def __init__(self, dim: int = 256, hidden: int = 256, num_layers: int = 2):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"EdgeClassifier: num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        c = dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(c, hidden), nn.ReLU(inplace=True)]
            c = hidden
        layers.append(nn.Linear(c, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, edge_attr: Tensor) -> Tensor:
        return self.mlp(edge_attr).squeeze(-1)  # [E]


def _offsets_and_shapes(
    graph_or_offsets: Any, level_shapes: Sequence[tuple[int, int]] | None
) -> tuple[Tensor, Sequence[tuple[int, int]]]:
    if isinstance(graph_or_offsets, Tensor):
        offsets = graph_or_offsets
    else:
        offsets = graph_or_offsets.level_offsets
        if level_shapes is None:
            level_shapes = graph_or_offsets.level_shapes
    if level_shapes is None:
        raise ValueError("pixel_index: level_shapes is required when only offsets are given")
    if offsets.numel() != len(level_shapes) + 1:
        raise ValueError(
            f"pixel_index: level_offsets has {offsets.numel()} entries but there are "
            f"{len(level_shapes)} levels (expected L + 1)"
        )
    return offsets, level_shapes


def pixel_index(
    graph_or_offsets: Any,
    level_shapes: Sequence[tuple[int, int]] | None,
    level: Tensor,
    batch: Tensor,
    cell: Tensor,
) -> Tensor:
    """Index of the pixel node at ``(level, batch, y, x)``.

    Args:
        graph_or_offsets: the graph (its ``level_offsets`` and, if ``level_shapes`` is None, its
            ``level_shapes`` are used) or a ``[L + 1]`` offsets tensor.
        level_shapes: ``(H_l, W_l)`` per level, or None to take them from the graph.
        level, batch: ``[N]`` long; cell: ``[N, 2]`` long ``(y, x)``.
    Returns:
        ``[N]`` long, ``level_offsets[level] + (batch * H_l + y) * W_l + x``.
    """
    offsets, shapes = _offsets_and_shapes(graph_or_offsets, level_shapes)
    device = level.device
    offsets = offsets.to(device)
    hs = torch.tensor([int(h) for h, _ in shapes], device=device, dtype=torch.long)
    ws = torch.tensor([int(w) for _, w in shapes], device=device, dtype=torch.long)
    return offsets[level] + (batch * hs[level] + cell[:, 0]) * ws[level] + cell[:, 1]


def _num_pixels(graph: Any) -> int:
    return int(graph.level_offsets[-1])


def edge_training_targets(
    graph: Any,
    tgt: Assignment,
    ref_labels: Tensor,
    ref_track_ids: Tensor,
    class_agnostic: bool = False,
) -> tuple[Tensor, Tensor]:
    """Edges of E_prune and their labels (paper Eq. 6).

    An edge (reference node i, pixel j) is kept when pixel j is the centre cell of a target
    ground-truth instance on that instance's assigned level, and the reference instance of node i
    has that instance's class (any class with ``class_agnostic``: the instances of other classes
    in the window become negatives too). Its label is 1 iff both share the track id. When
    several target instances share a centre cell (same level and image), the one that comes last
    in the assignment (highest row) owns the pixel.

    Args:
        graph: the spatio-temporal graph (``edge_index``, ``ref_instance``, ``level_offsets``,
            ``level_shapes``).
        tgt: :class:`Assignment` of the target frames.
        ref_labels: ``[M]`` class of each reference instance (indexed by ``ref_instance``).
        ref_track_ids: ``[M]`` track id of each reference instance.
        class_agnostic: keep the edges to target instances of any class.
    Returns:
        ``edge_ids [K]`` long (indices into the graph's edges, ascending) and ``labels [K]``
        float in ``{0, 1}``.
    """
    edge_index = graph.edge_index
    device = edge_index.device
    num_pix = _num_pixels(graph)
    owner = torch.full((num_pix,), -1, dtype=torch.long, device=device)  # pixel -> target row
    if len(tgt) > 0:
        if int(tgt.level.max()) >= len(graph.level_shapes):
            raise ValueError(
                f"edge_training_targets: a target is assigned to level {int(tgt.level.max())} "
                f"but the graph has {len(graph.level_shapes)} levels"
            )
        pix = pixel_index(graph, None, tgt.level.to(device), tgt.batch.to(device),
                          tgt.cell.to(device))  # fmt: skip
        owner.scatter_reduce_(0, pix, torch.arange(len(tgt), device=device), reduce="amax")
    t = owner[edge_index[1]]  # [E] target row or -1
    has_t = t >= 0
    t_safe = t.clamp(min=0)
    m = graph.ref_instance.to(device)[edge_index[0]]  # [E] reference instance
    keep = has_t
    if not class_agnostic and len(tgt) > 0:
        keep = keep & (ref_labels.to(device)[m] == tgt.labels.to(device)[t_safe])
    edge_ids = keep.nonzero().squeeze(1)  # [K]
    if len(tgt) > 0:
        labels = ref_track_ids.to(device)[m[edge_ids]] == tgt.track_ids.to(device)[t[edge_ids]]
    else:
        labels = torch.zeros(0, dtype=torch.bool, device=device)
    return edge_ids, labels.float()


def edge_scores_for_detections(
    graph: Any,
    edge_logits: Tensor | Callable[[Tensor], Tensor],
    det_level: Tensor,
    det_batch: Tensor,
    det_cells: Tensor,
    det_labels: Tensor,
    ref_labels: Tensor,
    num_refs: int,
    class_agnostic: bool = False,
) -> Tensor:
    """Association probabilities between reference instances and detections.

    ``scores[m, d] = sigmoid(edge_logits[e])`` for the edge ``e`` joining a node of reference
    instance ``m`` to detection ``d``'s peak pixel (its level, image and cell), when
    ``ref_labels[m] == det_labels[d]`` (whatever the classes with ``class_agnostic``); 0 when
    there is no such edge or the classes differ (if several edges qualify, e.g. duplicated
    reference nodes, the highest probability is used).
    Several detections (different classes) may share one peak pixel.

    Args:
        graph: the graph (``edge_index``, ``ref_instance``, ``level_offsets``, ``level_shapes``).
        edge_logits: ``[E]`` classifier logits, or ``edges [J] -> [J]`` logits of those edges
            (inference classifies only the edges that reach a detection).
        det_level, det_batch: ``[D]`` long; det_cells: ``[D, 2]`` (y, x); det_labels: ``[D]``.
        ref_labels: ``[M]`` class of each reference instance.
        num_refs: M.
        class_agnostic: score the edges to detections of any class.
    Returns:
        ``[M, D]`` float probabilities.
    """
    device = det_level.device
    num_det = det_level.numel()
    num_edges = graph.edge_index.shape[1]
    if num_det == 0 or num_refs == 0 or num_edges == 0:
        dtype = edge_logits.dtype if isinstance(edge_logits, Tensor) else torch.float32
        return torch.zeros(num_refs, num_det, dtype=dtype, device=device)
    det_pix = pixel_index(graph, None, det_level.to(device), det_batch.to(device),
                          det_cells.to(device))  # fmt: skip
    # Join edges to detections on the pixel index: sort detections by pixel, then each edge's
    # matches are a contiguous run [lo, hi) found with searchsorted.
    det_pix_sorted, order = det_pix.sort()
    edge_pix = graph.edge_index[1].to(device)  # [E]
    lo = torch.searchsorted(det_pix_sorted, edge_pix, right=False)
    hi = torch.searchsorted(det_pix_sorted, edge_pix, right=True)
    counts = hi - lo  # [E]
    edge_rep = torch.repeat_interleave(torch.arange(edge_pix.numel(), device=device), counts)
    run_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    det = order[lo[edge_rep] + torch.arange(edge_rep.numel(), device=device) - run_start]
    m = graph.ref_instance.to(device)[graph.edge_index[0].to(device)[edge_rep]]  # [J]
    if class_agnostic:
        ok = torch.ones_like(m, dtype=torch.bool)
    else:
        ok = ref_labels.to(device)[m] == det_labels.to(device)[det]
    edges = edge_rep[ok]  # [J'] the edges that score a detection
    logits = edge_logits[edges] if isinstance(edge_logits, Tensor) else edge_logits(edges)
    prob = logits.sigmoid()
    scores = prob.new_zeros(num_refs * num_det)
    scores.scatter_reduce_(0, m[ok] * num_det + det[ok], prob, reduce="amax")
    return scores.view(num_refs, num_det)
