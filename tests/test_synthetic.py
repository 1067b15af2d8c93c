"""Tests of the synthetic YouTube-VIS dataset (visstg.data.synthetic), on tiny frames."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from visstg.data import synthetic
from visstg.data.synthetic import (
    CATEGORIES,
    draw_shape,
    ensure_synthetic,
    generate,
    render_video,
)

TINY = dict(height=64, width=96)
SMALL = dict(train_videos=5, val_videos=3, seed=3, **TINY)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic"), **SMALL)


def load(root: Path, split: str) -> dict:
    return json.loads((root / f"{split}.json").read_text())


@pytest.mark.parametrize("split", ["train", "valid"])
def test_masks_decode_and_agree_with_boxes_and_areas(small, split):
    data = load(small, split)
    videos = {v["id"]: v for v in data["videos"]}
    assert data["annotations"]
    for ann in data["annotations"]:
        video = videos[ann["video_id"]]
        h, w, n = video["height"], video["width"], video["length"]
        assert (h, w) == (64, 96) and (ann["height"], ann["width"]) == (h, w)
        assert len(ann["segmentations"]) == len(ann["bboxes"]) == len(ann["areas"]) == n
        assert ann["iscrowd"] == 0 and ann["length"] == 1
        visible = 0
        for seg, box, area in zip(ann["segmentations"], ann["bboxes"], ann["areas"]):
            # null frames are consistent: segmentation null <=> bbox null <=> area null
            assert (seg is None) == (box is None) == (area is None)
            if seg is None:
                continue
            visible += 1
            assert seg["size"] == [h, w] and isinstance(seg["counts"], str)
            m = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
            assert m.shape == (h, w)
            assert area == int(m.sum()) > 0
            ys, xs = np.nonzero(m)
            assert box == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert visible > 0, "an annotation that is never visible"


def test_schema_ids_and_categories(small):
    for split in ("train", "valid"):
        data = load(small, split)
        assert set(data) == {"info", "licenses", "videos", "annotations", "categories"}
        assert [(c["id"], c["name"]) for c in data["categories"]] == [
            (1, "disc"),
            (2, "square"),
            (3, "triangle"),
            (4, "ring"),
            (5, "cross"),
        ]
        assert [v["id"] for v in data["videos"]] == list(range(1, len(data["videos"]) + 1))
        ids = [a["id"] for a in data["annotations"]]
        assert ids == list(range(1, len(ids) + 1))
        assert {a["category_id"] for a in data["annotations"]} <= {1, 2, 3, 4, 5}
        assert {a["video_id"] for a in data["annotations"]} == {v["id"] for v in data["videos"]}
    assert len(load(small, "train")["videos"]) == 5 and len(load(small, "valid")["videos"]) == 3


def test_file_layout_and_frames_on_disk(small):
    for split in ("train", "valid"):
        root = small / split / "JPEGImages"
        listed = set()
        for video in load(small, split)["videos"]:
            assert 10 <= video["length"] <= 20 and video["length"] == len(video["file_names"])
            for t, name in enumerate(video["file_names"]):
                folder, frame = name.split("/")
                assert frame == f"{t:05d}.jpg" and folder == video["file_names"][0].split("/")[0]
                with Image.open(root / name) as im:
                    assert im.format == "JPEG" and im.size == (96, 64) and im.mode == "RGB"
                listed.add(root / name)
        assert set(root.glob("*/*.jpg")) == listed


def test_stored_masks_are_the_rendered_visible_masks(small):
    data = load(small, "valid")
    video = render_video(1, "valid", seed=3, **TINY)
    assert data["videos"][1]["file_names"][0].startswith(video.name + "/")
    anns = [a for a in data["annotations"] if a["video_id"] == 2]
    assert [a["category_id"] for a in anns] == video.category_ids
    for ann, mask in zip(anns, video.masks):
        for seg, m in zip(ann["segmentations"], mask):
            stored = np.zeros_like(m) if seg is None else mask_utils.decode(seg).astype(bool)
            assert np.array_equal(stored, m)


def test_deterministic_for_a_seed(small, tmp_path):
    again = generate(tmp_path / "again", **SMALL)
    for split in ("train", "valid"):
        assert (again / f"{split}.json").read_bytes() == (small / f"{split}.json").read_bytes()
    other = generate(tmp_path / "other", **{**SMALL, "seed": 4})
    assert (other / "train.json").read_bytes() != (small / "train.json").read_bytes()


def test_valid_split_does_not_depend_on_the_number_of_training_videos(small, tmp_path):
    """More training videos (the default grew from 64 to 512) leave `valid` byte-identical, so
    results on it stay comparable."""
    more = generate(tmp_path / "more", **{**SMALL, "train_videos": 7})
    valid, valid_more = load(small, "valid"), load(more, "valid")
    # Only the record of the generator's arguments (info.generator_args) differs.
    assert valid_more["info"]["generator_args"]["train_videos"] == 7
    assert {k: v for k, v in valid_more.items() if k != "info"} == {
        k: v for k, v in valid.items() if k != "info"
    }
    for name in valid["videos"][0]["file_names"]:
        assert (more / "valid/JPEGImages" / name).read_bytes() == (
            small / "valid/JPEGImages" / name
        ).read_bytes()
    assert len(load(more, "train")["videos"]) == 7
    first = load(small, "train")["annotations"][0]["segmentations"]
    assert load(more, "train")["annotations"][0]["segmentations"] == first


def test_train_and_valid_differ(small):
    train, valid = load(small, "train"), load(small, "valid")
    assert not {v["file_names"][0].split("/")[0] for v in train["videos"]} & {
        v["file_names"][0].split("/")[0] for v in valid["videos"]
    }
    a, b = render_video(0, "train", seed=3, **TINY), render_video(0, "valid", seed=3, **TINY)
    assert a.frames.shape != b.frames.shape or not np.array_equal(a.frames, b.frames)
    assert [s["counts"] for s in train["annotations"][0]["segmentations"] if s] != [
        s["counts"] for s in valid["annotations"][0]["segmentations"] if s
    ]


def test_occlusion_visible_masks_are_disjoint_and_exact():
    found = False
    for index in range(12):
        video = render_video(index, seed=0, **TINY)
        full, vis = video.full_masks, video.masks  # [K, T, H, W]
        assert (vis <= full).all()
        # each visible mask is the full shape minus every later (on top) object's shape
        for k in range(len(full)):
            assert np.array_equal(vis[k], full[k] & ~full[k + 1 :].any(axis=0))
        assert (vis.sum(axis=0) <= 1).all(), "visible masks overlap"
        for i in range(len(full)):
            for j in range(i + 1, len(full)):
                found |= bool((full[i] & full[j]).any())
    assert found, "no two objects' shapes ever overlap"


def test_same_category_instances_and_all_categories_occur(tmp_path):
    root = generate(tmp_path, train_videos=16, val_videos=1, height=48, width=64, max_frames=10)
    data = load(root, "train")
    per_video = Counter((a["video_id"], a["category_id"]) for a in data["annotations"])
    assert max(per_video.values()) >= 2, "never two instances of one category in a video"
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3, 4, 5}
    # objects enter late / leave: some tracks have null frames
    assert any(s is None for a in data["annotations"] for s in a["segmentations"])


def test_generator_options_change_the_data():
    base = dict(seed=0, **TINY)
    one = [render_video(i, max_objects=1, **base) for i in range(6)]
    assert all(len(v.category_ids) == 1 for v in one)
    same = [render_video(i, same_class_prob=1.0, **base) for i in range(6)]
    assert all(len(set(v.category_ids)) == 1 for v in same)
    step = {
        speed: np.nanmean([mean_step(render_video(i, speed=speed, **base)) for i in range(3)])
        for speed in (0.0, 3.0)
    }
    assert step[0.0] < 0.8 and step[3.0] > 1.5, step
    overlap = {  # fraction of frames in which two objects' shapes overlap
        p: np.mean(
            [
                (render_video(i, occlusion_prob=p, **base).full_masks.sum(0) > 1)
                .any(axis=(1, 2))
                .mean()
                for i in range(6)
            ]
        )
        for p in (0.0, 1.0)
    }
    assert overlap[1.0] > overlap[0.0] + 0.2, overlap
    with pytest.raises(ValueError, match="same_class_prob"):
        render_video(0, same_class_prob=1.5, **base)


def mean_step(video) -> float:
    """Mean centroid displacement (px per frame) of objects wholly inside two consecutive frames."""
    full = video.full_masks  # [K, T, H, W]
    inside = full.any(axis=(2, 3)) & ~full[..., [0, -1], :].any(axis=(2, 3))
    inside &= ~full[..., :, [0, -1]].any(axis=(2, 3))  # [K, T], not touching the border
    ys, xs = np.mgrid[: full.shape[2], : full.shape[3]]
    area = np.maximum(full.sum(axis=(2, 3)), 1)
    centre = (
        np.stack([(full * xs).sum(axis=(2, 3)), (full * ys).sum(axis=(2, 3))], -1) / area[..., None]
    )
    both = inside[:, 1:] & inside[:, :-1]  # [K, T-1]
    step = np.linalg.norm(np.diff(centre, axis=1), axis=-1)  # [K, T-1]
    return float(step[both].mean())


def test_shapes():
    h = w = 41
    masks = {c["name"]: draw_shape(c["id"], 20, 20, 32, h, w) for c in CATEGORIES}
    assert masks["disc"][20, 20] and not masks["disc"][5, 5]
    assert not masks["ring"][20, 20] and masks["ring"][20, 5]  # hole in the middle
    assert masks["square"][6, 6] and masks["square"][34, 34]  # axis-aligned, filled corners
    assert masks["cross"][20, 5] and masks["cross"][5, 20] and not masks["cross"][8, 8]
    rows = masks["triangle"].sum(axis=1)
    top, bottom = np.flatnonzero(rows)[[0, -1]]
    assert rows[top] < rows[bottom] / 4  # apex up
    ring_area, disc_area = masks["ring"].sum(), masks["disc"].sum()
    assert 0.65 < ring_area / disc_area < 0.85  # inner radius about half the outer
    clipped = draw_shape(1, 0, 0, 32, h, w)
    assert 0 < clipped.sum() < disc_area / 3


def test_ensure_synthetic_generates_once_and_refuses_other_arguments(tmp_path):
    kwargs = dict(train_videos=2, val_videos=1, height=48, width=64, max_frames=10)
    root = ensure_synthetic(tmp_path / "d", **kwargs)
    config = json.loads((root / synthetic.CONFIG_FILE).read_text())
    assert config["args"]["train_videos"] == 2 and config["args"]["speed"] == 1.0
    stamp = (root / "train.json").stat().st_mtime_ns
    assert ensure_synthetic(root, **kwargs) == root
    assert (root / "train.json").stat().st_mtime_ns == stamp  # not regenerated
    with pytest.raises(ValueError, match="train_videos: 2 on disk vs 3 requested"):
        ensure_synthetic(root, **{**kwargs, "train_videos": 3})
    with pytest.raises(TypeError, match="unknown synthetic dataset argument"):
        ensure_synthetic(root, frames=3)


def test_generate_refuses_a_foreign_dataset(tmp_path):
    (tmp_path / "train.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not written by visstg.data.synthetic"):
        generate(tmp_path, train_videos=1, val_videos=1, **TINY)
    assert (tmp_path / "train.json").read_text() == "{}"


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "visstg.data.synthetic", "--out", str(out)]
    args = ["--train-videos", "2", "--val-videos", "1", "--seed", "7", "--height", "48"]
    args += ["--width", "64", "--max-objects", "2", "--speed", "0.5"]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train: 2 videos" in proc.stdout and "valid: 1 videos" in proc.stdout
    train = load(out, "train")
    assert len(train["videos"]) == 2 and train["videos"][0]["height"] == 48
    assert all(len([a for a in train["annotations"] if a["video_id"] == v]) <= 2 for v in (1, 2))
    assert (
        out / "valid" / "JPEGImages" / load(out, "valid")["videos"][0]["file_names"][0]
    ).is_file()
    api = generate(tmp_path / "api", 2, 1, 7, 48, 64, max_objects=2, speed=0.5)
    assert (api / "train.json").read_bytes() == (out / "train.json").read_bytes()
    bad = subprocess.run(cmd + ["--same-class-prob", "2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "same_class_prob" in bad.stderr
