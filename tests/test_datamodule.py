"""Pair sampling, the shared augmentation, collate and the validation video stream."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import COLOURS
from visstg.data.datamodule import PairDataset, VISDataModule, collate_pairs, paste_instances
from visstg.data.pairs import sample_reference
from visstg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PairAugmentation,
    boxes_from_masks,
    resized_shape,
)
from visstg.data.ytvis import DatasetError, load_ytvis


@pytest.mark.parametrize("max_gap", [1, 2, 4])
def test_reference_within_gap_and_both_sides(max_gap: int) -> None:
    rng = random.Random(0)
    for length in (1, 2, 5, 12):
        for t in range(length):
            refs = {sample_reference(t, length, max_gap, rng) for _ in range(200)}
            if length == 1:
                assert refs == {0}
                continue
            assert all(0 <= k < length and 0 < abs(k - t) <= max_gap for k in refs)
            expected = {k for k in range(t - max_gap, t + max_gap + 1) if 0 <= k < length} - {t}
            assert refs == expected  # every candidate on either side is drawn


def test_resized_shape_caps_the_longer_side() -> None:
    assert resized_shape(48, 64, 96, 1000) == (96, 128)
    assert resized_shape(48, 64, 96, 100) == (75, 100)
    assert resized_shape(360, 640, 360, 640) == (360, 640)


def _denormalise(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _check_frame_consistency(frame: dict, labels_to_colour: dict) -> None:
    """Boxes are the masks' tight boxes; mask pixels carry their object's colour in the image."""
    img = _denormalise(frame["image"])
    for box, mask, label in zip(frame["boxes"], frame["masks"], frame["labels"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        # interior pixels (away from the resampled edge) have the object's colour
        inner = torch.nn.functional.max_pool2d((~mask)[None, None].float(), 5, 1, 2)[0, 0] == 0
        colours = img[inner.numpy()]
        assert len(colours) > 0
        np.testing.assert_allclose(colours.mean(0), labels_to_colour[int(label)], atol=12)


@pytest.mark.parametrize("flip", [False, True])
def test_shared_augmentation_keeps_boxes_and_masks_consistent(tiny_root: Path, flip: bool) -> None:
    ds = load_ytvis(tiny_root / "train.json")
    aug = PairAugmentation(train_sizes=(96,), max_size=1000, hflip_prob=1.0 if flip else 0.0)
    pairs = PairDataset(ds, aug, max_gap=4)
    torch.manual_seed(0)
    label_colour = {ds.label(c): COLOURS[c] for c in COLOURS}
    for i in range(len(pairs)):
        item = pairs[i]
        for side in ("ref", "tgt"):
            f = item[side]
            assert f["image"].shape == (3, 96, 128) and f["masks"].shape[1:] == (96, 128)
            _check_frame_consistency(f, label_colour)
        # the same flip in both frames: track 1 moves right by 4 px per frame (8 px scaled)
        k, t = item["frame_indices"]
        ref, tgt = item["ref"], item["tgt"]
        common = set(ref["track_ids"].tolist()) & set(tgt["track_ids"].tolist()) & {1}
        for tid in common:
            dx = (
                tgt["boxes"][tgt["track_ids"] == tid][0, 0]
                - ref["boxes"][ref["track_ids"] == tid][0, 0]
            ).item()
            assert dx == pytest.approx(8 * (t - k) * (-1 if flip else 1))


def test_crop_takes_one_window_of_both_frames(tiny_root: Path) -> None:
    """``crop_size``: both frames are the same window of the resized pair (masks, boxes and
    colours agree with the image, motion kept), drawn from the room the frame leaves."""
    ds = load_ytvis(tiny_root / "train.json")
    whole = PairDataset(ds, PairAugmentation((96,), 1000, 0.0), max_gap=4)
    aug = PairAugmentation((96,), 1000, 0.0, crop_size=(64, 200))
    cropped = PairDataset(ds, aug, max_gap=4)
    label_colour = {ds.label(c): COLOURS[c] for c in COLOURS}
    corners = set()
    for i in range(len(cropped)):
        torch.manual_seed(i)
        item = cropped[i]
        torch.manual_seed(i)
        rng = random.Random(int(torch.randint(0, 2**31 - 1, ()).item()))
        k, t = item["frame_indices"]
        torch.manual_seed(i)
        full = whole[i]
        assert full["frame_indices"] == (k, t)  # the same pair: the crop draws after it
        for side in ("ref", "tgt"):
            f = item[side]
            # 96 x 128 resized: the window is 64 high and as wide as the frame (128 < 200)
            assert f["image"].shape == (3, 64, 128) and f["masks"].shape[1:] == (64, 128)
            _check_frame_consistency(f, label_colour)
        sample_reference(t, ds.video(item["video_id"])["length"], 4, rng)
        _, _, (fy, _) = aug.sample(rng)
        y0 = round(fy * (96 - 64))
        corners.add(y0)
        for side in ("ref", "tgt"):
            torch.testing.assert_close(item[side]["image"], full[side]["image"][:, y0 : y0 + 64])
    assert len(corners) > 1
    with pytest.raises(ValueError, match="crop_size"):
        PairAugmentation((96,), 1000, 0.0, crop_size=(0, 10))


def test_targets_skip_frames_without_instances(tiny_root: Path) -> None:
    ds = load_ytvis(tiny_root / "train.json")
    pairs = PairDataset(ds, PairAugmentation((48,), 1000, 0.0), max_gap=4)
    assert (2, 0) not in pairs.samples and len(pairs) == 4 + 2


def test_reference_dropout(tiny_root: Path) -> None:
    ds = load_ytvis(tiny_root / "train.json")
    aug = PairAugmentation((48,), 1000, 0.0)
    full, none, half = (
        PairDataset(ds, aug, 4, ref_drop_frame=f, ref_drop_instance=i)
        for f, i in ((0.0, 0.0), (1.0, 0.0), (0.0, 0.5))
    )
    counts = {"full": 0, "half": 0}
    for i in range(len(full)):
        for name, pairs in (("full", full), ("none", none), ("half", half)):
            torch.manual_seed(i)  # the same pair, augmentation and dropout draw per index
            item = pairs[i]
            ref = item["ref"]
            keys = ("boxes", "labels", "track_ids", "masks")
            assert len({len(ref[k]) for k in keys}) == 1, "every reference field dropped alike"
            assert ref["image"].shape[-2:] == ref["masks"].shape[-2:]
            if name == "none":
                assert len(ref["labels"]) == 0 and len(item["tgt"]["labels"]) > 0
            else:
                counts[name] += len(ref["labels"])
                if name == "half":  # a subset of the full pair's references, tracks intact
                    torch.manual_seed(i)
                    whole = full[i]["ref"]
                    assert set(ref["track_ids"].tolist()) <= set(whole["track_ids"].tolist())
    assert 0 < counts["half"] < counts["full"]
    with pytest.raises(ValueError, match="ref_drop_frame"):
        PairDataset(ds, aug, 4, ref_drop_frame=1.5)


def _frame(masks: torch.Tensor, labels: list[int], ids: list[int], fill: float) -> dict:
    return {
        "image": torch.full((3, *masks.shape[1:]), fill),
        "boxes": boxes_from_masks(masks),
        "labels": torch.tensor(labels),
        "track_ids": torch.tensor(ids),
        "masks": masks,
    }


def test_paste_instances_covers_host_pixels_and_drops_hidden_instances() -> None:
    host_masks = torch.zeros((2, 8, 10), dtype=torch.bool)
    host_masks[0, 1:5, 1:5] = True  # half covered below
    host_masks[1, 6:8, 8:10] = True  # covered entirely below
    host = _frame(host_masks, [0, 1], [1, 2], fill=0.0)
    donor_masks = torch.zeros((2, 8, 12), dtype=torch.bool)  # wider than the host: cut
    donor_masks[0, 1:5, 3:7] = True
    donor_masks[1, 5:8, 7:12] = True
    donor = _frame(donor_masks, [3, 4], [101, 102], fill=1.0)
    out = paste_instances(host, donor)
    assert out["track_ids"].tolist() == [1, 101, 102] and out["labels"].tolist() == [0, 3, 4]
    assert out["masks"].shape == (3, 8, 10) and out["image"].shape == (3, 8, 10)
    assert out["masks"][0].sum() == 4 * 2 and not (out["masks"][0] & out["masks"][1]).any()
    assert out["boxes"].tolist() == [[1, 1, 3, 5], [3, 1, 7, 5], [7, 5, 10, 8]]
    pasted = donor_masks[:, :, :10].any(0)
    assert (out["image"][:, pasted] == 1).all() and (out["image"][:, ~pasted] == 0).all()
    assert (host["image"] == 0).all(), "the host frame is not changed in place"


def test_copy_paste_adds_another_videos_instances(tiny_root: Path) -> None:
    ds = load_ytvis(tiny_root / "train.json")
    aug = PairAugmentation((96,), 1000, 0.5)
    plain, pasted = (PairDataset(ds, aug, 4, copy_paste=p) for p in (0.0, 1.0))
    label_colour = {ds.label(c): COLOURS[c] for c in COLOURS}
    video_of = {t.id: t.video_id for tracks in ds.tracks.values() for t in tracks}
    offset = 1 + max(video_of)
    added = 0
    for i in range(len(plain)):
        torch.manual_seed(i)  # the same host pair and augmentation
        host = plain[i]
        torch.manual_seed(i)
        item = pasted[i]
        assert item["video_id"] == host["video_id"]
        assert item["frame_indices"] == host["frame_indices"]
        donor_ids = []
        for side in ("ref", "tgt"):
            f = item[side]
            ids = f["track_ids"].tolist()
            assert len(set(ids)) == len(ids) and len(f["boxes"]) == len(f["masks"]) == len(ids)
            own = [j for j in ids if j < offset]
            assert set(own) <= set(host[side]["track_ids"].tolist())
            donor_ids.append({j - offset for j in ids if j >= offset})
            _check_frame_consistency(f, label_colour)
            added += len(ids) - len(own)
        # The donor's instances come from one other video, with their own ids in both frames.
        donors = {video_of[j] for j in donor_ids[0] | donor_ids[1]}
        assert len(donors) == 1 and host["video_id"] not in donors
    assert added > 0
    with pytest.raises(ValueError, match="copy_paste"):
        PairDataset(ds, aug, 4, copy_paste=-0.1)


def test_collate_pads_to_multiple_of_32(tiny_root: Path) -> None:
    ds = load_ytvis(tiny_root / "train.json")
    pairs = PairDataset(ds, PairAugmentation((50, 70), 1000, 0.5), max_gap=4)
    torch.manual_seed(1)
    items = [pairs[i] for i in range(len(pairs))]
    batch = collate_pairs(items)
    b = len(items)
    H, W = batch["ref_images"].shape[-2:]
    assert H % 32 == 0 and W % 32 == 0
    assert batch["tgt_images"].shape == (b, 3, H, W)
    assert batch["image_sizes"].shape == (b, 2) and batch["frame_indices"].shape == (b, 2)
    for i, it in enumerate(items):
        h, w = it["tgt"]["image"].shape[-2:]
        assert batch["image_sizes"][i].tolist() == [h, w]
        assert batch["tgt_images"][i, :, h:].abs().sum() == 0  # zero padding
        for side in ("ref", "tgt"):
            t = batch[f"{side}_targets"][i]
            n = len(t["labels"])
            assert t["masks"].shape == (n, H, W) and t["masks"].dtype == torch.bool
            assert t["boxes"].shape == (n, 4) and t["track_ids"].shape == (n,)
            assert not t["masks"][:, h:].any() and not t["masks"][:, :, w:].any()


def test_validation_videos_stream_frames_in_order(tiny_root: Path) -> None:
    dm = VISDataModule(name="tiny", root=str(tiny_root), num_classes=3, test_size=96, max_size=1000)
    dm.setup("fit")
    videos = list(dm.val_dataloader())
    assert [v.video_id for v in videos] == [1, 2]
    frames = list(videos[0].frames())
    assert [f[0] for f in frames] == [0, 1, 2, 3]
    index, image, size, scale = frames[0]
    assert image.shape == (3, 96, 128) and size == (96, 128) and scale == 2.0
    batch = next(iter(dm.train_dataloader()))
    assert batch["ref_images"].shape[0] == min(dm.batch_size, len(dm.train_set))


def test_epoch_pairs_sets_the_epoch_length(tiny_root: Path) -> None:
    """epoch_pairs draws that many pairs per epoch (more than the data has, too), without
    repeating a pair before every pair has been drawn."""
    natural = VISDataModule(name="tiny", root=str(tiny_root), num_classes=3, batch_size=2)
    natural.setup("fit")
    n = len(natural.train_set)
    assert len(natural.train_dataloader()) == n // 2
    torch.manual_seed(0)
    dm = VISDataModule(
        name="tiny", root=str(tiny_root), num_classes=3, batch_size=1, epoch_pairs=n + 2
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == n + 2
    drawn = list(loader.sampler)
    assert sorted(drawn[:n]) == list(range(n))  # a permutation first
    assert len(drawn) == n + 2
    with pytest.raises(ValueError, match="epoch_pairs"):
        VISDataModule(name="tiny", root=str(tiny_root), epoch_pairs=0)


def test_datamodule_errors(tmp_path: Path, tiny_root: Path) -> None:
    dm = VISDataModule(name="ytvis2019", root=str(tmp_path / "ytvis"), num_classes=40)
    with pytest.raises(DatasetError, match=r"youtube-vos.org.*\n.*train.json"):
        dm.setup("fit")
    dm = VISDataModule(name="tiny", root=str(tiny_root), num_classes=40)
    with pytest.raises(
        DatasetError, match=r"has 3 categories but the config says data.num_classes=40"
    ):
        dm.setup("fit")
