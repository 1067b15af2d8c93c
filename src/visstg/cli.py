"""Small helpers shared by the command-line entry points."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from visstg.data.video_io import VideoIOError
from visstg.data.ytvis import DatasetError

__all__ = ["UsageError", "exit_on_user_error", "resolve_device"]


class UsageError(RuntimeError):
    """A problem with what the user asked for (paths, options), reported without a traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from visstg.inference import CheckpointError

    return (UsageError, DatasetError, VideoIOError, CheckpointError, FileExistsError)


def exit_on_user_error(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn``; a user error prints ``error: ...`` and exits with status 1 (no traceback)."""
    try:
        return fn(*args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device} requested but CUDA is not available on this machine")
    return device


def checkpoint_overrides(cfg: Any) -> dict[str, Any] | None:
    """Model options that a CLI's config may set over the checkpoint's stored ones (None
    keeps the stored value): ``test_flip_masks``, the mirrored-frame mask averaging."""
    value = cfg.get("test_flip_masks")
    return None if value is None else {"test_flip_masks": bool(value)}
