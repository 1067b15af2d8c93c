"""The guided filter that refines mask probabilities (visstg.refine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visstg.refine import box_mean, guided_filter, refine_masks


@pytest.mark.parametrize("radius", [1, 3, 7])
def test_box_mean_is_the_mean_over_the_window_inside_the_image(radius: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 11, 17)
    want = F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
    assert torch.allclose(box_mean(x, radius), want, atol=1e-6)


def test_box_mean_with_a_window_larger_than_the_image_is_the_global_mean() -> None:
    x = torch.rand(1, 5, 6)
    assert torch.allclose(box_mean(x, 10), x.mean().expand_as(x), atol=1e-6)


def step_edge(width: int = 24, edge: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """A guide dark left of column ``edge`` and bright from it on (RGB, 8 rows), and a mask
    probability ramp that crosses 0.5 two and a half columns left of the edge."""
    guide = torch.zeros(3, 8, width)
    guide[:, :, edge:] = 1.0
    cols = torch.arange(width, dtype=torch.float)
    prob = torch.sigmoid((cols - (edge - 3) - 0.5) / 1.5).expand(1, 8, width).contiguous()
    return guide, prob


def test_guided_filter_moves_the_mask_boundary_onto_the_guide_edge() -> None:
    guide, prob = step_edge()
    first = lambda m: int(torch.nonzero(m[0, 0] > 0.5)[0])  # noqa: E731 - first column in
    assert first(prob) == 10
    assert first(guided_filter(guide, prob, radius=4, eps=1e-3)) == 12  # on the edge
    # A plain blur of the same radius leaves the boundary where the ramp put it.
    assert first(box_mean(box_mean(prob, 4), 4)) == 10


def test_guided_filter_with_a_flat_guide_is_a_double_box_blur() -> None:
    torch.manual_seed(0)
    prob = torch.rand(2, 9, 13)
    flat = torch.full((3, 9, 13), 0.4)
    out = guided_filter(flat, prob, radius=2, eps=1e-3)
    assert torch.allclose(out, box_mean(box_mean(prob, 2), 2), atol=1e-5)


def test_guided_filter_weak_edges_are_smoothed_over_with_a_large_eps() -> None:
    guide, prob = step_edge()
    faint = guide * 0.01  # contrast 0.01, far under sqrt(eps) = 0.3
    out = guided_filter(faint, prob, radius=4, eps=0.1)
    assert torch.allclose(out, box_mean(box_mean(prob, 4), 4), atol=1e-3)


def test_guided_filter_checks_its_arguments() -> None:
    guide, prob = step_edge()
    with pytest.raises(ValueError, match="one size"):
        guided_filter(guide[:, :4], prob, 2, 1e-3)
    with pytest.raises(ValueError, match="radius >= 1"):
        guided_filter(guide, prob, 0, 1e-3)
    with pytest.raises(ValueError, match="eps > 0"):
        guided_filter(guide, prob, 2, 0.0)


def test_refine_masks_on_crops_equals_the_whole_frame_filter() -> None:
    torch.manual_seed(0)
    guide = torch.rand(3, 64, 96)
    boxes = torch.zeros(3, 64, 96)
    boxes[0, 5:20, 10:30] = 1.0  # near the top-left corner: its crop is clipped there
    boxes[1, 30:50, 50:70] = 1.0
    probs = F.avg_pool2d(boxes[None], 5, 1, 2)[0].clamp(1e-6, 1 - 1e-6)  # soft edges
    probs[2] = 1e-4  # nothing above the floor: kept as it is
    whole = guided_filter(guide.double(), probs.double(), 4, 1e-3)
    refined = refine_masks(guide, probs, 4, 1e-3)
    assert torch.allclose(refined[:2].double(), whole[:2], atol=1e-5)
    assert torch.equal(refined[2], probs[2])
