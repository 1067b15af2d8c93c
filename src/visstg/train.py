"""Train VisSTG: ``python -m visstg.train [+experiment=NAME] [overrides]``.

With no arguments it trains the small default model on the built-in synthetic dataset (generated
on first use) on the CPU, evaluates the best checkpoint on the validation split with the
YouTube-VIS metric, and prints the AP table and where the checkpoint is. ``-m`` runs Hydra
multirun sweeps, e.g. ``python -m visstg.train -m model.gnn.iterations=1,2,3,4``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from visstg.config import CONFIG_DIR, choose_openmp_wait_policy, register_resolvers

register_resolvers()


def build_trainer(cfg: DictConfig):
    """The Lightning Trainer with the configured logger and callbacks."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import LearningRateMonitor

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    logger: Any = False
    if cfg.get("logger"):
        logger = hydra.utils.instantiate(cfg.logger, **_sweep_grouping(cfg))
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    else:  # logger=none: the learning-rate monitor has nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if cfg.trainer.get("deterministic"):
        # Deterministic algorithms also fill every new tensor with NaN, to expose reads of
        # uninitialised memory; that is no part of repeatability. Measured: 0.311 / 0.298 s
        # against 0.281 / 0.279 s a step without it (two alternating pairs of
        # `scripts/bench_train_step.py [--fill-uninitialized]`), but only 889 -> 879 s for a
        # whole 11-epoch default run, which ended with bit-identical metrics either way.
        torch.utils.deterministic.fill_uninitialized_memory = False
    return trainer


def _sweep_grouping(cfg: DictConfig) -> dict[str, str]:
    """In a multirun, W&B runs are grouped by sweep and named by their overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or "WandbLogger" not in str(cfg.logger.get("_target_")):
        return {}
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return {}
    grouping = {}
    if not cfg.logger.get("group"):
        grouping["group"] = Path(hc.sweep.dir).name
    if not cfg.logger.get("name"):
        grouping["name"] = hc.job.override_dirname or f"job{hc.job.num}"
    return grouping


def build_module(cfg: DictConfig):
    """The LightningModule: network, criterion, optimizer and schedule from the config."""
    from visstg.lit import VisSTGModule

    net = hydra.utils.instantiate(cfg.model)
    return VisSTGModule(
        net=net,
        # The mask targets are downsampled to the stride the network's mask logits come out at
        # (model.mask_feat_stride / model.mask_upsample), whatever the loss group says.
        criterion=hydra.utils.instantiate(
            cfg.criterion, mask_target_stride=getattr(net, "mask_stride", 4)
        ),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        scheduler_interval=cfg.get("scheduler_interval", "step"),
        config=OmegaConf.to_container(cfg, resolve=True),
        tracker=OmegaConf.to_container(cfg.tracker, resolve=True) if cfg.get("tracker") else None,
        val_hota=cfg.get("val_hota", True),
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally evaluate); returns the final metrics and the checkpoint paths."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True)
    # Lightning calls datamodule.prepare_data() (which generates the synthetic dataset on first
    # use) on local rank 0 only, then setup() everywhere; the module reads the categories then.
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg)
    if cfg.get("ckpt_path"):
        check_resume_checkpoint(cfg.ckpt_path, module.net, module.config["model"])
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    out: dict[str, Any] = {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None:
        out["best_ckpt"] = ckpt_cb.best_model_path or None
        out["last_ckpt"] = str(Path(ckpt_cb.dirpath) / "last.ckpt") if ckpt_cb.dirpath else None
    if cfg.get("evaluate_after_fit") and not cfg.trainer.get("fast_dev_run"):
        best = out.get("best_ckpt") or None
        if not _validated_already(module, best):
            trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        out["val_metrics"] = module.validator.last_metrics
        out["evaluated_ckpt"] = best or "the final weights"
    out["global_step"] = trainer.global_step
    if trainer.is_global_zero:
        write_run_summary(Path(cfg.paths.output_dir), out)
    return out


def check_resume_checkpoint(path: str, net, model_cfg: dict[str, Any]) -> None:
    """``ckpt_path=`` must be a checkpoint of this run's network. Otherwise a CheckpointError
    that names the file, the weights that do not fit and the model options that differ from the
    ones stored in it (Lightning would stop at the first tensor, without the file or the cause).
    """
    from visstg.inference import CheckpointError, network_state, read_checkpoint, weight_mismatches

    file = Path(path)
    ckpt = read_checkpoint(file, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{file}: not a Lightning checkpoint (no 'state_dict') to resume")
    problems = weight_mismatches(network_state(ckpt), net.state_dict())
    if not problems:
        return
    lines = [f"{file}: cannot resume, its weights do not match this run's model:", *problems]
    stored = (ckpt.get("visstg_config") or {}).get("model")
    changed = _differences(stored, model_cfg, "model") if isinstance(stored, dict) else []
    if changed:
        lines.append("model options of the checkpoint's run -> this run:")
        lines += [f"  {key}: {old!r} -> {new!r}" for key, old, new in changed[:8]]
    lines.append("Resume with the overrides of the run that wrote it (its .hydra/overrides.yaml).")
    raise CheckpointError("\n".join(lines))


def _differences(old: Any, new: Any, key: str) -> list[tuple[str, Any, Any]]:
    """Dotted keys where two nested config dicts differ, with both values (None = absent)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            diff
            for k in sorted(set(old) | set(new), key=str)
            for diff in _differences(old.get(k), new.get(k), f"{key}.{k}")
        ]
    return [] if old == new else [(key, old, new)]


def _validated_already(module, best: str | None) -> bool:
    """Whether the last validation of the fit already scored ``best`` (the default run validates
    once, after its last step, and that checkpoint is the best): no second pass over the videos."""
    from visstg.inference import read_checkpoint

    if best is None or module.validated_step is None or not module.validator.last_metrics:
        return False
    ckpt = read_checkpoint(Path(best), mmap=True)
    return ckpt.get("global_step") == module.validated_step


def write_run_summary(output_dir: Path, out: dict[str, Any]) -> Path:
    """``metrics.json`` in the run directory: final validation metrics, checkpoints, steps.

    Sweeps read it (:mod:`visstg.sweep`) to tabulate every run.
    """
    val = {k: v for k, v in (out.get("val_metrics") or {}).items() if not k.startswith("_")}
    summary = {
        "val": val,
        "best_ckpt": out.get("best_ckpt"),
        "last_ckpt": out.get("last_ckpt"),
        "evaluated_ckpt": out.get("evaluated_ckpt"),
        "global_step": out.get("global_step"),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Before torch starts its threads (they spin on an idle machine, wait passively on a busy one).
    if choose_openmp_wait_policy():
        print("other processes are using the CPU: OMP_WAIT_POLICY=PASSIVE")
    from visstg.cli import exit_on_user_error

    result = exit_on_user_error(train, cfg)
    val = result.get("val_metrics")
    if val:
        from visstg.eval import format_table

        print(f"\nValidation ({cfg.data.name} {cfg.data.val_split}, {result['evaluated_ckpt']}):")
        print(format_table(val))
    print(f"best checkpoint: {result.get('best_ckpt')}")
    print(f"last checkpoint: {result.get('last_ckpt')}")
    # The sweeper (and users scripting sweeps) read the validation AP from the return value.
    return (val or {}).get("AP", result["metrics"].get("val/AP"))


if __name__ == "__main__":
    main()
