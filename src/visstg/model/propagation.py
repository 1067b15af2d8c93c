"""Kernel warping: propagate the reference frame's dynamic kernels to the target frame.

Paper 3.4 / Fig. 4: the feature difference ``F_t - F_k`` goes through a small CNN that predicts
the offsets of a 3x3 deformable convolution, which resamples the reference kernel map
``theta_k`` into ``theta_warp`` on the target frame's grid. All 169 kernel channels move
together (one offset field per location) and each channel is filtered on its own (depthwise).

torchvision's ``deform_conv2d`` infers its groups as ``in_channels // weight.shape[1]``, so the
weight ``[169, 1, 3, 3]`` makes it depthwise, and one offset group
(``offset.shape[1] // (2 * 3 * 3) = 1``) shares the offsets across channels. Offset channel
``2k`` is the y shift and ``2k + 1`` the x shift (in cells) of kernel tap ``k`` (row-major over
the 3x3 taps, tap 4 is the centre).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from visstg.model.sparse import tower_at_cells

__all__ = ["KernelWarp"]


class KernelWarp(nn.Module):
    """Warp reference kernels with offsets predicted from the feature difference.

    Args:
        in_channels: channels of the FPN features ``F_t``, ``F_k``.
        num_params: channels of the kernel maps (169).
        hidden: hidden channels of the offset CNN.
        kernel_size: deformable kernel size (3).
        num_convs: hidden 3x3 conv + ReLU layers of the offset CNN before its output conv.

    The offset CNN's output conv is zero-initialised and the depthwise weight is a centre-tap
    identity, so at initialisation ``theta_warp == theta_k``.

    Shapes:
        theta_k: list over levels of ``[B, num_params, H_l, W_l]``.
        f_t, f_k: lists over levels of ``[B, in_channels, H_l, W_l]``.
        output: list over levels of ``[B, num_params, H_l, W_l]``.
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_params: int = 169,
        hidden: int = 128,
        kernel_size: int = 3,
        num_convs: int = 2,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"KernelWarp: kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU(inplace=True)]
            c = hidden
        self.offset_cnn = nn.Sequential(*layers)
        self.offset_out = nn.Conv2d(c, 2 * kernel_size * kernel_size, 3, padding=1)
        for m in self.offset_cnn.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.offset_out.weight)
        nn.init.zeros_(self.offset_out.bias)
        self.num_params = num_params
        weight = torch.zeros(num_params, 1, kernel_size, kernel_size)
        weight[:, :, kernel_size // 2, kernel_size // 2] = 1.0
        self.weight = nn.Parameter(weight)  # depthwise, centre-tap identity

    def offsets(self, f_t: Tensor, f_k: Tensor) -> Tensor:
        """``[B, C, H, W]`` x 2 -> ``[B, 2*k*k, H, W]`` offsets (dy, dx per tap, in cells)."""
        return self.offset_out(self.offset_cnn(f_t - f_k))

    def warp(self, theta_k: Tensor, offsets: Tensor) -> Tensor:
        """Deformable depthwise conv of ``theta_k [B, P, H, W]`` -> ``[B, P, H, W]``."""
        return deform_conv2d(
            theta_k, offsets.to(theta_k.dtype), self.weight.to(theta_k.dtype),
            padding=self.kernel_size // 2,
        )  # fmt: skip

    def forward(
        self, theta_k: Sequence[Tensor], f_t: Sequence[Tensor], f_k: Sequence[Tensor]
    ) -> list[Tensor]:
        if not len(theta_k) == len(f_t) == len(f_k):
            raise ValueError(
                f"KernelWarp: got {len(theta_k)} kernel levels, {len(f_t)} target and "
                f"{len(f_k)} reference feature levels; they must match"
            )
        return [self.warp(th, self.offsets(ft, fk)) for th, ft, fk in zip(theta_k, f_t, f_k)]

    def warp_at(
        self,
        theta_k: Sequence[Tensor],
        f_t: Sequence[Tensor],
        f_k: Sequence[Tensor],
        batch: Tensor,
        level: Tensor,
        cell: Tensor,
    ) -> Tensor:
        """``forward`` read only at some cells: ``[N, num_params]``, equal (values and gradients)
        to ``gather_at_cells(self(theta_k, f_t, f_k), batch, level, cell)``.

        Training reads theta_warp only at the target instances' centre cells, so the deformable
        conv (whose CPU backward is most of a training step when run over every location) is
        evaluated at those cells only (:meth:`warp_cells`); the offset CNN still runs densely.

        Args:
            theta_k, f_t, f_k: as for ``forward`` (lists over levels).
            batch: ``[N]`` image, level: ``[N]`` pyramid level, cell: ``[N, 2]`` (y, x).
        """
        num_params = theta_k[0].shape[1]
        out = theta_k[0].new_zeros(batch.numel(), num_params)
        for lvl, (th, ft, fk) in enumerate(zip(theta_k, f_t, f_k)):
            offsets = self.offsets(ft, fk)  # [B, 2*k*k, H, W], always in the autograd graph
            idx = (level == lvl).nonzero().squeeze(1)  # [n]
            if idx.numel() == 0:
                out = out + (offsets.sum() + th.sum() + self.weight.sum()) * 0
                continue
            b, cy, cx = batch[idx], cell[idx, 0], cell[idx, 1]
            off = offsets[b, :, cy, cx]  # [n, 2*k*k] (dy, dx) per tap
            out = out.index_put((idx,), self.warp_cells(th, off, b, cell[idx]))  # [n, P]
        return out

    def offsets_at(self, f_t: Tensor, f_k: Tensor, cells: Tensor) -> Tensor:
        """``offsets(f_t, f_k)`` of one image ``[1, C, H, W]`` read at ``cells [n, 2]`` (y, x):
        ``[n, 2*k*k]``, computed only where those cells depend on it (inference)."""
        modules = [*self.offset_cnn, self.offset_out]
        return tower_at_cells(modules, f_t - f_k, cells)

    def warp_cells(self, theta_k: Tensor, offsets: Tensor, batch: Tensor, cell: Tensor) -> Tensor:
        """theta_warp of one level at some cells, given their offsets (see :meth:`warp_at`).

        The deformable depthwise conv written out at those cells: tap ``(i, j)`` of cell
        ``(y, x)`` reads ``theta_k`` bilinearly at ``(y - p + i + dy, x - p + j + dx)``, a corner
        outside the map reads zero, and the taps are summed with the depthwise weight. That is
        ``deform_conv2d``'s own sampling (same floor, same zero corners, so the same values and
        gradients, offsets included: the tests compare the two), without its CPU backward, which
        runs over the whole input map and took a tenth of a training step.

        Args:
            theta_k: ``[B, P, H, W]`` kernel map of the level.
            offsets: ``[n, 2*k*k]`` (dy, dx per tap) at the cells.
            batch: ``[n]`` image; cell: ``[n, 2]`` (y, x).
        Returns:
            ``[n, P]``.
        """
        h, w = theta_k.shape[-2:]
        offsets = offsets.to(theta_k.dtype)
        py, px = self._sample_points(offsets, cell)  # [n, k*k] each
        y0, x0 = py.floor(), px.floor()
        ly, lx = py - y0, px - x0  # bilinear weights of the lower-right corner
        y0, x0 = y0.long(), x0.long()
        b = batch[:, None].expand_as(y0)  # [n, k*k]
        sampled = 0
        for dy, wy in ((0, 1 - ly), (1, ly)):
            for dx, wx in ((0, 1 - lx), (1, lx)):
                yy, xx = y0 + dy, x0 + dx
                inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                corner = theta_k[b, :, yy.clamp(0, h - 1), xx.clamp(0, w - 1)]  # [n, k*k, P]
                sampled = sampled + corner * (wy * wx * inside)[..., None]
        weight = self.weight.to(theta_k.dtype).flatten(1)  # [P, k*k]
        return (sampled * weight.t()).sum(1)  # [n, P]

    def _sample_points(self, offsets: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        """Where each tap of the warp at ``cell [n, 2]`` (y, x) samples, with ``offsets
        [n, 2*k*k]``: rows and columns ``[n, k*k]`` (``y - p + i + dy``, ``x - p + j + dx``, in
        ``offsets``' dtype; taps row-major, as ``deform_conv2d`` orders them)."""
        k, pad = self.kernel_size, self.kernel_size // 2
        taps = torch.arange(k, device=cell.device, dtype=offsets.dtype)
        ty, tx = taps.repeat_interleave(k), taps.repeat(k)  # [k*k] row-major taps
        py = cell[:, 0, None].to(offsets.dtype) - pad + ty + offsets[:, 0::2]
        px = cell[:, 1, None].to(offsets.dtype) - pad + tx + offsets[:, 1::2]
        return py, px

    def sampled_cells(self, offsets: Tensor, cell: Tensor, shape: tuple[int, int]) -> Tensor:
        """Where the warp at ``cell [n, 2]`` (y, x) with ``offsets [n, 2*k*k]`` reads theta_k:
        boolean ``[H, W]``, True on the (up to) four cells around every tap's bilinear sample
        point. A tolerance of 1e-3 cell on the floor keeps float rounding from dropping one, so
        theta_k is only needed on these cells (the warp is exact with zeros elsewhere)."""
        h, w = shape
        py, px = self._sample_points(offsets, cell)  # [n, k*k] each
        ys, ok_y = _corner_rows(py, h)  # [n, k*k, 3] each
        xs, ok_x = _corner_rows(px, w)
        yy = ys[..., :, None].expand(-1, -1, 3, 3)  # [n, k*k, 3, 3]
        xx = xs[..., None, :].expand(-1, -1, 3, 3)
        ok = ok_y[..., :, None] & ok_x[..., None, :]  # [n, k*k, 3, 3]
        mask = torch.zeros(shape, dtype=torch.bool, device=cell.device)
        mask[yy[ok], xx[ok]] = True
        return mask


def _corner_rows(p: Tensor, size: int, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Integer rows a bilinear sample at ``p`` may read: ``floor(p)`` and ``floor(p) + 1``,
    widened to ``floor(p - eps) .. floor(p + eps) + 1`` against float rounding, inside
    ``[0, size)``. Returns candidates ``[..., 3]`` and which of them count."""
    lo = (p - eps).floor().long()  # [...]
    hi = (p + eps).floor().long() + 1
    rows = lo[..., None] + torch.arange(3, device=p.device)  # [..., 3]
    return rows, (rows <= hi[..., None]) & (rows >= 0) & (rows < size)
