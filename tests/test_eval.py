"""YouTube-VIS evaluation: hand-computed values, official conventions, fast == reference, CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from visstg.eval import (
    STAT_KEYS,
    evaluate,
    hota,
    hota_reference,
    load_results,
    make_submission_zip,
    tracks_to_results,
    write_results,
)
from visstg.eval.overlap import Overlaps, frame_intersections
from visstg.eval.reference import evaluate_reference


# --------------------------------------------------------------------------- helpers
def box(h, w, y0, x0, y1, x1):
    """Compressed RLE (str counts) of the box [y0:y1, x0:x1] in an h x w frame."""
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": rle["counts"].decode()}


def area(rle):
    return None if rle is None else int(mask_utils.area(rle))


def make_gt(tracks, n_videos=1, h=10, w=10, n_frames=3, n_cats=1):
    """tracks: dicts with video_id, category_id, segmentations (+ optional iscrowd, occlusion)."""
    videos = [
        {"id": v, "height": h, "width": w, "length": n_frames,
         "file_names": [f"v{v}/{f}.jpg" for f in range(n_frames)]}
        for v in range(1, n_videos + 1)
    ]  # fmt: skip
    anns = []
    for i, t in enumerate(tracks):
        a = {"id": i + 1, "iscrowd": 0, "areas": [area(s) for s in t["segmentations"]]}
        a.update(t)
        anns.append(a)
    cats = [{"id": c, "name": f"cat{c}"} for c in range(1, n_cats + 1)]
    return {"videos": videos, "categories": cats, "annotations": anns}


def det(segs, score, video_id=1, category_id=1):
    return {"video_id": video_id, "category_id": category_id, "score": score,
            "segmentations": segs}  # fmt: skip


def check_against_reference(gt, res):
    fast, ref = evaluate(gt, res), evaluate_reference(gt, res)
    for k in STAT_KEYS:
        assert fast[k] == pytest.approx(ref[k], abs=1e-9), k
    return fast


ONE = pytest.approx(1.0, abs=1e-12)  # precision is tp / (tp + fp + eps)
B4 = box(10, 10, 2, 2, 6, 6)  # 16 px
B2 = box(10, 10, 0, 0, 2, 2)  # 4 px
FAR = box(10, 10, 8, 8, 10, 10)  # 4 px, disjoint from B4 and B2


# --------------------------------------------------------------------------- hand-computed
def test_one_video_by_hand():
    # GT: 16 px in frames 0-1, absent in frame 2. Detection: the same two masks plus 4 px in
    # frame 2, where only it has a mask: video IoU = (16 + 16) / (16 + 16 + 4) = 0.889, so it
    # matches at thresholds 0.50..0.85 (8 of 10). A second, disjoint detection comes later.
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B4, B4, None]}])
    res = [det([B4, B4, B2], 0.9), det([FAR, FAR, FAR], 0.5)]
    m = check_against_reference(gt, res)
    # GT area 16 and detection areas 12 / 4: all small.
    expected = dict(AP=0.8, AP50=1.0, AP75=1.0, APs=0.8, APm=-1.0, APl=-1.0,
                    AR1=0.8, AR10=0.8, AR100=0.8, ARs=0.8, ARm=-1.0, ARl=-1.0)  # fmt: skip
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
    assert m["per_category_AP"] == {"cat1": pytest.approx(0.8)}


def test_video_iou_is_sum_of_intersections_over_sum_of_unions():
    # Frame 0: exact 2x2 (I=4, U=4). Frame 1: GT is the full 10x10 frame, detection 8x8.
    # Sum: 68 / 104 = 0.654 -> matches at 0.50, 0.55, 0.60, 0.65 only: AP = 0.4.
    # (A per-frame mean, (1 + 0.64) / 2 = 0.82, would give 0.7.)
    full, b8 = box(10, 10, 0, 0, 10, 10), box(10, 10, 0, 0, 8, 8)
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B2, full]}], n_frames=2)
    m = check_against_reference(gt, [det([B2, b8], 1.0)])
    assert m["AP"] == pytest.approx(0.4, abs=1e-12)


def test_frames_beyond_the_shorter_list_are_not_counted():
    # The official code zips the two lists: a result with 2 entries for a 3-frame video is
    # scored on 2 frames only (IoU 1, AP 1); extra entries past the GT's list are ignored.
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B4, B4, B4]}])
    assert check_against_reference(gt, [det([B4, B4], 1.0)])["AP"] == ONE
    assert check_against_reference(gt, [det([B4, B4, B4, FAR, FAR], 1.0)])["AP"] == ONE


def test_empty_masks_and_absent_frames():
    empty = box(10, 10, 0, 0, 0, 0)
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B4, empty, None]}])
    res = [det([B4, empty, empty], 0.7), det([None, None, None], 0.9), det([empty] * 3, 0.8)]
    m = check_against_reference(gt, res)
    # The all-empty detections rank first and are false positives: precision 1/3 at recall 1.
    assert m["AP50"] == pytest.approx(1 / 3, abs=1e-12)


@pytest.mark.parametrize(("order", "expected"), [("fp_first", 0.5), ("tp_first", 1.0)])
def test_score_ties_keep_file_order(order, expected):
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B4, B4, B4]}])
    tp, fp = det([B4] * 3, 0.5), det([FAR] * 3, 0.5)
    res = [fp, tp] if order == "fp_first" else [tp, fp]
    assert check_against_reference(gt, res)["AP"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("fp_video", "expected"), [(1, 0.5), (2, 1.0)])
def test_score_ties_across_videos_in_ascending_video_id(fp_video, expected):
    tp_video = 3 - fp_video
    gt = make_gt([{"video_id": tp_video, "category_id": 1, "segmentations": [B4] * 3}], n_videos=2)
    # The file lists the true positive first; the tie is still broken by video id.
    res = [det([B4] * 3, 0.5, video_id=tp_video), det([FAR] * 3, 0.5, video_id=fp_video)]
    assert check_against_reference(gt, res)["AP"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("side", "expected"),
    [(128, {"APs": 1.0, "APm": 1.0, "APl": -1.0}), (256, {"APs": -1.0, "APm": 1.0, "APl": 1.0})],
)
def test_area_range_boundaries_are_closed(side, expected):
    # A track of exactly 128^2 (256^2) pixels is both small and medium (medium and large).
    b = box(side, side, 0, 0, side, side)
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [b]}], h=side, w=side,
                 n_frames=1)  # fmt: skip
    m = check_against_reference(gt, [det([b], 1.0)])
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k


def test_track_area_is_mean_of_nonzero_areas_from_the_areas_field():
    # Areas field [0, 16384, None, 16384]: zeros and nulls are left out, mean 16384: medium.
    b = box(128, 128, 0, 0, 128, 128)
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [b]}], h=128, w=128,
                 n_frames=1)  # fmt: skip
    gt["annotations"][0]["areas"] = [0, 16384, None, 16384]
    assert check_against_reference(gt, [det([b], 1.0)])["APm"] == ONE


def test_crowd_ground_truth_absorbs_detections_and_is_ignored():
    crowd = box(10, 10, 0, 0, 10, 5)
    gt = make_gt([
        {"video_id": 1, "category_id": 1, "segmentations": [B4] * 3},
        {"video_id": 1, "category_id": 1, "segmentations": [crowd] * 3, "iscrowd": 1},
    ])  # fmt: skip
    # Two detections on the crowd region (both ignored, one crowd takes any number) rank
    # above the true positive: AP stays 1.
    res = [det([crowd] * 3, 0.9), det([crowd] * 3, 0.8), det([B4] * 3, 0.7)]
    assert check_against_reference(gt, res)["AP"] == ONE
    only_crowd = make_gt([gt["annotations"][1]])
    assert all(v == -1 for k, v in check_against_reference(only_crowd, res).items()
               if k in STAT_KEYS)  # fmt: skip


def test_statistics_without_ground_truth_are_minus_one():
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B4] * 3}], n_cats=2)
    m = check_against_reference(gt, [det([B4] * 3, 1.0), det([B4] * 3, 1.0, category_id=2)])
    assert m["per_category_AP"] == {"cat1": ONE, "cat2": -1.0}
    assert m["AP"] == ONE  # the category without ground truth does not drag the mean


def test_max_dets_limit_each_video_and_category():
    # One video, two categories, one correct detection each: AR1 is 1 because maxDets=1
    # applies per (video, category), not per video.
    gt = make_gt([
        {"video_id": 1, "category_id": 1, "segmentations": [B4] * 3},
        {"video_id": 1, "category_id": 2, "segmentations": [B2] * 3},
    ], n_cats=2)  # fmt: skip
    res = [det([B4] * 3, 0.9), det([B2] * 3, 0.8, category_id=2)]
    assert check_against_reference(gt, res)["AR1"] == ONE


def test_empty_results_give_zeros_and_a_warning(caplog):
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B4] * 3}])
    with caplog.at_level(logging.WARNING):
        m = evaluate(gt, [])
    assert "no track" in caplog.text
    assert m["AP"] == 0.0 and m["AR100"] == 0.0 and m["APs"] == 0.0 and m["APm"] == -1.0


def test_ovis_occlusion_ranges():
    gt = make_gt([
        {"video_id": 1, "category_id": 1, "segmentations": [B4] * 3, "occlusion": 0.1},
        {"video_id": 1, "category_id": 1, "segmentations": [B2] * 3, "occlusion": [0.7, 0.9, None]},
    ])  # fmt: skip
    m = evaluate(gt, [det([B4] * 3, 0.9)])
    occ = m["occlusion"]
    assert occ["AP_light"] == ONE and occ["AR_light"] == 1.0
    assert occ["AP_heavy"] == 0.0 and occ["AR_heavy"] == 0.0
    assert occ["AP_medium"] == -1.0
    assert "occlusion" not in evaluate(make_gt([gt["annotations"][0] | {"occlusion": None}]), [])


# --------------------------------------------------------------------------- fast == reference
def random_case(seed, n_videos=3, n_cats=3, h=12, w=16, n_frames=5):
    rng = np.random.default_rng(seed)

    def rand_box():
        if rng.random() < 0.1:
            return box(h, w, 0, 0, 0, 0)  # empty mask
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        return box(h, w, y0, x0, rng.integers(y0, h + 1), rng.integers(x0, w + 1))

    def shifted(rle):
        m = np.roll(mask_utils.decode(rle), int(rng.integers(-1, 2)), axis=int(rng.integers(2)))
        return {
            "size": [h, w],
            "counts": mask_utils.encode(np.asfortranarray(m))["counts"].decode(),
        }

    tracks, res = [], []
    for v in range(1, n_videos + 1):
        for _ in range(rng.integers(0, 4)):
            segs = [None if rng.random() < 0.2 else rand_box() for _ in range(n_frames)]
            tracks.append({"video_id": v, "category_id": int(rng.integers(1, n_cats + 1)),
                           "segmentations": segs, "iscrowd": int(rng.random() < 0.1)})  # fmt: skip
            for _ in range(rng.integers(0, 3)):  # noisy copies
                s = [shifted(x) if x and rng.random() < 0.9 else None for x in segs]
                s = s[: int(rng.integers(1, n_frames + 3))] if rng.random() < 0.3 else s
                c = (
                    tracks[-1]["category_id"]
                    if rng.random() < 0.8
                    else int(rng.integers(1, n_cats + 2))
                )
                res.append(det(s, float(rng.choice([0.5, 0.9, rng.random()])), v, c))
        for _ in range(rng.integers(0, 6)):  # distractors
            s = [None if rng.random() < 0.2 else rand_box() for _ in range(n_frames)]
            res.append(
                det(s, float(rng.choice([0.5, rng.random()])), v, int(rng.integers(1, n_cats + 1)))
            )
    return make_gt(tracks, n_videos, h, w, n_frames, n_cats), res


@pytest.mark.parametrize("seed", range(40))
def test_fast_equals_reference_on_random_inputs(seed):
    gt, res = random_case(seed, n_videos=1 + seed % 4)
    check_against_reference(gt, res)


def test_more_than_100_detections_per_video_and_category():
    gt, res = random_case(7, n_videos=1, n_cats=1)
    rng = np.random.default_rng(0)
    res = res + [det(r["segmentations"], float(rng.choice([0.1, 0.2]))) for r in res * 40][:150]
    check_against_reference(gt, res)


# --------------------------------------------------------------------------- per-frame intersections
class _T:
    """A track as frame_intersections reads it."""

    def __init__(self, segs):
        self.segs = segs
        self.present = np.array([s is not None for s in segs], bool)
        self.mask_areas = np.array([area(s) or 0 for s in segs], np.int64)


def brute_intersections(dts, gts):
    """{(frame, det, gt): pixels} by decoding every pair of masks."""
    out = {}
    for d, dt in enumerate(dts):
        for g, gt in enumerate(gts):
            for f, (a, b) in enumerate(zip(dt.segs, gt.segs)):
                if a is not None and b is not None:
                    n = int((mask_utils.decode(a) & mask_utils.decode(b)).sum())
                    if n:
                        out[f, d, g] = n
    return out


def as_dict(ov: Overlaps):
    return {(f, d, g): i for f, d, g, i in zip(*(x.tolist() for x in (ov.frame, ov.det, ov.gt, ov.inter)))}  # fmt: skip


def test_intersections_of_touching_adjacent_and_empty_masks():
    # pycocotools skips pairs whose boxes do not overlap; boxes sharing an edge or a corner
    # share no pixel, one shared column or pixel does, and empty masks meet nothing.
    h, w = 10, 12
    g = box(h, w, 2, 2, 6, 6)  # rows 2-5, columns 2-5
    empty = box(h, w, 0, 0, 0, 0)
    dets = [
        box(h, w, 2, 6, 6, 9),  # columns 6-8: shares the edge x = 6, no pixel
        box(h, w, 6, 2, 8, 6),  # rows 6-7: shares the edge y = 6
        box(h, w, 6, 6, 8, 8),  # touches only at a corner
        box(h, w, 2, 5, 6, 9),  # one shared column: 4 pixels
        box(h, w, 5, 5, 9, 9),  # one shared pixel at (5, 5)
        empty,
        g,
    ]
    dts = [_T([x, x]) for x in dets] + [_T([None, g])]
    gts = [_T([g, empty]), _T([empty, g])]
    got = as_dict(frame_intersections(dts, gts))
    assert got == brute_intersections(dts, gts)
    assert got == {(0, 3, 0): 4, (0, 4, 0): 1, (0, 6, 0): 16, (1, 3, 1): 4, (1, 4, 1): 1,
                   (1, 6, 1): 16, (1, 7, 1): 16}  # fmt: skip


def test_intersections_are_exact_on_random_masks():
    # Random masks (holes, several parts, runs that wrap to the next column, empty masks,
    # absent frames, lists of different lengths): every nonzero intersection, exactly.
    rng = np.random.default_rng(0)
    h, w, n_frames = 9, 7, 4

    def rand_mask():
        r = rng.random()
        if r < 0.15:
            return None
        m = (rng.random((h, w)) < (0.0 if r < 0.25 else rng.uniform(0.05, 0.6))).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m))
        return {"size": [h, w], "counts": rle["counts"].decode()}

    for _ in range(20):
        dts = [
            _T([rand_mask() for _ in range(int(rng.integers(1, n_frames + 2)))]) for _ in range(5)
        ]
        gts = [
            _T([rand_mask() for _ in range(int(rng.integers(1, n_frames + 2)))]) for _ in range(3)
        ]
        assert as_dict(frame_intersections(dts, gts)) == brute_intersections(dts, gts)


def test_mask_size_mismatch_is_an_input_error():
    gt = make_gt(
        [{"video_id": 1, "category_id": 1, "segmentations": [box(12, 12, 0, 0, 6, 6)] * 3}]
    )
    del gt["videos"][0]["height"], gt["videos"][0]["width"]  # results cannot be size-checked
    with pytest.raises(ValueError, match="mask sizes differ"):
        evaluate(gt, [det([B4] * 3, 0.9)])


# --------------------------------------------------------------------------- results files
def test_results_writer_zip_and_loader(tmp_path):
    raw = mask_utils.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))  # bytes counts
    tracks = [{"video_id": 1, "category_id": 1, "score": np.float32(0.5),
               "segmentations": [raw, None]}]  # fmt: skip
    res = tracks_to_results(tracks, video_lengths={1: 3})
    assert res[0]["segmentations"][1:] == [None, None]
    assert isinstance(res[0]["segmentations"][0]["counts"], str)
    path = write_results(tracks, tmp_path / "r.json", video_lengths={1: 3})
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B4] * 3}])
    assert load_results(path, gt)[0]["segmentations"][0] == res[0]["segmentations"][0]
    zp = make_submission_zip(path, tmp_path / "sub.zip")
    with zipfile.ZipFile(zp) as zf:
        assert zf.namelist() == ["results.json"]
        assert json.loads(zf.read("results.json")) == res


# --------------------------------------------------------------------------- HOTA
def test_hota_perfect_then_lower_with_swapped_ids():
    a, b = box(10, 10, 0, 0, 4, 4), box(10, 10, 5, 5, 10, 10)
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [a] * 4},
                  {"video_id": 1, "category_id": 1, "segmentations": [b] * 4}], n_frames=4)  # fmt: skip
    perfect = hota(gt, [det([a] * 4, 0.9), det([b] * 4, 0.8)])
    assert perfect == {"HOTA": 1.0, "DetA": 1.0, "AssA": 1.0}
    swapped = hota(gt, [det([a, a, b, b], 0.9), det([b, b, a, a], 0.8)])
    assert swapped["DetA"] == pytest.approx(1.0)
    assert swapped["AssA"] < 1.0 and swapped["HOTA"] < 1.0


def test_hota_stays_callable_after_evaluate_with_hota():
    # The trackeval module is imported lazily; importing it must not replace the package's
    # hota function (a submodule of the same name would: `visstg.eval.hota` became a module).
    import visstg.eval

    a = box(10, 10, 0, 0, 4, 4)
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [a] * 3}], n_frames=3)
    res = [det([a] * 3, 0.9)]
    assert evaluate(gt, res, with_hota=True)["HOTA"] == pytest.approx(1.0)
    assert visstg.eval.hota(gt, res)["HOTA"] == pytest.approx(1.0)
    from visstg.eval import hota as hota_after

    assert hota_after(gt, res)["HOTA"] == pytest.approx(1.0)


def hota_case(seed):
    """Random inputs with HOTA-relevant variety: several classes, empty masks, absent frames,
    result lists shorter or longer than the video, categories unknown to the ground truth."""
    gt, res = random_case(seed, n_videos=1 + seed % 4, n_frames=4 + seed % 3)
    rng = np.random.default_rng(seed)
    for r in res:  # identity swaps between tracks make association matter
        if rng.random() < 0.3:
            r["segmentations"] = r["segmentations"][::-1]
    return gt, res


@pytest.mark.parametrize("seed", range(30))
def test_fast_hota_equals_trackeval_dataset_path(seed):
    gt, res = hota_case(seed)
    fast, ref = hota(gt, res), hota_reference(gt, res)
    for k in ("HOTA", "DetA", "AssA"):
        assert fast[k] == pytest.approx(ref[k], abs=1e-9), k


def test_fast_hota_sequence_names_and_lengths_follow_trackeval():
    # Two videos whose files share a folder: trackeval keeps one sequence (the later video,
    # in the earlier one's place); a video without file names is named and sized from length.
    gt, res = random_case(3, n_videos=3, n_frames=5)
    gt["videos"][1]["file_names"] = [f"v1/{f}.jpg" for f in range(5)]  # same folder as video 1
    del gt["videos"][2]["file_names"]
    for k in ("HOTA", "DetA", "AssA"):
        assert hota(gt, res)[k] == pytest.approx(hota_reference(gt, res)[k], abs=1e-9)


# --------------------------------------------------------------------------- command line
def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "visstg.evaluate", *args], cwd=cwd,
                          capture_output=True, text=True)  # fmt: skip


def test_cli_writes_metrics_and_nothing_else(tmp_path):
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B4, B4, None]}])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([det([B4, B4, B2], 0.9)]))
    p = run_cli("gt=gt.json", "results=res.json", "output=m.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Average Precision" in p.stdout and "HOTA" in p.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(STAT_KEYS) <= set(m) and {"HOTA", "DetA", "AssA", "per_category_AP"} <= set(m)
    assert m["AP"] == pytest.approx(0.8)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["gt.json", "m.json", "res.json"]
    # workers=N (conf/evaluate.yaml) sets the scoring processes; one process scores the same
    p = run_cli("gt=gt.json", "results=res.json", "output=m1.json", "workers=1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "m1.json").read_text()) == m


def test_class_agnostic_scores_every_track_as_one_category(tmp_path):
    # Two objects of categories 1 and 2, each tracked perfectly but with the other's category:
    # both AP are 0; counting every category as one, both tracks match: AP 1.
    gt = make_gt(
        [{"video_id": 1, "category_id": 1, "segmentations": [B4] * 3},
         {"video_id": 1, "category_id": 2, "segmentations": [FAR] * 3}],
        n_cats=2,
    )  # fmt: skip
    res = [det([B4] * 3, 0.9, category_id=2), det([FAR] * 3, 0.8, category_id=1)]
    assert evaluate(gt, res)["AP"] == 0.0
    agnostic = evaluate(gt, res, class_agnostic=True)
    assert agnostic["AP"] == ONE and agnostic["per_category_AP"] == {"object": ONE}
    assert gt["categories"][0]["name"] == "cat1"  # the inputs are not modified
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    p = run_cli("gt=gt.json", "results=res.json", "output=m.json", "class_agnostic=true",
                cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "class-agnostic" in p.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["AP"] == pytest.approx(1.0) and m["class_agnostic"] is True


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (json.dumps([det([B4] * 3, 0.9, video_id=7)]), "video_id 7 is not a video"),
        (json.dumps([det([[1, 1, 5, 1, 5, 5]] * 3, 0.9)]), "polygons are not accepted"),
        ('[{"video_id": 1,', "is not valid JSON"),
        (b'[{"video_id": 1, "x": "\xff"}]', "is not valid JSON"),
    ],
)
def test_cli_bad_results_name_the_file(tmp_path, content, message):
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B4] * 3}])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    if isinstance(content, bytes):
        (tmp_path / "bad.json").write_bytes(content)
    else:
        (tmp_path / "bad.json").write_text(content)
    p = run_cli("gt=gt.json", "results=bad.json", "hota=false", cwd=tmp_path)
    assert p.returncode != 0
    assert message in p.stderr and "bad.json" in p.stderr
    assert "Traceback" not in p.stderr


def test_scoring_never_imports_torch(tmp_path):
    gt = make_gt([{"video_id": 1, "category_id": 1, "segmentations": [B4] * 3}])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    code = (
        "import sys, json\n"
        "import visstg.evaluate as E\n"
        "gt = json.load(open('gt.json'))\n"
        "res = [{'video_id': 1, 'category_id': 1, 'score': 1.0,"
        " 'segmentations': gt['annotations'][0]['segmentations']}]\n"
        "json.dump(res, open('r.json', 'w'))\n"
        "E.evaluate_files('gt.json', 'r.json', None, with_hota=True)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
