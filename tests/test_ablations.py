"""The paper's ablations (Table 2) as real variants: fusion relation | concat | none, association
edge | embedding | offset, kernel propagation on/off. Each builds, trains a step, runs the online
step, and the embedding / offset associations track through the same tracker and results writer
as the edge classifier."""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import InstantiationException

from test_visstg import C, D, H, W, frame, pair_batch, tiny_net
from visstg.config import compose
from visstg.model.association import (
    EmbeddingAssociation,
    OffsetAssociation,
    embedding_loss,
    embedding_scores,
    offset_scores,
    offset_targets,
)
from visstg.model.criterion import ASSOCIATION_LOSS_KEYS, LOSS_KEYS, VisSTGCriterion
from visstg.model.detection import assign_targets
from visstg.model.fusion import ConcatFusion

VALID = [
    ("relation", "edge"),
    ("relation", "embedding"),
    ("relation", "offset"),
    ("concat", "embedding"),
    ("concat", "offset"),
    ("none", "embedding"),
    ("none", "offset"),
]
LOSS_OF = {"edge": "loss_edge", "embedding": "loss_embed", "offset": "loss_track_offset"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def variant(fusion="relation", association="edge", propagation=True, **kwargs):
    net = tiny_net(propagation=propagation, fusion=fusion, association=association, **kwargs)
    return net


def second_frame_refs(net, out0, n=3):
    """What the OnlineTracker passes for n live tracks (every track as a memory entry)."""
    boxes = out0["boxes"][:n]
    refs = {
        "memory_nodes": out0["node_features"][:n],
        "memory_centers": (boxes[:, :2] + boxes[:, 2:]) / 2,
        "memory_boxes": boxes,
        "memory_labels": out0["labels"][:n],
    }
    for key in net.track_state_keys:
        refs[f"memory_{key}"] = out0[key][:n]
    return refs


# ------------------------------------------------------------------ every variant
@pytest.mark.parametrize("fusion, association", VALID)
def test_variant_trains_a_step_and_runs_two_frames(fusion, association):
    net, batch = variant(fusion, association, score_thresh=0.0, topk=10), pair_batch()
    assert (net.gnn is not None) == (fusion == "relation") == (net.graph is not None)
    assert (net.concat_fusion is not None) == (fusion == "concat")
    assert (net.edge_classifier is not None) == (association == "edge")
    assert (net.embedding_head is not None) == (association == "embedding")
    assert (net.offset_head is not None) == (association == "offset")
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    losses = VisSTGCriterion()(net.forward_train(batch), batch)
    own = LOSS_OF[association]
    expected = (set(LOSS_KEYS) - {"loss_edge"}) | {own, "loss"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses[own] > 0
    opt.zero_grad()
    losses["loss"].backward()
    # Every parameter the variant holds is trained (no unused parameter under DDP).
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    opt.step()

    net.eval()
    out0, state0 = net.inference_step(frame(0)[0][None])
    n0 = out0["scores"].numel()
    assert n0 >= 3 and out0["edge_scores"].shape == (0, n0)
    assert out0["node_features"].shape == (n0, 5, D)
    refs = second_frame_refs(net, out0)
    # The same frame again: every reference has its own detection back, so it scores > 0.
    out1, _ = net.inference_step(frame(0)[0][None], state0, refs, image_size=(H, W))
    n1 = out1["scores"].numel()
    scores = out1["edge_scores"]
    assert scores.shape == (3, n1)
    assert ((scores >= 0) & (scores <= 1)).all() and scores.max() > 0
    assert out1["masks"].shape == (n1, H // 4, W // 4)
    if association == "embedding":
        assert net.track_state_keys == ("embeddings",)
        assert out1["embeddings"].shape == (n1, 64)
    else:
        assert net.track_state_keys == ()


@pytest.mark.parametrize("association", ["embedding", "offset"])
def test_class_agnostic_association_drops_the_class_cue(association):
    """``edge_class_agnostic`` also removes the class cue of the ablation associations: their
    scores no longer depend on the tracks' classes, while the class-aware cue changes them."""
    # fusion none: the detections do not depend on the references, so the same frame again
    # detects each reference at its own box.
    net = variant("none", association, score_thresh=0.0, topk=10).eval()
    out0, state0 = net.inference_step(frame(0)[0][None])
    refs = second_frame_refs(net, out0)
    relabelled = {**refs, "memory_labels": (refs["memory_labels"] + 1) % C}

    def scores(agnostic, references):
        net.edge_class_agnostic = agnostic
        out, _ = net.inference_step(frame(0)[0][None], state0, references, image_size=(H, W))
        return out["edge_scores"]

    agnostic = scores(True, refs)
    assert agnostic.max() > 0.5
    torch.testing.assert_close(agnostic, scores(True, relabelled))
    assert not torch.allclose(scores(False, refs), scores(False, relabelled))


@pytest.mark.parametrize("ref_instances, tgt_instances", [(False, False), (True, False)])
@pytest.mark.parametrize("association", ["embedding", "offset"])
def test_association_losses_are_connected_without_instances(
    association, ref_instances, tgt_instances
):
    net, batch = variant("none", association), pair_batch(ref_instances, tgt_instances)
    losses = VisSTGCriterion()(net.forward_train(batch), batch)
    key = LOSS_OF[association]
    assert losses[key].item() == 0.0 and losses[key].requires_grad
    losses["loss"].backward()
    head = net.embedding_head if association == "embedding" else net.offset_head
    assert all(p.grad is not None for p in head.parameters())


def test_association_loss_weights_apply():
    net, batch = variant("none", "offset"), pair_batch()
    out = net.forward_train(batch)
    base = VisSTGCriterion()(out, batch)
    heavier = VisSTGCriterion(weights={"track_offset": 3.0})(out, batch)
    delta = heavier["loss"] - base["loss"]
    assert torch.isclose(delta, 2 * base["loss_track_offset"], atol=1e-5)


# ------------------------------------------------------------------ fusion
def test_fusion_none_feeds_the_backbone_maps_to_the_heads():
    net = variant("none", "offset", score_thresh=0.0, topk=10)
    seen = {}
    net.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("backbone", o))
    net.det_head.register_forward_hook(lambda m, i, o: seen.__setitem__("head", i[0]))
    net.forward_train(pair_batch())
    b = 1  # the backbone runs on [reference; target]: the head gets the target half
    assert all(torch.equal(h, f[b:]) for h, f in zip(seen["head"], seen["backbone"]))
    net.eval()
    out0, state0 = net.inference_step(frame(0)[0][None])
    net.inference_step(frame(4)[0][None], state0, second_frame_refs(net, out0))
    assert all(torch.equal(h, f) for h, f in zip(seen["head"], seen["backbone"]))


def test_concat_fusion_starts_as_the_plain_branch_and_uses_the_reference():
    fusion = ConcatFusion(D, num_convs=2)
    f_t = [torch.randn(2, D, 8, 12), torch.randn(2, D, 4, 6)]
    f_k = [torch.randn(2, D, 8, 12), torch.randn(2, D, 4, 6)]
    assert all(torch.equal(a, b) for a, b in zip(fusion(f_t, f_k), f_t))
    torch.nn.init.normal_(fusion.net[-1].weight, std=0.1)
    moved = fusion(f_t, f_k)
    assert [m.shape for m in moved] == [f.shape for f in f_t]
    other = fusion(f_t, [torch.zeros_like(k) for k in f_k])
    assert not torch.allclose(moved[0], other[0])  # the reference frame changes the result


# ------------------------------------------------------------------ propagation
def test_propagation_off_removes_the_warp_parameters():
    on, off = variant(propagation=True), variant(propagation=False)
    warp = sum(p.numel() for p in on.kernel_warp.parameters())
    assert warp > 0 and off.kernel_warp is None
    assert not any(name.startswith("kernel_warp.") for name, _ in off.named_parameters())
    n_on = sum(p.numel() for p in on.parameters())
    assert sum(p.numel() for p in off.parameters()) == n_on - warp
    # The same from the config (the warp node exists there but is dropped).
    cfg = compose("train", ["model.dim=16", "model.propagation=false"])
    net = hydra.utils.instantiate(cfg.model)
    assert net.kernel_warp is None and "kernel_warp" not in dict(net.named_children())


# ------------------------------------------------------------------ configuration
def test_config_builds_each_variant_and_invalid_combinations_fail():
    cfg = compose("train", ["model.dim=16", "model.fusion=concat", "model.association=embedding"])
    net = hydra.utils.instantiate(cfg.model)
    assert isinstance(net.concat_fusion, ConcatFusion)
    assert isinstance(net.embedding_head, EmbeddingAssociation)
    assert net.gnn is None and net.edge_classifier is None and net.offset_head is None
    criterion = hydra.utils.instantiate(cfg.criterion)
    assert criterion.weights["embed"] == 1.0 and criterion.weights["track_offset"] == 1.0
    cfg = compose("train", ["model.dim=16", "model.fusion=none", "model.association=offset"])
    net = hydra.utils.instantiate(cfg.model)
    assert isinstance(net.offset_head, OffsetAssociation) and net.embedding_head is None
    for fusion in ("none", "concat"):
        cfg = compose("train", ["model.dim=16", f"model.fusion={fusion}"])
        with pytest.raises(InstantiationException, match="association='edge'.*fusion='relation'"):
            hydra.utils.instantiate(cfg.model)
    for bad in ({"fusion": "attention"}, {"association": "flow"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            variant(**bad)


def test_inference_without_the_per_track_state_is_a_clear_error():
    net = variant("none", "embedding", score_thresh=0.0, topk=5).eval()
    out0, state0 = net.inference_step(frame(0)[0][None])
    refs = second_frame_refs(net, out0, 2)
    del refs["memory_embeddings"]
    with pytest.raises(ValueError, match="memory_embeddings"):
        net.inference_step(frame(4)[0][None], state0, refs)
    net = variant("none", "offset", score_thresh=0.0, topk=5).eval()
    refs = second_frame_refs(net, net.inference_step(frame(0)[0][None])[0], 2)
    del refs["memory_boxes"]
    with pytest.raises(ValueError, match="memory_boxes"):
        net.inference_step(frame(4)[0][None], state0, refs)


# ------------------------------------------------------------------ the pure functions
def test_embedding_loss_by_hand():
    # Image 0: references tracks 5, 6; image 1: reference track 7. Targets: track 6 (image 0),
    # track 9 (image 0, new), track 7 (image 1).
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    tgt = torch.tensor([[0.0, 2.0], [1.0, 0.0], [2.0, 0.0]])
    loss = embedding_loss(
        tgt, ref, torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]),
        torch.tensor([6, 9, 7]), torch.tensor([5, 6, 7]),
    )  # fmt: skip
    # Rows: [new, ref0, ref1] for image 0, [new, ref2] for image 1.
    ce0 = -math.log(math.exp(2) / (1 + 1 + math.exp(2)))  # logits [0, 0, 2], label ref1
    ce1 = -math.log(1 / (1 + math.e + 1))  # logits [0, 1, 0], label new
    ce2 = -math.log(math.exp(2) / (1 + math.exp(2)))  # logits [0, 2], label ref2
    assert loss.item() == pytest.approx((ce0 + ce1 + ce2) / 3, rel=1e-6)


def test_embedding_scores_combine_embedding_box_and_class():
    ref_emb = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    det_emb = torch.tensor([[4.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    ref_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    det_boxes = torch.tensor([[1.0, 1, 11, 11], [21, 21, 31, 31], [0, 0, 10, 10]])
    labels = torch.tensor([0, 1])
    s = embedding_scores(det_emb, ref_emb, det_boxes, ref_boxes, torch.tensor([0, 1, 0]), labels)
    assert s.shape == (2, 3)
    assert s[0, 0] > 0.99 and s[1, 1] > 0.99  # same embedding, box and class
    assert s[1, 0] < 1e-6 and s[0, 1] < 1e-6
    # No embedding evidence: p = 1/3 each; the IoU of 1 and the class pull it to track 0.
    c = torch.tensor([math.log(1 / 3), math.log(1 / 3) + 2.0, math.log(1 / 3) - 10]).softmax(0)
    assert s[0, 2].item() == pytest.approx(c[1].item(), rel=1e-5)
    # The class cue is soft (MaskTrack R-CNN's): without embedding evidence, another class
    # (almost) never matches, but a strong embedding similarity (16 here) still can.
    other = torch.tensor([1, 1, 1])
    s2 = embedding_scores(det_emb * 0, ref_emb, det_boxes, ref_boxes, other, labels)
    assert s2[0, 0] < 1e-3
    assert embedding_scores(det_emb, ref_emb, det_boxes, ref_boxes, other, labels)[0, 0] > 0.99


def test_offset_scores_match_by_distance_inside_the_radius_and_gates():
    ref_boxes = torch.tensor([[0.0, 0, 20, 20], [40, 0, 60, 20]])
    ref_centers = torch.tensor([[10.0, 10], [50, 10]])
    # Detection 0 moved +6 px in x; its predicted previous centre is back at track 0's centre.
    det_boxes = torch.tensor([[6.0, 0, 26, 20], [46, 0, 66, 20], [6, 0, 26, 20]])
    prev = torch.tensor([[10.0, 10], [52, 10], [30, 10]])
    labels = torch.tensor([0, 0, 0])
    s = offset_scores(prev, det_boxes, ref_centers, ref_boxes, labels, torch.tensor([0, 0]))
    assert s[0, 0] == 1.0  # exactly at the last centre
    assert s[1, 1].item() == pytest.approx(1 - 2 / 40)  # kappa = sqrt(20 * 20)
    assert s[1, 0] == 0 and s[0, 1] == 0  # beyond the radius
    assert s[0, 2] == 0 and s[1, 2] == 0  # 20 px from both: at the radius, not inside
    s = offset_scores(prev, det_boxes, ref_centers, ref_boxes, labels, torch.tensor([1, 0]))
    assert s[0, 0] == 0  # another class
    # The IoU gate: a small detection whose predicted previous centre is in the track's box
    # (inside the radius of the smaller box) but whose moved-back box barely overlaps it.
    small = torch.tensor([[12.0, 12, 14, 14]])
    s = offset_scores(torch.tensor([[11.0, 11]]), small, ref_centers[:1], ref_boxes[:1],
                      labels[:1], labels[:1], iou_gate=0.5)  # fmt: skip
    assert s.item() == 0
    s = offset_scores(torch.tensor([[11.0, 11]]), small, ref_centers[:1], ref_boxes[:1],
                      labels[:1], labels[:1], iou_gate=0.0)  # fmt: skip
    assert s.item() == pytest.approx(1 - math.sqrt(2) / 4)


def test_offset_targets_in_cells_of_the_target_level():
    ref = {"boxes": torch.tensor([[0.0, 0, 16, 16], [40, 40, 56, 56]]),
           "labels": torch.tensor([0, 1]), "track_ids": torch.tensor([3, 4])}  # fmt: skip
    tgt = {"boxes": torch.tensor([[8.0, 4, 24, 20], [0, 0, 10, 10]]),
           "labels": torch.tensor([0, 1]), "track_ids": torch.tensor([3, 8])}  # fmt: skip
    shapes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    ranges = [(0, 32), (32, 64), (64, 128), (128, 256), (256, math.inf)]
    strides = (8, 16, 32, 64, 128)
    a_t = assign_targets([tgt], shapes, strides, ranges)
    a_r = assign_targets([ref], shapes, strides, ranges)
    valid, target = offset_targets(a_t, a_r, strides)
    assert valid.tolist() == [True, False]
    assert target[0].tolist() == [(8 - 16) / 8, (8 - 12) / 8] and target[1].tolist() == [0, 0]


# ------------------------------------------------------------------ tracker + results writer
@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    from visstg.data.datamodule import VideoDataset
    from visstg.data.synthetic import generate
    from visstg.data.ytvis import load_ytvis

    root = generate(tmp_path_factory.mktemp("synthetic"), train_videos=1, val_videos=1,
                    height=64, width=96, min_frames=4, max_frames=4)  # fmt: skip
    ds = load_ytvis(root / "valid.json")
    return VideoDataset(ds, 64, 128)[0], json.loads((root / "valid.json").read_text())


@pytest.mark.parametrize("fusion, association", [("none", "offset"), ("concat", "embedding")])
def test_embedding_and_offset_track_through_the_tracker_and_results_writer(
    tiny_video, fusion, association
):
    from visstg.eval import load_results
    from visstg.inference import results_for_video
    from visstg.tracker import OnlineTracker, TrackerConfig

    video, gt = tiny_video
    net = variant(fusion, association, score_thresh=0.0, topk=8).eval()
    seen = []
    step = net.inference_step

    def spy(image, state=None, references=None, image_size=None, min_score=0.0):
        out, new_state = step(image, state, references, image_size, min_score)
        seen.append((len((references or {}).get("memory_labels", [])), out["edge_scores"]))
        return out, new_state

    net.inference_step = spy
    tracker = OnlineTracker(net, TrackerConfig(score_threshold=0.0, new_track_threshold=0.0))
    tracks = tracker.run(video)
    assert len(seen) == video.length and seen[0][0] == 0
    # From the second frame on, every live track is a reference with a score per detection.
    assert all(r > 0 and s.shape[0] == r for r, s in seen[1:])
    assert tracks and len({t["track_id"] for t in tracks}) == len(tracks)
    # Some detection continued a track (the untrained heads still associate a static peak).
    assert any(sum(s is not None for s in t["segmentations"]) > 1 for t in tracks)
    categories = [{"id": c["id"]} for c in gt["categories"]]
    results = results_for_video(tracks, video.video_id, categories)
    loaded = load_results(results, gt)
    assert len(loaded) == len(tracks)
    assert all(len(r["segmentations"]) == video.length for r in loaded)


def test_variants_through_lit_log_their_loss(tmp_path: Path):
    """The LightningModule logs the variant's association loss as train/<key>."""
    from visstg.lit import VisSTGModule

    assert set(ASSOCIATION_LOSS_KEYS) == {"loss_embed", "loss_track_offset"}
    net, batch = variant("none", "embedding"), pair_batch()
    module = VisSTGModule(net, VisSTGCriterion(), optimizer=torch.optim.SGD)
    logged = {}
    module.log = lambda key, value, **kw: logged.__setitem__(key, value)
    module.training_step(batch, 0)
    assert "train/loss_embed" in logged and "train/loss_edge" not in logged
    assert C == net.num_classes
