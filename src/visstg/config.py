"""Where the Hydra configuration lives and helpers to compose it outside the entry points."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["CONFIG_DIR", "register_resolvers", "compose", "resolved"]

# The package is installed editable from src/, so the repository's conf/ sits two levels up.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def register_resolvers() -> None:
    """Register the OmegaConf resolvers the configs use (idempotent)."""
    if not OmegaConf.has_resolver("eval"):
        # Arithmetic in configs, e.g. the linear learning-rate scaling with the batch size.
        OmegaConf.register_new_resolver("eval", eval)


def compose(config_name: str = "train", overrides: list[str] | None = None):
    """Compose a config with Hydra's compose API (tests, notebooks). ``hydra:`` keys unresolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return hydra_compose(config_name, overrides=overrides or [], return_hydra_config=True)


def resolved(cfg) -> dict:
    """A composed config as a plain dict, resolved, without the ``hydra`` node.

    ``${hydra:...}`` interpolations (``paths.output_dir``) resolve against ``cfg.hydra``.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    HydraConfig.instance().set_config(cfg)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return OmegaConf.to_container(cfg, resolve=True)
