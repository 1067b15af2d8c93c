"""Loading a trained model from a checkpoint and running it over videos.

Shared by ``visstg.evaluate`` (checkpoint mode), ``visstg.predict`` and ``visstg.benchmark``.
A visstg checkpoint is a Lightning checkpoint whose ``visstg_config`` holds the resolved training
config (so the network can be rebuilt without the original command line) and whose
``visstg_categories`` holds the training data's categories (original ids and names).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from visstg.cli import UsageError

__all__ = [
    "PRECISIONS",
    "CheckpointError",
    "LoadedModel",
    "autocast_context",
    "optimise_for_inference",
    "load_checkpoint",
    "network_state",
    "read_checkpoint",
    "results_for_video",
    "infer_split",
    "save_untrained_checkpoint",
    "weight_mismatches",
]


# Inference precisions (``precision=`` of predict, evaluate and benchmark): the autocast dtype.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model config."""


def autocast_context(device: str | torch.device, precision: str) -> AbstractContextManager:
    """``torch.autocast`` in ``precision`` on ``device``'s type; a null context for fp32.

    The network's convolutions and matmuls then run in bf16 / fp16; detection decoding, the
    tracker's association and mask encoding read float32 (:mod:`visstg.tracker`). On a CPU with
    native bf16 (avx512_bf16, AMX) bf16 is faster; on others it is emulated and slower.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def optimise_for_inference(
    net: torch.nn.Module,
    device: str | torch.device,
    channels_last: bool = False,
    compile_: bool = False,
    fuse_norms: bool = True,
) -> torch.nn.Module:
    """Backbone norms folded into its convs, channels_last memory format and optional
    torch.compile of the fixed-shape networks.

    The backbone and the dense heads see the same shapes on every frame of a video, so they
    compile once; the graph and the GNN have a frame-dependent edge count and stay eager.
    """
    if fuse_norms:
        net.backbone.fuse_norms()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile_:
        for name in ("backbone", "det_head", "controller", "mask_branch", "kernel_warp"):
            module = getattr(net, name, None)
            if module is not None:
                setattr(net, name, torch.compile(module, dynamic=False))
    return net


@dataclass
class LoadedModel:
    net: torch.nn.Module
    config: dict[str, Any]
    categories: list[dict]  # [{"id": original id, "name": ...}] in contiguous-label order
    path: Path

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def category_id(self, label: int) -> int:
        return int(self.categories[label]["id"])


def read_checkpoint(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file on the CPU; a CheckpointError naming the file when it
    is missing or unreadable."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # pickle/zip errors of every kind
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint: {err}") from None


def network_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's weights in a Lightning checkpoint (``state_dict`` without ``net.``)."""
    prefix = "net."
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def weight_mismatches(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """Lines saying how a checkpoint's weights ``state`` differ from a network's ``own`` state
    dict (missing and unexpected keys, shape mismatches, up to 8 of each); empty when they fit."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_errors = [
        f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    lines = [
        f"  {name} keys ({len(keys)}): {', '.join(keys[:8])}"
        for name, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    return lines + shape_errors[:8]


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", model_overrides: dict | None = None
) -> LoadedModel:
    """Rebuild the network from a checkpoint's stored config and load its weights.

    Args:
        path: a Lightning checkpoint written by ``python -m visstg.train``.
        model_overrides: values merged into the stored ``model`` config before building
            (e.g. ``{"tracker": {...}}`` or inference-only thresholds).

    Raises:
        CheckpointError: the file does not exist, is not a visstg checkpoint, or its weights do
            not fit the network its config builds (the message lists the mismatching keys).
    """
    import hydra
    from omegaconf import OmegaConf

    path = Path(path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "visstg_config" not in ckpt:
        raise CheckpointError(
            f"{path}: not a visstg checkpoint (no 'state_dict' / 'visstg_config'); "
            "use a checkpoint written by `python -m visstg.train`"
        )
    config = ckpt["visstg_config"]
    model_cfg = OmegaConf.create(config["model"])
    if model_overrides:
        model_cfg = OmegaConf.merge(model_cfg, OmegaConf.create(model_overrides))
    try:
        net = hydra.utils.instantiate(model_cfg)
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot build the model its config describes: {err}"
        ) from None
    state = network_state(ckpt)
    problems = weight_mismatches(state, net.state_dict())
    if problems:
        header = f"{path}: the weights do not match the model built from the config:"
        raise CheckpointError("\n".join([header, *problems]))
    net.load_state_dict(state)
    categories = ckpt.get("visstg_categories") or [
        {"id": i + 1, "name": n}
        for i, n in enumerate(config.get("data", {}).get("class_names") or [])
    ]
    return LoadedModel(net.to(device).eval(), config, categories, path)


def results_for_video(
    tracks: list[dict[str, Any]], video_id: int, categories: list[dict]
) -> list[dict[str, Any]]:
    """Video-level tracks (contiguous labels) -> YouTube-VIS result entries (original ids)."""
    return [
        {
            "video_id": video_id,
            "category_id": int(categories[t["label"]]["id"]),
            "score": float(t["score"]),
            "segmentations": t["segmentations"],
        }
        for t in tracks
    ]


def tracker_config(stored: dict | None, overrides: dict | None):
    """The checkpoint's tracker thresholds (``stored``) with the command line's ``overrides``
    (a null override keeps the stored value) as a :class:`visstg.tracker.TrackerConfig`."""
    from visstg.cli import UsageError
    from visstg.tracker import TrackerConfig

    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values = {**(stored or {}), **given}
    unknown = set(values) - set(TrackerConfig.__dataclass_fields__)
    if unknown:
        raise UsageError(f"unknown tracker option(s): {', '.join(sorted(unknown))}")
    try:
        return TrackerConfig(**values)
    except ValueError as err:
        raise UsageError(str(err)) from None


def infer_split(
    model: LoadedModel,
    data_cfg: dict[str, Any],
    split: str,
    tracker_overrides: dict | None = None,
    device: str | torch.device = "cpu",
    max_videos: int | None = None,
    precision: str = "fp32",
):
    """Track every video of ``data_cfg``'s ``split``; returns (loaded split, results list).

    ``data_cfg`` is a data config node (``conf/data/*.yaml``, resolved to a dict); the network
    runs under :func:`autocast_context` of ``precision``.
    """
    from rich.progress import track

    from visstg.data.datamodule import VideoDataset, VISDataModule
    from visstg.tracker import OnlineTracker

    kwargs = {k: v for k, v in data_cfg.items() if not k.startswith("_")}
    dm = VISDataModule(**kwargs)
    if not (dm.root / f"{split}.json").exists():
        dm.prepare_data()  # a synthetic dataset is generated again if it is missing
    ds = dm.split(split)
    if [c["id"] for c in ds.categories] != [c["id"] for c in model.categories]:
        raise CheckpointError(
            f"{model.path}: trained on categories {[c['id'] for c in model.categories]} but "
            f"{ds.path} has {[c['id'] for c in ds.categories]}"
        )
    videos = VideoDataset(ds, dm.test_size, dm.max_size)
    n = len(videos) if max_videos is None else min(max_videos, len(videos))
    tracker = OnlineTracker(
        model.net, tracker_config(model.config.get("tracker"), tracker_overrides)
    )
    results: list[dict[str, Any]] = []
    with torch.inference_mode(), autocast_context(device, precision):
        for i in track(range(n), description=f"inference on {ds.path.name}"):
            video = videos[i]
            results += results_for_video(tracker.run(video), video.video_id, model.categories)
    return ds, results


def save_untrained_checkpoint(path: str | Path, overrides: list[str] = (), seed: int = 0) -> Path:
    """A randomly initialised checkpoint in the format ``python -m visstg.train`` writes.

    For tests and benchmarks that need a checkpoint without training: the network is built from
    ``conf/train.yaml`` composed with ``overrides`` (e.g. ``["model.dim=16"]``), with the
    synthetic categories (or the data config's class names) stored as ``visstg_categories``.
    """
    import hydra

    from visstg.config import compose, resolved

    config = resolved(compose("train", list(overrides)))
    torch.manual_seed(seed)
    net = hydra.utils.instantiate(config["model"])
    names = config["data"]["class_names"] or []
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "visstg_config": config,
            "visstg_categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
        },
        path,
    )
    return Path(path)
