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

from visstg.model.criterion import LOSS_KEYS


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
    warmup = max(0, min(warmup_steps, total_steps // 4))

    def factor(step: int) -> float:
        decay = gamma ** sum(step >= s for s in steps)
        if step < warmup:
            alpha = step / warmup
            return decay * (warmup_factor * (1 - alpha) + alpha)
        return decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
            )
        # net/criterion are modules (saved in the state dict); the rest are hyper-parameters.
        self.save_hyperparameters(ignore=["net", "criterion"], logger=False)
        self.net = net
        self.criterion = criterion
        self.config = config

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.net.forward_train(batch)

    def model_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward + criterion on a batch of pairs (shared by every stage that has losses)."""
        return self.criterion(self.net.forward_train(batch), batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.model_step(batch)
        batch_size = int(batch["tgt_images"].shape[0])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        for key in LOSS_KEYS:
            if key in losses:
                self.log(f"train/{key}", losses[key], batch_size=batch_size)
        return losses["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """No-op for now: validation is whole-video tracking + the YouTube-VIS metric, driven by
        the tracker (a later issue), which will log ``val/AP``. Kept as a hook so a validation
        dataloader can be attached without error."""
        return None

    def configure_optimizers(self) -> Any:
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = self.hparams.optimizer(params)
        if self.hparams.scheduler is None:
            return optimizer
        if self.hparams.scheduler_interval == "step":
            total = self.trainer.estimated_stepping_batches
        else:
            total = self.trainer.max_epochs
        if total is None or not math.isfinite(total) or total <= 0:
            raise ValueError(
                "the LR schedule needs a finite run length: set trainer.max_epochs or max_steps"
            )
        scheduler = self.hparams.scheduler(optimizer, total_steps=int(total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["visstg_config"] = self.config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.config = checkpoint.get("visstg_config", self.config)
