"""The LightningModule: training loop glue around ``VisSTG`` and ``VisSTGCriterion``.

The network, criterion, optimizer and scheduler are built by Hydra from ``conf/`` (``model``,
``criterion``, ``optimizer``, ``scheduler`` nodes; the last two with ``_partial_: true``) and
injected here; nothing in this module reads a global config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from visstg.tracker import TrackerConfig
from visstg.validation import LOGGED_KEYS, VideoValidator


def scaled_sgd(
    params: Any,
    lr: float = 0.01,
    reference_batch_size: int = 16,
    batch_size: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> torch.optim.SGD:
    """SGD with the linear scaling rule: ``lr`` is the learning rate at ``reference_batch_size``
    (paper 4.2: 0.01 at 16); the optimizer gets ``lr * batch_size / reference_batch_size``.

    ``batch_size`` is the *total* batch per optimizer step (per-device batch x devices x
    gradient accumulation); ``None`` means ``reference_batch_size`` (no scaling).
    """
    scale = (batch_size or reference_batch_size) / reference_batch_size
    return torch.optim.SGD(params, lr=lr * scale, momentum=momentum, weight_decay=weight_decay)


def _with_warmup(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    warmup_factor: float,
    decay: Callable[[int, int], float],
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` of ``decay(step, warmup)`` times a linear warm-up that ramps from
    ``warmup_factor`` to 1 over the first ``warmup = min(warmup_steps, total_steps // 4)``
    steps (1 after them)."""
    warmup = max(0, min(warmup_steps, total_steps // 4))

    def factor(step: int) -> float:
        if step < warmup:
            alpha = step / warmup
            return decay(step, warmup) * (warmup_factor * (1 - alpha) + alpha)
        return decay(step, warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_multistep(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 500,
    warmup_factor: float = 0.001,
    milestones: Sequence[float] = (16, 22),
    schedule_epochs: float = 24,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then step decay, in optimizer-step units (``interval: step``).

    The milestones are epochs of a ``schedule_epochs``-long schedule (paper 4.2: x0.1 at 16 and 22
    of 24) and are mapped onto the actual run proportionally: milestone m falls at step
    ``round(m / schedule_epochs * total_steps)``, so shortening ``trainer.max_epochs`` shortens
    the whole schedule. The warm-up ramps the factor linearly from ``warmup_factor`` to 1 over
    ``min(warmup_steps, total_steps // 4)`` steps.

    Args:
        total_steps: optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
    """
    steps = [round(m / schedule_epochs * total_steps) for m in milestones]

    def decay(step: int, warmup: int) -> float:
        return gamma ** sum(step >= s for s in steps)

    return _with_warmup(optimizer, total_steps, warmup_steps, warmup_factor, decay)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 500,
    warmup_factor: float = 0.001,
    final_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up (as :func:`warmup_multistep`) then a half cosine from the full learning
    rate down to ``final_factor`` times it at ``total_steps``, in optimizer-step units."""

    def decay(step: int, warmup: int) -> float:
        # 1 during the warm-up, then the half cosine over the remaining steps.
        t = min(1.0, max(0, step - warmup) / max(1, total_steps - warmup))
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return _with_warmup(optimizer, total_steps, warmup_steps, warmup_factor, decay)


class VisSTGModule(pl.LightningModule):
    """Trains ``net`` (a ``VisSTG``) with ``criterion`` (a ``VisSTGCriterion``).

    Args:
        net: the network; ``net.forward_train(batch)`` gives raw outputs.
        criterion: ``criterion(outputs, batch)`` -> dict of ``loss_*`` and ``loss``.
        optimizer: partial ``optimizer(params)`` (e.g. ``scaled_sgd`` with ``_partial_: true``).
        scheduler: partial ``scheduler(optimizer, total_steps=...)`` or None.
        scheduler_interval: ``"step"`` or ``"epoch"`` (how Lightning steps the scheduler).
        config: the resolved run config (a plain dict); saved in the checkpoint's hyper-parameters
            and as ``checkpoint["visstg_config"]`` so a checkpoint rebuilds its model alone.
        tracker: thresholds of the online tracker used in validation (``TrackerConfig`` fields).
        val_hota: also compute HOTA/DetA/AssA at each validation.
        categories: the training data's categories ``[{"id", "name"}]`` in label order, stored in
            the checkpoint (``visstg_categories``) so predictions map back to original ids.

    Validation tracks every validation video online (one :class:`VideoSample` per step) and
    computes the YouTube-VIS metric once per epoch on the union of all ranks' videos, logging
    ``val/AP``, ``val/AP50``, ``val/AP75``, ``val/AR1``, ``val/AR10`` and ``val/HOTA``.

    Logged: ``train/loss`` and every ``train/loss_*`` component, with ``batch_size`` set (the
    number of pairs; Lightning cannot infer it from the batch dict's lists and graph).
    """

    def __init__(
        self,
        net: nn.Module,
        criterion: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        config: dict[str, Any] | None = None,
        tracker: dict[str, Any] | None = None,
        val_hota: bool = True,
        categories: list[dict] | None = None,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
            )
        # Only primitives go into the checkpoint's hyper-parameters: modules live in the state
        # dict, and pickled partials would make `torch.load(weights_only=True)` (the default
        # since torch 2.6, used by Lightning when resuming) refuse the checkpoint.
        self.save_hyperparameters(
            ignore=["net", "criterion", "optimizer", "scheduler"], logger=False
        )
        self.net = net
        self.criterion = criterion
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.config = config
        self.categories = categories
        self.validator = VideoValidator(TrackerConfig(**(tracker or {})), hota=val_hota)
        self.validated_step: int | None = None

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.net.forward_train(batch)

    def model_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward + criterion on a batch of pairs (shared by every stage that has losses)."""
        return self.criterion(self.net.forward_train(batch), batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.model_step(batch)
        batch_size = int(batch["tgt_images"].shape[0])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        for key, value in losses.items():  # every term of the variant (loss_center, ...)
            if key != "loss":
                self.log(f"train/{key}", value, batch_size=batch_size)
        return losses["loss"]

    def setup(self, stage: str) -> None:
        # The categories of the training data go into every checkpoint (visstg_categories).
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.categories is None and dm is not None and hasattr(dm, "split"):
            cats = dm.split(dm.train_split).categories
            self.categories = [{"id": c["id"], "name": c["name"]} for c in cats]

    def on_validation_epoch_start(self) -> None:
        self.validator.reset()

    def validation_step(self, video: Any, batch_idx: int) -> None:
        """Track one whole validation video (a ``VideoSample``) online."""
        self.validator.add_video(self.net, video, with_overlay=batch_idx == 0)

    def on_validation_epoch_end(self) -> None:
        metrics = self.validator.compute()  # identical on every rank (gathered first)
        self.validated_step = self.global_step  # the weights last_metrics describe
        for key in LOGGED_KEYS:
            if key in metrics:
                self.log(f"val/{key}", float(metrics[key]), prog_bar=key == "AP", batch_size=1)
        overlays = self.validator.overlays
        logger = self.logger
        if (
            overlays
            and logger is not None
            and hasattr(logger, "log_image")
            and self.global_rank == 0
        ):
            logger.log_image(key="val/overlay", images=list(overlays), step=self.global_step)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        if self.hparams.scheduler_interval == "step":
            total = self.trainer.estimated_stepping_batches
        else:
            total = self.trainer.max_epochs
        if total is None or not math.isfinite(total) or total <= 0:
            raise ValueError(
                "the LR schedule needs a finite run length: set trainer.max_epochs or max_steps"
            )
        scheduler = self.scheduler_factory(optimizer, total_steps=int(total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["visstg_config"] = self.config
        checkpoint["visstg_categories"] = self.categories

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.config = checkpoint.get("visstg_config", self.config)
        self.categories = checkpoint.get("visstg_categories", self.categories)
