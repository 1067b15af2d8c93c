"""Edge-aware refinement of mask probabilities: the guided filter (He, Sun and Tang, "Guided
Image Filtering", ECCV 2010 / TPAMI 2013), with the frame as the guide.

The tracker's masks come from stride-4 logits upsampled bilinearly, so their boundaries are
smooth curves through 4x4 cells wherever the object's edge really lies. The guided filter fits,
in every (2r+1) x (2r+1) window, the mask probability as an affine function of the guide's
colour, ``q = a . I + b`` (ridge-regularised by ``eps``), and averages the fits of the windows
over each pixel: where the window straddles a colour edge the output follows that edge; where
the colour is flat it is a plain box blur. Thresholding the filtered probability then puts the
mask boundary on the frame's edges (:class:`visstg.tracker.TrackerConfig` ``refine_radius``).

None of the project's libraries provides the filter (torchvision has no edge-aware filters), so it
is written here: box means by integral images (one cumulative sum per axis, so the cost does not
grow with the radius) and a per-pixel C x C solve for the colour guide. :func:`refine_masks`
filters each mask on a crop around it only (three radii beyond its support), since the filter
leaves a mask unchanged farther than two radii from its support.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["box_mean", "guided_filter", "refine_masks"]


def _window_sums(cums: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Window sums along ``dim`` from its cumulative sums ``cums`` (length n + 1, a leading
    zero): position i sums [max(0, i - r), min(n, i + r + 1))."""
    n = cums.shape[dim] - 1
    r = min(radius, n - 1)
    last = cums.narrow(dim, n, 1)
    upper = torch.cat([cums.narrow(dim, r + 1, n - r)] + [last] * r, dim)
    lower = torch.cat([torch.zeros_like(last)] * r + [cums.narrow(dim, 0, n - r)], dim)
    return upper - lower


def _window_sizes(n: int, radius: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    return (i + radius + 1).clamp(max=n) - (i - radius).clamp(min=0)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of ``x`` ([..., H, W]) over each pixel's (2r+1) x (2r+1) window, clipped at the
    borders (the mean of the pixels inside the image, as ``avg_pool2d`` with
    ``count_include_pad=False``), in ``x``'s dtype.
    """
    h, w = x.shape[-2:]
    sums = _window_sums(F.pad(x.cumsum(-2), (0, 0, 1, 0)), radius, x.dim() - 2)
    sums = _window_sums(F.pad(sums.cumsum(-1), (1, 0)), radius, x.dim() - 1)
    count = _window_sizes(h, radius, x.device)[:, None] * _window_sizes(w, radius, x.device)
    return sums / count.to(x.dtype)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Filter each of ``src``'s maps ([N, H, W]) guided by the image ``guide`` ([C, H, W],
    e.g. RGB in [0, 1]); returns [N, H, W].

    ``radius`` is the window's half-size in pixels and ``eps`` the regulariser of the per-window
    fit, in the guide's squared units: edges of contrast well above sqrt(eps) are followed,
    weaker ones are smoothed over. A constant guide gives a double box blur of ``src``.
    """
    if guide.dim() != 3 or src.dim() != 3 or guide.shape[-2:] != src.shape[-2:]:
        raise ValueError(
            f"guided_filter: guide [C, H, W] and src [N, H, W] of one size, got "
            f"{tuple(guide.shape)} and {tuple(src.shape)}"
        )
    if radius < 1 or eps <= 0:
        raise ValueError(f"guided_filter: radius >= 1 and eps > 0, got {radius} and {eps}")
    c = guide.shape[0]
    dtype = torch.promote_types(torch.promote_types(guide.dtype, src.dtype), torch.float32)
    guide, src = guide.to(dtype), src.to(dtype)
    mean_i = box_mean(guide, radius)  # [C, H, W]
    mean_ii = box_mean(guide[:, None] * guide[None], radius)  # [C, C, H, W]
    cov_ii = mean_ii - mean_i[:, None] * mean_i[None]
    cov_ii = cov_ii + eps * torch.eye(c, dtype=dtype, device=guide.device)[:, :, None, None]
    mean_p = box_mean(src, radius)  # [N, H, W]
    mean_ip = box_mean(guide[None] * src[:, None], radius)  # [N, C, H, W]
    cov_ip = mean_ip - mean_i[None] * mean_p[:, None]
    # a = cov_ii^-1 cov_ip for every pixel: [H, W, C, C] \ [H, W, C, N]
    a = torch.linalg.solve(cov_ii.permute(2, 3, 0, 1), cov_ip.permute(2, 3, 1, 0))
    a = a.permute(3, 2, 0, 1)  # [N, C, H, W]
    b = mean_p - (a * mean_i[None]).sum(1)
    return (box_mean(a, radius) * guide[None]).sum(1) + box_mean(b, radius)


def refine_masks(
    guide: torch.Tensor, probs: torch.Tensor, radius: int, eps: float, floor: float = 1e-3
) -> torch.Tensor:
    """:func:`guided_filter` of each mask probability map ([D, H, W]) with ``guide`` ([C, H,
    W]), computed on a crop around the mask: its pixels above ``floor`` and three radii around
    them. The filter changes pixels within two radii of those (the ones some window reaching the
    mask covers); the third radius keeps their averages over windows whole, so the crop gives
    the whole frame's result. Elsewhere the probabilities, all under ``floor``, are kept.
    Returns [D, H, W]."""
    out = probs.clone()
    h, w = probs.shape[-2:]
    margin = 3 * radius
    for d, support in enumerate(probs > floor):
        rows, cols = support.any(1).nonzero(), support.any(0).nonzero()
        if len(rows) == 0:
            continue
        y0, y1 = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, h)
        x0, x1 = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, w)
        crop = probs[d : d + 1, y0:y1, x0:x1]
        out[d, y0:y1, x0:x1] = guided_filter(guide[:, y0:y1, x0:x1], crop, radius, eps)[0]
    return out
