"""scripts/mask_oracle.py: the mask-resolution upper bound on hand-written annotations."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def mask_oracle(load_script):
    return load_script("mask_oracle")


def test_stride_1_at_the_native_size_is_exact_and_coarser_grids_lose(
    tiny_root, capsys, mask_oracle
):
    # tiny_root's frames are 48 pixels high: input size 48 is the identity resize.
    rc = mask_oracle.main(
        ["--root", str(tiny_root), "--split", "valid", "--input-size", "48", "--strides", "1", "8"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "9 masks" in out  # RLE, polygon and uncompressed-RLE masks, nulls skipped
    assert "stride 1: mean IoU 1.000" in out
    line = next(s for s in out.splitlines() if s.startswith("stride 8"))
    assert float(line.split("mean IoU ")[1].split(",")[0]) < 0.95


def test_a_disc_seen_through_cells_loses_its_boundary(mask_oracle):
    yy, xx = np.mgrid[:96, :96]
    disc = (yy - 48) ** 2 + (xx - 48) ** 2 <= 10**2
    fine, coarse = (mask_oracle.oracle_iou(disc, 96, s) for s in (2, 16))
    assert 0.9 < fine < 1.0 and coarse < fine


def test_unreadable_annotations_name_the_file(tmp_path, capsys, mask_oracle):
    (tmp_path / "valid.json").write_text("{not json")
    assert mask_oracle.main(["--root", str(tmp_path)]) == 2
    assert str(tmp_path / "valid.json") in capsys.readouterr().err
