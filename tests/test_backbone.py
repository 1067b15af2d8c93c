import urllib.error

import pytest
import torch
from torchvision.models import resnet18
from torchvision.ops import FrozenBatchNorm2d

from visstg.model.backbone import ResNetFPN, WeightsError


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_pyramid_shapes_and_strides(depth):
    net = ResNetFPN(depth=depth, out_channels=32, weights=None).eval()
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 64, 96))
    assert len(feats) == len(net.strides) == 5
    for f, s in zip(feats, net.strides):
        assert f.shape == (1, 32, -(-64 // s), -(-96 // s))


@pytest.mark.parametrize("depth", [10, 50])
def test_a_narrow_resnet_halves_every_stage(depth):
    narrow = ResNetFPN(depth=depth, out_channels=16, width=32, num_levels=3, fine_level=True)
    body = narrow.fpn.body
    expansion = 4 if depth == 50 else 1
    assert body.conv1.out_channels == body.bn1.weight.numel() == 32
    layers = [getattr(body, f"layer{i}") for i in range(1, 5)]
    assert [layer[0].conv1.out_channels for layer in layers] == [32, 64, 128, 256]
    lateral_in = [m[0].in_channels for m in narrow.fpn.fpn.inner_blocks]
    assert lateral_in == [c * expansion for c in (64, 128, 256)]  # C3, C4, C5
    assert narrow.fine_lateral.in_channels == 32 * expansion  # C2
    with torch.no_grad():
        feats = narrow(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (2, 16, 16, 24),
        (2, 16, 8, 12),
        (2, 16, 4, 6),
        (2, 16, 2, 3),
    ]

    # a quarter of the stage parameters of the 64-wide network: convs scale with width squared
    def stage_params(net):
        return sum(p.numel() for n, p in net.named_parameters() if n.startswith("fpn.body.layer"))

    wide = ResNetFPN(depth=depth, out_channels=16, num_levels=3)
    assert stage_params(narrow) == pytest.approx(stage_params(wide) / 4, rel=0.01)


def test_a_narrow_resnet_refuses_pretrained_weights_and_odd_widths():
    with pytest.raises(ValueError, match="width=32 needs model.backbone.weights=null"):
        ResNetFPN(depth=18, width=32, weights="imagenet")
    with pytest.raises(ValueError, match="multiple of 8"):
        ResNetFPN(depth=18, width=20)


def test_frozen_batchnorm_and_trainable_layers():
    net = ResNetFPN(depth=18, weights=None, trainable_layers=3)
    body = net.fpn.body
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert not body.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert all(p.requires_grad for p in net.fpn.fpn.parameters())
    bn = ResNetFPN(depth=18, weights=None, trainable_layers=5, norm="bn")
    assert bn.fpn.body.conv1.weight.requires_grad
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())


def test_local_state_dict_round_trip(tmp_path):
    ref = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    net = ResNetFPN(depth=18, weights=str(path))
    body = net.fpn.body
    assert torch.equal(body.conv1.weight, ref.conv1.weight)
    assert torch.equal(body.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    assert torch.equal(body.layer4[0].bn1.running_var, ref.layer4[0].bn1.running_var)
    # A wrapped checkpoint ({"state_dict": ...}) loads too.
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "wrapped.pth")
    ResNetFPN(depth=18, weights=tmp_path / "wrapped.pth")


def test_bad_local_files_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="missing.pth.*does not exist"):
        ResNetFPN(depth=18, weights=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        ResNetFPN(depth=18, weights=garbage)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in resnet18().state_dict().items() if "layer4" not in k}, partial)
    with pytest.raises(WeightsError, match="partial.pth.*missing keys"):
        ResNetFPN(depth=18, weights=partial)
    wrong = tmp_path / "r34_for_r18.pth"
    state = resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, wrong)
    with pytest.raises(WeightsError, match="r34_for_r18.pth"):
        ResNetFPN(depth=18, weights=wrong)


def test_imagenet_offline_error_says_how_to_pass_a_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"model\.backbone\.weights=/path/to/resnet18-"):
        ResNetFPN(depth=18, weights="imagenet")


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        ResNetFPN(depth=42)
    with pytest.raises(ValueError, match="norm"):
        ResNetFPN(depth=18, norm="group")


def test_resnet10_is_resnet18_with_one_block_per_stage():
    net = ResNetFPN(depth=10, out_channels=16, weights=None).eval()
    body = net.fpn.body
    assert [len(getattr(body, f"layer{i}")) for i in range(2, 5)] == [1, 1, 1]
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        ResNetFPN(depth=10, weights="imagenet")


def test_three_levels_drop_p6_p7():
    net = ResNetFPN(depth=10, out_channels=16, weights=None, num_levels=3).eval()
    assert net.strides == (8, 16, 32)
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 8, 12), (1, 16, 4, 6), (1, 16, 2, 3)]
    with pytest.raises(ValueError, match="num_levels"):
        ResNetFPN(depth=10, num_levels=4)


def test_autocast_and_channels_last_return_float32_nchw_maps_close_to_fp32():
    torch.manual_seed(0)
    ref = ResNetFPN(10, 16, norm="bn", trainable_layers=5, num_levels=3).eval()
    fast = ResNetFPN(
        10, 16, norm="bn", trainable_layers=5, num_levels=3, autocast="bf16", channels_last=True
    ).eval()
    fast.load_state_dict(ref.state_dict())
    assert fast.fpn.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected, got = ref(x), fast(x)
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32 and g.is_contiguous() and g.shape == e.shape
        # bfloat16 keeps 8 bits of mantissa: close, not equal.
        assert (g - e).abs().max() <= 0.05 * e.abs().max()
        assert not torch.equal(g, e)
    with pytest.raises(ValueError, match="autocast"):
        ResNetFPN(10, 16, autocast="int8")


@pytest.mark.parametrize("depth, c2", [(10, 64), (50, 256)])
def test_fine_level_prepends_the_c2_lateral_and_leaves_the_pyramid_as_it_was(depth, c2):
    """``fine_level``: a stride-4 map (C2 through a 1x1 conv) comes first; the pyramid levels are
    the ones the same weights give without it."""
    torch.manual_seed(0)
    ref = ResNetFPN(depth, 16, num_levels=3).eval()
    net = ResNetFPN(depth, 16, num_levels=3, fine_level=True).eval()
    missing, unexpected = net.load_state_dict(ref.state_dict(), strict=False)
    assert sorted(missing) == ["fine_lateral.bias", "fine_lateral.weight"] and not unexpected
    assert net.fine_lateral.in_channels == c2 and net.strides == ref.strides
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        fine, *levels = net(x)
        expected = ref(x)
        c2_map = net.fpn.body.layer1(net.fpn.body.maxpool(net.fpn.body.relu(net.fpn.body.bn1(
            net.fpn.body.conv1(x)))))  # fmt: skip
    assert fine.shape == (1, 16, 16, 24)
    torch.testing.assert_close(fine, net.fine_lateral(c2_map))
    for e, g in zip(expected, levels):
        torch.testing.assert_close(g, e)


def test_stem_channels_add_the_stem_lateral_after_the_c2_one():
    """``stem_channels``: a stride-2 map (the stem's ReLU output through a 1x1 conv) follows the
    stride-4 one; the pyramid levels and the C2 map are the same weights' as without it."""
    torch.manual_seed(0)
    ref = ResNetFPN(10, 16, num_levels=3, fine_level=True, width=32).eval()
    net = ResNetFPN(10, 16, num_levels=3, fine_level=True, width=32, stem_channels=8).eval()
    missing, unexpected = net.load_state_dict(ref.state_dict(), strict=False)
    assert sorted(missing) == ["stem_lateral.bias", "stem_lateral.weight"] and not unexpected
    assert net.stem_level and not ref.stem_level and net.stem_lateral.in_channels == 32
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        fine, stem, *levels = net(x)
        expected = ref(x)
        body = net.fpn.body
        stem_map = body.relu(body.bn1(body.conv1(x)))
    assert stem.shape == (1, 8, 32, 48)
    torch.testing.assert_close(stem, net.stem_lateral(stem_map))
    for e, g in zip(expected, [fine, *levels]):
        torch.testing.assert_close(g, e)
    with pytest.raises(ValueError, match="fine_level"):
        ResNetFPN(10, 16, num_levels=3, width=32, stem_channels=8)


def _randomise_norms(net):
    """Norm statistics and affines away from the identity map, so a wrong fold shows."""
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 50},
        {"depth": 10, "width": 32, "num_levels": 3, "fine_level": True},
        {"depth": 18, "norm": "bn"},
    ],
)
def test_fuse_norms_keeps_the_outputs_and_removes_every_norm(kwargs):
    net = ResNetFPN(out_channels=32, **kwargs).eval()
    _randomise_norms(net)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = net(x)
        fused = net.fuse_norms()
        got = fused(x)
    assert fused is net
    norms = (FrozenBatchNorm2d, torch.nn.BatchNorm2d)
    assert not any(isinstance(m, norms) for m in net.fpn.body.modules())
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())
    with torch.no_grad():  # a second call has nothing left to fold
        torch.testing.assert_close(net.fuse_norms()(x)[0], got[0])


def test_fuse_norms_refuses_a_network_in_training_mode():
    with pytest.raises(RuntimeError, match="eval"):
        ResNetFPN(depth=10, out_channels=16).fuse_norms()
