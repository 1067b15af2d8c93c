"""Image and target transforms shared by training, validation and ``predict``.

Training applies ONE random augmentation to both frames of a (reference, target) pair: a
multi-scale resize of the shorter side (longer side capped), a horizontal flip and, with a crop
size, one random window of the resized frames. Boxes are recomputed from the transformed masks,
so boxes and masks always agree with the image.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PairAugmentation",
    "resized_shape",
    "to_tensor",
    "denormalize",
    "normalize",
    "resize_image",
    "resize_masks",
    "boxes_from_masks",
    "pad_to_multiple",
    "preprocess_frame",
]


def resized_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) with the shorter side ``short`` and the longer side at most ``max_size``."""
    scale = short / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a [3, H, W] (or [N, 3, H, W]) tensor in [0, 1]."""
    mean = image.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: back to [0, 1] (clamped)."""
    mean = image.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean).clamp_(0.0, 1.0)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [3, H, W] to ``size`` (h, w), antialiased when shrinking."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(
        image[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of bool/uint8 masks [N, H, W] to ``size``; returns bool."""
    if masks.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.bool)
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.bool()
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes [N, 4] in pixel-edge coordinates (x2, y2 exclusive) of bool masks."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4))
    boxes = masks_to_boxes(masks)  # [N, 4] with inclusive max pixel index
    boxes[:, 2:] += 1.0
    return boxes


def pad_to_multiple(images: list[torch.Tensor], multiple: int = 32) -> torch.Tensor:
    """Zero-pad [3, h_i, w_i] images (bottom/right) to one [N, 3, H, W], H and W multiples."""
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    h, w = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    return out


@dataclass
class PairAugmentation:
    """One random draw applied identically to every frame of a pair.

    Args:
        train_sizes: candidate shorter-side lengths (multi-scale training).
        max_size: cap on the longer side.
        hflip_prob: probability of a horizontal flip.
        crop_size: ``(h, w)``: after the resize, one random window of at most this size
            (the same window in both frames, so motion is kept); ``None``: the whole frame.
            Training at a larger scale than the pixels a step can afford: objects are as
            large as at a test size of the same scale, at the step cost of the window.
    """

    train_sizes: tuple[int, ...] = (160, 176, 192, 208, 224)
    max_size: int = 400
    hflip_prob: float = 0.5
    crop_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.crop_size is not None:
            crop = tuple(int(v) for v in self.crop_size)
            if len(crop) != 2 or min(crop) < 1:
                raise ValueError(
                    f"PairAugmentation: crop_size must be (height, width) >= 1, got {crop}"
                )
            self.crop_size = crop

    def sample(self, rng: random.Random) -> tuple[int, bool, tuple[float, float] | None]:
        """(shorter side, flip, the crop window's corner as fractions of the free room)."""
        short, flip = rng.choice(list(self.train_sizes)), rng.random() < self.hflip_prob
        corner = (rng.random(), rng.random()) if self.crop_size is not None else None
        return short, flip, corner

    def apply(
        self,
        image: np.ndarray,
        masks: np.ndarray,
        short: int,
        flip: bool,
        corner: tuple[float, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transform one frame.

        Args:
            image: RGB uint8 [H, W, 3].
            masks: uint8 [N, H, W].
            short, flip, corner: one draw of :meth:`sample`.
        Returns:
            image: normalised float [3, h, w]; masks: bool [N, h, w]; boxes: [N, 4] xyxy.
        """
        h, w = resized_shape(image.shape[0], image.shape[1], short, self.max_size)
        img = resize_image(to_tensor(image), (h, w))
        m = resize_masks(torch.from_numpy(masks), (h, w))
        if flip:
            img, m = img.flip(-1), m.flip(-1)
        if self.crop_size is not None and corner is not None:
            ch, cw = min(h, self.crop_size[0]), min(w, self.crop_size[1])
            y0, x0 = round(corner[0] * (h - ch)), round(corner[1] * (w - cw))
            img, m = img[:, y0 : y0 + ch, x0 : x0 + cw], m[:, y0 : y0 + ch, x0 : x0 + cw]
        return normalize(img), m, boxes_from_masks(m)


def preprocess_frame(
    image: np.ndarray, test_size: int, max_size: int, multiple: int = 32
) -> tuple[torch.Tensor, tuple[int, int], float]:
    """Test-time preprocessing of one RGB uint8 frame [H, W, 3].

    Returns:
        image: normalised, zero-padded float [3, H', W'] (multiples of ``multiple``),
        size: (h, w) of the valid region, scale: resized / original.
    """
    h, w = resized_shape(image.shape[0], image.shape[1], test_size, max_size)
    img = normalize(resize_image(to_tensor(image), (h, w)))
    return pad_to_multiple([img], multiple)[0], (h, w), h / image.shape[0]
