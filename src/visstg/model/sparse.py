"""Convolution towers evaluated at a few cells only (inference-time savings, same values).

Several heads are read at a handful of locations at inference: the box size and offset at the
top-k heatmap peaks, the controller's 169 parameters at the detections, the kernel-warp offsets
at the detections and the previous frame's kernels where the warp samples them. Running their
3x3 convolutions over every cell of P3-P7 costs as much as the backbone at 360x640, so
:func:`tower_at_cells` runs a tower only on the cells that the requested outputs depend on:
layer ``i``'s output is needed on the requested cells dilated by the kernel radii of the layers
after it, and is computed there (``im2col`` of those cells + one matmul) or, when that is most
of the map, by the ordinary dense convolution. Zero padding is reproduced exactly: a cell
outside the map reads zero at every layer, as ``padding=k // 2`` does.

Only towers of stride-1, undilated, ungrouped, odd-square ``Conv2d`` layers with ``k // 2``
zero padding and element-wise ``ReLU`` are local in this sense; anything else (GroupNorm mixes
every cell of a group) makes :func:`tower_at_cells` run the tower densely and gather, which is
what the caller would have done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["cell_mask", "local_layers", "tower_at_cells", "tower_at_levels", "tower_on_mask"]


def local_layers(modules: Sequence[nn.Module]) -> list[nn.Module] | None:
    """The flattened layers of a tower if every one is a local op (see the module docstring),
    else ``None``."""
    out: list[nn.Module] = []
    for m in modules:
        if isinstance(m, nn.Sequential):
            inner = local_layers(list(m))
            if inner is None:
                return None
            out += inner
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size
            if not (
                k[0] == k[1]
                and k[0] % 2 == 1
                and m.stride == (1, 1)
                and m.dilation == (1, 1)
                and m.groups == 1
                and m.padding == (k[0] // 2, k[0] // 2)
                and m.padding_mode == "zeros"
            ):
                return None
            out.append(m)
        elif isinstance(m, (nn.ReLU, nn.Identity)):
            out.append(m)
        else:
            return None
    return out


def cell_mask(cells: Tensor, shape: tuple[int, int]) -> Tensor:
    """``[N, 2]`` (y, x) cells -> boolean ``[H, W]`` map, True on the cells."""
    mask = torch.zeros(shape, dtype=torch.bool, device=cells.device)
    mask[cells[:, 0], cells[:, 1]] = True
    return mask


def _conv_at(conv: nn.Conv2d, x: Tensor, cells: Tensor) -> Tensor:
    """``conv(x[None])[0][:, y, x]`` at ``cells [n, 2]`` as ``[n, C_out]`` (im2col + matmul).

    ``x``: ``[C, H, W]``; it must hold the right values on every cell within ``k // 2`` of the
    requested ones (the other cells are never read)."""
    k, p = conv.kernel_size[0], conv.padding[0]
    xp = F.pad(x, (p, p, p, p))  # [C, H+2p, W+2p]: the conv's zero padding
    taps = torch.arange(k, device=x.device)
    ys = cells[:, 0, None, None] + taps[None, :, None]  # [n, k, 1] rows in padded coordinates
    xs = cells[:, 1, None, None] + taps[None, None, :]  # [n, 1, k]
    patches = xp[:, ys, xs]  # [C, n, k, k]
    patches = patches.permute(1, 0, 2, 3).reshape(cells.shape[0], -1)  # [n, C*k*k]
    weight = conv.weight.reshape(conv.out_channels, -1).to(x.dtype)  # [C_out, C*k*k]
    out = patches @ weight.t()  # [n, C_out]
    if conv.bias is not None:
        out = out + conv.bias.to(out.dtype)
    return out


def tower_on_mask(
    layers: Sequence[nn.Module], x: Tensor, mask: Tensor, dense_fraction: float = 0.5
) -> Tensor:
    """Run a local tower on one map, exact on the cells of ``mask``.

    Args:
        layers: from :func:`local_layers` (not ``None``).
        x: ``[1, C, H, W]`` input map.
        mask: ``[H, W]`` bool, the output cells wanted.
        dense_fraction: a layer whose needed cells exceed this fraction of the map runs densely.
    Returns:
        ``[1, C_out, H, W]``: equal to ``tower(x)`` on ``mask`` (up to float summation order),
        arbitrary (zero) elsewhere.
    """
    h, w = x.shape[-2:]
    # needed[i]: cells where layer i's output is read (walk back from the requested cells).
    needed = [mask]
    for layer in reversed(layers[1:]):
        m = needed[0]
        if isinstance(layer, nn.Conv2d) and layer.kernel_size[0] > 1:
            k = layer.kernel_size[0]
            m = F.max_pool2d(m[None, None].float(), k, stride=1, padding=k // 2)[0, 0] > 0
        needed.insert(0, m)
    act = x[0]  # [C, H, W]
    for layer, m in zip(layers, needed):
        if not isinstance(layer, nn.Conv2d):
            act = torch.relu(act) if isinstance(layer, nn.ReLU) else act  # never in place on x
            continue
        cells = m.nonzero()  # [n, 2] (y, x)
        if cells.shape[0] > dense_fraction * h * w:
            act = layer(act[None])[0]  # [C_out, H, W]
            continue
        out = act.new_zeros(layer.out_channels, h, w)
        out[:, cells[:, 0], cells[:, 1]] = _conv_at(layer, act, cells).t().to(out.dtype)
        act = out  # [C_out, H, W], valid on the cells of m
    return act[None]


def tower_at_cells(
    modules: Sequence[nn.Module], x: Tensor, cells: Tensor, dense_fraction: float = 0.5
) -> Tensor:
    """``nn.Sequential(*modules)(x)[0, :, y, x]`` at ``cells [N, 2]`` (y, x) -> ``[N, C_out]``.

    ``x`` is one image ``[1, C, H, W]``. Local towers are computed only where the requested
    cells depend on them (:func:`tower_on_mask`); other towers run densely and are gathered.
    """
    layers = local_layers(modules)
    if layers is None:
        out = x
        for m in modules:
            out = m(out)
    elif cells.shape[0] == 0:
        c_out = [m for m in layers if isinstance(m, nn.Conv2d)][-1].out_channels
        return x.new_zeros(0, c_out)
    else:
        out = tower_on_mask(layers, x, cell_mask(cells, tuple(x.shape[-2:])), dense_fraction)
    return out[0, :, cells[:, 0], cells[:, 1]].t()  # [N, C_out]


def tower_at_levels(
    modules: Sequence[nn.Module], feats: Sequence[Tensor], level: Tensor, cells: Tensor
) -> Tensor:
    """A tower shared across pyramid levels, read at ``(level, cell)`` of one image.

    Args:
        feats: list over levels of ``[1, C, H_l, W_l]``.
        level: ``[N]`` long; cells: ``[N, 2]`` (y, x).
    Returns:
        ``[N, C_out]``, equal to ``gather_at_cells([tower(f) for f in feats], 0, level, cells)``.
    """
    c_out = [m for m in _flatten(modules) if isinstance(m, nn.Conv2d)][-1].out_channels
    out = feats[0].new_zeros(level.numel(), c_out)
    for lvl, f in enumerate(feats):
        idx = (level == lvl).nonzero().squeeze(1)  # [n]
        if idx.numel():
            out[idx] = tower_at_cells(modules, f, cells[idx]).to(out.dtype)
    return out


def _flatten(modules: Sequence[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in modules:
        out += _flatten(list(m)) if isinstance(m, nn.Sequential) else [m]
    return out
