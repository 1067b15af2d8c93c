"""CenterNet detection on every FPN level (paper 3.3, DESIGN.md "Detection").

Conventions used throughout visstg (segmentation and tracking rely on them too):

- Input pixels: ``x`` right, ``y`` down; boxes are ``xyxy`` in input (resized, padded) pixels.
- A level with stride ``s`` has cells ``(y, x)``; cell ``x`` covers input pixels ``[x*s, (x+1)*s)``.
- An instance with centre ``c = ((x1+x2)/2, (y1+y2)/2)`` is assigned to one level by
  ``max(w, h)``; its *centre cell* is ``floor(c / s)`` (clamped into the map) and its *offset*
  target is ``c / s - cell`` (in cells, ``[0, 1)`` for centres inside the map, order x, y).
- Size targets are ``log(w / s), log(h / s)`` (order w, h) with ``w, h`` clamped to >= 1 px, so
  one head shared across levels regresses numbers of the same magnitude on every level.
  Decoding: ``centre = (cell + offset) * s``, ``(w, h) = exp(size) * s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from visstg.model.losses import centernet_focal_loss
from visstg.model.sparse import tower_at_levels

__all__ = [
    "Assignment",
    "CenterNetHead",
    "DEFAULT_SIZE_RANGES",
    "DEFAULT_STRIDES",
    "assign_targets",
    "centernet_loss",
    "decode_detections",
    "gather_at_cells",
    "gaussian_radius",
    "heatmap_targets",
    "neighbour_cells",
]

DEFAULT_STRIDES = (8, 16, 32, 64, 128)
DEFAULT_SIZE_RANGES = ((0, 64), (64, 128), (128, 256), (256, 512), (512, math.inf))
_MAX_LOG_SIZE = 12.0  # exp(12) * stride is far beyond any image; keeps untrained decodes finite


def _branch(in_channels: int, feat_channels: int, out_channels: int, num_convs: int, norm: bool):
    """``num_convs - 1`` x (3x3 conv [+ GroupNorm] + ReLU) followed by a 1x1 output conv."""
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(num_convs - 1):
        layers.append(nn.Conv2d(c, feat_channels, 3, padding=1, bias=not norm))
        if norm:
            layers.append(nn.GroupNorm(math.gcd(32, feat_channels), feat_channels))
        layers.append(nn.ReLU(inplace=True))
        c = feat_channels
    layers.append(nn.Conv2d(c, out_channels, 1))
    return nn.Sequential(*layers)


class CenterNetHead(nn.Module):
    """CenterNet head shared across FPN levels: class heatmap, box size, sub-cell offset.

    Each branch has ``num_convs`` convolution layers: ``num_convs - 1`` 3x3 convs with ReLU
    (GroupNorm if ``norm``) then a 1x1 output conv (the paper's "three-convolutional head").

    Args:
        num_classes: C.
        in_channels: channels of the (GNN-fused) FPN features.
        feat_channels: hidden channels of each branch.
        num_convs: conv layers per branch (>= 1).
        prior_bias: initial bias of the heatmap logits (-2.19 = sigmoid^-1(0.1), CenterNet).
        norm: use GroupNorm (32 groups, fewer when the width is not a multiple) after each hidden
            conv.
        objectness: the heatmap branch also predicts one class-agnostic centre heatmap (one more
            output channel of its last conv), trained on the maximum of the class targets.
            Decoding then finds peaks and scores on it and reads the class at the peak from
            the class heatmaps (:func:`decode_detections`), so an object whose class the model
            is unsure of still scores as an object. Not in the paper (CenterNet's heatmaps are
            per class only).

    Shapes:
        input: list over levels of ``[B, in_channels, H_l, W_l]``.
        output: dict with lists over levels: ``heatmap [B, C, H_l, W_l]`` (logits),
        ``size [B, 2, H_l, W_l]`` (log(w/stride), log(h/stride)), ``offset [B, 2, H_l, W_l]``
        (x, y in cells), and with ``objectness`` ``objectness [B, 1, H_l, W_l]`` (logits,
        returned with ``heatmap``).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        feat_channels: int = 256,
        num_convs: int = 3,
        prior_bias: float = -2.19,
        norm: bool = False,
        objectness: bool = False,
    ):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"CenterNetHead: num_convs must be >= 1, got {num_convs}")
        self.num_classes = num_classes
        self.objectness = objectness
        heat_channels = num_classes + int(objectness)
        self.heatmap = _branch(in_channels, feat_channels, heat_channels, num_convs, norm)
        self.size = _branch(in_channels, feat_channels, 2, num_convs, norm)
        self.offset = _branch(in_channels, feat_channels, 2, num_convs, norm)
        for branch in (self.heatmap, self.size, self.offset):
            for m in branch.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.01)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        # Offsets start at the middle of the cell rather than its corner.
        nn.init.constant_(self.offset[-1].bias, 0.5)
        nn.init.constant_(self.heatmap[-1].bias, prior_bias)

    def forward(
        self, feats: Sequence[Tensor], branches: Sequence[str] = ("heatmap", "size", "offset")
    ) -> dict[str, list[Tensor]]:
        """Run ``branches`` (default all three) on every level; inference runs the heatmap
        alone and reads size and offset at its peaks (:meth:`regress_at`)."""
        # heatmap [B, C, H_l, W_l], size / offset [B, 2, H_l, W_l] per level
        out = {name: [getattr(self, name)(f) for f in feats] for name in branches}
        if self.objectness and "heatmap" in out:
            c = self.num_classes
            out["objectness"] = [h[:, c:] for h in out["heatmap"]]  # [B, 1, H_l, W_l]
            out["heatmap"] = [h[:, :c] for h in out["heatmap"]]
        return out

    def regress_at(
        self, feats: Sequence[Tensor], level: Tensor, y: Tensor, x: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The size and offset branches of one image read at some cells only.

        Equal (up to float summation order) to gathering ``forward(feats)["size"]`` and
        ``["offset"]`` at the cells, without running the two branches over every location
        (:func:`visstg.model.sparse.tower_at_cells`): inference needs them at the top-k
        heatmap peaks only.

        Args:
            feats: list over levels of ``[1, in_channels, H_l, W_l]``.
            level, y, x: ``[k]`` long, level and cell of each peak.
        Returns:
            ``size [k, 2]`` (log(w/stride), log(h/stride)), ``offset [k, 2]`` (x, y in cells).
        """
        cells = torch.stack([y, x], dim=1)  # [k, 2]
        size = tower_at_levels(list(self.size), feats, level, cells)  # [k, 2]
        offset = tower_at_levels(list(self.offset), feats, level, cells)  # [k, 2]
        return size, offset


@dataclass
class Assignment:
    """Ground-truth instances of a batch assigned to FPN levels (one row per instance).

    Rows are the instances of all images concatenated in target-list order.

    Attributes (N rows):
        batch: ``[N]`` long, image index in the batch.
        level: ``[N]`` long, assigned level (0 = P3).
        cell: ``[N, 2]`` long, centre cell ``(y, x)`` on the assigned level.
        offset: ``[N, 2]`` float, sub-cell offset ``(x, y)`` in cells (centre/stride - cell).
        size: ``[N, 2]`` float, size target ``(log(w/stride), log(h/stride))``, w, h >= 1 px.
        boxes: ``[N, 4]`` float, xyxy in input pixels.
        centers: ``[N, 2]`` float, box centre ``(x, y)`` in input pixels.
        labels: ``[N]`` long class indices.
        track_ids: ``[N]`` long track ids.
        instance: ``[N]`` long, row of the instance in its image's target dict.
    """

    batch: Tensor
    level: Tensor
    cell: Tensor
    offset: Tensor
    size: Tensor
    boxes: Tensor
    centers: Tensor
    labels: Tensor
    track_ids: Tensor
    instance: Tensor

    def __len__(self) -> int:
        return int(self.batch.numel())

    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> Assignment:
        """An assignment with no instance (every tensor has 0 rows)."""
        long = dict(dtype=torch.long, device=device)
        flt = dict(dtype=torch.float32, device=device)
        return cls(
            batch=torch.zeros(0, **long),
            level=torch.zeros(0, **long),
            cell=torch.zeros(0, 2, **long),
            offset=torch.zeros(0, 2, **flt),
            size=torch.zeros(0, 2, **flt),
            boxes=torch.zeros(0, 4, **flt),
            centers=torch.zeros(0, 2, **flt),
            labels=torch.zeros(0, **long),
            track_ids=torch.zeros(0, **long),
            instance=torch.zeros(0, **long),
        )

    def to(self, device: torch.device | str) -> Assignment:
        return Assignment(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: Tensor) -> Assignment:
        """Rows ``index`` (bool mask or long indices) of every tensor."""
        return Assignment(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def assign_targets(
    targets: Sequence[dict[str, Tensor]],
    level_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int] = DEFAULT_STRIDES,
    size_ranges: Sequence[tuple[float, float]] = DEFAULT_SIZE_RANGES,
) -> Assignment:
    """Assign every ground-truth box to one FPN level by ``max(w, h)`` in input pixels.

    A box goes to the level whose ``[lo, hi)`` range holds ``max(w, h)``; a size outside every
    range (only possible with custom ranges) goes to the level whose range starts last at or
    below it (the first level if none). See the module docstring for cell/offset/size units.

    Args:
        targets: list of B target dicts (``boxes [n, 4]`` xyxy, ``labels [n]``,
            ``track_ids [n]``; other keys ignored), see docs/contracts.md.
        level_shapes: ``(H_l, W_l)`` of each level.
        strides: stride of each level in input pixels.
        size_ranges: ``(lo, hi)`` of ``max(w, h)`` for each level.
    Returns:
        :class:`Assignment` with one row per instance, on the device of the boxes.
    """
    num_levels = len(level_shapes)
    if len(strides) != num_levels or len(size_ranges) != num_levels:
        raise ValueError(
            f"assign_targets: {num_levels} level shapes but {len(strides)} strides and "
            f"{len(size_ranges)} size ranges; they must match one to one"
        )
    if len(targets) == 0:
        return Assignment.empty()
    device = targets[0]["boxes"].device
    for i, t in enumerate(targets):
        for key in ("boxes", "labels", "track_ids"):
            if key not in t:
                raise KeyError(f"assign_targets: target dict {i} has no {key!r} entry")
    boxes = torch.cat([t["boxes"].reshape(-1, 4).float() for t in targets])  # [N, 4]
    if boxes.numel() == 0:
        return Assignment.empty(device)
    counts = torch.tensor([t["boxes"].reshape(-1, 4).shape[0] for t in targets], device=device)
    batch = torch.repeat_interleave(torch.arange(len(targets), device=device), counts)  # [N]
    instance = torch.cat([torch.arange(int(c), device=device) for c in counts.tolist()])  # [N]
    labels = torch.cat([t["labels"].reshape(-1).long() for t in targets])
    track_ids = torch.cat([t["track_ids"].reshape(-1).long() for t in targets])

    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)  # [N, 2] (w, h)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2  # [N, 2] (x, y)
    side = wh.max(dim=1).values  # [N]
    lows = torch.tensor([float(r[0]) for r in size_ranges], device=device)
    level = (torch.bucketize(side, lows, right=True) - 1).clamp(0, num_levels - 1)  # [N]

    stride = torch.tensor([float(s) for s in strides], device=device)[level]  # [N]
    shapes = torch.tensor([list(s) for s in level_shapes], device=device)[level]  # [N, 2] (H, W)
    c = centers / stride[:, None]  # [N, 2] (x, y) in cells
    cell_xy = c.floor().long()
    cell_xy[:, 0] = cell_xy[:, 0].clamp(0, None).minimum(shapes[:, 1] - 1)
    cell_xy[:, 1] = cell_xy[:, 1].clamp(0, None).minimum(shapes[:, 0] - 1)
    offset = c - cell_xy.to(c.dtype)  # [N, 2] (x, y)
    size = torch.log(wh.clamp(min=1.0) / stride[:, None])  # [N, 2] (w, h)
    return Assignment(
        batch=batch,
        level=level,
        cell=cell_xy.flip(1).contiguous(),  # [N, 2] (y, x)
        offset=offset,
        size=size,
        boxes=boxes,
        centers=centers,
        labels=labels,
        track_ids=track_ids,
        instance=instance,
    )


def neighbour_cells(
    assignment: Assignment,
    level_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    radius: int = 0,
) -> tuple[Tensor, Tensor]:
    """Cells of the ``(2 radius + 1)^2`` window around every instance's centre cell.

    A window cell is kept when it lies on its level's map and its centre ``(x + 0.5) * stride``
    is inside the instance's box; the centre cell itself is always kept. ``radius=0`` gives one
    row per instance, the centre cells.

    Returns:
        ``rows [K]`` (assignment row of each cell, grouped by row in order) and
        ``cells [K, 2]`` ``(y, x)`` on the row's level.
    """
    n = len(assignment)
    rows = torch.arange(n, device=assignment.cell.device)
    if radius <= 0 or n == 0:
        return rows, assignment.cell
    d = torch.arange(-radius, radius + 1, device=rows.device)
    delta = torch.cartesian_prod(d, d)  # [W, 2] (dy, dx), W = (2r + 1)^2
    cells = assignment.cell[:, None] + delta[None]  # [N, W, 2]
    shapes = torch.tensor([list(s) for s in level_shapes], device=rows.device)
    shapes = shapes[assignment.level][:, None]  # [N, 1, 2] (H, W)
    stride = torch.tensor([float(s) for s in strides], device=rows.device)[assignment.level]
    centre = (cells.flip(-1).float() + 0.5) * stride[:, None, None]  # [N, W, 2] (x, y) pixels
    boxes = assignment.boxes[:, None]  # [N, 1, 4]
    keep = (
        (cells >= 0).all(-1)
        & (cells < shapes).all(-1)
        & (centre >= boxes[..., :2]).all(-1)
        & (centre <= boxes[..., 2:]).all(-1)
    ) | (delta == 0).all(-1)[None]  # [N, W]
    rows = rows[:, None].expand_as(keep)[keep]  # [K]
    return rows, cells[keep]


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CenterNet's Gaussian radius (in cells) for boxes of ``height x width`` cells.

    The smallest of three radii for which a box with corners shifted by the radius still has IoU
    ``>= min_overlap`` with the ground truth (CornerNet's three cases), using the quadratic-root
    expressions exactly as CenterNet evaluates them, so heatmaps match the reference method.
    Returns the real-valued radius; callers take ``floor`` and clamp at 0.
    """
    h, w = height.float(), width.float()
    m = min_overlap
    b1 = h + w
    c1 = w * h * (1 - m) / (1 + m)
    r1 = (b1 + torch.sqrt((b1 * b1 - 4 * c1).clamp(min=0))) / 2
    b2 = 2 * (h + w)
    c2 = (1 - m) * w * h
    r2 = (b2 + torch.sqrt((b2 * b2 - 16 * c2).clamp(min=0))) / 2
    a3 = 4 * m
    b3 = -2 * m * (h + w)
    c3 = (m - 1) * w * h
    r3 = (b3 + torch.sqrt((b3 * b3 - 4 * a3 * c3).clamp(min=0))) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def heatmap_targets(
    assignment: Assignment,
    level_shapes: Sequence[tuple[int, int]],
    batch_size: int,
    num_classes: int,
    strides: Sequence[int] = DEFAULT_STRIDES,
    min_overlap: float = 0.7,
    min_radius: int = 0,
) -> list[Tensor]:
    """Gaussian class heatmaps per level (CenterNet targets).

    Instance ``i`` on level ``l`` splats ``exp(-(dx^2 + dy^2) / (2 sigma^2))`` with
    ``sigma = (2r + 1) / 6`` around its centre cell over the square window ``|dx|, |dy| <= r``,
    ``r = max(min_radius, floor(gaussian_radius(h/stride, w/stride, min_overlap)))``;
    overlapping instances of the same class take the maximum. The centre cell is exactly 1.
    ``min_radius`` 0 is CenterNet's rule. On a stride-8 level that rule gives objects under
    ~29 px (under ~3.6 cells) radius 0: a one-cell target whose eight neighbours count as full
    negatives; CenterNet's own stride-4 output gives them radius >= 1 from ~15 px on.

    Returns:
        list over levels of ``[B, C, H_l, W_l]`` float tensors in ``[0, 1]``.
    """
    device = assignment.batch.device
    out = []
    for lvl, (h_l, w_l) in enumerate(level_shapes):
        heat = torch.zeros(batch_size * num_classes * h_l * w_l, device=device)
        sel = assignment.level == lvl
        if bool(sel.any()):
            a = assignment.select(sel)
            wh = (a.boxes[:, 2:] - a.boxes[:, :2]).clamp(min=0) / strides[lvl]  # [n, 2] cells
            radius = gaussian_radius(wh[:, 1], wh[:, 0], min_overlap).floor()
            radius = radius.clamp(min=max(0, min_radius)).long()  # [n]
            r_max = int(radius.max())
            d = torch.arange(-r_max, r_max + 1, device=device)  # [K]
            dy, dx = d[:, None], d[None, :]  # [K, 1], [1, K]
            sigma = (2 * radius.float() + 1) / 6  # [n]
            g = torch.exp(-(dx * dx + dy * dy)[None].float() / (2 * sigma[:, None, None] ** 2))
            ys = a.cell[:, 0, None, None] + dy[None]  # [n, K, 1]
            xs = a.cell[:, 1, None, None] + dx[None]  # [n, 1, K]
            ys, xs = torch.broadcast_tensors(ys, xs)  # [n, K, K]
            inside = (
                (dy.abs()[None] <= radius[:, None, None])
                & (dx.abs()[None] <= radius[:, None, None])
                & (ys >= 0)
                & (ys < h_l)
                & (xs >= 0)
                & (xs < w_l)
            )  # [n, K, K]
            plane = (a.batch * num_classes + a.labels)[:, None, None]  # [n, 1, 1]
            flat = (plane * h_l + ys) * w_l + xs  # [n, K, K]
            heat.scatter_reduce_(0, flat[inside], g[inside], reduce="amax")
        out.append(heat.view(batch_size, num_classes, h_l, w_l))
    return out


def gather_at_cells(maps: Sequence[Tensor], batch: Tensor, level: Tensor, cell: Tensor) -> Tensor:
    """Read the vector at ``(level, batch, y, x)`` of a list of per-level maps.

    Args:
        maps: list over levels of ``[B, K, H_l, W_l]``.
        batch: ``[N]`` image indices; level: ``[N]`` level indices; cell: ``[N, 2]`` (y, x).
    Returns:
        ``[N, K]`` (differentiable w.r.t. ``maps``).
    """
    k = maps[0].shape[1]
    out = maps[0].new_zeros(batch.numel(), k)
    for lvl, m in enumerate(maps):
        idx = (level == lvl).nonzero().squeeze(1)  # [n]
        if idx.numel() == 0:
            continue
        vals = m[batch[idx], :, cell[idx, 0], cell[idx, 1]]  # [n, K]
        out = out.index_put((idx,), vals)
    return out


def centernet_loss(
    pred: dict[str, list[Tensor]],
    assignment: Assignment,
    heatmaps: Sequence[Tensor],
    size_weight: float = 0.1,
    offset_weight: float = 1.0,
) -> dict[str, Tensor]:
    """CenterNet losses over all levels.

    ``loss_center`` = penalty-reduced focal loss (alpha 2, beta 4) summed over every level and
    divided by ``max(N, 1)``; ``loss_size`` / ``loss_offset`` = mean L1 over the ``N x 2`` targets
    read at the assigned centre cells, multiplied by their weights. With an ``objectness``
    prediction (:class:`CenterNetHead`), ``loss_objectness`` is the same focal loss of it
    against the maximum over classes of ``heatmaps`` (every object's Gaussian, whatever its
    class).

    Args:
        pred: :class:`CenterNetHead` output.
        assignment: from :func:`assign_targets`.
        heatmaps: from :func:`heatmap_targets`.
    Returns:
        dict ``loss_center``, ``loss_size``, ``loss_offset`` (+ ``loss_objectness``; scalars,
        graph-connected even when there is no instance).
    """
    num = len(assignment)
    loss_center = sum(
        centernet_focal_loss(logit, heat) for logit, heat in zip(pred["heatmap"], heatmaps)
    ) / max(num, 1)
    losses = {"loss_center": loss_center}
    if "objectness" in pred:
        losses["loss_objectness"] = sum(
            centernet_focal_loss(logit, heat.amax(1, keepdim=True))
            for logit, heat in zip(pred["objectness"], heatmaps)
        ) / max(num, 1)
    if num == 0:
        loss_size = sum(s.sum() for s in pred["size"]) * 0
        loss_offset = sum(o.sum() for o in pred["offset"]) * 0
    else:
        a = assignment
        size = gather_at_cells(pred["size"], a.batch, a.level, a.cell)  # [N, 2]
        offset = gather_at_cells(pred["offset"], a.batch, a.level, a.cell)  # [N, 2]
        loss_size = size_weight * F.l1_loss(size, a.size.to(size.dtype))
        loss_offset = offset_weight * F.l1_loss(offset, a.offset.to(offset.dtype))
    return {**losses, "loss_size": loss_size, "loss_offset": loss_offset}


@torch.no_grad()
def decode_detections(
    pred: dict[str, list[Tensor]],
    strides: Sequence[int],
    image_sizes: Tensor,
    topk: int = 100,
    nms_thresh: float = 0.6,
    score_thresh: float = 0.05,
    pool_size: int = 3,
    regress: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    class_agnostic: bool = False,
    min_score: float = 0.0,
) -> list[dict[str, Tensor]]:
    """Heatmap peaks -> boxes, per image.

    Peaks are cells equal to the max of their ``pool_size`` neighbourhood (per class, per level);
    the ``topk`` best over all levels and classes of an image are kept, those below
    ``score_thresh`` or whose decoded centre lies outside the valid region are dropped, boxes are
    clipped to the valid region and class-aware NMS (``nms_thresh``) runs across levels
    (``class_agnostic``: one NMS over every class, so peaks of several classes on one object
    leave only the highest-scoring one). With an ``objectness`` prediction the peaks and scores
    are those of the class-agnostic heatmap, each labelled with the class of highest heatmap
    at its cell.

    Args:
        pred: :class:`CenterNetHead` output (lists over levels); only ``heatmap`` is read
            when ``regress`` is given.
        strides: stride of each level.
        image_sizes: ``[B, 2]`` (h, w) of the valid (unpadded) region in input pixels.
        regress: ``(level, y, x) -> (size, offset)``, all ``[B, k]`` in and ``[B, 2, k]`` out:
            the size and offset at the top-k peaks, instead of reading them from
            ``pred["size"]`` / ``pred["offset"]`` (inference evaluates those branches at the
            peaks only, :meth:`CenterNetHead.regress_at`).
        min_score: also drop scores below it (kept when equal, as a tracker's
            ``score >= threshold`` keeps them; ``score_thresh`` drops scores equal to it).
    Returns:
        list of B dicts: ``boxes [D, 4]`` xyxy input px, ``scores [D]``, ``labels [D]``,
        ``levels [D]``, ``cells [D, 2]`` (y, x of the peak on its level), ``centers [D, 2]``
        (x, y input px of the peak: cell + predicted offset, before clipping), ``class_scores
        [D, C]`` (every class's heatmap probability at the peak's cell), sorted by score.
    """
    heat_maps = pred["heatmap"]
    bsz, num_classes = heat_maps[0].shape[:2]
    device = heat_maps[0].device
    shapes = [tuple(h.shape[-2:]) for h in heat_maps]
    scores_l = []
    for lvl, logit in enumerate(heat_maps):
        heat = logit.sigmoid()
        if "objectness" in pred:
            obj = pred["objectness"][lvl].sigmoid()  # [B, 1, H_l, W_l]
            peak = F.max_pool2d(obj, pool_size, stride=1, padding=pool_size // 2)
            # Each peak's score goes to its best class's plane, the others' stay 0.
            best = heat.argmax(1, keepdim=True)
            heat = torch.zeros_like(heat).scatter_(1, best, obj * (peak == obj))
            scores_l.append(heat.flatten(1))  # [B, C*H_l*W_l]
            continue
        peak = F.max_pool2d(heat, pool_size, stride=1, padding=pool_size // 2)
        scores_l.append((heat * (peak == heat)).flatten(1))  # [B, C*H_l*W_l]
    scores_all = torch.cat(scores_l, 1)  # [B, S] S = sum_l C*H_l*W_l

    score_sizes = torch.tensor([num_classes * h * w for h, w in shapes], device=device)
    score_starts = torch.cumsum(score_sizes, 0) - score_sizes  # [L]
    pix_sizes = torch.tensor([h * w for h, w in shapes], device=device)
    pix_starts = torch.cumsum(pix_sizes, 0) - pix_sizes  # [L]
    heights = torch.tensor([h for h, _ in shapes], device=device)
    widths = torch.tensor([w for _, w in shapes], device=device)
    stride_t = torch.tensor([float(s) for s in strides], device=device)

    k = min(topk, scores_all.shape[1])
    scores, idx = scores_all.topk(k, dim=1)  # [B, k]
    level = torch.bucketize(idx, score_starts, right=True) - 1  # [B, k]
    rem = idx - score_starts[level]  # index inside the level's [C, H, W] block
    hw = heights[level] * widths[level]
    label = rem // hw
    pix = rem % hw
    y, x = pix // widths[level], pix % widths[level]
    # Every class's heatmap at each peak's cell (the tracker's soft class votes).
    heat_all = torch.cat([h.flatten(2) for h in heat_maps], 2)  # [B, C, P] logits
    cls_flat = (pix_starts[level] + pix)[:, None, :].expand(-1, num_classes, -1)  # [B, C, k]
    class_scores = heat_all.gather(2, cls_flat).sigmoid().transpose(1, 2)  # [B, k, C]
    if regress is None:
        sizes_all = torch.cat([s.flatten(2) for s in pred["size"]], 2)  # [B, 2, P]
        offsets_all = torch.cat([o.flatten(2) for o in pred["offset"]], 2)  # P = sum_l H_l*W_l
        flat = (pix_starts[level] + pix)[:, None, :].expand(-1, 2, -1)  # [B, 2, k]
        size, offset = sizes_all.gather(2, flat), offsets_all.gather(2, flat)  # [B, 2, k] each
    else:
        size, offset = regress(level, y, x)  # [B, 2, k] each
    size = size.clamp(max=_MAX_LOG_SIZE)  # (w, h)
    s = stride_t[level]  # [B, k]
    cx = (x.to(s.dtype) + offset[:, 0]) * s
    cy = (y.to(s.dtype) + offset[:, 1]) * s
    w, h = size[:, 0].exp() * s, size[:, 1].exp() * s
    img_h = image_sizes[:, 0].to(device=device, dtype=s.dtype)[:, None]  # [B, 1]
    img_w = image_sizes[:, 1].to(device=device, dtype=s.dtype)[:, None]
    boxes = torch.stack(
        [
            (cx - w / 2).clamp(min=0).minimum(img_w),
            (cy - h / 2).clamp(min=0).minimum(img_h),
            (cx + w / 2).clamp(min=0).minimum(img_w),
            (cy + h / 2).clamp(min=0).minimum(img_h),
        ],
        dim=-1,
    )  # [B, k, 4]
    image = torch.arange(bsz, device=device)[:, None].expand(-1, k)  # [B, k]
    keep = (scores > score_thresh) & (scores >= min_score)
    keep &= (cx >= 0) & (cx < img_w) & (cy >= 0) & (cy < img_h)

    boxes, scores, label, level, image, class_scores = (
        t[keep] for t in (boxes, scores, label, level, image, class_scores)
    )
    cells = torch.stack([y[keep], x[keep]], dim=-1)  # [n, 2]
    centers = torch.stack([cx[keep], cy[keep]], dim=-1)  # [n, 2]
    groups = image if class_agnostic else image * num_classes + label
    kept = batched_nms(boxes, scores, groups, nms_thresh)  # sorted by score
    image = image[kept]
    out = []
    for b in range(bsz):
        sel = kept[image == b]
        out.append(
            {
                "boxes": boxes[sel],
                "scores": scores[sel],
                "labels": label[sel],
                "levels": level[sel],
                "cells": cells[sel],
                "centers": centers[sel],
                "class_scores": class_scores[sel],
            }
        )
    return out
