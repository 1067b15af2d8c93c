"""Every config group option composes and resolves (Hydra compose API), +experiment=r50 included."""

from __future__ import annotations

import pytest

from visstg.config import CONFIG_DIR, compose, resolved

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONFIG_DIR / group).glob("*.yaml"))]


def _resolved(overrides: list[str]) -> dict:
    return resolved(compose("train", overrides))


def test_every_group_has_options() -> None:
    for group in ("data", "trainer", "logger", "experiment"):
        assert (group, "default") in OPTIONS or any(g == group for g, _ in OPTIONS), group
    assert {o for g, o in OPTIONS if g == "data"} >= {"synthetic", "ytvis2019", "ytvis2021", "ovis"}
    assert {o for g, o in OPTIONS if g == "trainer"} >= {"cpu", "gpu", "ddp", "ddp_sim"}
    assert {o for g, o in OPTIONS if g == "logger"} >= {"wandb", "csv", "none"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_resolves(group: str, option: str) -> None:
    if group == "experiment":
        cfg = _resolved([f"+experiment={option}"])
    elif group == "trainer" and option == "default":
        pytest.skip("base file of the trainer group, composed through every other trainer")
    else:
        cfg = _resolved([f"{group}={option}"])
    assert cfg["data"]["num_classes"] > 0


def test_default_is_synthetic_on_cpu() -> None:
    cfg = _resolved([])
    assert cfg["data"]["name"] == "synthetic" and cfg["trainer"]["accelerator"] == "cpu"
    assert cfg["logger"]["offline"] is True


def test_r50_experiment_is_the_paper_setup() -> None:
    cfg = _resolved(["+experiment=r50"])
    assert cfg["data"]["name"] == "ytvis2019" and cfg["data"]["num_classes"] == 40
    assert cfg["data"]["batch_size"] == 16
