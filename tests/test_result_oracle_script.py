"""scripts/result_oracle.py: AP with the ground truth's masks or classes put in."""

import json

import numpy as np
import pytest

from conftest import box_mask, rle


@pytest.fixture(scope="module")
def result_oracle(load_script):
    return load_script("result_oracle")


def _video(boxes):
    return [rle(box_mask(*b)) for b in boxes]


@pytest.fixture
def files(tmp_path):
    """Two objects of two classes; one track a frame-shrunk copy of each, with swapped
    classes, plus a track on nothing."""
    boxes = {1: [(2, 2, 22, 22)] * 3, 2: [(30, 10, 60, 40)] * 3}
    shrunk = {1: [(4, 4, 20, 20)] * 3, 2: [(33, 13, 57, 37)] * 3}  # IoU 0.64 / 0.64
    gt = {
        "videos": [{"id": 1, "height": 48, "width": 64, "length": 3}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": k, "video_id": 1, "category_id": k, "segmentations": _video(boxes[k])}
            for k in (1, 2)
        ],
    }
    results = [
        {"video_id": 1, "category_id": 3 - k, "score": 0.9 - 0.1 * k,
         "segmentations": _video(shrunk[k])}
        for k in (1, 2)
    ] + [{"video_id": 1, "category_id": 1, "score": 0.5,
          "segmentations": [rle(np.zeros((48, 64), np.uint8))] * 3}]  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    return tmp_path / "gt.json", tmp_path / "res.json"


def _table(out):
    rows = {}
    for line in out.splitlines():
        for name in ("as is", "GT masks", "GT classes", "both", "IoU scores"):
            if line.startswith(name):
                rows[name] = [float(v) for v in line[len(name) :].split()]
    return rows


def test_each_oracle_fixes_only_its_own_error(files, capsys, result_oracle):
    assert result_oracle.main([str(p) for p in files]) == 0
    out = capsys.readouterr().out
    assert "3 tracks, 2 on an object, 2 objects" in out
    rows = _table(out)  # AP, AP50, AP75, AR1, AR10
    assert rows["as is"][0] == 0.0  # every class wrong
    assert rows["GT masks"][0] == 0.0  # right masks, still the wrong classes
    # right classes, masks of IoU 0.64: found at IoU 0.5-0.6, missed from 0.65 on
    assert rows["GT classes"][1] == pytest.approx(1.0) and rows["GT classes"][2] == 0.0
    assert rows["both"][0] == pytest.approx(1.0)
    assert rows["IoU scores"] == rows["as is"]  # a wrong class scores 0: nothing to rank


def test_iou_scores_rank_a_confident_false_track_last(files, tmp_path, capsys, result_oracle):
    """Right classes, but the track on nothing outscores the one on object 1."""
    results = json.loads(files[1].read_text())
    for r, (category, score) in zip(results, ((1, 0.5), (2, 0.8), (1, 0.9))):
        r["category_id"], r["score"] = category, score
    ranked = tmp_path / "ranked.json"
    ranked.write_text(json.dumps(results))
    assert result_oracle.main([str(files[0]), str(ranked)]) == 0
    rows = _table(capsys.readouterr().out)
    # AP50: class a finds its object second (precision 0.5 at full recall), class b first.
    assert rows["as is"][1] == pytest.approx(0.75, abs=0.01)
    assert rows["IoU scores"][1] == pytest.approx(1.0)
    # AR1 reads each video's top track per class, which is now the true one; AR10 reads all.
    assert rows["IoU scores"][3] > rows["as is"][3]
    assert rows["IoU scores"][4] == rows["as is"][4]


def test_a_higher_iou_leaves_the_masks_alone(files, capsys, result_oracle):
    assert result_oracle.main([*map(str, files), "--iou", "0.7"]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows["both"] == rows["GT classes"]


def test_bad_results_name_the_file(files, tmp_path, capsys, result_oracle):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    assert result_oracle.main([str(files[0]), str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
