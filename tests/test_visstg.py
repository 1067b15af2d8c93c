"""The composed VisSTG network and its criterion: training pairs, empty frames, inference steps,
the Hydra configs (default small model, the paper's +experiment=r50)."""

import math

import hydra
import pytest
import torch

from visstg.config import compose
from visstg.model import VisSTG, VisSTGCriterion
from visstg.model.backbone import ResNetFPN
from visstg.model.criterion import LOSS_KEYS
from visstg.model.detection import CenterNetHead, neighbour_cells
from visstg.model.gnn import SpatialTemporalGNN
from visstg.model.graph import GraphBuilder
from visstg.model.losses import box_bce_loss, downsample_masks
from visstg.model.propagation import KernelWarp
from visstg.model.segmentation import Controller, MaskBranch, ProjectionMaskBranch
from visstg.model.tracking import EdgeClassifier
from visstg.model.visstg import _as_ranges

H, W, D, C = 64, 96, 16, 3
SMALL_RANGES = [(0, 32), (32, 64), (64, 128), (128, 256), (256, math.inf)]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these small models gain little from two, and two threads on a shared
    2-core machine slow down by an order of magnitude whenever another process is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(propagation=True, iterations=2, **kwargs):
    torch.manual_seed(0)
    return VisSTG(
        C,
        backbone=kwargs.pop("backbone", None) or ResNetFPN(18, D, norm="bn", trainable_layers=5),
        graph=GraphBuilder(D, hidden=8),
        gnn=SpatialTemporalGNN(D, iterations, hidden=D),
        det_head=kwargs.pop("det_head", None) or CenterNetHead(C, D, D),
        controller=Controller(D, 169, D),
        mask_branch=kwargs.pop("mask_branch", None) or MaskBranch(D, D, num_convs=2),
        kernel_warp=KernelWarp(D, 169, D) if propagation else None,
        edge_classifier=EdgeClassifier(D, D),
        dim=D,
        size_ranges=SMALL_RANGES,
        propagation=propagation,
        **kwargs,
    )


def frame(shift, instances=True):
    """A frame with a disc (class 0, track 7) and a rectangle (class 1, track 9)."""
    img = torch.full((3, H, W), -0.5)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0] = (xx - (22 + shift)) ** 2 + (yy - 22) ** 2 <= 12**2
    masks[1, 20 + shift : 50 + shift, 50:80] = True
    img[0][masks[0]], img[1][masks[1]] = 1.5, 1.5
    boxes = torch.tensor([[10.0 + shift, 10, 35 + shift, 35], [50, 20.0 + shift, 80, 50 + shift]])
    target = {
        "boxes": boxes,
        "labels": torch.tensor([0, 1]),
        "track_ids": torch.tensor([7, 9]),
        "masks": masks,
    }
    if not instances:
        target = {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "track_ids": torch.zeros(0, dtype=torch.long),
            "masks": torch.zeros(0, H, W, dtype=torch.bool),
        }
    return img, target


def pair_batch(ref_instances=True, tgt_instances=True):
    i0, t0 = frame(0, ref_instances)
    i1, t1 = frame(4, tgt_instances)
    return {
        "ref_images": i0[None],
        "tgt_images": i1[None],
        "ref_targets": [t0],
        "tgt_targets": [t1],
        "image_sizes": torch.tensor([[H, W]]),
        "video_ids": [1],
        "frame_indices": torch.tensor([[0, 2]]),
    }


def test_forward_train_outputs():
    net, batch = tiny_net(), pair_batch()
    out = net.forward_train(batch)
    assert [h.shape for h in out["det"]["heatmap"]] == [
        (1, C, math.ceil(H / s), math.ceil(W / s)) for s in net.strides
    ]
    assert out["mask_logits"].shape == out["mask_warp_logits"].shape == (2, H // 4, W // 4)
    assert out["ref_mask_logits"].shape == (2, H // 4, W // 4)
    graph = out["graph"]
    assert graph.x_ref.shape == (2 * 5, D)
    assert out["edge_logits"].shape == (graph.edge_index.shape[1],)
    assert len(out["tgt_assignment"]) == 2 and len(out["ref_assignment"]) == 2
    losses = VisSTGCriterion()(out, batch)
    assert set(LOSS_KEYS) | {"loss"} == set(losses)


def test_mask_neighbours_train_the_kernels_around_each_centre():
    batch = pair_batch()
    centre = tiny_net().forward_train(batch)
    assert centre["mask_rows"].tolist() == centre["ref_mask_rows"].tolist() == [0, 1]
    net = tiny_net(mask_neighbours=1)
    out = net.forward_train(batch)
    rows = out["mask_rows"]
    tgt = out["tgt_assignment"]
    _, cells = neighbour_cells(tgt, out["level_shapes"], net.strides, radius=1)
    # Both objects are several P3/P4 cells across: every instance gets its centre cell and more.
    assert rows.unique().tolist() == [0, 1] and len(rows) > 2
    assert out["mask_logits"].shape == (len(rows), H // 4, W // 4)
    assert out["ref_mask_logits"].shape == (len(out["ref_mask_rows"]), H // 4, W // 4)
    # M' (warped kernels) stays one row per target instance.
    assert out["mask_warp_logits"].shape == (2, H // 4, W // 4)
    # The centre cell's mask is the same kernel read as without neighbours.
    at_centre = (cells == tgt.cell[rows]).all(1)
    assert rows[at_centre].tolist() == [0, 1]
    torch.testing.assert_close(out["mask_logits"][at_centre], centre["mask_logits"])
    losses = VisSTGCriterion()(out, batch)
    assert torch.isfinite(losses["loss"])
    # The loss pairs each row with its own instance's mask: logits that draw each row's mask
    # score ~0, the same logits with the two objects' rows swapped score high.
    masks = downsample_masks(batch["tgt_targets"][0]["masks"][rows], 4)
    perfect = dict(out, mask_logits=40 * masks - 20)
    swapped = dict(perfect, mask_rows=1 - rows)
    assert VisSTGCriterion()(perfect, batch)["loss_mask"] < 0.05
    assert VisSTGCriterion()(swapped, batch)["loss_mask"] > 0.5


def test_mask_bce_adds_the_in_box_bce_to_every_mask_term():
    """``mask_bce``: each of loss_mask, loss_mask_warp, loss_mask_ref grows by the weight times
    the in-box BCE of its logits against the same soft targets; 0 is the paper's dice."""
    batch = pair_batch()
    out = tiny_net().forward_train(batch)
    dice = VisSTGCriterion()(out, batch)
    both = VisSTGCriterion(mask_bce=0.5)(out, batch)
    for key, logits, frame, a in (
        ("loss_mask", out["mask_logits"], "tgt_targets", out["tgt_assignment"]),
        ("loss_mask_warp", out["mask_warp_logits"], "tgt_targets", out["tgt_assignment"]),
        ("loss_mask_ref", out["ref_mask_logits"], "ref_targets", out["ref_assignment"]),
    ):
        soft = downsample_masks(batch[frame][0]["masks"].float(), 4)
        bce = box_bce_loss(logits, soft, a.boxes, 4)
        torch.testing.assert_close(both[key], dice[key] + 0.5 * bce)
        assert bce > 0
    assert torch.isfinite(both["loss"]) and both["loss"] > dice["loss"]


def test_mask_loss_stride_scores_the_upsampled_logits_against_finer_targets():
    """``mask_loss_stride``: every mask term compares the logits upsampled bilinearly to that
    stride with the ground truth averaged over cells of that stride (binary at 1); the default
    is the logits' own stride; a stride that does not divide it is refused."""
    from visstg.model.losses import dice_loss
    from visstg.model.segmentation import upsample_mask_logits

    batch = pair_batch()
    out = tiny_net().forward_train(batch)
    default = VisSTGCriterion(mask_bce=1.0)(out, batch)
    torch.testing.assert_close(
        default, VisSTGCriterion(mask_bce=1.0, mask_loss_stride=4)(out, batch)
    )
    for stride in (2, 1):
        fine = VisSTGCriterion(mask_bce=1.0, mask_loss_stride=stride)(out, batch)
        for key, logits, frame, a in (
            ("loss_mask", out["mask_logits"], "tgt_targets", out["tgt_assignment"]),
            ("loss_mask_warp", out["mask_warp_logits"], "tgt_targets", out["tgt_assignment"]),
            ("loss_mask_ref", out["ref_mask_logits"], "ref_targets", out["ref_assignment"]),
        ):
            up = upsample_mask_logits(logits, 4 // stride)
            target = downsample_masks(batch[frame][0]["masks"].float(), stride)
            assert up.shape == target.shape == (2, H // stride, W // stride)
            if stride == 1:
                assert set(target.unique().tolist()) == {0.0, 1.0}
            expected = dice_loss(up, target) + box_bce_loss(up, target, a.boxes, stride)
            torch.testing.assert_close(fine[key], expected)
            assert not torch.allclose(fine[key], default[key])
        fine["loss"].backward(retain_graph=True)
    with pytest.raises(ValueError, match="mask_loss_stride 3 must divide"):
        VisSTGCriterion(mask_loss_stride=3)
    for bad in (-1, 0.5):
        with pytest.raises(ValueError, match=f"min_radius must be a whole number.*got {bad}"):
            VisSTGCriterion(min_radius=bad)


def test_overfitting_one_pair_reduces_every_loss():
    net, batch = tiny_net(), pair_batch()
    criterion = VisSTGCriterion()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(30):
        losses = criterion(net.forward_train(batch), batch)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    for key in LOSS_KEYS + ("loss",):
        first, last = history[0][key], history[-1][key]
        assert math.isfinite(last) and last < first, (key, first, last)


@pytest.mark.parametrize(
    "ref_instances, tgt_instances", [(False, False), (True, False), (False, True)]
)
def test_empty_frames_give_finite_connected_losses(ref_instances, tgt_instances):
    net, batch = tiny_net(), pair_batch(ref_instances, tgt_instances)
    losses = VisSTGCriterion()(net.forward_train(batch), batch)
    for key, value in losses.items():
        assert torch.isfinite(value), key
        assert value.requires_grad, key
    losses["loss"].backward()
    # Every head still receives a (possibly zero) gradient: no unused parameter under DDP.
    for module in (
        net.graph,
        net.gnn,
        net.det_head,
        net.controller,
        net.mask_branch,
        net.kernel_warp,
        net.edge_classifier,
    ):
        assert all(p.grad is not None for p in module.parameters()), type(module).__name__


def test_propagation_off_and_invalid_variants():
    net, batch = tiny_net(propagation=False), pair_batch()
    assert net.kernel_warp is None
    out = net.forward_train(batch)
    assert out["mask_warp_logits"] is None
    losses = VisSTGCriterion()(out, batch)
    assert losses["loss_mask_warp"].item() == 0.0
    # The ablation variants are implemented (tests/test_ablations.py); edge association needs
    # the graph.
    with pytest.raises(ValueError, match="fusion='relation'"):
        tiny_net(fusion="concat")
    with pytest.raises(ValueError, match="fusion"):
        tiny_net(fusion="attention")


def test_inference_first_and_second_frame():
    net = tiny_net(score_thresh=0.0, topk=10).eval()
    i0, _ = frame(0)
    i1, _ = frame(4)
    out0, state0 = net.inference_step(i0[None])
    n0 = out0["scores"].numel()
    assert n0 > 0
    assert out0["boxes"].shape == (n0, 4) and out0["cells"].shape == (n0, 2)
    assert out0["masks"].shape == (n0, H // net.mask_stride, W // net.mask_stride)
    assert out0["edge_scores"].shape == (0, n0)
    assert out0["node_features"].shape == (n0, 5, D)
    assert out0["kernels"].shape == (n0, 169)
    assert [f.shape[1] for f in state0["feats"]] == [D] * 5
    assert [k.shape[1] for k in state0["kernels"]] == [169] * 5

    refs = {
        "boxes": out0["boxes"][:2],
        "labels": out0["labels"][:2],
        "memory_nodes": out0["node_features"][2:3],
        "memory_centers": torch.tensor([[40.0, 30.0]]),
        "memory_labels": out0["labels"][2:3],
        "memory_kernels": out0["kernels"][2:3],
        "memory_levels": out0["levels"][2:3],
        "memory_cells": out0["cells"][2:3],
    }
    out1, state1 = net.inference_step(i1[None], state0, refs, image_size=(H, W))
    n1 = out1["scores"].numel()
    assert out1["edge_scores"].shape == (3, n1)
    assert ((out1["edge_scores"] >= 0) & (out1["edge_scores"] <= 1)).all()
    # A reference only scores detections of its own class.
    other = out1["labels"][None, :] != torch.cat([refs["labels"], refs["memory_labels"]])[:, None]
    assert (out1["edge_scores"][other] == 0).all()
    assert out1["masks"].shape == (n1, H // 4, W // 4)
    # The carried state has a fixed size.
    assert [f.shape for f in state1["feats"]] == [f.shape for f in state0["feats"]]
    assert [k.shape for k in state1["kernels"]] == [k.shape for k in state0["kernels"]]


def test_memory_kernels_are_written_into_the_previous_kernel_maps():
    kernels = [torch.zeros(1, 169, 8, 12), torch.zeros(1, 169, 4, 6)]
    refs = {
        "memory_kernels": torch.arange(3 * 169.0).view(3, 169),
        "memory_levels": torch.tensor([0, 1, 0]),
        "memory_cells": torch.tensor([[2, 5], [3, 1], [7, 11]]),
    }
    out = VisSTG._with_memory_kernels(kernels, refs)
    assert torch.equal(out[0][0, :, 2, 5], refs["memory_kernels"][0])
    assert torch.equal(out[1][0, :, 3, 1], refs["memory_kernels"][1])
    assert torch.equal(out[0][0, :, 7, 11], refs["memory_kernels"][2])
    assert out[0].abs().sum() == refs["memory_kernels"][[0, 2]].abs().sum()
    assert kernels[0].abs().sum() == 0  # the carried state is not modified in place


def test_no_reference_is_the_plain_branch():
    """With a previous frame but no reference node, detections equal the first-frame path."""
    net = tiny_net(score_thresh=0.0, topk=10).eval()
    i0, _ = frame(0)
    i1, _ = frame(4)
    _, state0 = net.inference_step(i0[None])
    plain, _ = net.inference_step(i1[None])
    with_state, _ = net.inference_step(i1[None], state0, None)
    for key in ("boxes", "scores", "labels", "kernels", "node_features"):
        assert torch.allclose(plain[key], with_state[key]), key


def test_default_config_builds_the_small_model_and_trains_a_step():
    cfg = compose("train", ["model.gnn.iterations=2"])
    net = hydra.utils.instantiate(cfg.model)
    criterion = hydra.utils.instantiate(cfg.criterion)
    assert isinstance(net, VisSTG) and len(net.gnn.layers) == 2
    # The CPU default: ResNet-10 with P3-P5 (conf/backbone/resnet10.yaml).
    assert net.backbone.depth == 10 and net.num_classes == cfg.data.num_classes
    assert len(net.strides) == 3 and net.size_ranges == ((0, 64), (64, 128), (128, math.inf))
    batch = pair_batch()
    for t in batch["ref_targets"] + batch["tgt_targets"]:
        t["labels"] = t["labels"] % net.num_classes
    losses = criterion(net.forward_train(batch), batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])


def test_mask_head_width_sets_the_controller_and_warp_sizes_and_is_checked():
    """``model.mask_head_channels`` / ``model.mask_branch.out_channels``: the configs size the
    controller and the kernel warp for the wider dynamic head, which trains and infers; parts
    sized for another head are refused with the key to set."""
    cfg = compose("train", ["model.mask_head_channels=16", "model.mask_branch.out_channels=4"])
    net = hydra.utils.instantiate(cfg.model)
    # (4 + 2) * 16 + 16 + 16 * 16 + 16 + 16 + 1
    assert net.controller.num_params == net.kernel_warp.num_params == 401
    batch = pair_batch()
    for t in batch["ref_targets"] + batch["tgt_targets"]:
        t["labels"] = t["labels"] % net.num_classes
    out = net.forward_train(batch)
    VisSTGCriterion()(out, batch)["loss"].backward()
    assert net.controller.out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        res, state = net.eval().inference_step(batch["tgt_images"][:1], None, None)
        res2, _ = net.inference_step(batch["tgt_images"][:1], state, None)
    assert res["kernels"].shape[1] == 401 and res2["masks"].shape[0] == res2["scores"].numel()
    with pytest.raises(ValueError, match=r"model.controller.num_params=169.*465"):
        tiny_net(mask_head_channels=16)
    with pytest.raises(ValueError, match="mask branch gives 8 channels"):
        tiny_net(mask_channels=16)


def test_size_ranges_take_the_yaml_infinity_from_the_command_line():
    # Hydra hands `.inf` in an override over as a string; YAML files give a float.
    cfg = compose("train", ["model.size_ranges=[[0,64],[64,128],[128,.inf]]"])
    assert cfg.model.size_ranges[-1][1] == ".inf"
    net = hydra.utils.instantiate(cfg.model)
    assert net.size_ranges == ((0, 64), (64, 128), (128, math.inf))
    assert _as_ranges([[0, "inf"], ["1e3", "+.inf"]]) == ((0, math.inf), (1000, math.inf))
    with pytest.raises(ValueError, match=r"model.size_ranges: \['a', 64\] is not"):
        _as_ranges([["a", 64]])
    with pytest.raises(ValueError, match="is not a"):
        _as_ranges([[0, 32, 64]])
    with pytest.raises(ValueError, match=r"0 <= lo < hi, got \[64.0, 32.0\]"):
        _as_ranges([[64, 32]])


def r50_config():
    # Offline: no ImageNet download here, the shapes are what matter.
    return compose("train", ["+experiment=r50", "model.backbone.weights=null"])


def test_r50_experiment_is_the_paper_model():
    cfg = r50_config()
    assert cfg.model.backbone.weights is None
    net = hydra.utils.instantiate(cfg.model)
    assert net.backbone.depth == 50 and net.backbone.out_channels == 256
    assert net.num_classes == 40 and net.det_head.num_classes == 40
    assert net.size_ranges == ((0, 64), (64, 128), (128, 256), (256, 512), (512, math.inf))
    assert len(net.gnn.layers) == 3 and net.graph.windows == (9, 7, 5, 3, 3)
    assert isinstance(net.mask_branch, ProjectionMaskBranch)  # the paper's 1x1 conv of P3
    assert cfg.data.batch_size == 16 and cfg.trainer.max_epochs == 24
    assert list(cfg.scheduler.milestones) == [16, 22] and cfg.optimizer.lr == 0.01
    assert compose("train", ["+experiment=r50"]).model.backbone.weights == "imagenet"


def test_r50_forward_backward_on_a_360x640_pair():
    cfg = r50_config()
    net = hydra.utils.instantiate(cfg.model)
    criterion = hydra.utils.instantiate(cfg.criterion)
    h, w = 360, 640
    boxes = torch.tensor([[10.0, 10, 100, 120], [300, 100, 600, 350]])
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 10:120, 10:100] = True
    masks[1, 100:350, 300:600] = True
    target = {
        "boxes": boxes,
        "labels": torch.tensor([3, 17]),
        "track_ids": torch.tensor([1, 2]),
        "masks": masks,
    }
    batch = {
        "ref_images": torch.randn(1, 3, h, w),
        "tgt_images": torch.randn(1, 3, h, w),
        "ref_targets": [target],
        "tgt_targets": [target],
        "image_sizes": torch.tensor([[h, w]]),
    }
    out = net.forward_train(batch)
    assert out["mask_logits"].shape == (2, h // 4, w // 4)
    losses = criterion(out, batch)
    losses["loss"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert net.edge_classifier.mlp[0].weight.grad is not None


@pytest.mark.slow
def test_overfitted_pair_detects_and_associates_online():
    """After overfitting one pair, the online step finds both objects on each frame and the edge
    scores link every reference track to its own detection (detection + tracking end to end)."""
    from torchvision.ops import box_iou

    net, batch = tiny_net(), pair_batch()
    criterion = VisSTGCriterion()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=2e-3)
    # 140 steps: the first frame's boxes pass IoU 0.5 from step ~100 on (checked every 20 steps
    # up to 160); at 80, after a change of float summation order in the GNN (its block-wise
    # first layers), they were at 0.48 / 0.44.
    for _ in range(140):
        losses = criterion(net.forward_train(batch), batch)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    net.eval()
    (i0, t0), (i1, t1) = frame(0), frame(4)
    out0, state = net.inference_step(i0[None])
    out1, _ = net.inference_step(i1[None], state, {"boxes": t0["boxes"], "labels": t0["labels"]})
    for out, target in ((out0, t0), (out1, t1)):
        iou = box_iou(out["boxes"][:2], target["boxes"])  # [2 detections, 2 objects]
        best = iou.argmax(1)
        assert sorted(best.tolist()) == [0, 1] and (iou.max(1).values > 0.5).all()
        assert torch.equal(out["labels"][:2], target["labels"][best])
    best = box_iou(out1["boxes"][:2], t1["boxes"]).argmax(1)  # detection -> object
    scores = out1["edge_scores"][:, :2]  # [2 reference tracks, 2 detections]
    for d, obj in enumerate(best.tolist()):
        assert scores[obj, d] > 0.5 and scores[1 - obj, d] < 0.5


def test_reference_frame_detection_is_the_head_on_the_unfused_reference_maps():
    """ref_detection: det_ref is the detection head on the reference frame's backbone maps (what
    a first frame gives it at inference), det is unchanged, and the criterion adds loss_det_ref
    (the CenterNet loss of the reference ground truth) to the total."""
    from visstg.model.criterion import REF_DETECTION_LOSS_KEY
    from visstg.model.detection import centernet_loss, heatmap_targets

    batch = pair_batch()
    plain, with_ref = tiny_net(), tiny_net(ref_detection=True)
    out, out_ref = plain.forward_train(batch), with_ref.forward_train(batch)
    for a, b in zip(out["det"]["heatmap"], out_ref["det"]["heatmap"]):
        torch.testing.assert_close(a, b)
    assert out["det_ref"] is None
    with torch.no_grad():
        # Both frames go through the backbone together (batch-norm statistics of the pair).
        both = with_ref.backbone(torch.cat([batch["ref_images"], batch["tgt_images"]]))
        expected = with_ref.det_head([f[:1] for f in both])
    for key in ("heatmap", "size", "offset"):
        for a, b in zip(out_ref["det_ref"][key], expected[key]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    criterion = VisSTGCriterion(weights={"det_ref": 2.0})
    losses, losses_plain = criterion(out_ref, batch), criterion(out, batch)
    assert REF_DETECTION_LOSS_KEY not in losses_plain
    ref = out_ref["ref_assignment"]
    heat = heatmap_targets(ref, out_ref["level_shapes"], 1, C, with_ref.strides)
    expected_loss = sum(centernet_loss(out_ref["det_ref"], ref, heat).values())
    torch.testing.assert_close(losses[REF_DETECTION_LOSS_KEY], expected_loss)
    without = losses["loss"] - 2.0 * losses[REF_DETECTION_LOSS_KEY]
    recomputed = criterion({**out_ref, "det_ref": None}, batch)["loss"]
    torch.testing.assert_close(without, recomputed)
    # Reference-frame detection trains the head through the reference frame's maps.
    losses[REF_DETECTION_LOSS_KEY].backward()
    assert with_ref.backbone.fpn.body.conv1.weight.grad.abs().sum() > 0


def test_objectness_loss_joins_detection_on_both_frames():
    """CenterNetHead(objectness=True): loss_objectness is part of L_det (weights.det) and of the
    reference frame's loss_det_ref, and inference scores detections with the objectness map."""
    from visstg.model.criterion import OBJECTNESS_LOSS_KEY, REF_DETECTION_LOSS_KEY

    batch = pair_batch()
    net = tiny_net(det_head=CenterNetHead(C, D, D, objectness=True), ref_detection=True)
    out = net.forward_train(batch)
    criterion = VisSTGCriterion(weights={"det": 2.0})
    losses = criterion(out, batch)
    assert losses[OBJECTNESS_LOSS_KEY].item() > 0
    without = {
        k: {n: v for n, v in out[k].items() if n != "objectness"} for k in ("det", "det_ref")
    }
    plain = criterion({**out, **without}, batch)
    assert OBJECTNESS_LOSS_KEY not in plain
    ref_objectness = losses[REF_DETECTION_LOSS_KEY] - plain[REF_DETECTION_LOSS_KEY]
    assert ref_objectness.item() > 0  # the reference frame's objectness term
    torch.testing.assert_close(
        losses["loss"] - plain["loss"], 2.0 * (losses[OBJECTNESS_LOSS_KEY] + ref_objectness)
    )
    net.eval()
    with torch.no_grad():
        det, _ = net.inference_step(batch["tgt_images"], image_size=(H, W))
        maps = net.backbone(batch["tgt_images"])
        objectness = [o.sigmoid() for o in net.det_head(maps)["objectness"]]
    top = max(float(o.max()) for o in objectness)
    assert float(det["scores"].max()) == pytest.approx(top, rel=1e-4)


def test_edge_class_agnostic_training_scores_edges_to_other_classes():
    """``edge_class_agnostic``: the criterion's E_prune also holds the edges from a reference
    to target instances of another class (negatives), as inference scores them."""
    from visstg.model.losses import edge_loss
    from visstg.model.tracking import edge_training_targets

    batch = pair_batch()
    for t in (*batch["ref_targets"], *batch["tgt_targets"]):  # the rectangle beside the disc
        t["boxes"][1] = t["boxes"][0] + torch.tensor([20.0, 0, 20, 0])
        t["masks"][1] = torch.roll(t["masks"][0], 20, dims=1)
    out = tiny_net(edge_class_agnostic=True).forward_train(batch)
    assert out["edge_class_agnostic"]
    ref = batch["ref_targets"][0]
    args = (out["graph"], out["tgt_assignment"], ref["labels"], ref["track_ids"])
    ids, labels = edge_training_targets(*args, class_agnostic=True)
    same_class_ids, same_class_labels = edge_training_targets(*args)
    assert ids.numel() > same_class_ids.numel()  # the disc's and the rectangle's cross edges
    assert labels.sum() == same_class_labels.sum() > 0  # the new edges are all negatives
    losses = VisSTGCriterion()(out, batch)
    torch.testing.assert_close(losses["loss_edge"], edge_loss(out["edge_logits"][ids], labels))


def test_mask_branch_at_stride_4_trains_and_infers_at_the_same_mask_stride():
    """``mask_branch.upsample=2`` with ``mask_feat_stride=4, mask_upsample=1``: the dynamic head
    runs at stride 4 and the logits keep the stride-4 contract; a stride that disagrees with the
    branch is refused by name."""
    branch = dict(mask_branch=MaskBranch(D, D, num_convs=2, upsample=2))
    net = tiny_net(**branch, mask_feat_stride=4, mask_upsample=1)
    batch = pair_batch()
    out = net.forward_train(batch)
    assert net.mask_stride == 4
    assert out["mask_logits"].shape == out["ref_mask_logits"].shape == (2, H // 4, W // 4)
    losses = VisSTGCriterion()(out, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        res, _ = net.eval().inference_step(batch["tgt_images"], None, None)
    assert res["masks"].shape[-2:] == (H // 4, W // 4)
    with pytest.raises(ValueError, match="mask_feat_stride=4"):
        tiny_net(**branch)


def test_fine_level_feeds_the_mask_branch_only_and_trains_end_to_end():
    """``backbone.fine_level`` + ``mask_branch.fine``: the stride-4 C2 map reaches the mask
    branch (its conv gets gradients) and nothing else (the heads and the graph see the three
    levels); inference returns stride-4 masks; the two settings must agree."""
    torch.manual_seed(0)
    backbone = ResNetFPN(18, D, norm="bn", trainable_layers=5, fine_level=True)
    branch = MaskBranch(D, D, num_convs=2, upsample=2, fine=True)
    net = tiny_net(mask_branch=branch, backbone=backbone, mask_feat_stride=4, mask_upsample=1)
    batch = pair_batch()
    out = net.forward_train(batch)
    assert out["level_shapes"][0] == (H // 8, W // 8) and len(out["level_shapes"]) == 5
    assert out["mask_logits"].shape == out["ref_mask_logits"].shape == (2, H // 4, W // 4)
    VisSTGCriterion()(out, batch)["loss"].backward()
    for p in [*backbone.fine_lateral.parameters(), *branch.fine.parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():
        res, state = net.eval().inference_step(batch["tgt_images"][:1], None, None)
        res2, _ = net.inference_step(batch["tgt_images"][:1], state, None)
    assert res["masks"].shape[-2:] == res2["masks"].shape[-2:] == (H // 4, W // 4)
    assert len(state["feats"]) == 5 and state["feats"][0].shape[-2:] == (H // 8, W // 8)
    plain_branch = MaskBranch(D, D, num_convs=2, upsample=2)
    with pytest.raises(ValueError, match="fine_level"):
        tiny_net(mask_branch=plain_branch, backbone=backbone, mask_feat_stride=4)
    with pytest.raises(ValueError, match="fine_level"):
        tiny_net(mask_branch=branch, mask_feat_stride=4)


def test_head_autocast_bf16_trains_in_float32_outputs_close_to_full_precision():
    """``head_autocast="bf16"``: the heads run in bf16 (the conv outputs differ from float32 by
    bf16 rounding only) and hand float32 to the losses, which backpropagate."""
    batch = pair_batch()
    full = tiny_net(ref_detection=True).forward_train(batch)
    net = tiny_net(ref_detection=True, head_autocast="bf16")
    half = net.forward_train(batch)
    for key in ("det", "det_ref"):
        for a, b in zip(full[key]["heatmap"], half[key]["heatmap"]):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
            assert not torch.equal(a, b)  # bf16 did run
    for a, b in zip(full["kernel_maps"]["theta_t"], half["kernel_maps"]["theta_t"]):
        assert b.dtype == torch.float32 and b.shape == a.shape
    assert half["mask_logits"].dtype == torch.float32
    losses = VisSTGCriterion()(half, batch)
    losses["loss"].backward()
    grads = [p.grad for p in net.mask_branch.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="head_autocast"):
        tiny_net(head_autocast="int8")


def test_mask_negative_slope_reaches_the_dynamic_head_and_is_checked():
    batch = pair_batch()
    # tiny_net seeds itself: the same weights, only the activation differs.
    relu, leaky = tiny_net(), tiny_net(mask_negative_slope=0.2)
    a, b = relu.forward_train(batch), leaky.forward_train(batch)
    assert a["mask_logits"].shape == b["mask_logits"].shape
    assert not torch.allclose(a["mask_logits"], b["mask_logits"])
    with pytest.raises(ValueError, match="mask_negative_slope"):
        tiny_net(mask_negative_slope=-0.1)


def test_stem_map_feeds_the_mask_branch_and_the_masks_come_out_at_stride_2():
    """``backbone.stem_channels`` + ``mask_branch.stem_channels``: the stride-2 stem map reaches
    the mask branch (its convs get gradients), training and inference masks are at stride 2, and
    the two settings must agree."""
    torch.manual_seed(0)
    backbone = ResNetFPN(18, D, norm="bn", trainable_layers=5, fine_level=True, stem_channels=4)
    branch = MaskBranch(D, D, num_convs=2, upsample=4, fine=True, stem_channels=4)
    net = tiny_net(mask_branch=branch, backbone=backbone, mask_feat_stride=2, mask_upsample=1)
    batch = pair_batch()
    out = net.forward_train(batch)
    assert out["mask_logits"].shape == out["ref_mask_logits"].shape == (2, H // 2, W // 2)
    assert out["mask_warp_logits"].shape == (2, H // 2, W // 2)
    VisSTGCriterion()(out, batch)["loss"].backward()
    for p in [*backbone.stem_lateral.parameters(), *branch.stem.parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():
        res, state = net.eval().inference_step(batch["tgt_images"][:1], None, None)
        res2, _ = net.inference_step(batch["tgt_images"][:1], state, None)
    assert res["masks"].shape[-2:] == res2["masks"].shape[-2:] == (H // 2, W // 2)
    fine_only = MaskBranch(D, D, num_convs=2, upsample=4, fine=True)
    with pytest.raises(ValueError, match="stem_channels must agree"):
        tiny_net(mask_branch=fine_only, backbone=backbone, mask_feat_stride=2)
    plain_backbone = ResNetFPN(18, D, norm="bn", trainable_layers=5, fine_level=True)
    with pytest.raises(ValueError, match="stem_channels must agree"):
        tiny_net(mask_branch=branch, backbone=plain_backbone, mask_feat_stride=2)
