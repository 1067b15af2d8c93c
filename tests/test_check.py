"""``python -m visstg.data.check``: summary on good data, every problem listed on bad data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from visstg.data.check import main


def test_check_passes_and_prints_summary(tiny_root: Path, capsys) -> None:
    assert main([str(tiny_root), "--split", "train", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "videos: 2  frames: 7  annotated tracks: 3" in out
    assert "red" in out and "OK" in out


def test_check_lists_every_problem(tiny_root: Path, capsys) -> None:
    data = json.loads((tiny_root / "train.json").read_text())
    data["annotations"][1]["category_id"] = 99  # schema problem
    data["annotations"][0]["segmentations"][0] = {"size": [48, 64], "counts": "garbage!!"}
    (tiny_root / "train.json").write_text(json.dumps(data))
    (tiny_root / "train" / "JPEGImages" / "video2" / "00001.png").unlink()  # missing frame
    bad = tiny_root / "train" / "JPEGImages" / "video1" / "00003.png"
    bad.write_bytes(b"garbage")  # undecodable frame
    assert main([str(tiny_root), "--split", "train", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "4 problem(s) found" in err
    assert "category_id 99 is not in 'categories'" in err
    assert "video 2 frame 1: file" in err and "does not exist" in err
    assert "video 1 frame 3: cannot decode" in err
    assert "annotation 1 frame 0: cannot decode the mask" in err


def test_check_cli_checks_all_splits_by_default(tiny_root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "visstg.data.check", str(tiny_root), "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "valid" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "visstg.data.check", str(tiny_root / "nope")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "no such folder" in proc.stderr
