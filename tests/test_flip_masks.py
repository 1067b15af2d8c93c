"""Test-time mirrored masks (``VisSTG.test_flip_masks``): each detection's M is also predicted
on the frame mirrored left-right and averaged in; detection and association are untouched."""

import pytest
import torch

from test_inference_sparse import frames, random_net, run_steps
from test_visstg import H, W, _one_thread  # noqa: F401 (autouse fixture)
from visstg.cli import checkpoint_overrides
from visstg.model.detection import gather_at_cells
from visstg.model.visstg import mirror_cells
from visstg.tracker import OnlineTracker, TrackerConfig


def test_mirror_cells_nearest_cell_of_the_mirrored_centre():
    strides = (8, 16, 64)
    # 96 px: 12 and 6 whole cells at strides 8 and 16, 1.5 cells at 64.
    cells = torch.tensor([[0, 0], [3, 11], [2, 5], [1, 0], [0, 0], [0, 1]])
    levels = torch.tensor([0, 0, 0, 1, 2, 2])
    got = mirror_cells(cells, levels, strides, [12, 6, 2], 96)
    assert got[:, 0].tolist() == cells[:, 0].tolist()  # rows stay
    assert got[:4, 1].tolist() == [11, 0, 6, 5]  # W_l - 1 - x
    # Brute force on the partial level: the cell whose centre is nearest to W - centre.
    for i in (4, 5):
        target = 96 - (cells[i, 1].item() + 0.5) * 64
        dist = [abs((x + 0.5) * 64 - target) for x in range(2)]
        assert dist[got[i, 1].item()] == min(dist)


def test_mirrored_masks_change_only_the_masks():
    """Same detections, kernels, node features and edge scores; other masks; the dense path
    (GPUs) gives the sparse path's."""
    net = random_net(topk=12, score_thresh=0.0)
    plain, _ = run_steps(net, True)
    net.test_flip_masks = True
    flipped, _ = run_steps(net, True)
    dense, _ = run_steps(net, False)
    for t, (a, b, c) in enumerate(zip(plain, flipped, dense)):
        assert a.keys() == b.keys(), t
        for key in ("labels", "levels", "cells", "scores", "boxes", "kernels", "edge_scores"):
            assert torch.equal(a[key], b[key]), (t, key)
        assert not torch.allclose(a["masks"], b["masks"], atol=1e-3), t
        torch.testing.assert_close(c["masks"], b["masks"], rtol=1e-4, atol=1e-4)


def mirrored_kernels(net, image, levels, cells):
    """Kernels of the mirrored image read densely at the mirrored cells, its mask features: the
    mirrored frame as a first frame (no track, so the GNN leaves the backbone maps as they are)."""
    fine, maps = net._backbone(image.flip(-1))
    widths = torch.tensor([m.shape[-1] for m in maps])
    cells = torch.stack([cells[:, 0], widths[levels] - 1 - cells[:, 1]], 1)
    batch = torch.zeros_like(levels)
    return gather_at_cells(net.controller(maps), batch, levels, cells), net.mask_branch(maps, fine)


@torch.no_grad()
def test_mask_is_the_mean_of_the_frame_its_mirror_and_the_warp():
    """First frame: (M + M_flip) / 2; next frame, with tracks: (M + M_flip + M') / 3. The
    mirrored pass reads the dense heads of the mirrored image, as a first frame whatever the
    references, at the mirrored peak cells with mirrored centres; its logits are mirrored back."""
    net = random_net(topk=12, score_thresh=0.0)
    image0, image1 = frames(2)
    plain, _ = net.inference_step(image0, None, None, image_size=(H, W))
    net.test_flip_masks = True
    calls = []
    dynamic_head = net._masks_from_params

    def spy(mask_feats, params, batch, level, centers):
        calls.append((mask_feats, params, batch, level, centers))
        return dynamic_head(mask_feats, params, batch, level, centers)

    net._masks_from_params = spy
    first, state = net.inference_step(image0, None, None, image_size=(H, W))
    refs = {"boxes": first["boxes"][:3], "labels": first["labels"][:3]}
    second, _ = net.inference_step(image1, state, refs, image_size=(H, W))
    assert len(calls) == 5  # M, M_flip; M, M_flip, M'
    assert second["edge_scores"].shape[0] == 3 and (second["edge_scores"] > 0).any()
    for image, out, (m_call, f_call) in ((image0, first, calls[:2]), (image1, second, calls[2:4])):
        feats_m, params_m, batch, levels, centers_m = m_call
        feats_f, params_f, _, levels_f, centers_f = f_call
        assert torch.equal(levels_f, levels) and torch.equal(levels, out["levels"])
        on_whole_cells = levels <= 2  # strides 8, 16, 32: 96 px is a whole number of cells
        assert on_whole_cells.sum() >= 3
        kernels, mask_feats = mirrored_kernels(net, image, levels, out["cells"])
        torch.testing.assert_close(
            params_f[on_whole_cells], kernels[on_whole_cells], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(feats_f, mask_feats, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(centers_f[:, 0], W - centers_m[:, 0])
        torch.testing.assert_close(centers_f[:, 1], centers_m[:, 1])
    views = [dynamic_head(*c) for c in calls]
    views[1], views[3] = views[1].flip(-1), views[3].flip(-1)
    torch.testing.assert_close(plain["masks"], views[0])
    torch.testing.assert_close(first["masks"], (views[0] + views[1]) / 2)
    torch.testing.assert_close(second["masks"], (views[2] + views[3] + views[4]) / 3)


def test_tracker_runs_with_mirrored_masks_and_the_cli_override():
    net = random_net(topk=10, score_thresh=0.0)
    net.test_flip_masks = True
    cfg = TrackerConfig(score_threshold=0.0, new_track_threshold=0.0, match_threshold=0.3)
    tracker = OnlineTracker(net, cfg)
    results = [tracker.step(f, (H, W), (H, W)) for f in frames()]
    assert all(results)
    assert checkpoint_overrides({"test_flip_masks": None}) is None
    assert checkpoint_overrides({}) is None
    assert checkpoint_overrides({"test_flip_masks": False}) == {"test_flip_masks": False}


@pytest.mark.parametrize("combine", ["target", "warp"])
def test_mask_combine_target_and_warp(combine):
    """``target``: (M + M_flip) / 2 on every frame; ``warp`` reads no M, so it is unchanged."""
    net = random_net(topk=12, score_thresh=0.0, mask_combine=combine)
    plain, _ = run_steps(net, True)
    net.test_flip_masks = True
    flipped, _ = run_steps(net, True)
    same = [torch.equal(a["masks"], b["masks"]) for a, b in zip(plain, flipped)]
    if combine == "warp":  # no mirrored pass at all
        assert all(same)
    else:
        assert not any(same)


@torch.no_grad()
def test_a_frame_without_detections_skips_the_mirrored_pass():
    net = random_net(topk=12, score_thresh=0.0)
    net.test_flip_masks = True
    passes = []
    mirrored_maps = net._mirrored_maps
    net._mirrored_maps = lambda *args: passes.append(1) or mirrored_maps(*args)
    image = frames(1)[0]
    out, _ = net.inference_step(image, None, None, image_size=(H, W), min_score=1.1)
    assert out["masks"].shape[0] == 0 and passes == []
    out, _ = net.inference_step(image, None, None, image_size=(H, W))
    assert out["masks"].shape[0] > 0 and passes == [1]
