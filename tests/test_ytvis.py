"""The YouTube-VIS reader: mask formats, category mapping and one test per validation error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import box_mask, make_dataset
from visstg.data.ytvis import DatasetError, decode_segmentation, load_ytvis


def test_formats_decode_to_the_drawn_masks(tiny_root: Path) -> None:
    ds = load_ytvis(tiny_root / "train.json")
    v1, v2 = ds.video(1), ds.video(2)
    # compressed RLE (track 1), polygons (track 2), uncompressed RLE (track 3)
    tracks, masks = ds.frame_masks(v1, 1)
    assert [t.id for t in tracks] == [1, 2]
    np.testing.assert_array_equal(masks[0], box_mask(8, 6, 24, 22))
    np.testing.assert_array_equal(masks[1], box_mask(36, 27, 56, 45))
    tracks, masks = ds.frame_masks(v2, 2)
    assert [t.id for t in tracks] == [3]
    np.testing.assert_array_equal(masks[0], box_mask(34, 20, 48, 40))


def test_null_frames_and_annotated_frames(tiny_root: Path) -> None:
    ds = load_ytvis(tiny_root / "train.json")
    tracks, masks = ds.frame_masks(ds.video(1), 2)  # track 2 is null in frame 2
    assert [t.id for t in tracks] == [1] and masks.shape == (1, 48, 64)
    assert ds.annotated_frames(ds.video(2)) == [1, 2]  # frame 0 has no instance
    assert decode_segmentation(None, 4, 4) is None


def test_categories_map_to_contiguous_labels_and_back(tmp_path: Path) -> None:
    data = make_dataset(tmp_path)
    for c in data["categories"]:
        c["id"] *= 10  # ids 10, 20, 30
    for a in data["annotations"]:
        a["category_id"] *= 10
    (tmp_path / "train.json").write_text(json.dumps(data))
    ds = load_ytvis(tmp_path / "train.json")
    assert [ds.label(c) for c in (10, 20, 30)] == [0, 1, 2]
    assert [ds.category_id(i) for i in range(3)] == [10, 20, 30]
    assert ds.class_names == ["red", "green", "blue"]
    assert {t.label for t in ds.tracks[1]} == {0, 1}


def test_file_without_annotations_loads_for_inference(tmp_path: Path) -> None:
    data = make_dataset(tmp_path)
    del data["annotations"]
    (tmp_path / "valid.json").write_text(json.dumps(data))
    ds = load_ytvis(tmp_path / "valid.json", tmp_path / "train" / "JPEGImages")
    assert not ds.has_annotations and len(ds.videos) == 2
    assert ds.load_frame(ds.video(1), 0).shape == (48, 64, 3)
    with pytest.raises(DatasetError, match="has no 'annotations'"):
        load_ytvis(tmp_path / "valid.json", require_annotations=True)


def _broken(tmp_path: Path, edit) -> Path:
    data = copy.deepcopy(make_dataset(tmp_path))
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


def _set(d: dict, key: str, value) -> None:
    d[key] = value


CASES = {
    "missing top-level key": (lambda d: d.pop("videos"), r"missing key\(s\) 'videos'"),
    "missing video key": (lambda d: d["videos"][1].pop("file_names"), r"video 2: missing key"),
    "missing annotation key": (
        lambda d: d["annotations"][0].pop("segmentations"),
        r"annotation 1: missing key\(s\) 'segmentations'",
    ),
    "segmentations length": (
        lambda d: d["annotations"][2]["segmentations"].pop(),
        r"annotation 3: 'segmentations' has 2 entries but video 2 has 3 frames",
    ),
    "unknown category": (
        lambda d: _set(d["annotations"][1], "category_id", 7),
        r"annotation 2: category_id 7 is not in 'categories'",
    ),
    "unknown video": (
        lambda d: _set(d["annotations"][1], "video_id", 9),
        r"annotation 2: video_id 9 is not in 'videos'",
    ),
    "duplicate video id": (
        lambda d: _set(d["videos"][1], "id", 1),
        r"duplicate video id 1",
    ),
    "duplicate annotation id": (
        lambda d: _set(d["annotations"][2], "id", 1),
        r"duplicate annotation id 1",
    ),
    "duplicate category id": (
        lambda d: _set(d["categories"][2], "id", 1),
        r"duplicate category id 1",
    ),
    "mask size": (
        lambda d: _set(d["annotations"][0]["segmentations"][1], "size", [24, 64]),
        r"annotation 1: frame 1 mask size 24x64 differs from video 1 size 48x64",
    ),
    "length mismatch": (
        lambda d: _set(d["videos"][0], "length", 9),
        r"video 1: 'length' is 9 but it lists 4 file_names",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_errors_name_the_file_and_the_id(tmp_path: Path, case: str) -> None:
    edit, message = CASES[case]
    path = _broken(tmp_path, edit)
    with pytest.raises(DatasetError, match=message) as err:
        load_ytvis(path)
    assert str(path) in str(err.value)


def test_problems_are_collected_not_raised(tmp_path: Path) -> None:
    def edit(d):
        d["annotations"][1]["category_id"] = 7
        d["annotations"][2]["segmentations"].pop()

    problems: list[str] = []
    ds = load_ytvis(_broken(tmp_path, edit), problems=problems)
    assert len(problems) == 2 and len(ds.tracks[1]) == 1  # the two bad tracks are skipped


def test_malformed_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"videos": [')
    with pytest.raises(DatasetError, match=r"bad.json: not valid JSON"):
        load_ytvis(bad)
    with pytest.raises(DatasetError, match=r"nope.json: annotation file does not exist"):
        load_ytvis(tmp_path / "nope.json")


def test_missing_and_undecodable_frames(tiny_root: Path) -> None:
    ds = load_ytvis(tiny_root / "train.json")
    frame = tiny_root / "train" / "JPEGImages" / "video1" / "00002.png"
    frame.unlink()
    with pytest.raises(DatasetError, match=r"video 1 frame 2: file .*00002.png does not exist"):
        ds.load_frame(ds.video(1), 2)
    frame.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"video 1 frame 2: cannot decode .*00002.png"):
        ds.load_frame(ds.video(1), 2)


def test_reader_and_check_on_generated_synthetic_data(tmp_path: Path) -> None:
    from visstg.data.check import check_split
    from visstg.data.datamodule import PairDataset
    from visstg.data.synthetic import generate
    from visstg.data.transforms import PairAugmentation

    generate(
        tmp_path, train_videos=3, val_videos=1, height=64, width=96, min_frames=4, max_frames=6
    )
    ds = load_ytvis(tmp_path / "train.json")
    assert ds.class_names == ["disc", "square", "triangle", "ring", "cross"]
    assert len(ds.videos) == 3 and sum(len(t) for t in ds.tracks.values()) >= 3
    for video in ds.videos:
        for frame in range(video["length"]):
            tracks, masks = ds.frame_masks(video, frame)
            assert masks.shape == (len(tracks), 64, 96)
            assert all(t.segmentations[frame] is not None for t in tracks)
    pairs = PairDataset(ds, PairAugmentation((64,), 200, 0.5), max_gap=4)
    item = pairs[0]
    assert item["tgt"]["masks"].shape[0] == len(item["tgt"]["labels"]) >= 1
    for split in ("train", "valid"):
        loaded, problems = check_split(tmp_path, split, progress=False)
        assert loaded is not None and problems == []
