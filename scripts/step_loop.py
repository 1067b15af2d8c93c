"""Set-up shared by the scripts that run the plain training step loop (no Lightning).

``python scripts/bench_train_step.py`` and ``python scripts/mask_head_health.py`` import it as a
sibling module (Python puts a script's own folder first on ``sys.path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StepLoop:
    """What a training step needs, built from ``conf/train.yaml`` with overrides."""

    cfg: Any  # the resolved DictConfig
    datamodule: Any
    module: Any  # visstg.lit.VisSTGModule (its net in train mode)
    params: list  # the trainable parameters, which the optimizer steps
    optimizer: Any

    @property
    def net(self):
        return self.module.net

    @property
    def criterion(self):
        return self.module.criterion


def build_step_loop(
    overrides: list[str], fill_uninitialized: bool = False, device: str = "cpu"
) -> StepLoop:
    """Network, criterion, optimizer and the fitted datamodule of the training config.

    Like training, deterministic algorithms are on when ``trainer.deterministic`` is set (the
    CPU default), without filling new tensors with NaN unless ``fill_uninitialized``. The
    network is moved to ``device`` before the optimizer is built (batches are the caller's to
    move).
    """
    import hydra
    import torch
    from omegaconf import OmegaConf

    from visstg.config import compose, resolved
    from visstg.train import build_module

    cfg = OmegaConf.create(resolved(compose("train", overrides)))
    if cfg.trainer.get("deterministic"):
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = fill_uninitialized
    torch.manual_seed(cfg.seed)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg)
    module.to(device)
    module.net.train()
    params = [p for p in module.net.parameters() if p.requires_grad]
    optimizer = module.optimizer_factory(params)
    return StepLoop(cfg, datamodule, module, params, optimizer)
