"""The LightningModule, optimizer and schedule: fast_dev_run, logging, config in the checkpoint."""

import functools
import math
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from visstg.lit import VisSTGModule, scaled_sgd, warmup_cosine, warmup_multistep
from visstg.model import VisSTGCriterion
from visstg.model.criterion import LOSS_KEYS

sys.path.insert(0, str(Path(__file__).parent))
from test_visstg import _one_thread, pair_batch, tiny_net  # noqa: E402, F401


def loader(n=2):
    pairs = [pair_batch() for _ in range(n)]
    # Items are already batches of one pair; the identity collate hands them over unchanged.
    return DataLoader(pairs, batch_size=None, shuffle=False)


def module(config=None):
    return VisSTGModule(
        net=tiny_net(iterations=1),
        criterion=VisSTGCriterion(),
        optimizer=functools.partial(scaled_sgd, lr=0.01, reference_batch_size=16, batch_size=8),
        scheduler=functools.partial(warmup_multistep, warmup_steps=2, milestones=(16, 22)),
        config=config,
    )


def test_fast_dev_run_logs_every_loss():
    model = module()
    trainer = pl.Trainer(
        fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader())
    logged = trainer.callback_metrics
    assert "train/loss" in logged
    for key in LOSS_KEYS:
        assert f"train/{key}" in logged, key
        assert torch.isfinite(logged[f"train/{key}"])


def test_checkpoint_holds_the_resolved_config_and_resumes(tmp_path):
    config = {"model": {"dim": 16}, "data": {"num_classes": 3}}
    model = module(config=config)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader(1))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["visstg_config"] == config
    assert ckpt["hyper_parameters"]["config"] == config
    assert any(k.startswith("net.gnn.layers.0") for k in ckpt["state_dict"])
    # Resuming goes through torch.load(weights_only=True): no pickled objects in the checkpoint.
    resumed = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    resumed.fit(module(config=config), train_dataloaders=loader(2), ckpt_path=path)
    assert resumed.global_step == 2


def test_scaled_sgd_applies_the_linear_rule():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = scaled_sgd(params, lr=0.01, reference_batch_size=16, batch_size=8)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    assert opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    assert scaled_sgd(params, lr=0.01).param_groups[0]["lr"] == pytest.approx(0.01)


def _lrs(scheduler, total, **kwargs):
    """Learning rate of every step of a ``total``-step run of ``scheduler`` at base lr 1."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = scheduler(opt, total, **kwargs)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_then_steps_at_16_and_22_of_24_epochs():
    total = 2400  # 24 epochs of 100 steps
    lrs = _lrs(warmup_multistep, total, warmup_steps=100, warmup_factor=0.001)
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[50] == pytest.approx(0.001 * 0.5 + 0.5)
    assert lrs[100] == pytest.approx(1.0) and lrs[1599] == pytest.approx(1.0)
    assert lrs[1600] == pytest.approx(0.1) and lrs[2199] == pytest.approx(0.1)
    assert lrs[2200] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.01)


def test_warmup_then_cosine_to_the_final_factor():
    lrs = _lrs(warmup_cosine, 1100, warmup_steps=100, warmup_factor=0.001, final_factor=0.02)
    assert lrs[0] == pytest.approx(0.001) and lrs[50] == pytest.approx(0.001 * 0.5 + 0.5)
    assert lrs[100] == pytest.approx(1.0)
    assert lrs[600] == pytest.approx(0.02 + 0.98 * 0.5)  # half way through the cosine
    assert lrs[-1] == pytest.approx(0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * 999 / 1000)))
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))  # never rises after the warm-up
