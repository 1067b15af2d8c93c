"""The training objective (paper Eq. 7): L = l1 * L_det + l2 * L_mask + l3 * L_edge.

``VisSTGCriterion`` turns ``VisSTG.forward_train``'s raw outputs and the batch's ground truth into
targets (Gaussian heatmaps, stride-4 masks, E_prune edge labels) and scores them with the pure
loss functions of ``visstg.model.losses`` / ``detection`` / ``tracking``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visstg.model.association import association_losses
from visstg.model.detection import Assignment, centernet_loss, heatmap_targets
from visstg.model.losses import box_bce_loss, dice_loss, downsample_masks, edge_loss
from visstg.model.segmentation import upsample_mask_logits
from visstg.model.tracking import edge_training_targets

LOSS_KEYS = (
    "loss_center",
    "loss_size",
    "loss_offset",
    "loss_mask",
    "loss_mask_warp",
    "loss_mask_ref",
    "loss_edge",
)
# Losses of the association ablations (model.association=embedding / offset); a criterion output
# has the one of its variant instead of loss_edge.
ASSOCIATION_LOSS_KEYS = ("loss_embed", "loss_track_offset")
# Present only with VisSTG(ref_detection=True).
REF_DETECTION_LOSS_KEY = "loss_det_ref"
# Present only with a class-agnostic centre heatmap (CenterNetHead(objectness=True)).
OBJECTNESS_LOSS_KEY = "loss_objectness"


def assignment_masks(
    targets: Sequence[dict[str, Tensor]], assignment: Assignment, shape: tuple[int, int]
) -> Tensor:
    """Ground-truth masks of the assigned instances, in assignment order: ``[N, H, W]`` bool."""
    rows = [
        targets[b]["masks"][i]
        for b, i in zip(assignment.batch.tolist(), assignment.instance.tolist())
    ]
    if not rows:
        return torch.zeros(0, *shape, dtype=torch.bool, device=assignment.batch.device)
    return torch.stack(rows)  # [N, H, W]


def _match(logits: Tensor, target: Tensor) -> Tensor:
    """Crop or zero-pad ``target [N, h', w']`` to ``logits``' spatial size (they differ by a cell
    when the input is not a multiple of 8)."""
    h, w = logits.shape[-2:]
    target = target[..., :h, :w]
    return F.pad(target, (0, w - target.shape[-1], 0, h - target.shape[-2]))


class VisSTGCriterion(nn.Module):
    """L_total = l1 * L_det + l2 * L_mask + l3 * L_edge (paper Eq. 3, 6, 7).

    - L_det = loss_center + loss_size + loss_offset (CenterNet; ``size_weight`` and
      ``offset_weight`` are already applied to the last two, paper Eq. 3), + loss_objectness
      with a class-agnostic centre heatmap (``CenterNetHead(objectness=True)``).
    - L_mask = mask_weights[target] * loss_mask (dice of M, target kernels) +
      mask_weights[warp] * loss_mask_warp (dice of M', warped reference kernels) +
      mask_weights[ref] * loss_mask_ref (dice of the reference frame's masks, paper 3.6).
      With ``mask_bce`` > 0 each of the three also adds ``mask_bce`` times the per-pixel BCE
      inside the instance's box (:func:`visstg.model.losses.box_bce_loss`; the paper: dice only).
    - With ``VisSTG(ref_detection=True)`` L_det also has ``weights[det_ref] * loss_det_ref``,
      the same three terms on the reference frame's unfused maps.
    - L_edge = loss_edge (BCE over E_prune, paper Eq. 6), or for the association ablations
      (:mod:`visstg.model.association`) instead: weights[embed] * loss_embed (cross-entropy over
      {new} + reference instances) or weights[track_offset] * loss_track_offset (L1 of the
      displacement to the previous centre).

    Args:
        weights: ``{"det": l1, "mask": l2, "edge": l3, "embed", "track_offset"}``.
        size_weight, offset_weight: lambda_size, lambda_offset.
        mask_weights: ``{"target", "warp", "ref"}`` weights inside L_mask.
        min_overlap: Gaussian radius parameter of the heatmap targets.
        min_radius: smallest Gaussian radius in cells (0: CenterNet's; see
            :func:`~visstg.model.detection.heatmap_targets`).
        mask_target_stride: stride of the mask logits (4).
        mask_bce: weight of the in-box BCE added to every dice term (0: the paper's dice only).
        mask_loss_stride: stride at which the mask losses compare (None: ``mask_target_stride``,
            the logits against the ground truth averaged over their cells, CondInst's). A
            divisor of ``mask_target_stride``: the logits are first upsampled bilinearly to it
            (:func:`~visstg.model.segmentation.upsample_mask_logits`, as inference does before
            thresholding), so at 1 the loss sees the binary masks and trains the boundary the
            thresholded upsampled logits draw.

    ``forward(outputs, batch)`` returns every ``loss_*`` component (unweighted by l1-l3) and
    ``loss``, the total. All are finite scalars connected to the autograd graph, also when the
    batch has no instance or no edge.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        size_weight: float = 0.1,
        offset_weight: float = 1.0,
        mask_weights: Mapping[str, float] | None = None,
        min_overlap: float = 0.7,
        min_radius: int = 0,
        mask_target_stride: int = 4,
        mask_bce: float = 0.0,
        mask_loss_stride: int | None = None,
    ) -> None:
        super().__init__()
        loss_stride = mask_target_stride if mask_loss_stride is None else int(mask_loss_stride)
        if loss_stride < 1 or mask_target_stride % loss_stride:
            raise ValueError(
                f"VisSTGCriterion: mask_loss_stride {mask_loss_stride} must divide the mask "
                f"logits' stride {mask_target_stride}"
            )
        self.mask_loss_stride = loss_stride
        self.weights = {
            "det": 1.0, "mask": 1.0, "edge": 1.0, "embed": 1.0, "track_offset": 1.0, "det_ref": 1.0,
            **dict(weights or {}),
        }  # fmt: skip
        self.mask_weights = {"target": 1.0, "warp": 1.0, "ref": 1.0, **dict(mask_weights or {})}
        self.size_weight = size_weight
        self.offset_weight = offset_weight
        self.min_overlap = min_overlap
        if int(min_radius) != min_radius or min_radius < 0:
            raise ValueError(
                f"VisSTGCriterion: min_radius must be a whole number of cells >= 0, "
                f"got {min_radius}"
            )
        self.min_radius = int(min_radius)
        self.mask_target_stride = mask_target_stride
        self.mask_bce = float(mask_bce)

    def _mask_loss(
        self,
        logits: Tensor,
        targets: Sequence[dict[str, Tensor]],
        a: Assignment,
        rows: Tensor | None = None,
    ) -> Tensor:
        """Dice (+ ``mask_bce`` x in-box BCE) of ``logits [K, h, w]`` against the masks of
        ``a``'s instances ``rows`` (every instance once, in order, when None)."""
        shape = tuple(targets[0]["masks"].shape[-2:]) if targets else (0, 0)
        if rows is not None:
            a = a.select(rows)
        masks = assignment_masks(targets, a, shape).to(logits.device)  # [K, H, W]
        stride = self.mask_loss_stride
        if stride != self.mask_target_stride:
            logits = upsample_mask_logits(logits.float(), self.mask_target_stride // stride)
        soft = _match(logits, downsample_masks(masks, stride))  # [K, H/s, W/s]
        loss = dice_loss(logits, soft)
        if self.mask_bce > 0:
            boxes = a.boxes.to(logits.device, torch.float32)
            loss = loss + self.mask_bce * box_bce_loss(logits, soft, boxes, stride)
        return loss

    def _centernet(
        self, det: dict[str, list[Tensor]], a: Assignment, outputs: dict[str, Any]
    ) -> dict[str, Tensor]:
        """loss_center, loss_size, loss_offset of one frame's detection outputs against the
        Gaussian heatmaps of its assigned ground truth."""
        heatmaps = heatmap_targets(
            a,
            outputs["level_shapes"],
            outputs["batch_size"],
            outputs["num_classes"],
            outputs["strides"],
            self.min_overlap,
            self.min_radius,
        )  # L x [B, C, H_l, W_l]
        return centernet_loss(det, a, heatmaps, self.size_weight, self.offset_weight)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, Tensor]:
        tgt: Assignment = outputs["tgt_assignment"]
        ref: Assignment = outputs["ref_assignment"]
        losses = self._centernet(outputs["det"], tgt, outputs)
        det_ref = outputs.get("det_ref")
        if det_ref is not None:  # VisSTG(ref_detection=True): L_det on the reference frame too
            losses[REF_DETECTION_LOSS_KEY] = sum(self._centernet(det_ref, ref, outputs).values())

        # Keeps every kernel map (and so the controller / warp module) in the graph even when
        # a frame has no instance and the gathered kernels are empty.
        zero = sum(m.sum() for maps in outputs["kernel_maps"].values() for m in maps) * 0
        losses["loss_mask"] = (
            self._mask_loss(
                outputs["mask_logits"], batch["tgt_targets"], tgt, outputs.get("mask_rows")
            )
            + zero
        )
        warp = outputs.get("mask_warp_logits")
        losses["loss_mask_warp"] = (
            self._mask_loss(warp, batch["tgt_targets"], tgt) + zero if warp is not None else zero
        )
        losses["loss_mask_ref"] = (
            self._mask_loss(
                outputs["ref_mask_logits"], batch["ref_targets"], ref, outputs.get("ref_mask_rows")
            )
            + zero
        )

        ref_labels = torch.cat([t["labels"].long() for t in batch["ref_targets"]])  # [M]
        ref_tracks = torch.cat([t["track_ids"].long() for t in batch["ref_targets"]])  # [M]
        logits = outputs.get("edge_logits")
        if logits is not None:  # association "edge"
            graph = outputs["graph"]
            edge_ids, labels = edge_training_targets(
                graph, tgt, ref_labels, ref_tracks, outputs.get("edge_class_agnostic", False)
            )
            losses["loss_edge"] = edge_loss(logits[edge_ids], labels, all_logits=logits)
        losses.update(association_losses(outputs))  # loss_embed / loss_track_offset

        w, mw = self.weights, self.mask_weights
        l_det = losses["loss_center"] + losses["loss_size"] + losses["loss_offset"]
        if OBJECTNESS_LOSS_KEY in losses:
            l_det = l_det + losses[OBJECTNESS_LOSS_KEY]
        l_mask = (
            mw["target"] * losses["loss_mask"]
            + mw["warp"] * losses["loss_mask_warp"]
            + mw["ref"] * losses["loss_mask_ref"]
        )
        l_assoc = sum(
            w[key[5:]] * losses[key]
            for key in ("loss_edge", *ASSOCIATION_LOSS_KEYS)
            if key in losses
        )
        if REF_DETECTION_LOSS_KEY in losses:
            l_det = l_det + w["det_ref"] * losses[REF_DETECTION_LOSS_KEY]
        losses["loss"] = w["det"] * l_det + w["mask"] * l_mask + l_assoc
        return losses
