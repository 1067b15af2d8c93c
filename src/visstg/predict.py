"""Run a trained model on your own video: ``python -m visstg.predict input=... ckpt_path=...
output_dir=DIR``.

Streams the input (a video file, decoded with PyAV, or a folder of frames) one frame at a time
through the online tracker and writes:

- ``DIR/overlay.mp4``: the input with every track drawn in its own colour with its class name and
  id; same number of frames and same frame rate as the input;
- ``DIR/results.json``: the tracks in the YouTube-VIS results format (``video_id``,
  ``category_id``, ``category_name``, ``track_id``, ``score``, ``segmentations`` as compressed RLE
  at the input's resolution, null where the track is absent);
- with ``save_masks=true``, ``DIR/masks/track_<id>/<frame>.png`` (0/255) for each track and frame.

An output folder that already holds any of these is refused unless ``overwrite=true``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from visstg.cli import UsageError, checkpoint_overrides, exit_on_user_error, resolve_device
from visstg.config import CONFIG_DIR, register_resolvers

register_resolvers()

OUTPUTS = ("overlay.mp4", "results.json", "masks")


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to overwrite earlier results unless asked to."""
    existing = [name for name in OUTPUTS if (output_dir / name).exists()]
    if existing and not overwrite:
        raise UsageError(
            f"{output_dir} already holds {', '.join(existing)}; choose another output_dir or pass "
            "overwrite=true to replace them"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{output_dir}: exists and is not a folder")


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run prediction; returns a summary (frames, tracks, output paths)."""
    missing = [k for k in ("input", "ckpt_path", "output_dir") if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise UsageError(
            f"missing {', '.join(f'{k}=...' for k in missing)}; usage: python -m visstg.predict "
            "input=VIDEO_OR_FRAME_DIR ckpt_path=CKPT output_dir=DIR"
        )
    import torch
    from rich.progress import Progress

    from visstg.data.transforms import preprocess_frame
    from visstg.data.video_io import VideoFile, VideoWriter, open_video
    from visstg.inference import (
        autocast_context,
        load_checkpoint,
        optimise_for_inference,
        tracker_config,
    )
    from visstg.tracker import OnlineTracker
    from visstg.viz import decode_rle, draw_tracks

    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir, cfg.overwrite)
    video = open_video(cfg.input, fps=cfg.fps)
    device = resolve_device(cfg.device)
    autocast = autocast_context(device, cfg.precision)  # a bad precision fails before loading
    model = load_checkpoint(cfg.ckpt_path, device, model_overrides=checkpoint_overrides(cfg))
    model.net = optimise_for_inference(
        model.net, device, cfg.channels_last, fuse_norms=cfg.fuse_norms
    )
    data_cfg = model.config.get("data", {})
    test_size = cfg.test_size or data_cfg.get("test_size", 360)
    max_size = cfg.max_size or data_cfg.get("max_size", 1333)
    tracker = OnlineTracker(
        model.net, tracker_config(model.config.get("tracker"), cfg.get("tracker"))
    )
    names = model.class_names

    output_dir.mkdir(parents=True, exist_ok=True)
    rate = video.rate if isinstance(video, VideoFile) else cfg.fps
    total = len(video) or None
    n_frames = 0
    with VideoWriter(output_dir / "overlay.mp4", rate) as writer, Progress() as progress:
        task = progress.add_task(f"predict {Path(cfg.input).name}", total=total)
        for frame in video:
            image, size, _ = preprocess_frame(frame, test_size, max_size)
            with torch.inference_mode(), autocast:
                dets = tracker.step(image.to(device), size, frame.shape[:2])
            shown = [(tid, names[label], score, rle) for tid, label, score, rle in dets]
            writer.write(draw_tracks(frame, shown, alpha=cfg.alpha))
            n_frames += 1
            progress.advance(task)

    tracks = tracker.video_results(n_frames)
    results = [
        {
            "video_id": 1,
            "track_id": t["track_id"],
            "category_id": model.category_id(t["label"]),
            "category_name": names[t["label"]],
            "score": t["score"],
            "segmentations": t["segmentations"],
        }
        for t in tracks
    ]
    (output_dir / "results.json").write_text(json.dumps(results))
    if cfg.save_masks:
        from PIL import Image

        for t in tracks:
            folder = output_dir / "masks" / f"track_{t['track_id']:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, rle in enumerate(t["segmentations"]):
                if rle is not None:
                    Image.fromarray(decode_rle(rle).astype("uint8") * 255).save(
                        folder / f"{i:05d}.png"
                    )
    summary = {"frames": n_frames, "tracks": len(tracks), "output_dir": str(output_dir)}
    print(f"{n_frames} frames, {len(tracks)} tracks -> {output_dir}/overlay.mp4, results.json")
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(predict, cfg)


if __name__ == "__main__":
    main()
