"""Fusion ablations of the paper's Table 2: the target maps without a graph.

VisSTG's default fusion is ``"relation"``: the spatial-temporal GNN (:mod:`visstg.model.gnn`)
turns the backbone maps F_t into F^_t. The two ablations replace it:

- ``"concat"``: :class:`ConcatFusion`, a convolution over the concatenation of the target and
  reference maps of each level (no graph, no instance-level reference).
- ``"none"``: F^_t = F_t, the backbone maps go to the heads unchanged (nothing to build).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["ConcatFusion", "box_features"]


def _groups(channels: int) -> int:
    """GroupNorm groups: at most 32, at least 2 channels each (a 1 x 1 map at P7 then still
    has 2 values per group in training)."""
    return math.gcd(32, max(channels // 2, 1))


class ConcatFusion(nn.Module):
    """Per-level fusion of the target maps with the reference frame's maps by convolution.

    ``F^_t^l = F_t^l + N([F_t^l, F_k^l])``, where N is ``num_convs`` 3x3 convolutions over the
    channel concatenation (GroupNorm + ReLU between them), shared across levels like every head.
    The last convolution starts at zero, so an untrained module is the plain branch F^_t = F_t
    (as the GNN is on a frame without reference nodes) and training only has to learn what the
    reference frame adds.

    Args:
        dim: channels D of every pyramid level.
        hidden: hidden channels (default D).
        num_convs: convolutions (>= 1).
        norm: GroupNorm after each hidden convolution.

    Shapes:
        tgt_feats, ref_feats: L maps ``[B, D, H_l, W_l]`` each (same shapes level by level).
        output: L fused maps ``[B, D, H_l, W_l]``.
    """

    def __init__(
        self, dim: int = 256, hidden: int | None = None, num_convs: int = 2, norm: bool = True
    ) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"ConcatFusion: num_convs must be >= 1, got {num_convs}")
        hidden = hidden or dim
        layers: list[nn.Module] = []
        c = 2 * dim
        for _ in range(num_convs - 1):
            layers.append(nn.Conv2d(c, hidden, 3, padding=1, bias=not norm))
            if norm:
                layers.append(nn.GroupNorm(_groups(hidden), hidden))
            layers.append(nn.ReLU(inplace=True))
            c = hidden
        layers.append(nn.Conv2d(c, dim, 3, padding=1))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, tgt_feats: Sequence[Tensor], ref_feats: Sequence[Tensor]) -> list[Tensor]:
        if len(tgt_feats) != len(ref_feats):
            raise ValueError(
                f"ConcatFusion: {len(tgt_feats)} target levels but {len(ref_feats)} reference levels"
            )
        return [
            t + self.net(torch.cat([t, k], dim=1))  # [B, 2D, H_l, W_l] -> [B, D, H_l, W_l]
            for t, k in zip(tgt_feats, ref_feats)
        ]


def box_features(feats: Sequence[Tensor], boxes: Tensor, strides: Sequence[int]) -> Tensor:
    """Mean of each level's map over each box (parameter-free ROIAlign to 1 x 1), one image.

    What a track keeps as its node features when there is no graph (``fusion`` ``"concat"`` or
    ``"none"``): the tracker stores them, nothing learned reads them.

    Shapes:
        feats: L maps ``[1, D, H_l, W_l]``; boxes: ``[N, 4]`` xyxy input px -> ``[N, L, D]``.
    """
    rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1).to(feats[0])  # [N, 5]
    pooled = [
        roi_align(f, rois, output_size=1, spatial_scale=1.0 / s, sampling_ratio=2, aligned=True)
        for f, s in zip(feats, strides)
    ]  # L x [N, D, 1, 1]
    return torch.stack(pooled, dim=1).flatten(2)  # [N, L, D]
