"""Kernel warping with deformable convolution (visstg.model.propagation)."""

import pytest
import torch

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
