"""CondInst-style segmentation: controller, mask branch, dynamic head, dice loss."""

import pytest
import torch
import torch.nn.functional as F

from visstg.model.losses import box_bce_loss, dice_loss, downsample_masks
from visstg.model.segmentation import (
    Controller,
    MaskBranch,
    ProjectionMaskBranch,
    dynamic_mask_head,
    gather_at_cells,
    num_dynamic_params,
    parse_dynamic_params,
    relative_coords,
    upsample_mask_logits,
)


def test_controller_emits_169_params_per_location():
    assert num_dynamic_params() == (8 + 2) * 8 + 8 + 8 * 8 + 8 + 8 * 1 + 1 == 169
    ctrl = Controller(in_channels=16, feat_channels=8, num_convs=2)
    out = ctrl([torch.randn(2, 16, 6, 5), torch.randn(2, 16, 3, 3)])
    assert [o.shape for o in out] == [(2, 169, 6, 5), (2, 169, 3, 3)]


def test_mask_branch_stride_8_output():
    mb = MaskBranch(in_channels=16, channels=8, out_channels=8, num_convs=2)
    feats = [torch.randn(2, 16, 8, 12), torch.randn(2, 16, 4, 6), torch.randn(2, 16, 2, 3)]
    assert mb(feats + [torch.randn(2, 16, 1, 2)]).shape == (2, 8, 8, 12)
    with pytest.raises(ValueError, match=r"needs 3 level\(s\)"):
        mb(feats[:2])


def test_mask_branch_upsample_is_bilinear_resize_of_the_stride_8_features():
    feats = [torch.randn(2, 16, 8, 12), torch.randn(2, 16, 4, 6), torch.randn(2, 16, 2, 3)]
    torch.manual_seed(0)
    plain = MaskBranch(in_channels=16, channels=8, out_channels=8, num_convs=2)
    torch.manual_seed(0)
    fine = MaskBranch(in_channels=16, channels=8, out_channels=8, num_convs=2, upsample=2)
    out = fine(feats)
    assert out.shape == (2, 8, 16, 24)
    want = F.interpolate(plain(feats), scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="upsample"):
        MaskBranch(16, 8, upsample=0)


def test_controller_and_mask_branch_groupnorm_option():
    ctrl = Controller(in_channels=16, feat_channels=24, num_convs=2, norm=True)
    gns = [m for m in ctrl.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(gns) == 2 and gns[0].num_groups == 8  # gcd(32, 24): any width works
    assert ctrl([torch.randn(2, 16, 6, 5)])[0].shape == (2, 169, 6, 5)
    mb = MaskBranch(in_channels=16, channels=8, out_channels=8, num_convs=2, norm=True)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in mb.modules()) == 3 + 2
    feats = [torch.randn(2, 16, 8, 12), torch.randn(2, 16, 4, 6), torch.randn(2, 16, 2, 3)]
    out = mb(feats)
    assert out.shape == (2, 8, 8, 12) and torch.isfinite(out).all()
    plain = Controller(in_channels=16, feat_channels=8, num_convs=2)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules())


def test_parse_dynamic_params_layout_and_error():
    params = torch.arange(2 * 169, dtype=torch.float32).reshape(2, 169)
    weights, biases = parse_dynamic_params(params)
    assert [w.shape for w in weights] == [(16, 10, 1, 1), (16, 8, 1, 1), (2, 8, 1, 1)]
    assert [b.shape for b in biases] == [(16,), (16,), (2,)]
    # weights first (80 + 64 + 8), then biases (8 + 8 + 1)
    assert weights[0][0, :, 0, 0].tolist() == list(range(10))
    assert weights[0][8, 0, 0, 0] == 169  # first weight of the second instance
    assert biases[0][0] == 152 and biases[2][0] == 168
    with pytest.raises(ValueError, match="169"):
        parse_dynamic_params(torch.zeros(2, 170))


def test_relative_coords_convention():
    centers = torch.tensor([[12.0, 4.0]])
    rc = relative_coords(centers, torch.tensor([64.0]), (2, 3), mask_stride=8)
    assert rc.shape == (1, 2, 2, 3)
    # cell (i=1, j=2) stands for pixel (20, 12): ((20 - 12) / 64, (12 - 4) / 64)
    torch.testing.assert_close(rc[0, :, 1, 2], torch.tensor([8 / 64, 8 / 64]))
    torch.testing.assert_close(rc[0, :, 0, 0], torch.tensor([(4 - 12) / 64, 0.0]))


def _explicit_head(mask_feats, params, batch, centers, soi, stride, slope=0.0):
    """One instance at a time: three F.conv2d 1x1 layers over [feats, coords]."""
    out = []
    h, w = mask_feats.shape[-2:]
    for n in range(params.shape[0]):
        p = params[n]
        w1, w2, w3 = (
            p[:80].view(8, 10, 1, 1),
            p[80:144].view(8, 8, 1, 1),
            p[144:152].view(1, 8, 1, 1),
        )
        b1, b2, b3 = p[152:160], p[160:168], p[168:169]
        ys = (torch.arange(h) + 0.5) * stride
        xs = (torch.arange(w) + 0.5) * stride
        rx = (xs[None, :] - centers[n, 0]).expand(h, w) / soi[n]
        ry = (ys[:, None] - centers[n, 1]).expand(h, w) / soi[n]
        x = torch.cat([mask_feats[batch[n]], torch.stack([rx, ry])], 0)[None]  # [1, 10, h, w]
        x = F.leaky_relu(F.conv2d(x, w1, b1), slope)
        x = F.leaky_relu(F.conv2d(x, w2, b2), slope)
        out.append(F.conv2d(x, w3, b3)[0, 0])
    return torch.stack(out)


def test_dynamic_mask_head_equals_explicit_per_instance_convs():
    torch.manual_seed(0)
    mask_feats = torch.randn(2, 8, 5, 7)
    params = torch.randn(3, 169)
    batch = torch.tensor([1, 0, 1])
    centers = torch.tensor([[10.0, 20.0], [50.0, 4.0], [30.0, 30.0]])
    soi = torch.tensor([64.0, 128.0, 64.0])
    got = dynamic_mask_head(mask_feats, params, batch, centers, soi, mask_stride=8)
    exp = _explicit_head(mask_feats, params, batch, centers, soi, 8)
    assert got.shape == (3, 5, 7)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_leaky_dynamic_mask_head_equals_explicit_per_instance_convs():
    torch.manual_seed(1)
    mask_feats = torch.randn(1, 8, 4, 6)
    params = torch.randn(2, 169)
    batch, soi = torch.zeros(2, dtype=torch.long), torch.tensor([64.0, 64.0])
    centers = torch.tensor([[8.0, 8.0], [30.0, 20.0]])
    got = dynamic_mask_head(mask_feats, params, batch, centers, soi, 8, negative_slope=0.1)
    exp = _explicit_head(mask_feats, params, batch, centers, soi, 8, slope=0.1)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    relu = dynamic_mask_head(mask_feats, params, batch, centers, soi, 8)
    assert not torch.allclose(got, relu)  # the slope reaches the hidden layers


@pytest.mark.parametrize("slope", [0.0, 0.01])
def test_a_dead_second_layer_passes_gradient_only_with_a_leak(slope):
    # Every second-layer unit negative at every pixel (biases -10, small weights): with ReLU
    # the output is the last bias for all pixels and nothing before it gets a gradient.
    torch.manual_seed(0)
    mask_feats = torch.randn(1, 8, 4, 6, requires_grad=True)
    params = torch.randn(1, 169)
    params[0, 80:144] *= 0.01  # layer-2 weights
    params[0, 160:168] = -10.0  # layer-2 biases
    params.requires_grad_(True)
    logits = dynamic_mask_head(mask_feats, params, torch.zeros(1, dtype=torch.long),
                               torch.tensor([[12.0, 12.0]]), torch.tensor([64.0]), 8,
                               negative_slope=slope)  # fmt: skip
    (logits * torch.randn_like(logits)).sum().backward()
    layer1_grad = params.grad[0, :80].abs().sum() + params.grad[0, 152:160].abs().sum()
    if slope == 0.0:
        assert float(logits.amax() - logits.amin()) == 0.0  # one constant: the last bias
        assert float(layer1_grad) == 0.0 and float(mask_feats.grad.abs().sum()) == 0.0
    else:
        assert float(logits.amax() - logits.amin()) > 0.0
        assert float(layer1_grad) > 0.0 and float(mask_feats.grad.abs().sum()) > 0.0


def test_dynamic_mask_head_empty_is_connected():
    mask_feats = torch.randn(2, 8, 5, 7, requires_grad=True)
    params = torch.randn(0, 169, requires_grad=True)
    logits = dynamic_mask_head(mask_feats, params, torch.zeros(0, dtype=torch.long),
                               torch.zeros(0, 2), torch.zeros(0))  # fmt: skip
    assert logits.shape == (0, 5, 7)
    up = upsample_mask_logits(logits)
    assert up.shape == (0, 10, 14)
    loss = dice_loss(up, torch.zeros(0, 10, 14))
    assert loss.item() == 0.0
    loss.backward()
    assert mask_feats.grad is not None and float(mask_feats.grad.abs().sum()) == 0


def test_upsample_mask_logits_convention():
    logits = torch.tensor([[[0.0, 4.0]]])  # [1, 1, 2]
    up = upsample_mask_logits(logits, factor=2)
    assert up.shape == (1, 2, 4)
    # align_corners=False: outputs at input positions -0.25, 0.25, 0.75, 1.25 (edges clamp)
    torch.testing.assert_close(up[0, 0], torch.tensor([0.0, 1.0, 3.0, 4.0]))


def test_dice_loss_hand_value():
    logits = torch.tensor([[[0.0, 100.0], [-100.0, 0.0]]])  # p = .5, 1, 0, .5
    targets = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # 2 * (0.5 + 1) / ((0.25 + 1 + 0 + 0.25) + 2) = 3 / 3.5
    assert dice_loss(logits, targets, eps=0).item() == pytest.approx(1 - 3 / 3.5)
    two = torch.cat([logits, torch.full((1, 2, 2), 100.0)])
    tt = torch.cat([targets, torch.ones(1, 2, 2)])
    assert dice_loss(two, tt, eps=0).item() == pytest.approx((1 - 3 / 3.5) / 2)
    with pytest.raises(ValueError, match="shape"):
        dice_loss(logits, targets[:, :1])


def test_downsample_masks_area_fraction():
    m = torch.zeros(1, 8, 10, dtype=torch.bool)
    m[0, :4, :2] = True
    d = downsample_masks(m, stride=4)
    assert d.shape == (1, 2, 3)  # width padded to 12
    assert d[0, 0].tolist() == [0.5, 0.0, 0.0]
    assert float(d[0, 1].sum()) == 0.0


def test_gather_reexported_for_kernels():
    theta = [torch.randn(1, 169, 3, 3)]
    k = gather_at_cells(theta, torch.tensor([0]), torch.tensor([0]), torch.tensor([[2, 1]]))
    torch.testing.assert_close(k[0], theta[0][0, :, 2, 1])


def test_mask_branch_fine_adds_a_stride_4_map_to_the_upsampled_output():
    """``fine=True``: output = the upsampled stride-8 output + conv(fine map); the map is passed
    exactly when the branch was built for it, at twice P3's size, and needs ``upsample=2``."""
    feats = [torch.randn(2, 16, 8, 12), torch.randn(2, 16, 4, 6), torch.randn(2, 16, 2, 3)]
    fine_map = torch.randn(2, 16, 16, 24)
    torch.manual_seed(0)
    plain = MaskBranch(in_channels=16, channels=8, out_channels=8, num_convs=2, upsample=2)
    torch.manual_seed(0)
    mb = MaskBranch(in_channels=16, channels=8, out_channels=8, num_convs=2, upsample=2, fine=True)
    mb.load_state_dict(plain.state_dict(), strict=False)
    out = mb(feats, fine_map)
    assert out.shape == (2, 8, 16, 24)
    torch.testing.assert_close(out, plain(feats) + mb.fine(fine_map))
    assert not torch.allclose(out, plain(feats))
    with pytest.raises(ValueError, match="fine=True"):
        mb(feats)
    with pytest.raises(ValueError, match="fine=False"):
        plain(feats, fine_map)
    with pytest.raises(ValueError, match="multiple of 32"):
        mb(feats, fine_map[..., :15, :])
    with pytest.raises(ValueError, match="upsample must be 2"):
        MaskBranch(16, 8, fine=True)
    with pytest.raises(ValueError, match="upsample must be 2"):
        MaskBranch(16, 8, fine=True, upsample=8)


def test_mask_branch_fine_upsample_4_resizes_the_stride_4_sum_to_stride_2():
    """``fine=True, upsample=4``: the stride-4 output (upsampled P3 + fine detail) resized x2."""
    feats = [torch.randn(2, 16, 8, 12), torch.randn(2, 16, 4, 6), torch.randn(2, 16, 2, 3)]
    fine_map = torch.randn(2, 16, 16, 24)
    torch.manual_seed(0)
    at4 = MaskBranch(16, 8, out_channels=8, num_convs=2, upsample=2, fine=True)
    at2 = MaskBranch(16, 8, out_channels=8, num_convs=2, upsample=4, fine=True)
    at2.load_state_dict(at4.state_dict())
    out = at2(feats, fine_map)
    assert out.shape == (2, 8, 32, 48)
    expected = F.interpolate(at4(feats, fine_map), scale_factor=2, mode="bilinear")
    torch.testing.assert_close(out, expected)


def test_mask_branch_stem_adds_a_stride_2_map_to_the_stride_2_features():
    """``stem_channels``: output = the ``fine, upsample=4`` output + conv(stem map); ``fine`` is
    then the pair (stride-4 map, stride-2 map), and the path needs ``fine`` and ``upsample=4``."""
    feats = [torch.randn(2, 16, 8, 12), torch.randn(2, 16, 4, 6), torch.randn(2, 16, 2, 3)]
    fine_map, stem_map = torch.randn(2, 16, 16, 24), torch.randn(2, 4, 32, 48)
    torch.manual_seed(0)
    at2 = MaskBranch(16, 8, out_channels=8, num_convs=2, upsample=4, fine=True)
    stem = MaskBranch(16, 8, out_channels=8, num_convs=2, upsample=4, fine=True, stem_channels=4)
    missing, unexpected = stem.load_state_dict(at2.state_dict(), strict=False)
    assert missing and all(k.startswith("stem.") for k in missing) and not unexpected
    out = stem(feats, (fine_map, stem_map))
    assert out.shape == (2, 8, 32, 48)
    torch.testing.assert_close(out, at2(feats, fine_map) + stem.stem(stem_map))
    assert stem.stem(stem_map).abs().sum() > 0
    with pytest.raises(ValueError, match="pair"):
        stem(feats, fine_map)
    with pytest.raises(ValueError, match="multiple of 32"):
        stem(feats, (fine_map, stem_map[..., :31, :]))
    for bad in ({"fine": False, "upsample": 4}, {"fine": True, "upsample": 2}):
        with pytest.raises(ValueError, match="stem_channels"):
            MaskBranch(16, 8, stem_channels=4, **bad)
    with pytest.raises(ValueError, match="stem_channels"):
        ProjectionMaskBranch(16, 8, upsample=4, fine=True, stem_channels=-1)


def test_box_bce_loss_is_the_mean_bce_over_the_cells_each_box_overlaps():
    """Cells overlapping the box count, every other cell is ignored; instances weigh equally."""
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 6, 8), torch.rand(2, 6, 8)
    # Instance 0: pixels x 5..11, y 0..7 -> cells x 1..2, y 0..1 at stride 4 (x 12 is not in).
    # Instance 1: a sub-cell box inside cell (3, 4).
    boxes = torch.tensor([[5.0, 0.0, 12.0, 7.5], [17.0, 13.0, 18.0, 14.0]])
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    want = (bce[0, 0:2, 1:3].mean() + bce[1, 3, 4]) / 2
    torch.testing.assert_close(box_bce_loss(logits, targets, boxes, 4), want)
    outside = logits.clone()
    outside[:, 4:, 6:] = 50.0  # no box reaches these cells
    torch.testing.assert_close(box_bce_loss(outside, targets, boxes, 4), want)
    empty = torch.zeros(0, 6, 8, requires_grad=True)
    loss = box_bce_loss(empty, torch.zeros(0, 6, 8), torch.zeros(0, 4))
    assert loss.item() == 0 and loss.requires_grad
    with pytest.raises(ValueError, match="box_bce_loss"):
        box_bce_loss(logits, targets, boxes[:1])


def test_projection_mask_branch_is_one_1x1_conv_of_p3():
    """The paper's F^d_t (3.4): a 1x1 conv of the fused P3 to 8 channels; coarser levels unread.
    ``upsample`` and ``fine`` behave as in CondInst's branch."""
    feats = [torch.randn(2, 16, 8, 12), torch.randn(2, 16, 4, 6)]
    pb = ProjectionMaskBranch(in_channels=16, out_channels=8)
    assert [type(m) for m in pb.modules()][1:] == [torch.nn.Conv2d]
    torch.testing.assert_close(pb(feats), pb.proj(feats[0]))
    assert pb(feats).shape == (2, 8, 8, 12)
    assert torch.equal(pb(feats), pb(feats[:1]))
    fine_map = torch.randn(2, 16, 16, 24)
    fine = ProjectionMaskBranch(16, 8, upsample=2, fine=True, channels=4, norm=True)
    fine.proj.load_state_dict(pb.proj.state_dict())
    up = F.interpolate(pb(feats), scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(fine(feats, fine_map), up + fine.fine(fine_map))
    assert fine.fine[0].out_channels == 4 and isinstance(fine.fine[1], torch.nn.GroupNorm)
    with pytest.raises(ValueError, match="ProjectionMaskBranch: a stride-4 map"):
        pb(feats, fine_map)
    with pytest.raises(ValueError, match="ProjectionMaskBranch: fine=True"):
        ProjectionMaskBranch(16, 8, fine=True)
    with pytest.raises(ValueError, match=r"ProjectionMaskBranch needs 1 level\(s\)"):
        pb([])
