"""Kernel warping with deformable convolution (visstg.model.propagation)."""

import pytest
import torch
from torch import nn

from visstg.model.detection import gather_at_cells
from visstg.model.propagation import KernelWarp


def _inputs(levels=((4, 5), (2, 3)), p=169, c=8):
    torch.manual_seed(0)
    theta = [torch.randn(2, p, h, w) for h, w in levels]
    f_t = [torch.randn(2, c, h, w) for h, w in levels]
    f_k = [torch.randn(2, c, h, w) for h, w in levels]
    return theta, f_t, f_k


def test_identity_at_initialisation():
    warp = KernelWarp(in_channels=8, hidden=4)
    theta, f_t, f_k = _inputs()
    out = warp(theta, f_t, f_k)
    assert [o.shape for o in out] == [t.shape for t in theta]
    for o, t in zip(out, theta):
        torch.testing.assert_close(o, t)


def test_integer_offset_shifts_by_one_cell():
    warp = KernelWarp(in_channels=8, hidden=4)
    theta, f_t, f_k = _inputs(levels=((4, 5),))
    with torch.no_grad():
        warp.offset_out.bias[2 * 4 + 1] = 1.0  # centre tap, x shift +1 cell
    out = warp(theta, f_t, f_k)[0]
    torch.testing.assert_close(out[..., :-1], theta[0][..., 1:])
    assert out[..., -1].abs().max().item() == 0.0  # sampled beyond the border -> zero
    with torch.no_grad():
        warp.offset_out.bias.zero_()
        warp.offset_out.bias[2 * 4] = -1.0  # centre tap, y shift -1 cell
    out = warp(theta, f_t, f_k)[0]
    torch.testing.assert_close(out[..., 1:, :], theta[0][..., :-1, :])


def test_gradients_reach_offset_cnn_and_weight():
    warp = KernelWarp(in_channels=8, hidden=4)
    theta, f_t, f_k = _inputs()
    warp(theta, f_t, f_k)[0].square().sum().backward()
    # at initialisation (zero offsets) the offset head already receives a gradient
    assert float(warp.offset_out.weight.grad.abs().sum()) > 0
    warp.zero_grad()
    with torch.no_grad():
        warp.offset_out.bias.fill_(0.3)  # fractional offsets: bilinear sampling is smooth
    theta, f_t, f_k = _inputs()
    theta = [t.requires_grad_() for t in theta]
    out = warp(theta, f_t, f_k)
    (sum(o.square().sum() for o in out)).backward()
    assert float(warp.offset_out.weight.grad.abs().sum()) > 0
    assert float(warp.offset_out.bias.grad.abs().sum()) > 0
    assert float(warp.weight.grad.abs().sum()) > 0
    assert all(float(t.grad.abs().sum()) > 0 for t in theta)


def test_level_count_mismatch_is_an_error():
    warp = KernelWarp(in_channels=8, hidden=4)
    theta, f_t, f_k = _inputs()
    with pytest.raises(ValueError, match="levels"):
        warp(theta, f_t[:1], f_k)


def test_warp_at_equals_the_full_warp_read_at_cells_values_and_gradients():
    torch.manual_seed(0)
    warp = KernelWarp(in_channels=4, num_params=6, hidden=4).double()
    # Offsets of a few cells, some reaching outside the map; a non-identity depthwise weight.
    for m in warp.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.5)
    nn.init.normal_(warp.weight, std=0.5)
    shapes = [(5, 7), (3, 4), (1, 2)]
    theta = [torch.randn(2, 6, h, w, dtype=torch.double, requires_grad=True) for h, w in shapes]
    f_t = [torch.randn(2, 4, h, w, dtype=torch.double, requires_grad=True) for h, w in shapes]
    f_k = [torch.randn(2, 4, h, w, dtype=torch.double) for h, w in shapes]
    # Several instances per image and level (more than a row holds), corners, an empty level.
    batch = torch.tensor([0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    level = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    cell = torch.tensor(
        [[0, 0], [4, 6], [2, 3], [4, 0], [2, 3], [0, 0], [1, 1], [2, 0], [1, 1], [3, 5],
         [0, 6], [2, 2], [1, 4], [3, 3], [4, 4], [0, 3]]
    )  # fmt: skip
    full = gather_at_cells(warp(theta, f_t, f_k), batch, level, cell)
    fast = warp.warp_at(theta, f_t, f_k, batch, level, cell)
    assert fast.shape == (16, 6)
    torch.testing.assert_close(fast, full)
    g = torch.randn_like(full)
    params = [*theta, *f_t, *warp.parameters()]
    grads_full = torch.autograd.grad((full * g).sum(), params, allow_unused=True)
    grads_fast = torch.autograd.grad((fast * g).sum(), params, allow_unused=True)
    for a, b in zip(grads_full, grads_fast):
        if a is None:
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(b, a)


def test_warp_at_without_instances_stays_in_the_graph():
    warp = KernelWarp(in_channels=4, num_params=6, hidden=4)
    theta = [torch.randn(1, 6, 3, 3, requires_grad=True)]
    feats = [torch.randn(1, 4, 3, 3)]
    empty = torch.zeros(0, dtype=torch.long)
    out = warp.warp_at(theta, feats, feats, empty, empty, torch.zeros(0, 2, dtype=torch.long))
    assert out.shape == (0, 6)
    out.sum().backward()
    assert theta[0].grad is not None and warp.offset_out.weight.grad is not None
    assert warp.weight.grad is not None


def test_warp_at_matches_the_full_warp_at_integer_sample_points():
    """At initialisation the offsets are exactly zero, so every tap samples a cell centre: the
    offset gradients there (which corner pair the bilinear derivative uses) match too."""
    torch.manual_seed(1)
    warp = KernelWarp(in_channels=4, num_params=6, hidden=4).double()
    nn.init.normal_(warp.weight, std=0.5)
    theta = [torch.randn(2, 6, 4, 5, dtype=torch.double, requires_grad=True)]
    f_t = [torch.randn(2, 4, 4, 5, dtype=torch.double)]
    f_k = [torch.randn(2, 4, 4, 5, dtype=torch.double)]
    batch, level = torch.tensor([0, 1, 1]), torch.zeros(3, dtype=torch.long)
    cell = torch.tensor([[0, 0], [3, 4], [2, 1]])
    full = gather_at_cells(warp(theta, f_t, f_k), batch, level, cell)
    fast = warp.warp_at(theta, f_t, f_k, batch, level, cell)
    torch.testing.assert_close(fast, full)
    params = [*theta, warp.offset_out.weight, warp.offset_out.bias, warp.weight]
    grads_full = torch.autograd.grad(full.square().sum(), params)
    grads_fast = torch.autograd.grad(fast.square().sum(), params)
    assert grads_full[1].abs().sum() > 0  # the offsets do get a gradient at zero offset
    for a, b in zip(grads_full, grads_fast):
        torch.testing.assert_close(b, a)
