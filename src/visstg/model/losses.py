"""Pure loss functions of VisSTG (no parameters, no config).

Every loss returns a scalar that stays in the autograd graph even when there is nothing to score
(``x.sum() * 0``), so an empty batch still back-propagates zeros into every parameter that
produced ``x`` and distributed training never hangs waiting for a missing gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "box_bce_loss",
    "centernet_focal_loss",
    "dice_loss",
    "downsample_masks",
    "edge_loss",
]


def centernet_focal_loss(
    logits: Tensor, heatmap: Tensor, alpha: float = 2.0, beta: float = 4.0
) -> Tensor:
    """Penalty-reduced pixel-wise focal loss of CenterNet, *summed* (not normalised).

    With ``p = sigmoid(logits)`` and Gaussian target ``y``::

        pos (y == 1):  -(1 - p)^alpha * log(p)
        neg (y <  1):  -(1 - y)^beta * p^alpha * log(1 - p)

    The caller divides by the number of objects. ``log(p)`` and ``log(1 - p)`` are computed with
    ``logsigmoid`` so that saturated logits stay finite (no probability clamping).

    Args:
        logits: heatmap logits, any shape (e.g. ``[B, C, H, W]``).
        heatmap: Gaussian targets in ``[0, 1]``, same shape; positives are exactly 1.
    Returns:
        scalar sum of the per-pixel losses.
    """
    if logits.shape != heatmap.shape:
        raise ValueError(
            f"centernet_focal_loss: logits {tuple(logits.shape)} and heatmap "
            f"{tuple(heatmap.shape)} differ in shape"
        )
    logits = logits.float()  # the pow/log terms underflow in half precision
    heatmap = heatmap.float()
    p = logits.sigmoid()
    log_p = F.logsigmoid(logits)  # log(p)
    log_1mp = F.logsigmoid(-logits)  # log(1 - p)
    pos = heatmap.eq(1).to(logits.dtype)
    pos_loss = -((1 - p) ** alpha) * log_p * pos
    neg_loss = -((1 - heatmap) ** beta) * (p**alpha) * log_1mp * (1 - pos)
    return (pos_loss + neg_loss).sum()


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1e-5) -> Tensor:
    """Dice loss (V-Net form) averaged over instances.

    ``dice_i = 2 * sum(p * t) / (sum(p^2) + sum(t^2) + eps)`` with ``p = sigmoid(logits)``,
    loss = ``mean_i(1 - dice_i)``.

    Args:
        logits: ``[N, h, w]`` mask logits.
        targets: ``[N, h, w]`` targets in ``[0, 1]`` (bool or float), same shape.
    Returns:
        scalar; ``logits.sum() * 0`` (zero, still in the graph) when ``N == 0``.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"dice_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
            "differ in shape"
        )
    if logits.numel() == 0:
        return logits.sum() * 0
    p = logits.float().sigmoid().flatten(1)  # [N, h*w]
    t = targets.to(p.dtype).flatten(1)  # [N, h*w]
    inter = (p * t).sum(1)
    union = (p * p).sum(1) + (t * t).sum(1)
    dice = 2 * inter / (union + eps)
    return (1 - dice).mean()


def box_bce_loss(logits: Tensor, targets: Tensor, boxes: Tensor, stride: int = 4) -> Tensor:
    """Per-pixel binary cross-entropy inside each instance's box, averaged over instances.

    Dice scores a mask as a whole; inside the box this adds a per-pixel term, so a wrong region
    that dice hardly notices (the hole of a ring predicted as a filled disc costs dice 0.14 at a
    hole of half the radius) is penalised cell by cell.

    Args:
        logits: ``[N, h, w]`` mask logits at ``stride``.
        targets: ``[N, h, w]`` targets in ``[0, 1]``.
        boxes: ``[N, 4]`` xyxy in input pixels; cell ``(i, j)`` covers pixels
            ``[j * stride, (j + 1) * stride)`` (and the same in y) and counts when it overlaps
            the box (a box of positive size has at least one).
    Returns:
        scalar: the mean over instances of the mean BCE over their box cells (``logits.sum() *
        0`` when ``N == 0``).
    """
    if logits.shape != targets.shape or boxes.shape != (logits.shape[0], 4):
        raise ValueError(
            f"box_bce_loss: logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and "
            f"boxes {tuple(boxes.shape)} do not match ([N, h, w], [N, h, w], [N, 4])"
        )
    if logits.numel() == 0:
        return logits.sum() * 0
    n, h, w = logits.shape
    lo = torch.arange(h, device=logits.device, dtype=boxes.dtype) * stride  # [h] cell tops
    ys = (lo[None] + stride > boxes[:, 1:2]) & (lo[None] < boxes[:, 3:4])  # [N, h]
    lo = torch.arange(w, device=logits.device, dtype=boxes.dtype) * stride
    xs = (lo[None] + stride > boxes[:, 0:1]) & (lo[None] < boxes[:, 2:3])  # [N, w]
    inside = (ys[:, :, None] & xs[:, None, :]).to(torch.float32)  # [N, h, w]
    bce = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), reduction="none"
    )  # [N, h, w]
    per_instance = (bce * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)
    return per_instance.mean()


def downsample_masks(masks: Tensor, stride: int = 4) -> Tensor:
    """Ground-truth masks in input pixels -> soft targets at the mask-logit resolution.

    Each output cell ``(i, j)`` covers input pixels ``[i*stride, (i+1)*stride)`` (and the same in
    x), whose centre ``(i + 0.5) * stride`` is where :func:`visstg.model.segmentation.
    upsample_mask_logits` places logit ``(i, j)``. The value is the fraction of the cell covered by
    the mask (average pooling). Masks whose size is not a multiple of ``stride`` are zero-padded.

    Args:
        masks: ``[N, H, W]`` bool/float masks (padded input resolution).
        stride: output stride (4 for VisSTG's mask logits).
    Returns:
        ``[N, ceil(H/stride), ceil(W/stride)]`` float in ``[0, 1]``.
    """
    if masks.dim() != 3:
        raise ValueError(f"downsample_masks expects [N, H, W] masks, got {tuple(masks.shape)}")
    m = masks.float()
    n, h, w = m.shape
    ph, pw = (-h) % stride, (-w) % stride
    if ph or pw:
        m = F.pad(m, (0, pw, 0, ph))
    if n == 0:
        return m.new_zeros(0, m.shape[1] // stride, m.shape[2] // stride)
    return F.avg_pool2d(m[:, None], stride, stride)[:, 0]  # [N, H/s, W/s]


def edge_loss(logits: Tensor, labels: Tensor, all_logits: Tensor | None = None) -> Tensor:
    """Binary cross-entropy over the pruned edge set E_prune (paper Eq. 6).

    Args:
        logits: ``[K]`` logits of the edges of E_prune (e.g. ``all_logits[edge_ids]``).
        labels: ``[K]`` targets in ``{0, 1}``.
        all_logits: optional ``[E]`` logits of every edge; when ``K == 0`` the zero loss is taken
            from it so it stays connected to the classifier (``logits`` itself, if it was indexed
            from the full tensor, also stays connected).
    Returns:
        scalar mean BCE-with-logits; zero (in the graph) when ``K == 0``.
    """
    if logits.shape != labels.shape:
        raise ValueError(
            f"edge_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
            "differ in shape"
        )
    if logits.numel() == 0:
        src = all_logits if all_logits is not None else logits
        return src.sum() * 0
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
