"""The small from-scratch default (synthetic data, 2 CPU cores) and the paper's r50 setup stay
distinct: what the default tunes for speed must not leak into +experiment=r50."""

from __future__ import annotations

import hydra
import torch

from visstg.config import compose, resolved


def test_default_is_the_small_three_level_model_with_adamw() -> None:
    cfg = resolved(compose("train", []))
    model = cfg["model"]
    assert model["backbone"]["depth"] == 10 and model["backbone"]["num_levels"] == 3
    n = len(model["strides"])
    assert n == 3 == len(model["size_ranges"]) == len(model["sizes_of_interest"])
    assert len(model["graph"]["windows"]) == n
    assert cfg["optimizer"]["_target_"] == "torch.optim.AdamW"
    assert model["controller"]["norm"] and model["mask_branch"]["norm"]
    assert cfg["trainer"]["gradient_clip_val"] > 0
    # Seeded CPU runs repeat bit for bit (conf/trainer/cpu.yaml says what it fixed).
    assert cfg["trainer"]["deterministic"] is True
    # The dataset is not made easier: the generator's look is untouched (frame size, seed, and
    # every SyntheticOptions default), the valid split is the same 16 videos; only the number of
    # training videos grew (more data of the same kind).
    assert cfg["data"]["synthetic"] == {
        "train_videos": 512, "val_videos": 16, "seed": 0, "height": 192, "width": 320,
    }  # fmt: skip
    assert cfg["data"]["epoch_pairs"] == 920
    # Training reads 128x224 windows of frames resized to 144-176 (conf/data/synthetic.yaml),
    # tested at 160, for 15 epochs of a half-width ResNet-10 (conf/backbone/resnet10.yaml).
    assert cfg["data"]["crop_size"] == [128, 224] and cfg["data"]["test_size"] == 160
    assert cfg["data"]["train_sizes"] == [144, 160, 176] and cfg["trainer"]["max_epochs"] == 15
    # Half of the pairs get another training video's objects pasted on top (copy-paste).
    assert cfg["data"]["copy_paste"] == 0.5
    assert model["backbone"]["width"] == 32
    # The synthetic default trains detection on the reference frame too, runs the backbone
    # in bf16 (float32 maps out) and associates across classes.
    assert model["ref_detection"] and model["backbone"]["autocast"] == "bf16"
    assert model["nms_class_agnostic"] and model["edge_class_agnostic"]
    # Heads in bf16 for training; the dynamic mask head runs at stride 4.
    assert model["head_autocast"] == "bf16" and model["mask_feat_stride"] == 4
    assert model["mask_branch"]["upsample"] == 2 and model["mask_upsample"] == 1
    # Its hidden activations leak (a ReLU head died in the first steps, conf/head/default.yaml).
    assert model["mask_negative_slope"] == 0.01
    # One GNN update (docs/ablations.md, Table 1).
    assert model["gnn"]["iterations"] == 1
    # Tracker thresholds chosen on the tuning set (conf/train.yaml), mask pixels at 0.45; the
    # kernels are read at the centre cells only (model.mask_neighbours measured worse).
    assert cfg["tracker"]["mask_threshold"] == 0.45 and model["mask_neighbours"] == 0
    # Masks also predicted on the mirrored frame at inference (conf/head/default.yaml).
    assert model["test_flip_masks"] is True and model["mask_combine"] == "mean"
    assert cfg["tracker"]["coverage_power"] == 0.5 and cfg["tracker"]["class_votes"] == "soft"
    assert cfg["tracker"]["maskness_power"] == 3.0
    assert cfg["tracker"]["backfill_frames"] == 10 and cfg["tracker"]["backfill_iou"] == 0.5
    # The mask branch reads the backbone's stride-4 C2 map; dice + in-box BCE.
    assert model["mask_branch"]["fine"] and model["backbone"]["fine_level"]
    assert model["mask_branch"]["stem_channels"] == model["backbone"]["stem_channels"] == 0
    assert cfg["criterion"]["mask_bce"] == 1.0
    # Heatmap Gaussians of radius >= 1 cell (CenterNet's rule gives small objects one cell).
    assert cfg["criterion"]["min_radius"] == 1 and cfg["criterion"]["min_overlap"] == 0.7


def test_default_model_builds_and_outputs_three_levels() -> None:
    cfg = compose("train", ["model.dim=16"])
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    net = hydra.utils.instantiate(cfg.model).eval()
    with torch.no_grad():
        fine, *feats = net.backbone(torch.randn(1, 3, 64, 96))
    assert len(feats) == len(net.strides) == 3
    # The mask branch's stride-4 C2 map comes first (model.mask_branch.fine).
    assert net.fine_level and fine.shape[-2:] == (16, 24) and feats[0].shape[-2:] == (8, 12)


def test_r50_keeps_the_paper_setup() -> None:
    cfg = resolved(compose("train", ["+experiment=r50"]))
    model = cfg["model"]
    assert cfg["optimizer"]["_target_"] == "visstg.lit.scaled_sgd"
    assert cfg["optimizer"]["lr"] == 0.01 and cfg["optimizer"]["reference_batch_size"] == 16
    assert cfg["scheduler"]["milestones"] == [16, 22] and cfg["trainer"]["max_epochs"] == 24
    assert model["backbone"]["depth"] == 50 and model["backbone"].get("num_levels", 5) == 5
    assert model["backbone"]["width"] == 64  # torchvision's, so ImageNet weights load
    assert model["strides"] == [8, 16, 32, 64, 128] and model["dim"] == 256
    assert model["gnn"]["iterations"] == 3
    assert cfg["data"]["crop_size"] is None  # whole frames, the paper's multi-scale training
    assert cfg["data"]["copy_paste"] == 0.0  # no copy-paste in the paper's training
    assert not (model["det_head"]["norm"] or model["controller"]["norm"])
    # CenterNet's head on ResNet backbones: 64 wide (its head_conv), over the 256-channel maps.
    assert model["det_head"]["feat_channels"] == 64 and model["det_head"]["in_channels"] == 256
    assert model["det_head"]["num_convs"] == 3
    assert not model["mask_branch"]["norm"]
    assert cfg["trainer"]["gradient_clip_val"] is None
    # The paper's training and decoding: no reference-frame detection loss, full precision
    # unless trainer.precision says otherwise, per-class NMS, the usual tracker thresholds.
    assert not model["ref_detection"] and model["backbone"]["autocast"] is None
    assert not model["nms_class_agnostic"] and not model["edge_class_agnostic"]
    assert model["mask_feat_stride"] == 8 and model["mask_upsample"] == 2
    assert model["mask_branch"]["upsample"] == 1 and model["head_autocast"] is None
    assert model["mask_negative_slope"] == 0.0  # CondInst's ReLU
    assert not model["mask_branch"]["fine"] and not model["backbone"]["fine_level"]
    # The paper's F^d_t: one 1x1 conv of the fused P3; CondInst's branch one choice away.
    assert model["mask_branch"]["_target_"].endswith(".ProjectionMaskBranch")
    condinst = resolved(compose("train", ["+experiment=r50", "mask_branch=condinst"]))["model"]
    assert condinst["mask_branch"]["_target_"].endswith(".MaskBranch")
    assert condinst["mask_branch"]["channels"] == 128 and not condinst["mask_branch"]["norm"]
    assert not condinst["mask_branch"]["fine"] and condinst["mask_branch"]["num_convs"] == 4
    assert cfg["criterion"]["mask_bce"] == 0.0 and cfg["criterion"]["min_radius"] == 0
    assert cfg["tracker"]["score_threshold"] == 0.1
    assert cfg["tracker"]["match_threshold"] == 0.5
    assert cfg["tracker"]["new_track_threshold"] == 0.2
    assert cfg["tracker"]["mask_threshold"] == 0.5 and cfg["tracker"]["coverage_power"] == 0.0
    assert cfg["tracker"]["maskness_power"] == 0.0 and cfg["tracker"]["backfill_frames"] == 0
    assert cfg["tracker"]["class_votes"] == "hard"
    assert cfg["model"]["test_flip_masks"] is False
    assert cfg["data"]["epoch_pairs"] is None
