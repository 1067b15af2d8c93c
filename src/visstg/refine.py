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
grow with the radius) and a per-pixel C x C solve for the colour guide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["box_mean", "guided_filter"]


def _window(n: int, radius: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """End (exclusive) and start of each position's window along an axis of length ``n``."""
    i = torch.arange(n, device=device)
    return (i + radius + 1).clamp(max=n), (i - radius).clamp(min=0)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of ``x`` ([..., H, W]) over each pixel's (2r+1) x (2r+1) window, clipped at the
    borders (the mean of the pixels inside the image, as ``avg_pool2d`` with
    ``count_include_pad=False``). Sums are accumulated in float64; the result has ``x``'s dtype.
    """
    h, w = x.shape[-2:]
    end_y, start_y = _window(h, radius, x.device)
    end_x, start_x = _window(w, radius, x.device)
    rows = F.pad(x.double().cumsum(-2), (0, 0, 1, 0))  # [..., H + 1, W]
    sums = rows[..., end_y, :] - rows[..., start_y, :]
    cols = F.pad(sums.cumsum(-1), (1, 0))  # [..., H, W + 1]
    sums = cols[..., end_x] - cols[..., start_x]
    count = (end_y - start_y).double()[:, None] * (end_x - start_x).double()[None, :]
    return (sums / count).to(x.dtype)


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
    guide, src = guide.float(), src.float()
    mean_i = box_mean(guide, radius)  # [C, H, W]
    mean_ii = box_mean(guide[:, None] * guide[None], radius)  # [C, C, H, W]
    cov_ii = mean_ii - mean_i[:, None] * mean_i[None]
    cov_ii = cov_ii + eps * torch.eye(c, device=guide.device)[:, :, None, None]
    mean_p = box_mean(src, radius)  # [N, H, W]
    mean_ip = box_mean(guide[None] * src[:, None], radius)  # [N, C, H, W]
    cov_ip = mean_ip - mean_i[None] * mean_p[:, None]
    # a = cov_ii^-1 cov_ip for every pixel: [H, W, C, C] \ [H, W, C, N]
    a = torch.linalg.solve(cov_ii.permute(2, 3, 0, 1), cov_ip.permute(2, 3, 1, 0))
    a = a.permute(3, 2, 0, 1)  # [N, C, H, W]
    b = mean_p - (a * mean_i[None]).sum(1)
    return (box_mean(a, radius) * guide[None]).sum(1) + box_mean(b, radius)
