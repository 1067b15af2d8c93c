"""Streamed video input and output: folders of frames and video files, one frame at a time.

``open_video(path)`` returns a reader for either a folder of images (natural sort of the file
names: ``frame2.jpg`` before ``frame10.jpg``) or a video file decoded with PyAV. Frames are RGB
uint8 arrays ``[H, W, 3]``. :class:`VideoWriter` encodes frames to an mp4 at a given frame rate.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "VideoIOError",
    "FrameFolder",
    "VideoFile",
    "open_video",
    "iter_frames",
    "natural_key",
    "VideoWriter",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_FOLDER_FPS = 30.0


class VideoIOError(RuntimeError):
    """A video or frame folder is missing, unreadable or empty."""


def natural_key(name: str) -> list:
    """Sort key where digit runs compare as numbers (``f2`` < ``f10``)."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


class FrameFolder:
    """A folder of image files read in natural order.

    Args:
        path: the folder.
        fps: frame rate to report (a folder has none of its own).
    """

    def __init__(self, path: str | Path, fps: float = DEFAULT_FOLDER_FPS) -> None:
        self.path = Path(path)
        self.files = sorted(
            (p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: natural_key(p.name),
        )
        if not self.files:
            raise VideoIOError(
                f"{self.path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder"
            )
        self.fps = float(fps)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        for f in self.files:
            try:
                with Image.open(f) as im:
                    yield np.array(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as err:
                raise VideoIOError(f"{f}: cannot decode image: {err}") from None


class VideoFile:
    """A video file decoded with PyAV, frame by frame."""

    def __init__(self, path: str | Path) -> None:
        import av

        self.path = Path(path)
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise VideoIOError(f"{self.path}: no video stream in this file")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                self.fps = float(rate) if rate else DEFAULT_FOLDER_FPS
                self.rate = Fraction(rate) if rate else Fraction(30)
                self.num_frames = int(stream.frames or 0)  # 0 when the container does not say
                self.width, self.height = stream.codec_context.width, stream.codec_context.height
        except VideoIOError:
            raise
        except Exception as err:  # av.error.* and anything the demuxer raises
            raise VideoIOError(f"{self.path}: cannot open as a video: {err}") from None

    def __len__(self) -> int:
        return self.num_frames

    def __iter__(self) -> Iterator[np.ndarray]:
        import av

        count = 0
        try:
            with av.open(str(self.path)) as container:
                for frame in container.decode(video=0):
                    count += 1
                    yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as err:
            raise VideoIOError(
                f"{self.path}: decoding failed after {count} frames: {err}"
            ) from None
        if count == 0:
            raise VideoIOError(f"{self.path}: the video has no frames")


def open_video(path: str | Path, fps: float | None = None) -> FrameFolder | VideoFile:
    """Open a folder of frames or a video file; a clear error if it is missing or unreadable."""
    path = Path(path)
    if not path.exists():
        raise VideoIOError(f"{path}: no such file or folder")
    if path.is_dir():
        return FrameFolder(path, fps or DEFAULT_FOLDER_FPS)
    if path.stat().st_size == 0:
        raise VideoIOError(f"{path}: the file is empty")
    return VideoFile(path)


def iter_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Iterate the RGB uint8 frames [H, W, 3] of a frame folder or a video file."""
    yield from open_video(path)


class VideoWriter:
    """Encode RGB uint8 frames to a video file (H.264 in mp4) at a fixed frame rate.

    Use as a context manager; every frame must have the size of the first one. Odd sizes are
    padded by one pixel (H.264 with yuv420p needs even dimensions).
    """

    def __init__(self, path: str | Path, fps: float | Fraction, codec: str = "libx264") -> None:
        self.path = Path(path)
        self.rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
        self.codec = codec
        self._container = None
        self._stream = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, frame: np.ndarray) -> None:
        import av

        h, w = frame.shape[:2]
        if self._container is None:
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream(self.codec, rate=self.rate)
            self._stream.width, self._stream.height = w + w % 2, h + h % 2
            self._stream.pix_fmt = "yuv420p"
        if (h + h % 2, w + w % 2) != (self._stream.height, self._stream.width):
            raise VideoIOError(
                f"{self.path}: frame size {h}x{w} differs from the first frame's "
                f"{self._stream.height}x{self._stream.width}"
            )
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
