"""Association ablations of the paper's Table 2: embeddings and centre offsets instead of edges.

VisSTG's default association is ``"edge"``: the GNN's final edge features are classified
(:mod:`visstg.model.tracking`). The two ablations replace the edge classifier with a dense head on
the fused target maps, read at each instance's centre cell (the ground-truth centre in training,
the detected peak at inference), exactly where the dynamic mask kernels are read:

- ``"embedding"`` (MaskTrack R-CNN style), :class:`EmbeddingAssociation`: an embedding per
  instance. Training: each target instance is classified among the reference frame's instances
  of its image plus a "new" slot, with cross-entropy over the dot-product similarities (the new
  slot's logit is 0), :func:`embedding_loss`. Inference: the embedding probability is combined
  with box-IoU and class cues, :func:`embedding_scores`.
- ``"offset"`` (CenterTrack style), :class:`OffsetAssociation`: the displacement of each centre
  from its position in the previous frame. Like CenterTrack, the head sees both frames (the fused
  target maps concatenated with the reference frame's backbone maps). Training: L1 at the target
  centres whose track is in the reference frame, :func:`offset_loss`. Inference: the detection's
  predicted previous centre is matched by distance to the tracks' last centres, gated by IoU,
  :func:`offset_scores`.

Both give the same ``[R, Dn]`` association score in ``[0, 1]`` (0 = cannot match) as the edge
classifier, so :class:`visstg.tracker.OnlineTracker` associates all three the same way (greedy,
detections in descending score order, ``match_threshold``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from visstg.model.detection import Assignment, gather_at_cells

__all__ = [
    "EmbeddingAssociation",
    "OffsetAssociation",
    "association_losses",
    "embedding_loss",
    "embedding_scores",
    "gather_connected",
    "offset_loss",
    "offset_scores",
    "offset_targets",
]


def _groups(channels: int) -> int:
    """GroupNorm groups: at most 32, at least 2 channels each (a 1 x 1 map at P7 then still
    has 2 values per group in training)."""
    return math.gcd(32, max(channels // 2, 1))


def _conv_branch(
    in_channels: int, feat_channels: int, out_channels: int, num_convs: int, norm: bool
) -> nn.Sequential:
    """``num_convs - 1`` x (3x3 conv [+ GroupNorm] + ReLU), then a 1x1 output conv."""
    if num_convs < 1:
        raise ValueError(f"num_convs must be >= 1, got {num_convs}")
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(num_convs - 1):
        layers.append(nn.Conv2d(c, feat_channels, 3, padding=1, bias=not norm))
        if norm:
            layers.append(nn.GroupNorm(_groups(feat_channels), feat_channels))
        layers.append(nn.ReLU(inplace=True))
        c = feat_channels
    layers.append(nn.Conv2d(c, out_channels, 1))
    return nn.Sequential(*layers)


def gather_connected(maps: Sequence[Tensor], batch: Tensor, level: Tensor, cell: Tensor) -> Tensor:
    """:func:`gather_at_cells` that stays connected to every map when there is no row (so the
    head that made the maps gets a zero gradient, not none: no unused parameter under DDP)."""
    out = gather_at_cells(maps, batch, level, cell)  # [N, K]
    if out.shape[0] == 0:
        out = out + sum(m.sum() for m in maps) * 0
    return out


# ------------------------------------------------------------------ embedding (MaskTrack R-CNN)
class EmbeddingAssociation(nn.Module):
    """MaskTrack R-CNN style tracking head: an embedding map on the fused target maps.

    Args:
        in_channels: channels D of the pyramid maps.
        embed_dim: embedding size E.
        feat_channels: hidden channels.
        num_convs: conv layers (3x3 hidden convs, then a 1x1 output).
        norm: GroupNorm in the hidden convs.
        iou_weight, class_weight: weights of the box-IoU and class cues at inference
            (:func:`embedding_scores`; MaskTrack R-CNN's 2 and 10).

    Shapes:
        forward: L maps ``[B, D, H_l, W_l]`` -> L maps ``[B, E, H_l, W_l]``.
    """

    def __init__(
        self,
        in_channels: int = 256,
        embed_dim: int = 64,
        feat_channels: int = 256,
        num_convs: int = 3,
        norm: bool = True,
        iou_weight: float = 2.0,
        class_weight: float = 10.0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.iou_weight, self.class_weight = iou_weight, class_weight
        self.head = _conv_branch(in_channels, feat_channels, embed_dim, num_convs, norm)
        # Small initial embeddings: similarities start near 0 (every slot about equally likely).
        nn.init.normal_(self.head[-1].weight, std=0.01)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [self.head(f) for f in feats]  # L x [B, E, H_l, W_l]

    def scores(self, *args: Tensor) -> Tensor:
        """:func:`embedding_scores` with this head's cue weights."""
        return embedding_scores(*args, iou_weight=self.iou_weight, class_weight=self.class_weight)


def embedding_loss(
    tgt_embed: Tensor,
    ref_embed: Tensor,
    tgt_batch: Tensor,
    ref_batch: Tensor,
    tgt_track_ids: Tensor,
    ref_track_ids: Tensor,
) -> Tensor:
    """Cross-entropy of each target instance over {new} + the reference instances of its image.

    ``logits[n] = [0, e_n . e_m for every reference instance m of image batch[n]]``; the label is
    ``1 + m`` for the reference instance with the same track id, 0 ("new") when there is none.
    Mean over target instances; a zero still in the autograd graph when there is none.

    Args:
        tgt_embed: ``[N, E]``; ref_embed: ``[M, E]``.
        tgt_batch, tgt_track_ids: ``[N]`` long; ref_batch, ref_track_ids: ``[M]`` long.
    """
    zero = tgt_embed.sum() * 0 + ref_embed.sum() * 0
    if tgt_embed.shape[0] == 0:
        return zero
    same_image = tgt_batch[:, None] == ref_batch[None, :]  # [N, M]
    sim = (tgt_embed @ ref_embed.t()).masked_fill(~same_image, float("-inf"))  # [N, M]
    logits = torch.cat([sim.new_zeros(sim.shape[0], 1), sim], dim=1)  # [N, 1 + M]
    match = same_image & (tgt_track_ids[:, None] == ref_track_ids[None, :])  # [N, M]
    label = torch.where(match.any(1), match.float().argmax(1) + 1, 0)  # [N]
    return F.cross_entropy(logits.float(), label) + zero


def embedding_scores(
    det_embed: Tensor,
    ref_embed: Tensor,
    det_boxes: Tensor,
    ref_boxes: Tensor,
    det_labels: Tensor,
    ref_labels: Tensor,
    iou_weight: float = 2.0,
    class_weight: float = 10.0,
) -> Tensor:
    """Association scores of R reference tracks and Dn detections from embeddings + cues.

    For detection d: ``log p(. | d)`` = log-softmax over ``[0 (new), e_d . e_r for every r]``
    (the training classifier). The cues are added to each track's log-probability, MaskTrack
    R-CNN's combination: ``c[d, r] = log p(r | d) + iou_weight * IoU(box_r, box_d) +
    class_weight * ([label_r == label_d] - 1)``; the new slot keeps ``c[d, new] = log p(new | d)``.
    The score is ``softmax_r'(c[d, :])[r]`` over {new} + tracks: in ``[0, 1]``, and above 0.5
    only for a track that beats every other track and the new slot together. (MaskTrack R-CNN's
    detection-score term is the same for every slot of a detection, so it changes no decision;
    the tracker's greedy order by detection score is where it plays its part here.)

    Args:
        det_embed ``[Dn, E]``, ref_embed ``[R, E]``; det_boxes ``[Dn, 4]``, ref_boxes ``[R, 4]``
        (xyxy, the tracks' last boxes); det_labels ``[Dn]``, ref_labels ``[R]``.
    Returns:
        ``[R, Dn]`` float scores.
    """
    r, n = ref_embed.shape[0], det_embed.shape[0]
    if r == 0 or n == 0:
        return det_embed.new_zeros(r, n).float()
    sim = det_embed.float() @ ref_embed.float().t()  # [Dn, R]
    log_p = torch.cat([sim.new_zeros(n, 1), sim], dim=1).log_softmax(dim=1)  # [Dn, 1 + R]
    iou = box_iou(det_boxes.float(), ref_boxes.float())  # [Dn, R]
    same = (det_labels[:, None] == ref_labels[None, :].to(det_labels)).float()  # [Dn, R]
    cues = iou_weight * iou + class_weight * (same - 1)
    comp = torch.cat([log_p[:, :1], log_p[:, 1:] + cues], dim=1)  # [Dn, 1 + R]
    return comp.softmax(dim=1)[:, 1:].t().contiguous()  # [R, Dn]


# ------------------------------------------------------------------ offset (CenterTrack)
class OffsetAssociation(nn.Module):
    """CenterTrack style tracking head: each centre's displacement to the previous frame.

    The head reads the concatenation of the fused target maps and the reference (previous)
    frame's backbone maps, so it sees both frames whatever the fusion (with ``fusion="none"``
    too). Output (x, y) in cells of each level: ``previous centre = centre + stride * output``.

    Args:
        in_channels: channels D of the pyramid maps (the head takes 2 D).
        feat_channels: hidden channels.
        num_convs: conv layers (3x3 hidden convs, then a 1x1 output).
        norm: GroupNorm in the hidden convs.
        iou_gate: minimum IoU between a track's last box and the detection's box moved back by
            its predicted displacement (:func:`offset_scores`).

    Shapes:
        forward: L maps ``[B, D, H_l, W_l]`` (target) and L maps (reference) -> L maps
        ``[B, 2, H_l, W_l]``.
    """

    def __init__(
        self,
        in_channels: int = 256,
        feat_channels: int = 256,
        num_convs: int = 3,
        norm: bool = True,
        iou_gate: float = 0.1,
    ) -> None:
        super().__init__()
        self.iou_gate = iou_gate
        self.head = _conv_branch(2 * in_channels, feat_channels, 2, num_convs, norm)
        # Start at "no motion".
        nn.init.normal_(self.head[-1].weight, std=0.01)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, tgt_feats: Sequence[Tensor], ref_feats: Sequence[Tensor]) -> list[Tensor]:
        return [
            self.head(torch.cat([t, k], dim=1))  # [B, 2D, H_l, W_l] -> [B, 2, H_l, W_l]
            for t, k in zip(tgt_feats, ref_feats)
        ]

    def scores(self, *args: Tensor) -> Tensor:
        """:func:`offset_scores` with this head's IoU gate."""
        return offset_scores(*args, iou_gate=self.iou_gate)


def offset_targets(
    tgt: Assignment, ref: Assignment, strides: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Displacement targets of the target instances whose track is in the reference frame.

    Returns ``valid [N]`` bool (a reference instance of the same image has the track id) and
    ``target [N, 2]``: ``(ref centre - target centre) / stride`` of the target's level (x, y in
    cells; 0 where not valid).
    """
    device = tgt.centers.device
    n = len(tgt)
    if n == 0 or len(ref) == 0:
        return torch.zeros(n, dtype=torch.bool, device=device), tgt.centers.new_zeros(n, 2)
    match = (tgt.batch[:, None] == ref.batch[None, :].to(device)) & (
        tgt.track_ids[:, None] == ref.track_ids[None, :].to(device)
    )  # [N, M]
    valid = match.any(1)
    prev = ref.centers.to(device)[match.float().argmax(1)]  # [N, 2]
    stride = torch.tensor([float(s) for s in strides], device=device)[tgt.level]  # [N]
    target = (prev - tgt.centers) / stride[:, None]
    return valid, torch.where(valid[:, None], target, torch.zeros_like(target))


def offset_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """L1 over x and y, mean over the valid rows (a zero in the graph when none is valid).

    Args:
        pred, target: ``[N, 2]``; valid: ``[N]`` bool.
    """
    zero = pred.sum() * 0
    if not bool(valid.any()):
        return zero
    return (
        F.l1_loss(pred[valid].float(), target[valid].float(), reduction="sum") / valid.sum() + zero
    )


def offset_scores(
    prev_centers: Tensor,
    det_boxes: Tensor,
    ref_centers: Tensor,
    ref_boxes: Tensor,
    det_labels: Tensor,
    ref_labels: Tensor,
    iou_gate: float = 0.1,
) -> Tensor:
    """Association scores of R tracks and Dn detections from predicted previous centres.

    ``dist[r, d] = |prev_centre_d - last_centre_r|``; CenterTrack's radius is
    ``kappa = sqrt(min(area_d, area_r))`` (the smaller box's geometric-mean size). A pair can
    match when ``dist < kappa``, the classes agree and the track's last box overlaps the
    detection's box moved back by its displacement with ``IoU >= iou_gate``; its score is then
    ``1 - dist / (2 kappa)`` in ``(0.5, 1]`` (closest highest), else 0. So the tracker's greedy
    pass (detections by descending score, each its best free track, ``match_threshold`` 0.5)
    is CenterTrack's greedy matching by distance within its radius.

    Args:
        prev_centers ``[Dn, 2]`` (x, y px), det_boxes ``[Dn, 4]``; ref_centers ``[R, 2]``,
        ref_boxes ``[R, 4]`` (the tracks' last centres and boxes); det_labels ``[Dn]``,
        ref_labels ``[R]``.
    Returns:
        ``[R, Dn]`` float scores.
    """
    r, n = ref_centers.shape[0], prev_centers.shape[0]
    if r == 0 or n == 0:
        return prev_centers.new_zeros(r, n).float()
    prev_centers, det_boxes = prev_centers.float(), det_boxes.float()
    ref_centers, ref_boxes = ref_centers.float(), ref_boxes.float()
    dist = torch.cdist(ref_centers, prev_centers)  # [R, Dn]
    det_wh = (det_boxes[:, 2:] - det_boxes[:, :2]).clamp(min=1)  # [Dn, 2]
    ref_wh = (ref_boxes[:, 2:] - ref_boxes[:, :2]).clamp(min=1)  # [R, 2]
    area = torch.minimum(ref_wh.prod(1)[:, None], det_wh.prod(1)[None, :])  # [R, Dn]
    kappa = area.sqrt()
    shift = prev_centers - (det_boxes[:, :2] + det_boxes[:, 2:]) / 2  # [Dn, 2]
    moved = det_boxes + shift.repeat(1, 2)  # [Dn, 4] the detection's box in the previous frame
    iou = box_iou(ref_boxes, moved)  # [R, Dn]
    same = ref_labels[:, None].to(det_labels) == det_labels[None, :]
    ok = (dist < kappa) & (iou >= iou_gate) & same
    return torch.where(ok, 1 - dist / (2 * kappa), torch.zeros_like(dist))


# ------------------------------------------------------------------ criterion
def association_losses(outputs: dict[str, Any]) -> dict[str, Tensor]:
    """The ablation association losses present in ``VisSTG.forward_train``'s outputs.

    - ``loss_embed`` (:func:`embedding_loss`) when ``embeddings_tgt`` / ``embeddings_ref`` are
      there (association ``"embedding"``);
    - ``loss_track_offset`` (:func:`offset_loss`) when ``track_offsets`` is (``"offset"``).
    Empty for the default edge association.
    """
    losses: dict[str, Tensor] = {}
    tgt: Assignment = outputs["tgt_assignment"]
    ref: Assignment = outputs["ref_assignment"]
    if outputs.get("embeddings_tgt") is not None:
        e_t, e_r = outputs["embeddings_tgt"], outputs["embeddings_ref"]
        dev = e_t.device
        losses["loss_embed"] = embedding_loss(
            e_t, e_r, tgt.batch.to(dev), ref.batch.to(dev), tgt.track_ids.to(dev),
            ref.track_ids.to(dev),
        )  # fmt: skip
    if outputs.get("track_offsets") is not None:
        pred = outputs["track_offsets"]
        valid, target = offset_targets(tgt.to(pred.device), ref, outputs["strides"])
        losses["loss_track_offset"] = offset_loss(pred, target, valid)
    return losses
