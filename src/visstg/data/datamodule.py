"""Datasets, collate function and the ``LightningDataModule`` for YouTube-VIS-format data.

Training items are (reference, target) frame pairs (see :mod:`visstg.data.pairs`) with one shared
augmentation; :func:`collate_pairs` pads them into the batch described in ``docs/contracts.md``.
Validation items are whole videos (:class:`VideoSample`) whose frames are decoded one at a time,
so a long video never has all its frames or masks in memory.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from visstg.data.pairs import sample_reference, target_index
from visstg.data.transforms import (
    PairAugmentation,
    boxes_from_masks,
    pad_to_multiple,
    preprocess_frame,
)
from visstg.data.ytvis import YTVIS, DatasetError, load_ytvis

log = logging.getLogger(__name__)

__all__ = [
    "PairDataset",
    "VideoDataset",
    "VideoSample",
    "collate_pairs",
    "paste_instances",
    "VISDataModule",
]

DATASET_SOURCES = {
    "ytvis2019": "YouTube-VIS 2019 from https://youtube-vos.org/dataset/vis/ (CodaLab download)",
    "ytvis2021": "YouTube-VIS 2021 from https://youtube-vos.org/dataset/vis/ (CodaLab download)",
    "ytvis2022": "YouTube-VIS 2022 from https://youtube-vos.org/dataset/vis/",
    "ovis": "OVIS from https://songbai.site/ovis/",
}


class PairDataset(Dataset):
    """(reference, target) frame pairs of one split.

    Each item is ``{"ref": frame, "tgt": frame, "video_id", "frame_indices": (k, t)}`` with
    ``frame = {"image": [3, h, w] normalised, "boxes": [N, 4] xyxy, "labels": [N],
    "track_ids": [N], "masks": [N, h, w] bool}``; both frames share one augmentation draw.

    Reference dropout (a training regulariser, off by default): with probability
    ``ref_drop_frame`` the reference frame keeps no instance (the graph then has no reference
    node, as on a video's first frame), otherwise each reference instance is removed with
    probability ``ref_drop_instance`` (its target counterpart becomes a new object). With GT
    references in every pair the heads can find objects from the graph's messages alone: on
    2-core runs of the synthetic default the centre loss of the same weights was 0.76 with the
    references and 1.60 without, while at inference new objects never have a reference.

    Copy-paste (a training augmentation, off by default): with probability ``copy_paste`` the
    visible instances of another video's pair (its own reference and target, the same shorter
    side, its own flip and window) are pasted on top of both frames, as new tracks
    (:func:`paste_instances`). The instances they cover lose those pixels; one covered entirely
    is dropped from that frame. A step then sees more objects, and more occlusions, for the
    cost of loading a second pair.
    """

    def __init__(
        self,
        ds: YTVIS,
        augmentation: PairAugmentation,
        max_gap: int = 4,
        ref_drop_frame: float = 0.0,
        ref_drop_instance: float = 0.0,
        copy_paste: float = 0.0,
    ) -> None:
        for name, p in (
            ("ref_drop_frame", ref_drop_frame),
            ("ref_drop_instance", ref_drop_instance),
            ("copy_paste", copy_paste),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"PairDataset: {name} must be a probability in [0, 1], got {p}")
        self.ds = ds
        self.aug = augmentation
        self.max_gap = max_gap
        self.ref_drop_frame, self.ref_drop_instance = ref_drop_frame, ref_drop_instance
        self.copy_paste = copy_paste
        annotated = {v["id"]: ds.annotated_frames(v) for v in ds.videos}
        self.samples = target_index(annotated)
        if not self.samples:
            raise DatasetError(f"{ds.path}: no annotated frame with a visible instance to train on")
        # Pasted instances get track ids above every id of the file, so they never meet a
        # host instance's id (annotation ids need not be unique across videos).
        self._paste_id_offset = 1 + max(
            (t.id for tracks in ds.tracks.values() for t in tracks), default=0
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # Seeded from torch so `seed_everything(workers=True)` makes the draw repeatable.
        rng = random.Random(int(torch.randint(0, 2**31 - 1, ()).item()))
        video_id, t = self.samples[index]
        video = self.ds.video(video_id)
        k = sample_reference(t, video["length"], self.max_gap, rng)
        draw = self.aug.sample(rng)
        ref, tgt = self._frame(video, k, draw), self._frame(video, t, draw)
        if self.copy_paste > 0 and rng.random() < self.copy_paste:
            donor = self._donor_pair(video_id, draw[0], rng)
            if donor is not None:
                ref, tgt = paste_instances(ref, donor[0]), paste_instances(tgt, donor[1])
        return {
            "ref": self._drop_references(ref, rng),
            "tgt": tgt,
            "video_id": video_id,
            "frame_indices": (k, t),
        }

    def _donor_pair(self, video_id: int, short: int, rng: random.Random) -> tuple | None:
        """(reference, target) frames of a pair from another video, resized to the same
        shorter side with their own flip and window, track ids moved above the file's."""
        for _ in range(8):  # a few tries: a dataset may be one long video
            donor_id, t = self.samples[rng.randrange(len(self.samples))]
            if donor_id != video_id:
                break
        else:
            return None
        video = self.ds.video(donor_id)
        k = sample_reference(t, video["length"], self.max_gap, rng)
        _, flip, corner = self.aug.sample(rng)
        frames = [self._frame(video, i, (short, flip, corner)) for i in (k, t)]
        for f in frames:
            f["track_ids"] = f["track_ids"] + self._paste_id_offset
        return frames[0], frames[1]

    def _drop_references(self, ref: dict[str, torch.Tensor], rng: random.Random) -> dict:
        if self.ref_drop_frame == 0 and self.ref_drop_instance == 0:
            return ref
        n = len(ref["labels"])
        if rng.random() < self.ref_drop_frame:
            keep = torch.zeros(n, dtype=torch.bool)
        else:
            keep = torch.tensor(
                [rng.random() >= self.ref_drop_instance for _ in range(n)], dtype=torch.bool
            )
        return {key: v if key == "image" else v[keep] for key, v in ref.items()}

    def _frame(self, video: dict, frame: int, draw: tuple) -> dict[str, torch.Tensor]:
        image = self.ds.load_frame(video, frame)
        tracks, masks = self.ds.frame_masks(video, frame)
        if masks.shape[1:] != image.shape[:2]:
            raise DatasetError(
                f"{self.ds.path}: video {video['id']} frame {frame}: image "
                f"{image.shape[0]}x{image.shape[1]} differs from the annotated size "
                f"{masks.shape[1]}x{masks.shape[2]}"
            )
        img, m, boxes = self.aug.apply(image, masks, *draw)
        keep = m.flatten(1).any(1)  # a tiny instance can vanish when downscaled, or be cropped
        return {
            "image": img,
            "boxes": boxes[keep],
            "labels": torch.tensor([tr.label for tr in tracks], dtype=torch.long)[keep],
            "track_ids": torch.tensor([tr.id for tr in tracks], dtype=torch.long)[keep],
            "masks": m[keep],
        }


def paste_instances(host: dict[str, Any], donor: dict[str, Any]) -> dict[str, Any]:
    """Paste the instances of one frame on top of another (copy-paste augmentation).

    Both are :class:`PairDataset` frames (normalised image, boxes, labels, track_ids, masks);
    the donor is aligned at the top-left corner and cut to the host's size. The host's
    instances lose the pixels the pasted ones cover and are dropped where nothing is left;
    boxes are recomputed from the masks. The donor's track ids must not clash with the host's.
    """
    h, w = host["image"].shape[-2:]
    dh, dw = min(h, donor["image"].shape[-2]), min(w, donor["image"].shape[-1])
    pasted = _pad_masks(donor["masks"][:, :h, :w], h, w)
    cover = pasted.any(0)  # [h, w]
    image = host["image"].clone()
    image[:, :dh, :dw] = torch.where(
        cover[:dh, :dw], donor["image"][:, :dh, :dw], image[:, :dh, :dw]
    )
    masks = torch.cat([host["masks"] & ~cover, pasted])
    keep = masks.flatten(1).any(1)
    masks = masks[keep]
    return {
        "image": image,
        "boxes": boxes_from_masks(masks),
        "labels": torch.cat([host["labels"], donor["labels"]])[keep],
        "track_ids": torch.cat([host["track_ids"], donor["track_ids"]])[keep],
        "masks": masks,
    }


def _pad_masks(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    out = torch.zeros((masks.shape[0], h, w), dtype=torch.bool)
    out[:, : masks.shape[1], : masks.shape[2]] = masks
    return out


def collate_pairs(items: list[dict[str, Any]], multiple: int = 32) -> dict[str, Any]:
    """Pad a list of pair items into one batch (layout in ``docs/contracts.md``).

    Returns:
        ref_images, tgt_images: [B, 3, H, W] (H, W multiples of ``multiple``);
        ref_targets, tgt_targets: B dicts of boxes [N, 4], labels [N], track_ids [N],
        masks [N, H, W] bool; image_sizes: [B, 2] (h, w) valid region; video_ids: list[int];
        frame_indices: [B, 2] (reference, target).
    """
    images = pad_to_multiple([it[s]["image"] for s in ("ref", "tgt") for it in items], multiple)
    b = len(items)
    h, w = images.shape[-2:]

    def targets(side: str) -> list[dict[str, torch.Tensor]]:
        out = []
        for it in items:
            f = it[side]
            out.append(
                {
                    "boxes": f["boxes"],
                    "labels": f["labels"],
                    "track_ids": f["track_ids"],
                    "masks": _pad_masks(f["masks"], h, w),
                }
            )
        return out

    return {
        "ref_images": images[:b],  # [B, 3, H, W]
        "tgt_images": images[b:],  # [B, 3, H, W]
        "ref_targets": targets("ref"),
        "tgt_targets": targets("tgt"),
        "image_sizes": torch.tensor([it["tgt"]["image"].shape[-2:] for it in items]),  # [B, 2]
        "video_ids": [it["video_id"] for it in items],
        "frame_indices": torch.tensor([it["frame_indices"] for it in items]),  # [B, 2]
    }


@dataclass
class VideoSample:
    """One video for online inference; frames are decoded lazily, one at a time."""

    ds: YTVIS
    video: dict
    test_size: int
    max_size: int

    @property
    def video_id(self) -> int:
        return self.video["id"]

    @property
    def length(self) -> int:
        return self.video["length"]

    @property
    def orig_size(self) -> tuple[int, int]:
        return self.video["height"], self.video["width"]

    @property
    def file_names(self) -> list[str]:
        return self.video["file_names"]

    def frames(self) -> Iterator[tuple[int, torch.Tensor, tuple[int, int], float]]:
        """Yield ``(frame_index, image [3, H, W], valid (h, w), scale)`` in order."""
        for i in range(self.length):
            raw = self.ds.load_frame(self.video, i)
            image, size, scale = preprocess_frame(raw, self.test_size, self.max_size)
            yield i, image, size, scale

    def raw_frame(self, index: int):
        """The original RGB uint8 frame [H, W, 3] (for overlays)."""
        return self.ds.load_frame(self.video, index)


class VideoDataset(Dataset):
    """Whole videos of a split, for online evaluation (one :class:`VideoSample` per item)."""

    def __init__(self, ds: YTVIS, test_size: int, max_size: int) -> None:
        self.ds, self.test_size, self.max_size = ds, test_size, max_size

    def __len__(self) -> int:
        return len(self.ds.videos)

    def __getitem__(self, index: int) -> VideoSample:
        return VideoSample(self.ds, self.ds.videos[index], self.test_size, self.max_size)


def _identity(x):
    return x


class VISDataModule(pl.LightningDataModule):
    """YouTube-VIS / OVIS / synthetic data for training (pairs) and validation (videos).

    Args:
        name: dataset name (used in messages: synthetic, ytvis2019, ytvis2021, ovis).
        root: folder with ``<split>.json`` and ``<split>/JPEGImages/``.
        num_classes: expected number of categories (checked against the file).
        class_names: contiguous class names; read from the file when None.
        synthetic: generator arguments; when given and ``root`` has no data, the synthetic
            dataset is generated there first.
        max_gap: reference frame within this many annotated frames of the target.
        train_sizes, max_size, hflip_prob, crop_size: the shared pair augmentation
            (:class:`~visstg.data.transforms.PairAugmentation`).
        test_size: shorter side at inference (longer side capped by ``max_size``).
        ref_drop_frame, ref_drop_instance: reference dropout of the training pairs
            (:class:`PairDataset`).
        copy_paste: probability that a training pair gets another video's instances pasted
            on top (:class:`PairDataset`).
        epoch_pairs: pairs per training epoch, drawn at random without replacement (a new draw
            every epoch); ``None``: one pair per annotated frame. Keeps the length of an epoch
            (and so the schedule in epochs) independent of how many videos the data has.
    """

    def __init__(
        self,
        name: str = "synthetic",
        root: str = "data/synthetic",
        train_split: str = "train",
        val_split: str = "valid",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        synthetic: dict | None = None,
        max_gap: int = 4,
        train_sizes: tuple[int, ...] = (160, 176, 192, 208, 224),
        max_size: int = 400,
        test_size: int = 192,
        hflip_prob: float = 0.5,
        batch_size: int = 8,
        num_workers: int = 2,
        val_max_videos: int | None = None,
        ref_drop_frame: float = 0.0,
        ref_drop_instance: float = 0.0,
        epoch_pairs: int | None = None,
        crop_size: tuple[int, int] | None = None,
        copy_paste: float = 0.0,
    ) -> None:
        super().__init__()
        if epoch_pairs is not None and epoch_pairs < 1:
            raise ValueError(f"epoch_pairs must be null or >= 1, got {epoch_pairs}")
        self.epoch_pairs = epoch_pairs
        self.name, self.root = name, Path(root)
        self.train_split, self.val_split = train_split, val_split
        self.num_classes, self.class_names = num_classes, class_names
        self.synthetic = dict(synthetic) if synthetic else None
        self.max_gap = max_gap
        self.aug = PairAugmentation(tuple(train_sizes), max_size, hflip_prob, crop_size)
        self.test_size, self.max_size = test_size, max_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_max_videos = val_max_videos
        self.pair_options = {
            "ref_drop_frame": ref_drop_frame,
            "ref_drop_instance": ref_drop_instance,
            "copy_paste": copy_paste,
        }
        self._splits: dict[str, YTVIS] = {}

    # --- files --------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from visstg.data.synthetic import ensure_synthetic

            ensure_synthetic(self.root, **self.synthetic)

    def split(self, name: str) -> YTVIS:
        """The loaded annotation file of a split (``root/<name>.json``), cached."""
        if name not in self._splits:
            path = self.root / f"{name}.json"
            if not path.is_file():
                raise DatasetError(self._missing_message(path))
            ds = load_ytvis(path, self.root / name / "JPEGImages")
            if self.num_classes is not None and ds.num_classes != self.num_classes:
                raise DatasetError(
                    f"{path}: has {ds.num_classes} categories but the config says "
                    f"data.num_classes={self.num_classes}"
                )
            self._splits[name] = ds
        return self._splits[name]

    def _missing_message(self, path: Path) -> str:
        if self.synthetic is not None:
            return f"{path}: not found (generate it with `python -m visstg.data.synthetic --out {self.root}`)"
        source = DATASET_SOURCES.get(self.name, "the dataset's official site")
        return (
            f"{path}: not found. Download {source} and arrange it as\n"
            f"  {self.root}/{self.train_split}.json\n"
            f"  {self.root}/{self.train_split}/JPEGImages/<video>/<frame>.jpg\n"
            f"  {self.root}/{self.val_split}.json\n"
            f"  {self.root}/{self.val_split}/JPEGImages/<video>/<frame>.jpg\n"
            f"or point the config at your copy with data.root=/path/to/{self.name}"
        )

    # --- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = PairDataset(
                self.split(self.train_split), self.aug, self.max_gap, **self.pair_options
            )
        if stage in (None, "fit", "validate"):
            self.val_set = VideoDataset(self.split(self.val_split), self.test_size, self.max_size)
            if self.val_max_videos is not None:  # a quick look at the first few videos
                n = min(self.val_max_videos, len(self.val_set))
                self.val_set = torch.utils.data.Subset(self.val_set, range(n))

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.epoch_pairs is not None:
            sampler = RandomSampler(self.train_set, num_samples=self.epoch_pairs)
        size = self.epoch_pairs or len(self.train_set)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=size >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_pairs,
        )

    def val_dataloader(self) -> DataLoader:
        # One whole video per item; frames are decoded inside the validation step.
        return DataLoader(self.val_set, batch_size=None, shuffle=False, collate_fn=_identity)
