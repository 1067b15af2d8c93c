"""CondInst-style segmentation (paper 3.4, DESIGN.md "Segmentation").

The controller predicts, at every location of every level, the 169 parameters of a tiny
per-instance FCN (three dynamic 1x1 convs). The mask branch turns P3-P5 into 8 shared mask
channels at stride 8. An instance's kernel is read at its centre cell (ground truth in training,
detected peak at inference) and run on ``[mask_feats, relative_coords]``.

Coordinate conventions (consistent with :mod:`visstg.model.detection`):

- Mask-feature cell ``(i, j)`` at stride ``s`` stands for input pixel ``((j + 0.5) s, (i + 0.5) s)``
  (the centre of the pixels it covers).
- Relative coordinates are ``(location - instance centre) / size_of_interest``, channels ``(x, y)``.
- Mask logits are upsampled x2 with bilinear ``align_corners=False``, which keeps that
  convention: logit ``(i, j)`` at stride 4 stands for pixel ``((j + 0.5) 4, (i + 0.5) 4)``; the
  matching targets come from :func:`visstg.model.losses.downsample_masks`.
- The dynamic convs see ``[mask_feats (8), relative_coords (2)]`` in that order (paper Eq. 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visstg.model.detection import gather_at_cells
from visstg.model.sparse import local_layers, tower_at_levels, tower_on_mask

__all__ = [
    "DEFAULT_SIZES_OF_INTEREST",
    "Controller",
    "LazyKernelMaps",
    "MaskBranch",
    "ProjectionMaskBranch",
    "dynamic_mask_head",
    "gather_at_cells",
    "num_dynamic_params",
    "parse_dynamic_params",
    "relative_coords",
    "upsample_mask_logits",
]

DEFAULT_SIZES_OF_INTEREST = (64, 128, 256, 512, 1024)


def num_dynamic_params(in_channels: int = 10, channels: int = 8, num_layers: int = 3) -> int:
    """Number of parameters of the dynamic FCN: ``(10*8+8) + (8*8+8) + (8*1+1) = 169``."""
    dims = [in_channels] + [channels] * (num_layers - 1) + [1]
    return sum(i * o + o for i, o in zip(dims[:-1], dims[1:]))


def _conv_norm_relu(in_channels: int, out_channels: int, norm: bool) -> list[nn.Module]:
    """3x3 conv (+ GroupNorm, at most 32 groups) + ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.GroupNorm(math.gcd(32, out_channels), out_channels))
    return layers + [nn.ReLU(inplace=True)]


class Controller(nn.Module):
    """Conv head shared across levels predicting the dynamic mask-head parameters.

    Args:
        in_channels: channels of the (fused) FPN features.
        num_params: parameters per location (169 for the default dynamic FCN).
        feat_channels: hidden channels.
        num_convs: hidden 3x3 conv + ReLU layers before the 3x3 output conv.
        norm: GroupNorm after each hidden conv. Off by default (paper setup); the small
            from-scratch default turns it on so the cubic dynamic head's parameters stay bounded
            under Adam-style optimisers.

    Shapes:
        input: list over levels of ``[B, in_channels, H_l, W_l]``.
        output: list over levels of ``[B, num_params, H_l, W_l]``.
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_params: int = 169,
        feat_channels: int = 256,
        num_convs: int = 2,
        norm: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(num_convs):
            layers += _conv_norm_relu(c, feat_channels, norm)
            c = feat_channels
        self.tower = nn.Sequential(*layers)
        self.num_params = num_params
        self.out = nn.Conv2d(c, num_params, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [self.out(self.tower(f)) for f in feats]  # [B, num_params, H_l, W_l]

    def at_cells(self, feats: Sequence[Tensor], level: Tensor, cells: Tensor) -> Tensor:
        """``forward(feats)`` of one image read at ``(level, cell)``: ``[N, num_params]``,
        computed only where those cells depend on it (:mod:`visstg.model.sparse`)."""
        return tower_at_levels([*self.tower, self.out], feats, level, cells)

    def on_mask(self, feat: Tensor, mask: Tensor) -> Tensor:
        """``forward([feat])[0]`` for one image ``[1, C, H, W]``, exact on the cells of ``mask
        [H, W]`` (zero elsewhere unless the tower is not local, then computed everywhere)."""
        layers = local_layers([*self.tower, self.out])
        if layers is None:
            return self.out(self.tower(feat))
        return tower_on_mask(layers, feat, mask)


class LazyKernelMaps(Sequence[Tensor]):
    """theta = ``controller(feats)``, a list over levels of ``[1, num_params, H_l, W_l]``,
    computed when it is read.

    The online state carries the kernels of frame t-1 for frame t's warp, which reads them only
    near the detections of frame t; :meth:`on_mask` computes a level only where it is read.
    Indexing or iterating computes (and caches) whole levels, so the object is the list of maps
    it stands for.

    Args:
        controller: the :class:`Controller`.
        feats: list over levels of ``[1, C, H_l, W_l]``.
        maps: ``controller(feats)`` if already computed (then nothing is recomputed).
    """

    def __init__(
        self,
        controller: Controller,
        feats: Sequence[Tensor],
        maps: Sequence[Tensor] | None = None,
    ) -> None:
        self.controller = controller
        self.feats = list(feats)
        # Already computed levels (``maps``: controller(feats) when the caller has it).
        self._dense: dict[int, Tensor] = dict(enumerate(maps)) if maps is not None else {}

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, level):  # type: ignore[override]
        if isinstance(level, slice):
            return [self[i] for i in range(len(self))[level]]
        level = range(len(self))[level]  # negative indices, IndexError
        if level not in self._dense:
            with torch.no_grad():
                self._dense[level] = self.controller([self.feats[level]])[0]
        return self._dense[level]

    def on_mask(self, level: int, mask: Tensor) -> Tensor:
        """Level ``level`` ``[1, num_params, H_l, W_l]``, exact on the cells of ``mask``."""
        if level in self._dense:
            return self._dense[level]
        with torch.no_grad():
            return self.controller.on_mask(self.feats[level], mask)


class _MaskFeatures(nn.Module):
    """What every mask branch shares: its stride-8 features (``_stride8``, from P3 first), then
    the resize to the output stride and the optional stride-4 detail of the backbone's C2 map.

    ``upsample`` > 1 resizes the ``out_channels`` features bilinearly (``align_corners=False``,
    which keeps the cell-centre convention) to stride ``8 / upsample``, so the dynamic head runs
    on a finer grid of relative coordinates and draws sharper boundaries than upsampled logits;
    the model's ``mask_feat_stride`` must say the same stride.

    ``fine`` (needs ``upsample`` 2 or 4) adds real stride-4 detail: the forward also takes a
    stride-4 map (``ResNetFPN(fine_level=True)``'s C2 lateral), which goes through one 3x3 conv
    (``in_channels -> channels``) + ReLU (GroupNorm with ``norm``) and a 1x1 conv to
    ``out_channels``, and is added to the output upsampled to stride 4; with ``upsample=4`` that
    sum is then resized bilinearly to stride 2, where the dynamic head draws the mask from it and
    relative coordinates of a stride-2 grid. Upsampled stride-8 features can only hold what a
    stride-8 grid holds: on the synthetic data at the then-default 128-pixel input, ground-truth
    masks seen through a stride-8 grid reach IoU 0.41 for rings and 0.56-0.77 for the other
    shapes, through a stride-4 grid 0.78-0.90 (scripts/mask_oracle.py); conf/mask_branch/ has
    what it changed in training.

    ``stem_channels`` > 0 (needs ``fine`` and ``upsample=4``) adds real stride-2 detail the same
    way: the forward's ``fine`` is then a pair (stride-4 map, stride-2 map with
    ``stem_channels`` channels, ``ResNetFPN(stem_channels=...)``'s stem lateral); the stride-2 map
    goes through one 3x3 conv (``stem_channels -> stem_channels``) + ReLU (GroupNorm with
    ``norm``) and a 1x1 conv to ``out_channels``, and is added to the stride-4 sum resized to
    stride 2, where the dynamic head then runs.

    Shapes:
        input: list over levels of ``[B, in_channels, H_l, W_l]`` (at least ``num_levels``),
        and with ``fine`` ``[B, in_channels, 2 * H_3, 2 * W_3]`` (with ``stem_channels``, that
        and ``[B, stem_channels, 4 * H_3, 4 * W_3]``).
        output: ``[B, out_channels, upsample * H_3, upsample * W_3]`` (stride 8 / upsample).
    """

    num_levels = 1

    def __init__(self, upsample: int, fine: bool, stem_channels: int = 0) -> None:
        super().__init__()
        name = type(self).__name__
        if upsample < 1:
            raise ValueError(f"{name}: upsample must be >= 1, got {upsample}")
        if fine and upsample not in (2, 4):
            raise ValueError(
                f"{name}: fine=True adds a stride-4 map, so upsample must be 2 (output at "
                f"stride 4) or 4 (the sum resized to stride 2), got {upsample}"
            )
        if stem_channels < 0 or (stem_channels and not (fine and upsample == 4)):
            raise ValueError(
                f"{name}: stem_channels > 0 adds a stride-2 map after the stride-4 one, so it "
                f"needs fine=True and upsample=4 (got stem_channels={stem_channels}, "
                f"fine={fine}, upsample={upsample})"
            )
        self.upsample = upsample
        self.stem_channels = stem_channels
        self.fine: nn.Module | None = None
        self.stem: nn.Module | None = None

    def _finish(
        self, fine: bool, in_channels: int, channels: int, out_channels: int, norm: bool
    ) -> None:
        """Add the stride-4 (and stride-2) paths (after the subclass's own layers, so that
        parameters are created and initialised in a fixed order) and initialise every conv."""
        self.out_channels = out_channels
        if fine:
            self.fine = nn.Sequential(
                *_conv_norm_relu(in_channels, channels, norm), nn.Conv2d(channels, out_channels, 1)
            )
        if self.stem_channels:
            c = self.stem_channels
            self.stem = nn.Sequential(*_conv_norm_relu(c, c, norm), nn.Conv2d(c, out_channels, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _stride8(self, feats: Sequence[Tensor]) -> Tensor:
        """``[B, out_channels, H_3, W_3]`` from the first ``num_levels`` levels."""
        raise NotImplementedError

    def forward(
        self, feats: Sequence[Tensor], fine: Tensor | tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        name = type(self).__name__
        stem = None
        if self.stem is not None:
            if not isinstance(fine, (tuple, list)) or len(fine) != 2:
                raise ValueError(
                    f"{name}: built with stem_channels={self.stem_channels}, so it takes the "
                    "pair (stride-4 map, stride-2 map) as `fine`"
                )
            fine, stem = fine
        if (fine is None) != (self.fine is None):
            raise ValueError(
                f"{name}: a stride-4 map is passed exactly when the branch was built with "
                f"fine=True (built with fine={self.fine is not None}, map given: {fine is not None})"
            )
        if len(feats) < self.num_levels:
            raise ValueError(f"{name} needs {self.num_levels} level(s), P3 first; got {len(feats)}")
        x = self._stride8(feats)  # [B, out_channels, H_3, W_3]
        # With a stride-4 map, its detail joins at stride 4 and any further resize follows.
        first = 2 if fine is not None else self.upsample
        if first > 1:
            x = F.interpolate(x, scale_factor=first, mode="bilinear", align_corners=False)
        if fine is not None:
            x = x + self.fine(self._same_size(fine, x, "stride-4 map"))  # [B, Cm, 2 H_3, 2 W_3]
            if self.upsample > 2:
                x = F.interpolate(
                    x, scale_factor=self.upsample // 2, mode="bilinear", align_corners=False
                )
        if stem is not None:
            x = x + self.stem(self._same_size(stem, x, "stride-2 map"))  # [B, Cm, 4 H_3, 4 W_3]
        return x

    def _same_size(self, detail: Tensor, x: Tensor, what: str) -> Tensor:
        """``detail`` if it has the upsampled features' size, else a ValueError saying so."""
        if detail.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"{type(self).__name__}: the {what} is {tuple(detail.shape[-2:])}, the upsampled "
                f"P3 is {tuple(x.shape[-2:])}; pad the input to a multiple of 32"
            )
        return detail


class MaskBranch(_MaskFeatures):
    """CondInst's mask branch: shared mask features from P3-P5 at stride 8 (or finer with
    ``upsample``).

    Each of the first ``num_levels`` levels gets a 3x3 conv (``in_channels -> channels``) + ReLU;
    coarser levels are upsampled (bilinear) to P3's size and summed; then ``num_convs`` 3x3 conv
    + ReLU layers and a 1x1 conv to ``out_channels``. ``norm`` adds GroupNorm after every 3x3
    conv (CondInst normalises its mask branch; off by default, the paper does not say).
    ``upsample``, ``fine`` and ``stem_channels``: see :class:`_MaskFeatures`. The paper's own
    description is a single 1x1 conv (:class:`ProjectionMaskBranch`).
    """

    def __init__(
        self,
        in_channels: int = 256,
        channels: int = 128,
        out_channels: int = 8,
        num_convs: int = 4,
        num_levels: int = 3,
        norm: bool = False,
        upsample: int = 1,
        fine: bool = False,
        stem_channels: int = 0,
    ):
        super().__init__(upsample, fine, stem_channels)
        self.num_levels = num_levels
        self.refine = nn.ModuleList(
            nn.Sequential(*_conv_norm_relu(in_channels, channels, norm)) for _ in range(num_levels)
        )
        tower: list[nn.Module] = []
        for _ in range(num_convs):
            tower += _conv_norm_relu(channels, channels, norm)
        tower.append(nn.Conv2d(channels, out_channels, 1))
        self.tower = nn.Sequential(*tower)
        self._finish(fine, in_channels, channels, out_channels, norm)

    def _stride8(self, feats: Sequence[Tensor]) -> Tensor:
        x = self.refine[0](feats[0])  # [B, channels, H_3, W_3]
        for refine, f in zip(self.refine[1:], feats[1 : self.num_levels]):
            y = refine(f)
            x = x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.tower(x)  # [B, out_channels, H_3, W_3]


class ProjectionMaskBranch(_MaskFeatures):
    """The paper's mask features (3.4, Eq. 4-5): "F^d_t is generated from F^_t by 1 x 1
    convolution to reduce the channel dimension to 8", i.e. one 1x1 conv of the fused P3
    (``in_channels -> out_channels``), no hidden layers.

    ``upsample``, ``fine`` and ``stem_channels`` as in :class:`_MaskFeatures` (``channels`` and
    ``norm`` size the ``fine`` path only). On a 360x640 ResNet-50 frame it costs ~0.5 ms where
    CondInst's branch (:class:`MaskBranch`, 128 channels) costs ~34 ms on 2 CPU cores
    (docs/benchmarks.md).
    """

    def __init__(
        self,
        in_channels: int = 256,
        out_channels: int = 8,
        upsample: int = 1,
        fine: bool = False,
        channels: int = 128,
        norm: bool = False,
        stem_channels: int = 0,
    ):
        super().__init__(upsample, fine, stem_channels)
        self.proj = nn.Conv2d(in_channels, out_channels, 1)
        self._finish(fine, in_channels, channels, out_channels, norm)

    def _stride8(self, feats: Sequence[Tensor]) -> Tensor:
        return self.proj(feats[0])


def parse_dynamic_params(
    params: Tensor, in_channels: int = 10, channels: int = 8, num_layers: int = 3
) -> tuple[list[Tensor], list[Tensor]]:
    """Split flat per-instance parameters into grouped-conv weights and biases.

    Layout of each row: all layer weights first (layer 1 ``[channels, in_channels]``, layer 2
    ``[channels, channels]``, ..., last ``[1, channels]``, each row-major ``out x in``), then all
    biases in the same layer order.

    Args:
        params: ``[N, P]`` with ``P = num_dynamic_params(in_channels, channels, num_layers)``.
    Returns:
        ``weights``: list over layers of ``[N * out_l, in_l, 1, 1]``;
        ``biases``: list over layers of ``[N * out_l]`` — ready for ``F.conv2d(groups=N)``.
    """
    n = params.shape[0]
    dims = [in_channels] + [channels] * (num_layers - 1) + [1]
    w_nums = [i * o for i, o in zip(dims[:-1], dims[1:])]
    b_nums = dims[1:]
    expected = sum(w_nums) + sum(b_nums)
    if params.dim() != 2 or params.shape[1] != expected:
        raise ValueError(
            f"parse_dynamic_params: expected params [N, {expected}] for {num_layers} layers "
            f"({in_channels} -> {channels} -> ... -> 1), got {tuple(params.shape)}"
        )
    chunks = torch.split(params, w_nums + b_nums, dim=1)
    weights = [
        w.reshape(n * o, i, 1, 1)  # [N*out, in, 1, 1]
        for w, i, o in zip(chunks[:num_layers], dims[:-1], dims[1:])
    ]
    biases = [b.reshape(-1) for b in chunks[num_layers:]]  # [N*out]
    return weights, biases


def relative_coords(
    centers: Tensor, soi: Tensor, mask_shape: tuple[int, int], mask_stride: int = 8
) -> Tensor:
    """Relative position maps of every instance.

    Args:
        centers: ``[N, 2]`` instance centres (x, y) in input pixels.
        soi: ``[N]`` size of interest of each instance's level (e.g. 64 for P3).
        mask_shape: ``(h, w)`` of the mask features.
        mask_stride: stride of the mask features; cell ``(i, j)`` is at
            ``((j + 0.5) * stride, (i + 0.5) * stride)``.
    Returns:
        ``[N, 2, h, w]``: channel 0 = ``(loc_x - cx) / soi``, channel 1 = ``(loc_y - cy) / soi``.
    """
    h, w = mask_shape
    dtype = centers.dtype if centers.is_floating_point() else torch.float32
    ys = (torch.arange(h, device=centers.device, dtype=dtype) + 0.5) * mask_stride  # [h]
    xs = (torch.arange(w, device=centers.device, dtype=dtype) + 0.5) * mask_stride  # [w]
    s = soi.to(dtype)[:, None, None]  # [N, 1, 1]
    rx = (xs[None, None, :] - centers[:, 0, None, None].to(dtype)) / s  # [N, 1, w]
    ry = (ys[None, :, None] - centers[:, 1, None, None].to(dtype)) / s  # [N, h, 1]
    return torch.stack(torch.broadcast_tensors(rx, ry), dim=1)  # [N, 2, h, w]


def dynamic_mask_head(
    mask_feats: Tensor,
    params: Tensor,
    batch: Tensor,
    centers: Tensor,
    soi: Tensor,
    mask_stride: int = 8,
    channels: int = 8,
    num_layers: int = 3,
    negative_slope: float = 0.0,
) -> Tensor:
    """Run every instance's dynamic FCN on its image's mask features, all at once.

    Input of instance ``n`` is ``cat([mask_feats[batch[n]], relative_coords(n)])``; the layers
    are 1x1 convs (one group per instance) with ReLU between them (CondInst's; leaky with slope
    ``negative_slope`` > 0) and none after the last.

    Args:
        mask_feats: ``[B, Cm, h, w]`` mask-branch output (Cm = 8).
        params: ``[N, 169]`` dynamic parameters (see :func:`parse_dynamic_params`).
        batch: ``[N]`` image of each instance.
        centers: ``[N, 2]`` centres (x, y) in input pixels.
        soi: ``[N]`` sizes of interest.
        negative_slope: of the hidden activations (0: ReLU). Every instance's hidden units are
            the controller's outputs, so a ReLU layer can go dead for all instances at once: the
            mask loss first pushes every logit down (most pixels are background), and with ReLU
            the second layer's units can all turn off, after which the output is the last bias
            alone and nothing upstream of it gets a gradient. From scratch under AdamW that
            happened within 75 steps for two of three seeds of the synthetic default; a small
            leak keeps the gradient (conf/head/default.yaml, ``scripts/mask_head_health.py``).
    Returns:
        ``[N, h, w]`` mask logits at the mask-feature stride (``[0, h, w]`` if N == 0, still
        connected to ``params`` and ``mask_feats``).
    """
    _, cm, h, w = mask_feats.shape
    n = params.shape[0]
    if n == 0:
        return mask_feats.new_zeros(0, h, w) + (params.sum() + mask_feats.sum()) * 0
    coords = relative_coords(centers, soi, (h, w), mask_stride).to(mask_feats.dtype)
    x = torch.cat([mask_feats[batch], coords], dim=1)  # [N, Cm+2, h, w]
    x = x.reshape(1, n * (cm + 2), h, w)  # instances as conv groups
    weights, biases = parse_dynamic_params(params, cm + 2, channels, num_layers)
    for i, (wt, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, wt, b, groups=n)  # [1, N*out_i, h, w]
        if i < len(weights) - 1:
            x = F.leaky_relu(x, negative_slope) if negative_slope else F.relu(x)
    return x.reshape(n, h, w)


def upsample_mask_logits(logits: Tensor, factor: int = 2) -> Tensor:
    """``[N, h, w] -> [N, factor*h, factor*w]`` bilinear, ``align_corners=False``.

    With ``align_corners=False`` output cell ``(i, j)`` samples input position
    ``((i + 0.5) / factor - 0.5, ...)``, i.e. cell centres line up with input pixels the same way
    at both strides (stride 8 -> stride 4 for the default factor).
    """
    n, h, w = logits.shape
    if n == 0:
        return logits.new_zeros(0, h * factor, w * factor) + logits.sum() * 0
    up = F.interpolate(logits[:, None], scale_factor=factor, mode="bilinear", align_corners=False)
    return up[:, 0]  # [N, factor*h, factor*w]
