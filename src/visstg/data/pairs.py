"""(reference, target) frame-pair sampling for training (paper 3.6, DESIGN.md section 2).

Targets are annotated frames with at least one visible instance. The reference frame is drawn
uniformly among the other annotated frames within ``max_gap`` frames of the target, either side.
YouTube-VIS ``file_names`` list only annotated frames, so "within 4 annotated frames" is a gap of
at most 4 in frame-list index (the paper's "time gap smaller than 5").
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["sample_reference", "target_index"]


def target_index(annotated: dict[int, Sequence[int]]) -> list[tuple[int, int]]:
    """Flatten ``{video_id: [target frames]}`` into a list of (video_id, frame) samples."""
    return [(vid, f) for vid, frames in annotated.items() for f in frames]


def sample_reference(target: int, length: int, max_gap: int, rng: random.Random) -> int:
    """A reference frame index within ``max_gap`` of ``target`` in a video of ``length`` frames.

    The target itself is excluded unless the video has a single frame.
    """
    if max_gap < 1:
        raise ValueError(f"max_gap must be >= 1, got {max_gap}")
    lo, hi = max(0, target - max_gap), min(length - 1, target + max_gap)
    candidates = [k for k in range(lo, hi + 1) if k != target]
    return rng.choice(candidates) if candidates else target
