"""ResNet + FPN backbone (P3-P7), as torchvision's FCOS/RetinaNet build it.

The backbone is one pass over a batch of frames. In training the reference and target frames of
every pair go through it together (``[2B, 3, H, W]``) so both frames see the same weights and
(frozen) batch-norm statistics.
"""

from __future__ import annotations

import os
import urllib.error
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7

# Block type and blocks per stage of each depth, as torchvision's builders use them.
_STAGES = {
    10: (resnet.BasicBlock, [1, 1, 1, 1]),
    18: (resnet.BasicBlock, [2, 2, 2, 2]),
    34: (resnet.BasicBlock, [3, 4, 6, 3]),
    50: (resnet.Bottleneck, [3, 4, 6, 3]),
    101: (resnet.Bottleneck, [3, 4, 23, 3]),
}


def _resnet10(weights=None, **kwargs) -> resnet.ResNet:
    """ResNet-10: ResNet-18's stages with one BasicBlock each (half its FLOPs). No published
    ImageNet weights; meant for small from-scratch runs (the synthetic default on 2 CPU cores)."""
    if weights is not None:
        raise ValueError("resnet10 has no pretrained weights")
    return resnet.ResNet(*_STAGES[10], **kwargs)


class _WideResNet(resnet.ResNet):
    """torchvision's ResNet with the stem and every stage ``width / 64`` times as wide
    (torchvision fixes them at 64-128-256-512 channels; BasicBlock refuses ``width_per_group``)."""

    def __init__(self, block, layers: list[int], width: int, **kwargs) -> None:
        self._width = width
        super().__init__(block, layers, **kwargs)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # layer1, built right after the 64-channel stem: make the stem narrow too
            self.conv1 = nn.Conv2d(3, self._width, 7, stride=2, padding=3, bias=False)
            self.bn1 = self._norm_layer(self._width)
            self.inplanes = self._width
        # ResNet.__init__ initialises every conv and norm after the last stage, these included
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


_RESNETS = {
    10: (_resnet10, None),
    18: (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1),
    34: (resnet.resnet34, resnet.ResNet34_Weights.IMAGENET1K_V1),
    50: (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V1),
    101: (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V1),
}
_NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class WeightsError(RuntimeError):
    """Backbone weights could not be obtained or do not fit the network."""


def _download_imagenet_state_dict(depth: int) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for ``resnet{depth}`` (from the torch hub cache or the web)."""
    if _RESNETS[depth][1] is None:
        raise WeightsError(
            f"resnet{depth} has no ImageNet weights; use model.backbone.weights=null "
            "(random init) or a deeper ResNet"
        )
    url = _RESNETS[depth][1].url
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        hub_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise WeightsError(
            f"could not download the ImageNet weights of resnet{depth} from {url} "
            f"({type(exc).__name__}: {exc}). On a machine without internet, fetch that file "
            f"elsewhere and either put it in {hub_dir}/ or pass it directly: "
            f"model.backbone.weights=/path/to/{os.path.basename(url)} "
            f"(or model.backbone.weights=null to start from random weights)."
        ) from exc


def _load_local_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A torchvision-format ResNet state dict from a file (``{"state_dict": ...}`` also accepted)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"backbone weights file {path} does not exist (model.backbone.weights must be null, "
            f"'imagenet' or the path of a torchvision ResNet state dict)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise WeightsError(
            f"backbone weights file {path} is not a readable PyTorch state dict "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(
            f"backbone weights file {path} does not hold a state dict (name -> tensor); "
            f"got {type(state).__name__}"
        )
    return state


class _NoExtraLevels(ExtraFPNBlock):
    """No pyramid level beyond P5 (``BackboneWithFPN`` would add a max-pooled one otherwise)."""

    def forward(self, results, x, names):
        return results, names


class ResNetFPN(nn.Module):
    """torchvision ResNet with a feature pyramid P3-P7.

    C3-C5 (``layer2``-``layer4``) feed a ``FeaturePyramidNetwork``; P6 and P7 come from P5 through
    ``LastLevelP6P7`` (stride-2 3x3 convs), as in torchvision's FCOS. Using P5 (not C5) makes P6/P7
    independent of the ResNet depth.

    Args:
        depth: 10 (ResNet-18 with one block per stage, no ImageNet weights), 18, 34, 50 or
            101.
        width: channels of the stem and the first stage (torchvision's ResNets: 64); every stage
            doubles it (64-128-256-512 at 64). Another width has no ImageNet weights: 32 quarters
            the cost of every convolution after the stem, for small from-scratch runs.
        out_channels: channels of every pyramid level (the paper's D = 256).
        weights: ``None`` (random init), ``"imagenet"`` (torchvision's IMAGENET1K_V1, downloaded
            when online) or the path of a torchvision-format ResNet state dict (``fc.*`` ignored).
        trainable_layers: how many ResNet stages, counted from the last, get gradients (0-5, as
            torchvision's ``resnet_fpn_backbone``; 5 also trains the stem). The FPN always trains.
        norm: ``"frozen_bn"`` (batch statistics and affine frozen, the detection default) or
            ``"bn"``.
        num_levels: 5 (P3-P7, the paper) or 3 (P3-P5: no P6/P7, for small inputs whose objects
            never reach the P6/P7 size ranges; every head then runs on 3 levels only).
        autocast: ``None`` (the surrounding precision), ``"bf16"`` or ``"fp16"``: run the
            ResNet and FPN under ``torch.autocast`` in that dtype on whatever device the input is
            on, and return float32 maps, so the graph and heads stay in full precision. Unlike
            ``trainer.precision=bf16-mixed`` this also works on CPU, where torchvision's
            ``deform_conv2d`` (the kernel warp) has no bfloat16 kernel.
        channels_last: keep the weights and the input in ``torch.channels_last`` (NHWC), the
            layout the bfloat16 CPU convolutions are fastest in.
        fine_level: also return a stride-4 map for a mask branch that reads one
            (``MaskBranch(fine=True)``): C2 (``layer1``) through a 1x1 conv to ``out_channels``,
            first in the returned list. It is not a pyramid level (no top-down path, not in
            ``strides``); the detection heads and the graph never see it.
        stem_channels: > 0 also returns a stride-2 map (needs ``fine_level``; ``stem_level``
            says whether there is one): the stem's output (conv1, norm, ReLU, before the max
            pool) through a 1x1 conv to ``stem_channels``, second in the returned list, for a
            mask branch that reads one (``MaskBranch(stem_channels=...)``).

    Shapes:
        input ``[N, 3, H, W]`` (ImageNet-normalised) -> list of 5 tensors
        ``[N, out_channels, ceil(H / s), ceil(W / s)]`` for ``s`` in ``strides``
        (``num_levels`` tensors), preceded by ``[N, out_channels, ceil(H / 4), ceil(W / 4)]``
        with ``fine_level``, and ``[N, stem_channels, ceil(H / 2), ceil(W / 2)]`` after it with
        ``stem_channels``.
    """

    def __init__(
        self,
        depth: int = 50,
        out_channels: int = 256,
        weights: str | os.PathLike | None = None,
        trainable_layers: int = 3,
        norm: str = "frozen_bn",
        num_levels: int = 5,
        autocast: str | None = None,
        channels_last: bool = False,
        fine_level: bool = False,
        width: int = 64,
        stem_channels: int = 0,
    ) -> None:
        super().__init__()
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(
                f"autocast must be null or one of {sorted(AUTOCAST_DTYPES)}, got {autocast!r}"
            )
        self.autocast_dtype = AUTOCAST_DTYPES[autocast] if autocast is not None else None
        self.channels_last = channels_last
        if num_levels not in (3, 5):
            raise ValueError(f"num_levels must be 3 (P3-P5) or 5 (P3-P7), got {num_levels}")
        self.strides: tuple[int, ...] = (8, 16, 32, 64, 128)[:num_levels]
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
        if width < 1 or width % 8:
            raise ValueError(f"width must be a positive multiple of 8, got {width}")
        if width != 64 and weights is not None:
            raise ValueError(
                f"pretrained ResNet weights are 64 channels wide; width={width} needs "
                "model.backbone.weights=null"
            )
        if stem_channels < 0 or (stem_channels and not fine_level):
            raise ValueError(
                f"stem_channels={stem_channels}: a stride-2 map (> 0) needs fine_level=True "
                "(it follows C2 in the returned list)"
            )
        self.depth = depth
        self.out_channels = out_channels

        if width == 64:  # torchvision's builders: the same random init for a seed as before
            body = _RESNETS[depth][0](weights=None, norm_layer=_NORMS[norm])
        else:
            block, stages = _STAGES[depth]
            body = _WideResNet(block, stages, width, norm_layer=_NORMS[norm])
        if weights is not None:
            if str(weights).lower() == "imagenet":
                state, source = _download_imagenet_state_dict(depth), f"ImageNet resnet{depth}"
            else:
                state, source = _load_local_state_dict(weights), str(weights)
            self._load_resnet_state(body, state, source)

        # Freeze from the stem upwards, as torchvision's _resnet_fpn_extractor does.
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            trainable.append("bn1")
        for name, param in body.named_parameters():
            if not any(name.startswith(prefix) for prefix in trainable):
                param.requires_grad_(False)

        # 128 (BasicBlock) or 512 (Bottleneck) at width 64
        c3 = 2 * width * type(body.layer2[-1]).expansion
        in_channels = [c3, c3 * 2, c3 * 4]  # C3, C4, C5
        self.fine_level = fine_level
        # C2 -> out_channels (fine_level): one 1x1 conv, as an FPN lateral.
        self.fine_lateral = nn.Conv2d(c3 // 2, out_channels, 1) if fine_level else None
        self.stem_level = stem_channels > 0
        # Stem output (width channels) -> stem_channels: one 1x1 conv.
        self.stem_lateral = nn.Conv2d(width, stem_channels, 1) if self.stem_level else None
        return_layers = {"layer2": "c3", "layer3": "c4", "layer4": "c5"}
        if fine_level:
            return_layers = {"layer1": "c2", **return_layers}
        if self.stem_level:
            return_layers = {"relu": "c1", **return_layers}
        self.fpn = BackboneWithFPN(
            body,
            return_layers=return_layers,
            in_channels_list=in_channels,
            out_channels=out_channels,
            extra_blocks=(
                LastLevelP6P7(out_channels, out_channels) if num_levels == 5 else _NoExtraLevels()
            ),
        )
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def fuse_norms(self) -> ResNetFPN:
        """Fold every ResNet norm layer into the convolution before it, for inference.

        A frozen (or eval-mode) batch norm is a per-channel affine map, so ``bn(conv(x))`` is one
        convolution with rescaled weights and a bias (``torch.nn.utils.fusion``): the same
        outputs up to float rounding, without two full-size element-wise passes per conv
        (about a fifth of ResNet-50's CPU time at 360x640, docs/benchmarks.md). The norms
        become ``nn.Identity``; the module can no longer be trained or load a checkpoint's
        state dict, so call it on a loaded, eval-mode network. Returns ``self``.
        """
        if self.training:
            raise RuntimeError("fuse_norms() is for inference: call .eval() first")
        pairs = [(self.fpn.body, "conv1", "bn1")]
        for module in self.fpn.body.modules():
            if isinstance(module, (resnet.BasicBlock, resnet.Bottleneck)):
                pairs += [(module, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
                if module.downsample is not None:
                    pairs.append((module.downsample, "0", "1"))
        for parent, conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if conv is None or not isinstance(bn, tuple(_NORMS.values())):
                continue  # BasicBlock has no conv3; already fused
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            setattr(parent, bn_name, nn.Identity())
        return self

    @staticmethod
    def _load_resnet_state(body: nn.Module, state: dict[str, Tensor], source: str) -> None:
        state = OrderedDict((k, v) for k, v in state.items() if not k.startswith("fc."))
        expected = {k for k in body.state_dict() if not k.startswith("fc.")}
        missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
        if missing:
            raise WeightsError(
                f"backbone weights {source} do not fit resnet: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}); expected a torchvision ResNet state dict of that depth"
            )
        try:
            body.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch, e.g. resnet50 weights into resnet18
            raise WeightsError(f"backbone weights {source} do not fit resnet: {exc}") from exc

    def forward(self, images: Tensor) -> list[Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            feats = self._pyramid(images)
        else:
            with torch.autocast(images.device.type, dtype=self.autocast_dtype):
                feats = self._pyramid(images)
            feats = [f.float() for f in feats]
        if self.channels_last:  # the graph and heads index and flatten the maps as NCHW
            feats = [f.contiguous() for f in feats]
        return feats  # (fine (+ stem) +) num_levels x [N, C, H_l, W_l]

    def _pyramid(self, images: Tensor) -> list[Tensor]:
        """``BackboneWithFPN.forward`` (body, then FPN), plus the C2 lateral with ``fine_level``
        and the stem's with ``stem_level``."""
        c = self.fpn.body(images)  # OrderedDict (c1, c2,) c3, c4, c5
        stem = self.stem_lateral(c.pop("c1")) if self.stem_level else None
        fine = self.fine_lateral(c.pop("c2")) if self.fine_level else None
        feats = list(self.fpn.fpn(c).values())  # p3, p4, p5(, p6, p7)
        extra = [t for t in (fine, stem) if t is not None]
        return [*extra, *feats]
