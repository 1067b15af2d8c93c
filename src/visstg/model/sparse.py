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


class _Cells:
    """A feature map known on some cells only.

    ``padded [n + 1, C]``: row ``i < n`` holds cell ``flat[i]`` of the ``H x W`` grid
    (``flat = y * W + x``), row ``n`` is zero (the conv's zero padding, and cells never read);
    ``lookup [H * W]`` maps a cell to its row (``n`` where unknown)."""

    def __init__(self, padded: Tensor, lookup: Tensor) -> None:
        self.padded, self.lookup = padded, lookup

    @classmethod
    def from_rows(cls, rows: Tensor, flat: Tensor, hw: int) -> _Cells:
        n = rows.shape[0]
        lookup = torch.full((hw,), n, dtype=torch.long, device=rows.device)
        lookup[flat] = torch.arange(n, device=rows.device)
        return cls(torch.cat([rows, rows.new_zeros(1, rows.shape[1])]), lookup)

    def relu(self) -> _Cells:
        return _Cells(torch.relu(self.padded), self.lookup)

    def at(self, flat: Tensor) -> Tensor:
        """Rows of the cells ``flat`` (zero where unknown)."""
        return self.padded[self.lookup[flat]]

    def dense(self, h: int, w: int) -> Tensor:
        """``[C, H, W]``: the known cells, zero elsewhere."""
        return self.padded[self.lookup].t().reshape(-1, h, w)


def _taps(cells: Tensor, k: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Flat indices ``[n, k * k]`` of the ``k x k`` window around each cell (row-major, as
    ``Conv2d.weight``'s last two dims) and whether each lies inside the map."""
    r = torch.arange(k, device=cells.device) - k // 2
    ys = (cells[:, 0, None, None] + r[None, :, None]).expand(-1, k, k)  # [n, k, k]
    xs = (cells[:, 1, None, None] + r[None, None, :]).expand(-1, k, k)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    return (ys * w + xs).reshape(cells.shape[0], -1), inside.reshape(cells.shape[0], -1)


def _tap_major_weight(conv: nn.Conv2d) -> Tensor:
    """``conv.weight`` as ``[C_out, k * k * C]`` in the patches' tap-major order. Without
    gradients the permuted copy is kept on the module until the weight changes (its storage or
    version), since inference asks for it every frame."""
    weight = conv.weight
    if torch.is_grad_enabled():
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
    cached = conv.__dict__.get("_tap_major")
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().permute(0, 2, 3, 1).reshape(weight.shape[0], -1))
        conv.__dict__["_tap_major"] = cached
    return cached[1]


def _conv_at(conv: nn.Conv2d, act: Tensor | _Cells, cells: Tensor, h: int, w: int) -> Tensor:
    """``conv(x[None])[0][:, y, x]`` at ``cells [n, 2]`` as ``[n, C_out]`` (im2col + matmul).

    ``act`` is the input map, dense ``[C, H, W]`` or a :class:`_Cells`; it must hold the right
    values on every cell within ``k // 2`` of the requested ones (no other cell is read). The
    patches are gathered as rows of C channels, tap-major (``[n, k * k, C]``): contiguous rows of
    a channels-last map (the GNN's fused maps are one) or of :class:`_Cells`, and the weight is
    permuted to match."""
    k, n = conv.kernel_size[0], cells.shape[0]
    flat, inside = _taps(cells, k, h, w)  # [n, k*k]
    if isinstance(act, _Cells):
        rows = act.lookup[flat.clamp(0, h * w - 1)].masked_fill(~inside, act.padded.shape[0] - 1)
        patches = act.padded[rows]  # [n, k*k, C]
    else:
        table = act.permute(1, 2, 0).reshape(h * w, act.shape[0])  # [H*W, C]
        patches = table[flat.clamp(0, h * w - 1)]  # [n, k*k, C]
        patches.masked_fill_(~inside[..., None], 0)  # the conv's zero padding
    patches = patches.reshape(n, -1)  # [n, k*k*C]
    weight = _tap_major_weight(conv).to(patches.dtype)  # [C_out, k*k*C]
    if conv.bias is None:
        return patches @ weight.t()  # [n, C_out]
    return torch.addmm(conv.bias.to(patches.dtype), patches, weight.t())


def _run_on_cells(
    layers: Sequence[nn.Module], x: Tensor, mask: Tensor, dense_fraction: float
) -> Tensor | _Cells:
    """The tower's output, right on ``mask``: a dense ``[C_out, H, W]`` map or a
    :class:`_Cells` holding the cells of ``mask``."""
    h, w = x.shape[-2:]
    # needed[i]: cells where layer i's output is read (walk back from the requested cells).
    needed = [mask]
    for layer in reversed(layers[1:]):
        m = needed[0]
        if isinstance(layer, nn.Conv2d) and layer.kernel_size[0] > 1:
            k = layer.kernel_size[0]
            m = F.max_pool2d(m[None, None].float(), k, stride=1, padding=k // 2)[0, 0] > 0
        needed.insert(0, m)
    act: Tensor | _Cells = x[0]  # [C, H, W]
    for layer, m in zip(layers, needed):
        if not isinstance(layer, nn.Conv2d):
            if isinstance(layer, nn.ReLU):  # never in place on x
                act = act.relu() if isinstance(act, _Cells) else torch.relu(act)
            continue
        cells = m.nonzero()  # [n, 2] (y, x)
        if cells.shape[0] > dense_fraction * h * w:
            dense = act.dense(h, w) if isinstance(act, _Cells) else act
            act = layer(dense[None])[0]  # [C_out, H, W]
            continue
        flat = cells[:, 0] * w + cells[:, 1]
        act = _Cells.from_rows(_conv_at(layer, act, cells, h, w), flat, h * w)
    return act


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
    act = _run_on_cells(layers, x, mask, dense_fraction)
    h, w = x.shape[-2:]
    return (act.dense(h, w) if isinstance(act, _Cells) else act)[None]


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
        return out[0, :, cells[:, 0], cells[:, 1]].t()  # [N, C_out]
    if cells.shape[0] == 0:
        c_out = [m for m in layers if isinstance(m, nn.Conv2d)][-1].out_channels
        return x.new_zeros(0, c_out)
    act = _run_on_cells(layers, x, cell_mask(cells, tuple(x.shape[-2:])), dense_fraction)
    if isinstance(act, _Cells):
        return act.at(cells[:, 0] * x.shape[-1] + cells[:, 1])  # [N, C_out]
    return act[:, cells[:, 0], cells[:, 1]].t()


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
